"""Read-only views for ambitctl."""
from __future__ import annotations

from typing import Callable

from ambit.api.v1 import agent_pb2 as pb
from ambit.api.v1 import agent_pb2_grpc as pb_grpc

from .. import __version__
from ..enrolment import Enrolment


class DebugService(pb_grpc.DebugServicer):
    def __init__(self, enrolment: Enrolment, node: str, started_at: float,
                 readiness: Callable[[], tuple[bool, str]]) -> None:
        self.enrolment = enrolment
        self.node = node
        self.started_at = started_at
        self.readiness = readiness

    async def ListWorkloads(self, request: pb.ListWorkloadsRequest, context) -> pb.ListWorkloadsResponse:
        return pb.ListWorkloadsResponse(workloads=[w.to_proto() for w in self.enrolment.workloads()])

    async def AgentStatus(self, request: pb.AgentStatusRequest, context) -> pb.AgentStatusResponse:
        ready, reason = self.readiness()
        return pb.AgentStatusResponse(version=__version__, node=self.node, started_at=self.started_at,
                                      enrolled=len(self.enrolment.workloads()), ready=ready, reason=reason)
