"""The plugin's side of the agent API: one RPC per CNI command, with gRPC
status codes mapped to CNI error codes in one place."""

from . import grpc_unary as g
from . import wire
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

    def call(self, method: str, request: bytes) -> bytes:
        try:
            return g.unary_call(self.socket_path, _SERVICE + method, request, self.timeout)
        except g.RpcError as exc:
            code = _CNI_CODE.get(exc.code, AGENT_ERROR)
            if code == TRY_AGAIN_LATER:
                raise CniError(code, "ambit agent is not reachable, try again later", exc.message) from None
            raise CniError(code, exc.message or f"agent failed {method}", f"gRPC status {exc.code}") from None

    def enrol(self, request: bytes) -> dict:
        return wire.enrol_pod_response(self.call("EnrolPod", request))

    def release(self, request: bytes) -> dict:
        return wire.release_pod_response(self.call("ReleasePod", request))

    def check(self, request: bytes) -> None:
        self.call("CheckPod", request)

    def gc(self, request: bytes) -> list[str]:
        return wire.garbage_collect_response(self.call("GarbageCollect", request))

    def status(self) -> dict:
        """STATUS: any failure to reach the agent means "not available" (50)."""
        try:
            return wire.plugin_status_response(self.call("PluginStatus", b""))
        except CniError as exc:
            raise CniError(NOT_AVAILABLE, "ambit agent is not available", exc.details or exc.msg) from None
