"""The agent's own lifecycle: handing a node over to a successor, draining,
and squaring records with the kernel and discovery (docs/lifecycle.md)."""
