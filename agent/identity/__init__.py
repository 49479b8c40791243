"""Workload identities: SPIFFE IDs, keys made here, certificates from a CA (Istio's API or a local key), TLS contexts."""
