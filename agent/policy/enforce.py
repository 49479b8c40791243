"""Policy at the destination side, as the node proxy applies it: the
destination pod's AuthorizationPolicies and PeerAuthentication, evaluated
for one connection (HBONE peers with their verified identity, plaintext
peers with none).

The destination is attributed first (agent/discovery/attribution.py): an
address no workload can be attributed to is denied as an unknown
destination, as ztunnel does, never evaluated as a workload without
namespace or labels (which no namespace or selector policy would match).

A peer with an identity (HBONE) opens many connections to the same pod and
port: the verdict on (client IP, peer identity, destination IP, port) is
remembered with the policy generation and the destination pod object it was
made for, and reused (and logged again) only while both are the same. The
destination is still attributed on every connection, so a pod that went away
or changed (a new PodInfo) is decided afresh, and an unknown one fails closed.
"""
from __future__ import annotations

from typing import Any

import structlog

from ..discovery.attribution import Attributor
from ..discovery.state import ClusterState
from ..identity.spiffe import SpiffeId
from ..discovery.model import PodInfo
from .authz import UNKNOWN_DESTINATION, ConnectionAttributes, Decision, PolicyEngine

# Verdicts remembered (an entry is a few hundred bytes); emptied when full or when policy changes.
MAX_REMEMBERED_DECISIONS = 4096

_DecisionKey = tuple[str, SpiffeId, str, int]


class Authorizer:
    def __init__(self, state: ClusterState, engine: PolicyEngine, attributor: Attributor | None = None,
                 logger: Any = None) -> None:
        """`attributor`: the agent's, which knows its enrolment records; by default discovery alone."""
        self.state = state
        self.engine = engine
        self.attributor = attributor or Attributor(state)
        self._log: Any = logger if logger is not None else structlog.get_logger(__name__)
        # (client IP, peer, destination IP, port) -> (what it was decided on, and the verdict)
        self._decided: dict[_DecisionKey, tuple[PodInfo, ConnectionAttributes, Decision]] = {}
        self._decided_generation = engine.generation

    def check(self, *, source_ip: str, source_identity: SpiffeId | None, dst_ip: str, dst_port: int) -> Decision:
        destination = self.attributor.pod(dst_ip)
        if destination is None:
            decision = Decision(False, f"denied: unknown destination: {self.attributor.attribute(dst_ip).reason}",
                                fail_closed=UNKNOWN_DESTINATION)
            self._log.info("connection denied", reason=decision.reason, src=source_ip,
                           peer=str(source_identity) if source_identity else None, dst=f"{dst_ip}:{dst_port}")
            return decision
        if source_identity is None:  # plaintext: PeerAuthentication takes part, not remembered
            return self.engine.allows(ConnectionAttributes(
                source_ip=source_ip, destination_ip=dst_ip, destination_port=dst_port,
                destination_namespace=destination.namespace, destination_labels=destination.labels))
        engine = self.engine
        if self._decided_generation != engine.generation:
            self._decided.clear()
            self._decided_generation = engine.generation
        key = (source_ip, source_identity, dst_ip, dst_port)
        known = self._decided.get(key)
        if known is not None and known[0] is destination:
            engine.report(known[1], known[2])
            return known[2]
        conn = ConnectionAttributes(
            source_ip=source_ip, destination_ip=dst_ip, destination_port=dst_port,
            destination_namespace=destination.namespace, destination_labels=destination.labels,
            source_principal=str(source_identity))
        decision = engine.allows(conn)
        if len(self._decided) >= MAX_REMEMBERED_DECISIONS:
            self._decided.clear()
        self._decided[key] = (destination, conn, decision)
        return decision

    @property
    def generation(self) -> int:
        """Changes whenever the policies do (to re-check live connections)."""
        return self.engine.generation
