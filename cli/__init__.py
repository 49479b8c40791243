"""The `ambit` command: one dispatcher for the tools built around the agent (lab, waypoint, ca, install-cni)."""
