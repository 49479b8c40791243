"""The agent API's own unary gRPC server (agent/rpc/unary.py) against both
real clients: grpcio (ambitctl's) and ambit-cni's standard-library client.
Answers, refusals with their status and message, unknown methods, handler
bugs, answers larger than HTTP/2's initial window, the health service, and a
client that goes away mid-call."""
from __future__ import annotations

import asyncio
import os
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ambit.agent import eventloop
from ambit.agent.rpc.server import AgentServer
from ambit.agent.grpc_wire import PlainEncoder
from ambit.agent.rpc.unary import CallContext, StatusCode
from ambit.api.v1 import agent_pb2 as pb
from ambit.api.v1 import agent_pb2_grpc as pb_grpc
from ambit.cni.grpc_unary import RpcError, unary_call

MANY = 5000  # workloads in one answer: well past the 64 KiB initial window


class Cni:
    async def PluginStatus(self, request: pb.PluginStatusRequest, context: CallContext) -> pb.PluginStatusResponse:
        return pb.PluginStatusResponse(ready=True, reason="ready")

    async def EnrolPod(self, request: pb.EnrolPodRequest, context: CallContext) -> pb.EnrolPodResponse:
        await context.abort(StatusCode.FAILED_PRECONDITION, f"pod {request.pod.name} été 100% refused")

    async def CheckPod(self, request: pb.CheckPodRequest, context: CallContext) -> pb.CheckPodResponse:
        raise RuntimeError("a bug in a handler")

    async def ReleasePod(self, request: pb.ReleasePodRequest, context: CallContext) -> pb.ReleasePodResponse:
        await asyncio.sleep(3600)  # a call its client gives up on
        raise AssertionError("unreachable")


class Debug:
    async def ListWorkloads(self, request: pb.ListWorkloadsRequest,
                            context: CallContext) -> pb.ListWorkloadsResponse:
        return pb.ListWorkloadsResponse(workloads=[
            pb.Workload(pod=pb.PodRef(namespace="ns", name=f"pod-{i}", uid="u" * 36), host_veth=f"veth{i:08x}")
            for i in range(MANY)])


@pytest.fixture(params=["uvloop", "asyncio"])
def server(request, tmp_path: Path) -> Iterator[str]:
    """The server on the agent's loop (uvloop) and on asyncio's."""
    path = str(tmp_path / "agent.sock")
    loop = eventloop.loop_factory(request.param)[1]()
    agent_server = AgentServer(path, Cni(), Debug())
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(agent_server.start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10), "the server did not start"
    try:
        yield path
    finally:
        asyncio.run_coroutine_threadsafe(agent_server.stop(grace=1.0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def channel(path: str) -> grpc.Channel:
    return grpc.insecure_channel(f"unix:{path}")


def test_the_socket_is_the_owners_alone(server: str) -> None:
    assert stat.S_IMODE(os.stat(server).st_mode) == 0o600


def test_answers_reach_both_clients(server: str) -> None:
    with channel(server) as ch:
        assert pb_grpc.CNIStub(ch).PluginStatus(pb.PluginStatusRequest(), timeout=5).ready
    raw = unary_call(server, "/ambit.agent.v1.CNI/PluginStatus", pb.PluginStatusRequest().SerializeToString(), 5)
    assert pb.PluginStatusResponse.FromString(raw) == pb.PluginStatusResponse(ready=True, reason="ready")


def test_a_refusal_keeps_its_status_and_message(server: str) -> None:
    request = pb.EnrolPodRequest(pod=pb.PodRef(name="web"))
    with channel(server) as ch, pytest.raises(grpc.RpcError) as grpc_error:
        pb_grpc.CNIStub(ch).EnrolPod(request, timeout=5)
    assert grpc_error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert grpc_error.value.details() == "pod web été 100% refused"
    with pytest.raises(RpcError) as plugin_error:
        unary_call(server, "/ambit.agent.v1.CNI/EnrolPod", request.SerializeToString(), 5)
    assert (plugin_error.value.code, plugin_error.value.message) == (9, "pod web été 100% refused")


def test_unknown_methods_and_handler_bugs_fail_the_call_not_the_server(server: str) -> None:
    with pytest.raises(RpcError) as unknown:
        unary_call(server, "/ambit.agent.v1.CNI/NoSuchCall", b"", 5)
    assert unknown.value.code == StatusCode.UNIMPLEMENTED
    with channel(server) as ch:
        with pytest.raises(grpc.RpcError) as bug:
            pb_grpc.CNIStub(ch).CheckPod(pb.CheckPodRequest(), timeout=5)
        assert bug.value.code() == grpc.StatusCode.UNKNOWN and "a bug in a handler" in bug.value.details()
        assert pb_grpc.CNIStub(ch).PluginStatus(pb.PluginStatusRequest(), timeout=5).ready


def test_an_answer_larger_than_the_initial_window_arrives_whole(server: str) -> None:
    with channel(server) as ch:
        reply = pb_grpc.DebugStub(ch).ListWorkloads(pb.ListWorkloadsRequest(), timeout=10)
    assert len(reply.workloads) == MANY and reply.workloads[-1].pod.name == f"pod-{MANY - 1}"
    assert reply.ByteSize() > 4 * 65535
    raw = unary_call(server, "/ambit.agent.v1.Debug/ListWorkloads", b"", 10)
    assert len(pb.ListWorkloadsResponse.FromString(raw).workloads) == MANY


def test_health_reports_the_server_and_each_service(server: str) -> None:
    with channel(server) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "ambit.agent.v1.CNI", "ambit.agent.v1.Debug"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as unknown:
            stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_client_that_gives_up_leaves_the_server_serving(server: str) -> None:
    with channel(server) as ch:
        with pytest.raises(grpc.RpcError) as late:
            pb_grpc.CNIStub(ch).ReleasePod(pb.ReleasePodRequest(), timeout=0.2)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(server)
    sock.sendall(b"GET / HTTP/1.1\r\n\r\n")  # not HTTP/2 at all
    sock.settimeout(5)
    while sock.recv(4096):
        pass
    sock.close()
    assert unary_call(server, "/ambit.agent.v1.CNI/PluginStatus", b"", 5) is not None


def test_header_values_are_literals_as_grpcio_sends_them() -> None:
    """ambit-cni decodes Huffman only on a rare path (it costs an import)."""
    block = PlainEncoder().encode([(b"content-type", b"application/grpc"), (b"grpc-status", b"0")])
    assert b"application/grpc" in block
