"""ambitctl's connection to the agent socket (grpcio; the CLI is not on the
pod start-up path, unlike ambit-cni)."""
from __future__ import annotations

import os

import grpc

from ambit.api.v1 import agent_pb2 as pb
from ambit.api.v1 import agent_pb2_grpc as pb_grpc

DEFAULT_SOCKET = "/var/run/ambit/agent.sock"


class AgentUnavailable(Exception):
    """The agent is not running or not reachable on its socket."""


class AgentClient:
    def __init__(self, socket_path: str = DEFAULT_SOCKET, timeout: float = 5.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._channel = grpc.insecure_channel(f"unix:{socket_path}")
        self.debug = pb_grpc.DebugStub(self._channel)
        self.cni = pb_grpc.CNIStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "AgentClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method, request):
        if not os.path.exists(self.socket_path):
            raise AgentUnavailable(f"no agent socket at {self.socket_path}: is ambit-agent running on this node?")
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise AgentUnavailable(f"agent at {self.socket_path} is not answering: {exc.details()}") from None
            raise

    def status(self) -> pb.AgentStatusResponse:
        return self._call(self.debug.AgentStatus, pb.AgentStatusRequest())

    def connections(self) -> list[pb.Connection]:
        return list(self._call(self.debug.ListConnections, pb.ListConnectionsRequest()).connections)

    def policies(self, workload: str = "") -> pb.ListPoliciesResponse:
        return self._call(self.debug.ListPolicies, pb.ListPoliciesRequest(workload=workload))

    def certificates(self) -> pb.ListCertificatesResponse:
        return self._call(self.debug.ListCertificates, pb.ListCertificatesRequest())

    def trace(self, source_ip: str, destination_ip: str, destination_port: int) -> pb.TraceResponse:
        return self._call(self.debug.Trace, pb.TraceRequest(source_ip=source_ip, destination_ip=destination_ip,
                                                            destination_port=destination_port))

    def workloads(self) -> list[pb.Workload]:
        return list(self._call(self.debug.ListWorkloads, pb.ListWorkloadsRequest()).workloads)
