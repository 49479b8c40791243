"""Read-only views for ambitctl."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ambit.api.v1 import agent_pb2 as pb
from ambit.api.v1 import agent_pb2_grpc as pb_grpc

from .. import __version__
from ..enrolment import Enrolment
from ..proxy.connections import ConnectionInfo


@dataclass(frozen=True)
class ProxyView:
    """What the Debug service may read of the running proxy."""

    capture: str
    proxy_netns: str
    listeners: Callable[[], list[str]]
    connections: Callable[[], tuple[ConnectionInfo, ...]]
    discovery: str = "none"
    discovery_synced: bool = False
    discovered_pods: int = 0


NO_PROXY = ProxyView(capture="none", proxy_netns="", listeners=lambda: [], connections=lambda: ())


class DebugService(pb_grpc.DebugServicer):
    def __init__(self, enrolment: Enrolment, node: str, started_at: float,
                 readiness: Callable[[], tuple[bool, str]], proxy: Callable[[], ProxyView] = lambda: NO_PROXY) -> None:
        self.enrolment = enrolment
        self.node = node
        self.started_at = started_at
        self.readiness = readiness
        self.proxy = proxy

    async def ListWorkloads(self, request: pb.ListWorkloadsRequest, context) -> pb.ListWorkloadsResponse:
        return pb.ListWorkloadsResponse(workloads=[w.to_proto() for w in self.enrolment.workloads()])

    async def AgentStatus(self, request: pb.AgentStatusRequest, context) -> pb.AgentStatusResponse:
        ready, reason = self.readiness()
        proxy = self.proxy()
        return pb.AgentStatusResponse(version=__version__, node=self.node, started_at=self.started_at,
                                      enrolled=self.enrolment.enrolled_count(), ready=ready, reason=reason,
                                      capture=proxy.capture, listeners=proxy.listeners(),
                                      proxy_netns=proxy.proxy_netns, live_connections=len(proxy.connections()),
                                      discovery=proxy.discovery, discovery_synced=proxy.discovery_synced,
                                      discovered_pods=proxy.discovered_pods)

    async def ListConnections(self, request: pb.ListConnectionsRequest, context) -> pb.ListConnectionsResponse:
        return pb.ListConnectionsResponse(connections=[
            pb.Connection(id=c.id, listener=c.listener.value, client=str(c.client),
                          original_destination=str(c.original_dst), source_identity=c.source_identity,
                          destination_identity=c.destination_identity, bytes_sent=c.bytes_to_upstream,
                          bytes_received=c.bytes_to_client, started_at=c.started_at, state=c.state.value,
                          decision=c.decision, reason=c.reason, via=c.via)
            for c in self.proxy().connections()])
