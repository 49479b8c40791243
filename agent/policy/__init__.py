"""L4 authorization: AuthorizationPolicy and PeerAuthentication as ztunnel enforces them."""
