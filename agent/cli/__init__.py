"""ambitctl: the agent's debug CLI over its socket, and the client it uses (the lab uses it too)."""
