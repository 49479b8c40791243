"""Where a captured connection goes, decided from the cluster state alone.

Pure logic (no sockets), so every rule is unit-tested:

  outbound (15001), client = an enrolled pod on this node
    - destination is a Service VIP:port -> pick a ready endpoint (even
      spread), map port -> targetPort; none ready -> refuse
    - destination pod unknown or not in the mesh -> passthrough: plain TCP
      from the client's IP, as if there were no mesh
    - destination pod on this node -> local: inbound policy in-process, then
      plain TCP from the client's IP (it never leaves the node)
    - destination pod on another node -> HBONE to <pod IP>:15008 with
      CONNECT <pod IP>:<port>, expecting the pod's identity
  A client the state does not know has no identity to present: refuse
  (fail closed) rather than send it in plaintext.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from ..discovery.balance import EvenSpread
from ..discovery.model import PodInfo
from ..discovery.state import ClusterState
from ..identity.spiffe import SpiffeId


class Route(enum.Enum):
    LOCAL = "local"              # same node: policy in-process, plain TCP
    HBONE = "hbone"              # other node: mTLS tunnel to the pod's 15008
    PASSTHROUGH = "passthrough"  # not a mesh destination: plain TCP
    REFUSE = "refuse"            # nothing sensible to do: reset the client


@dataclass(frozen=True)
class OutboundPlan:
    route: Route
    reason: str
    dst_ip: str
    dst_port: int
    source: PodInfo | None = None
    source_identity: SpiffeId | None = None
    destination: PodInfo | None = None
    destination_identity: SpiffeId | None = None
    service: str | None = None   # "namespace/name" when dialled through a Service


class OutboundRouter:
    def __init__(self, state: ClusterState, node_name: str, trust_domain: str) -> None:
        self.state = state
        self.node_name = node_name
        self.trust_domain = trust_domain
        self._spread = EvenSpread()

    def identity(self, pod: PodInfo) -> SpiffeId:
        return self.state.identity(pod, self.trust_domain)

    def plan(self, client_ip: str, dst_ip: str, dst_port: int, dry_run: bool = False) -> OutboundPlan:
        """dry_run: decide without advancing the Service spread (ambitctl trace)."""
        source = self.state.pod_by_ip(client_ip)
        if source is None:
            return OutboundPlan(Route.REFUSE, f"source {client_ip} is not a known pod: no identity to present",
                                dst_ip, dst_port)
        source_identity = self.identity(source)
        service = None
        found = self.state.service_for(dst_ip, dst_port)
        if found is not None:
            svc, port = found
            service = f"{svc.namespace}/{svc.name}"
            choose = self._spread.peek if dry_run else self._spread.pick
            endpoint = choose((svc.namespace, svc.name, port.port), self.state.endpoints(svc, port))
            if endpoint is None:
                return OutboundPlan(Route.REFUSE, f"service {service} port {dst_port} has no ready endpoint",
                                    dst_ip, dst_port, source, source_identity, service=service)
            dst_ip, dst_port = endpoint.ip, endpoint.target_port
        destination = self.state.pod_by_ip(dst_ip)
        if destination is None:
            return OutboundPlan(Route.PASSTHROUGH, "destination is not a known pod", dst_ip, dst_port, source,
                                source_identity, service=service)
        in_mesh, why = self.state.ambient_decision(destination)
        if not in_mesh:
            return OutboundPlan(Route.PASSTHROUGH, f"destination is not in the mesh ({why})", dst_ip, dst_port,
                                source, source_identity, destination, service=service)
        destination_identity = self.identity(destination)
        if destination.node_name == self.node_name:
            return OutboundPlan(Route.LOCAL, "destination is on this node", dst_ip, dst_port, source,
                                source_identity, destination, destination_identity, service)
        return OutboundPlan(Route.HBONE, f"destination is on node {destination.node_name or '?'}", dst_ip,
                            dst_port, source, source_identity, destination, destination_identity, service)
