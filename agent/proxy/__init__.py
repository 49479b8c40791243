"""The node proxy: transparent listeners, relay, HBONE client/server."""
