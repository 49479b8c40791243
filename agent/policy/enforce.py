"""Policy at the destination side, as the node proxy applies it: the
destination pod's AuthorizationPolicies and PeerAuthentication, evaluated
for one connection (HBONE peers with their verified identity, plaintext
peers with none)."""
from __future__ import annotations

from ..discovery.state import ClusterState
from ..identity.spiffe import SpiffeId
from .authz import ConnectionAttributes, Decision, PolicyEngine


class Authorizer:
    def __init__(self, state: ClusterState, engine: PolicyEngine) -> None:
        self.state = state
        self.engine = engine

    def check(self, *, source_ip: str, source_identity: SpiffeId | None, dst_ip: str, dst_port: int) -> Decision:
        destination = self.state.pod_by_ip(dst_ip)
        return self.engine.allows(ConnectionAttributes(
            source_ip=source_ip, destination_ip=dst_ip, destination_port=dst_port,
            destination_namespace=destination.namespace if destination else "",
            destination_labels=destination.labels if destination else {},
            source_principal=str(source_identity) if source_identity else None))

    @property
    def generation(self) -> int:
        """Changes whenever the policies do (to re-check live connections)."""
        return self.engine.generation
