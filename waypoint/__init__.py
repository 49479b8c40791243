"""The waypoint: an Envoy that takes L7 hand-offs from node proxies (`ambit waypoint`)."""
