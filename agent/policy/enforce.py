"""Policy at the destination side, as the node proxy applies it: the
destination pod's AuthorizationPolicies and PeerAuthentication, evaluated
for one connection (HBONE peers with their verified identity, plaintext
peers with none).

The destination is attributed first (agent/discovery/attribution.py): an
address no workload can be attributed to is denied as an unknown
destination, as ztunnel does, never evaluated as a workload without
namespace or labels (which no namespace or selector policy would match).
"""
from __future__ import annotations

from typing import Any

import structlog

from ..discovery.attribution import Attributor
from ..discovery.state import ClusterState
from ..identity.spiffe import SpiffeId
from .authz import UNKNOWN_DESTINATION, ConnectionAttributes, Decision, PolicyEngine


class Authorizer:
    def __init__(self, state: ClusterState, engine: PolicyEngine, attributor: Attributor | None = None,
                 logger: Any = None) -> None:
        """`attributor`: the agent's, which knows its enrolment records; by default discovery alone."""
        self.state = state
        self.engine = engine
        self.attributor = attributor or Attributor(state)
        self._log: Any = logger if logger is not None else structlog.get_logger(__name__)

    def check(self, *, source_ip: str, source_identity: SpiffeId | None, dst_ip: str, dst_port: int) -> Decision:
        destination = self.attributor.pod(dst_ip)
        if destination is None:
            decision = Decision(False, f"denied: unknown destination: {self.attributor.attribute(dst_ip).reason}",
                                fail_closed=UNKNOWN_DESTINATION)
            self._log.info("connection denied", reason=decision.reason, src=source_ip,
                           peer=str(source_identity) if source_identity else None, dst=f"{dst_ip}:{dst_port}")
            return decision
        return self.engine.allows(ConnectionAttributes(
            source_ip=source_ip, destination_ip=dst_ip, destination_port=dst_port,
            destination_namespace=destination.namespace, destination_labels=destination.labels,
            source_principal=str(source_identity) if source_identity else None))

    @property
    def generation(self) -> int:
        """Changes whenever the policies do (to re-check live connections)."""
        return self.engine.generation
