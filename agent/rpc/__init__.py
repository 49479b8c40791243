"""gRPC services on the agent socket: CNI (plugin calls) and Debug (ambitctl)."""
