"""Read the agent's state over its real gRPC API (grpcio)."""
from __future__ import annotations

from ambit.agent.cli.client import AgentClient


def agent_status(socket: str):
    with AgentClient(socket, timeout=2.0) as client:
        return client.status()


def workloads(socket: str):
    with AgentClient(socket, timeout=5.0) as client:
        return client.workloads()
