"""Workload identities: SPIFFE IDs, the local CA, TLS contexts."""
