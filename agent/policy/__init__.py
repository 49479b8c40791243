"""L4 authorization: AuthorizationPolicy and PeerAuthentication as ztunnel enforces them.

The policy objects are parsed and validated by discovery (discovery/policy_model.py), with every
other cluster object; this package decides with them. It reads discovery, never the reverse:
ClusterState pushes policies into the engine through the small interfaces discovery/state.py
declares.
"""
