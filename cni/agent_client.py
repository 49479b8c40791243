"""The plugin's side of the agent API: one RPC per CNI command, with gRPC
status codes mapped to CNI error codes in one place."""
from __future__ import annotations

from ambit.api.v1 import agent_pb2 as pb

from . import grpc_unary as g
from .spec import (AGENT_ERROR, INVALID_CONFIG, NOT_AVAILABLE, TRY_AGAIN_LATER, UNKNOWN_CONTAINER,
                   CniError)

_SERVICE = "/ambit.agent.v1.CNI/"

# How an agent answer becomes a CNI error code (see proto/ambit/api/v1/agent.proto).
_CNI_CODE = {
    g.INVALID_ARGUMENT: INVALID_CONFIG,
    g.FAILED_PRECONDITION: INVALID_CONFIG,
    g.NOT_FOUND: UNKNOWN_CONTAINER,
    g.UNAVAILABLE: TRY_AGAIN_LATER,
    g.DEADLINE_EXCEEDED: TRY_AGAIN_LATER,
}


class AgentClient:
    def __init__(self, socket_path: str, timeout: float) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def _call(self, method: str, request, response_type):
        try:
            raw = g.unary_call(self.socket_path, _SERVICE + method, request.SerializeToString(), self.timeout)
        except g.RpcError as exc:
            code = _CNI_CODE.get(exc.code, AGENT_ERROR)
            if code == TRY_AGAIN_LATER:
                raise CniError(code, "ambit agent is not reachable, try again later", exc.message) from None
            raise CniError(code, exc.message or f"agent failed {method}", f"gRPC status {exc.code}") from None
        return response_type.FromString(raw)

    def enrol(self, request: pb.EnrolPodRequest) -> pb.EnrolPodResponse:
        return self._call("EnrolPod", request, pb.EnrolPodResponse)

    def release(self, request: pb.ReleasePodRequest) -> pb.ReleasePodResponse:
        return self._call("ReleasePod", request, pb.ReleasePodResponse)

    def check(self, request: pb.CheckPodRequest) -> pb.CheckPodResponse:
        return self._call("CheckPod", request, pb.CheckPodResponse)

    def gc(self, request: pb.GarbageCollectRequest) -> pb.GarbageCollectResponse:
        return self._call("GarbageCollect", request, pb.GarbageCollectResponse)

    def status(self) -> pb.PluginStatusResponse:
        """STATUS: any failure to reach the agent means "not available" (50)."""
        try:
            return self._call("PluginStatus", pb.PluginStatusRequest(), pb.PluginStatusResponse)
        except CniError as exc:
            raise CniError(NOT_AVAILABLE, "ambit agent is not available", exc.details or exc.msg) from None
