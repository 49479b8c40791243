"""ambit-cni's stdlib gRPC client against the real thing: its HPACK decoder
against the `hpack` library's encoder, and unary_call against a real grpc.aio
server serving the generated CNI service on a Unix socket, plus the broken
peers a node shows (no agent, a hung agent, an agent that hangs up)."""
from __future__ import annotations

import asyncio
import random
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import grpc
import hpack
import pytest

from ambit.api.v1 import agent_pb2 as pb
from ambit.api.v1 import agent_pb2_grpc as pb_grpc
from ambit.cni import grpc_unary as g
from ambit.cni import spec
from ambit.cni.agent_client import AgentClient
from ambit.cni.grpc_unary import HeaderDecoder, RpcError, unary_call
from ambit.cni.spec import CniError

ENROL = "/ambit.agent.v1.CNI/EnrolPod"
STATUS = "/ambit.agent.v1.CNI/PluginStatus"


# -- HPACK --------------------------------------------------------------------------

def _as_bytes(headers: list[tuple[str | bytes, str | bytes]]) -> list[tuple[bytes, bytes]]:
    return [(n.encode() if isinstance(n, str) else n, v.encode() if isinstance(v, str) else v)
            for n, v in headers]


RESPONSE_HEADERS = [(":status", "200"), ("content-type", "application/grpc"),
                    ("grpc-accept-encoding", "identity,deflate,gzip"), ("x-node", "node-1")]
TRAILERS = [("grpc-status", "5"), ("grpc-message", "no pod %C3%A9t%C3%A9 here"),
            ("x-long", "v" * 300), ("x-" + "n" * 200, "long name")]


@pytest.mark.parametrize("huffman", [True, False], ids=["huffman", "plain"])
def test_decoder_matches_hpack_encoder_across_blocks(huffman: bool) -> None:
    """Two blocks on one connection: the second refers to the first's dynamic
    table entries, as a real server's trailers and later responses do."""
    encoder, decoder = hpack.Encoder(), HeaderDecoder()
    first = encoder.encode(RESPONSE_HEADERS, huffman=huffman)
    second = encoder.encode(RESPONSE_HEADERS + TRAILERS, huffman=huffman)
    # The repeated headers are one-byte indexes (static or dynamic table).
    assert all(b & 0x80 for b in second[:len(RESPONSE_HEADERS)]) and second[1] >= 0x80 + 62
    assert decoder.decode(first) == _as_bytes(RESPONSE_HEADERS)
    assert decoder.decode(second) == _as_bytes(RESPONSE_HEADERS + TRAILERS)
    # The repeated block is nothing but indexes into the dynamic table.
    third = encoder.encode(RESPONSE_HEADERS, huffman=huffman)
    assert all(b & 0x80 for b in third)
    assert decoder.decode(third) == _as_bytes(RESPONSE_HEADERS)


def test_decoder_handles_huffman_non_ascii_and_never_indexed() -> None:
    headers = [(":status", "200"), ("grpc-message", "h\u00e9llo w\u00f6rld".encode()),
               hpack.NeverIndexedHeaderTuple("authorization", "secret-token"),
               ("x-empty", ""), ("x-bin-bin", bytes(range(256)))]
    block = hpack.Encoder().encode(headers, huffman=True)
    assert HeaderDecoder().decode(block) == [(bytes(h[0], "ascii"), h[1] if isinstance(h[1], bytes)
                                              else h[1].encode()) for h in headers]


@pytest.mark.parametrize("sizes", [[0, 4096], [64], [100, 200, 4096], [0]])
def test_decoder_follows_table_size_updates(sizes: list[int]) -> None:
    encoder, decoder = hpack.Encoder(), HeaderDecoder()
    assert decoder.decode(encoder.encode(RESPONSE_HEADERS + TRAILERS)) == _as_bytes(RESPONSE_HEADERS + TRAILERS)
    for size in sizes:
        encoder.header_table_size = size
        block = encoder.encode(RESPONSE_HEADERS + TRAILERS)
        assert block[0] & 0xE0 == 0x20, "the block must start with a table size update"
        assert decoder.decode(block) == _as_bytes(RESPONSE_HEADERS + TRAILERS)
        assert decoder.decode(encoder.encode(TRAILERS)) == _as_bytes(TRAILERS)


def test_table_size_update_evicts_entries() -> None:
    """After a size update to 0 the dynamic table is empty: an index into it
    is a protocol error, not a stale header."""
    decoder = HeaderDecoder()
    decoder.decode(hpack.Encoder().encode([("x-node", "node-1")]))
    assert decoder.decode(b"\xbe") == [(b"x-node", b"node-1")]  # index 62: first dynamic entry
    with pytest.raises(ValueError):
        decoder.decode(b"\x20\xbe")  # size update to 0, then index 62


def test_decoder_evicts_oldest_entries_when_full() -> None:
    encoder, decoder = hpack.Encoder(), HeaderDecoder()
    encoder.header_table_size = 200
    rng = random.Random(7)
    for round_ in range(30):
        headers = [(f"x-h{rng.randrange(12)}", "v" * rng.randrange(40)) for _ in range(rng.randrange(1, 6))]
        assert decoder.decode(encoder.encode(headers)) == _as_bytes(headers), round_


@pytest.mark.parametrize("block", [b"\x80", b"\xff\x00", b"\x40\x85ab", b"\x00\x01"],
                         ids=["index-0", "index-past-tables", "truncated-string", "truncated-value"])
def test_decoder_rejects_broken_blocks(block: bytes) -> None:
    with pytest.raises((ValueError, IndexError)):
        HeaderDecoder().decode(block)


# -- a real grpc.aio agent in a thread ---------------------------------------------

class FakeCniServicer(pb_grpc.CNIServicer):
    """Answers like the agent; `fail` makes a method abort with a status, `delay` makes it slow."""

    def __init__(self) -> None:
        self.fail: dict[str, tuple[grpc.StatusCode, str]] = {}
        self.delay: dict[str, float] = {}
        self.seen: list[tuple[str, dict[str, str], float | None]] = []
        self.gc_repeat = 1

    async def _enter(self, method: str, context) -> None:
        self.seen.append((method, dict(context.invocation_metadata()), context.time_remaining()))
        if method in self.delay:
            await asyncio.sleep(self.delay[method])
        if method in self.fail:
            await context.abort(*self.fail[method])

    async def EnrolPod(self, request: pb.EnrolPodRequest, context) -> pb.EnrolPodResponse:
        await self._enter("EnrolPod", context)
        return pb.EnrolPodResponse(enrolled=True, reason=f"hello {request.pod.name}", workload=pb.Workload(
            attachment=request.attachment, netns=request.netns, pod=request.pod, ips=request.ips,
            network=request.network, host_veth="veth1234", host_veth_ifindex=17, capture="recorded"))

    async def ReleasePod(self, request: pb.ReleasePodRequest, context) -> pb.ReleasePodResponse:
        await self._enter("ReleasePod", context)
        return pb.ReleasePodResponse(released=True)

    async def CheckPod(self, request: pb.CheckPodRequest, context) -> pb.CheckPodResponse:
        await self._enter("CheckPod", context)
        return pb.CheckPodResponse()

    async def PluginStatus(self, request: pb.PluginStatusRequest, context) -> pb.PluginStatusResponse:
        await self._enter("PluginStatus", context)
        return pb.PluginStatusResponse(ready=True, reason="ready")

    async def GarbageCollect(self, request: pb.GarbageCollectRequest, context) -> pb.GarbageCollectResponse:
        await self._enter("GarbageCollect", context)
        return pb.GarbageCollectResponse(released=list(request.valid) * self.gc_repeat)


class AioServer:
    """grpc.aio server on its own event loop thread, so the blocking client
    under test can run on the test's thread."""

    def __init__(self, socket_path: str, servicer: FakeCniServicer) -> None:
        self.socket_path = socket_path
        self.servicer = servicer
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: grpc.aio.Server | None = None

    async def _start(self) -> None:
        self.server = grpc.aio.server()
        pb_grpc.add_CNIServicer_to_server(self.servicer, self.server)
        self.server.add_insecure_port(f"unix:{self.socket_path}")
        await self.server.start()

    def start(self) -> "AioServer":
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def stop(self) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def servicer() -> FakeCniServicer:
    return FakeCniServicer()


@pytest.fixture
def agent(tmp_path: Path, servicer: FakeCniServicer) -> Iterator[AioServer]:
    server = AioServer(str(tmp_path / "agent.sock"), servicer).start()
    try:
        yield server
    finally:
        server.stop()


class SilentPeer:
    """A Unix socket that accepts and then never says a word (a wedged agent),
    or hangs up at once (`close=True`)."""

    def __init__(self, path: str, close: bool = False) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(8)
        self.close_at_once = close
        self.accepted: list[socket.socket] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(0.05)
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except (socket.timeout, OSError):
                continue
            if self.close_at_once:
                conn.close()
            else:
                self.accepted.append(conn)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        for conn in self.accepted:
            conn.close()
        self.listener.close()


@pytest.fixture
def silent_peer(tmp_path: Path) -> Iterator[SilentPeer]:
    peer = SilentPeer(str(tmp_path / "hung.sock"))
    try:
        yield peer
    finally:
        peer.close()


@pytest.fixture
def hangup_peer(tmp_path: Path) -> Iterator[SilentPeer]:
    peer = SilentPeer(str(tmp_path / "hangup.sock"), close=True)
    try:
        yield peer
    finally:
        peer.close()


def _enrol_request(n_ips: int = 2) -> pb.EnrolPodRequest:
    return pb.EnrolPodRequest(
        attachment=pb.Attachment(container_id="c0ffee" * 10, ifname="eth0"), netns="/var/run/netns/p1",
        pod=pb.PodRef(namespace="shop", name="caf\u00e9-0", uid="u-1"),
        ips=[f"10.248.{i // 250}.{i % 250 + 1}/16" for i in range(n_ips)], network="podnet")


# -- unary_call ---------------------------------------------------------------------

def test_round_trip(agent: AioServer, servicer: FakeCniServicer) -> None:
    request = _enrol_request()
    raw = unary_call(agent.socket_path, ENROL, request.SerializeToString(), timeout=5.0)
    reply = pb.EnrolPodResponse.FromString(raw)
    assert reply.enrolled and reply.reason == "hello caf\u00e9-0"
    assert list(reply.workload.ips) == list(request.ips)
    assert reply.workload.attachment == request.attachment and reply.workload.host_veth == "veth1234"
    method, metadata, remaining = servicer.seen[-1]
    assert method == "EnrolPod"
    assert metadata["user-agent"].startswith("ambit-cni")
    assert remaining is not None and 3.0 < remaining <= 5.0, "grpc-timeout must reach the server"


def test_sequential_calls_each_get_an_answer(agent: AioServer) -> None:
    for _ in range(20):
        raw = unary_call(agent.socket_path, STATUS, b"", timeout=5.0)
        assert pb.PluginStatusResponse.FromString(raw).ready


def test_request_spanning_several_data_frames(agent: AioServer) -> None:
    request = _enrol_request(2500)
    assert 16384 < request.ByteSize() < 65535, "needs more than one 16 KiB DATA frame"
    raw = unary_call(agent.socket_path, ENROL, request.SerializeToString(), timeout=5.0)
    assert list(pb.EnrolPodResponse.FromString(raw).workload.ips) == list(request.ips)


def test_response_larger_than_the_initial_window(agent: AioServer, servicer: FakeCniServicer) -> None:
    """More than 65535 bytes back: the server can only finish when the client
    sends WINDOW_UPDATEs for what it has read."""
    servicer.gc_repeat = 3
    valid = [pb.Attachment(container_id=f"{i:064x}", ifname="eth0") for i in range(700)]
    request = pb.GarbageCollectRequest(valid=valid, network="podnet")
    assert request.ByteSize() < 65535
    raw = unary_call(agent.socket_path, "/ambit.agent.v1.CNI/GarbageCollect", request.SerializeToString(), 5.0)
    assert len(raw) > 65535
    reply = pb.GarbageCollectResponse.FromString(raw)
    assert len(reply.released) == 3 * 700 and reply.released[-1].container_id == f"{699:064x}"


def test_request_larger_than_the_window_is_refused_locally(agent: AioServer) -> None:
    with pytest.raises(RpcError) as info:
        unary_call(agent.socket_path, ENROL, _enrol_request(8000).SerializeToString(), timeout=5.0)
    assert info.value.code == g.INTERNAL


def test_error_status_with_non_ascii_message(agent: AioServer, servicer: FakeCniServicer) -> None:
    message = "pod caf\u00e9-0 has no interface \u201ceth0\u201d: 100% gone"
    servicer.fail["EnrolPod"] = (grpc.StatusCode.NOT_FOUND, message)
    with pytest.raises(RpcError) as info:
        unary_call(agent.socket_path, ENROL, _enrol_request().SerializeToString(), timeout=5.0)
    assert info.value.code == g.NOT_FOUND
    assert info.value.message == message


def test_unknown_method_is_unimplemented(agent: AioServer) -> None:
    with pytest.raises(RpcError) as info:
        unary_call(agent.socket_path, "/ambit.agent.v1.CNI/Nope", b"", timeout=5.0)
    assert info.value.code == grpc.StatusCode.UNIMPLEMENTED.value[0]


def test_no_socket_file_is_unavailable(tmp_path: Path) -> None:
    path = str(tmp_path / "missing.sock")
    with pytest.raises(RpcError) as info:
        unary_call(path, STATUS, b"", timeout=2.0)
    assert info.value.code == g.UNAVAILABLE and path in info.value.message


def test_socket_file_nobody_listens_on_is_unavailable(tmp_path: Path) -> None:
    path = str(tmp_path / "stale.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    with pytest.raises(RpcError) as info:
        unary_call(path, STATUS, b"", timeout=2.0)
    assert info.value.code == g.UNAVAILABLE


@pytest.mark.parametrize("where", ["under-a-file", "directory", "regular-file"])
def test_socket_path_that_cannot_be_a_socket_is_unavailable(tmp_path: Path, where: str) -> None:
    """Whatever is wrong with the path, the agent is not there: UNAVAILABLE
    (CNI 11, and DEL succeeds), never an unexpected exception."""
    (tmp_path / "file").write_text("x")
    path = {"under-a-file": tmp_path / "file" / "agent.sock", "directory": tmp_path,
            "regular-file": tmp_path / "file"}[where]
    with pytest.raises(RpcError) as info:
        unary_call(str(path), STATUS, b"", timeout=2.0)
    assert info.value.code == g.UNAVAILABLE and str(path) in info.value.message


@pytest.mark.parametrize("timeout", [0.3, 1.0])
def test_hung_agent_is_deadline_exceeded_within_the_timeout(silent_peer: SilentPeer, timeout: float) -> None:
    started = time.monotonic()
    with pytest.raises(RpcError) as info:
        unary_call(silent_peer.listener.getsockname(), STATUS, b"", timeout=timeout)
    elapsed = time.monotonic() - started
    assert info.value.code == g.DEADLINE_EXCEEDED
    assert timeout * 0.9 <= elapsed < timeout + 0.5


def test_slow_agent_is_deadline_exceeded(agent: AioServer, servicer: FakeCniServicer) -> None:
    servicer.delay["PluginStatus"] = 3.0
    started = time.monotonic()
    with pytest.raises(RpcError) as info:
        unary_call(agent.socket_path, STATUS, b"", timeout=0.5)
    assert info.value.code == g.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("grace", [0.0, 0.3])
def test_agent_stopping_mid_call_is_unavailable(tmp_path: Path, servicer: FakeCniServicer, grace: float) -> None:
    """An agent restarting while a pod is added: the runtime must hear "try
    again" (UNAVAILABLE -> CNI 11), not an internal error."""
    servicer.delay["PluginStatus"] = 3.0
    server = AioServer(str(tmp_path / "agent.sock"), servicer).start()
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["reply"] = unary_call(server.socket_path, STATUS, b"", timeout=5.0)
        except RpcError as exc:
            outcome["error"] = exc
    caller = threading.Thread(target=call)
    try:
        caller.start()
        deadline = time.monotonic() + 5
        while not servicer.seen and time.monotonic() < deadline:
            time.sleep(0.01)
        assert servicer.seen, "the call never reached the server"
        asyncio.run_coroutine_threadsafe(server.server.stop(grace), server.loop).result(10)
        caller.join(10)
    finally:
        server.stop()
    assert "error" in outcome, outcome
    assert outcome["error"].code == g.UNAVAILABLE, outcome["error"]


def test_agent_that_hangs_up_is_unavailable(hangup_peer: SilentPeer) -> None:
    started = time.monotonic()
    with pytest.raises(RpcError) as info:
        unary_call(hangup_peer.listener.getsockname(), STATUS, b"", timeout=5.0)
    assert info.value.code == g.UNAVAILABLE
    assert time.monotonic() - started < 2.0, "a hang-up must not wait for the deadline"


# -- AgentClient: gRPC status -> CNI error code --------------------------------------

@pytest.mark.parametrize("status, cni_code", [
    (grpc.StatusCode.UNAVAILABLE, spec.TRY_AGAIN_LATER),
    (grpc.StatusCode.DEADLINE_EXCEEDED, spec.TRY_AGAIN_LATER),
    (grpc.StatusCode.NOT_FOUND, spec.UNKNOWN_CONTAINER),
    (grpc.StatusCode.INVALID_ARGUMENT, spec.INVALID_CONFIG),
    (grpc.StatusCode.FAILED_PRECONDITION, spec.INVALID_CONFIG),
    (grpc.StatusCode.INTERNAL, spec.AGENT_ERROR),
    (grpc.StatusCode.PERMISSION_DENIED, spec.AGENT_ERROR),
])
@pytest.mark.parametrize("method", ["EnrolPod", "ReleasePod", "CheckPod", "GarbageCollect"])
def test_agent_errors_map_to_cni_codes(agent: AioServer, servicer: FakeCniServicer, method: str,
                                       status: grpc.StatusCode, cni_code: int) -> None:
    servicer.fail[method] = (status, f"agent says no to {method}")
    client = AgentClient(agent.socket_path, timeout=5.0)
    call = {"EnrolPod": lambda: client.enrol(_enrol_request().SerializeToString()),
            "ReleasePod": lambda: client.release(pb.ReleasePodRequest().SerializeToString()),
            "CheckPod": lambda: client.check(pb.CheckPodRequest().SerializeToString()),
            "GarbageCollect": lambda: client.gc(pb.GarbageCollectRequest().SerializeToString())}[method]
    with pytest.raises(CniError) as info:
        call()
    assert info.value.code == cni_code
    if cni_code == spec.TRY_AGAIN_LATER:
        assert "try again" in info.value.msg and method in info.value.details
    else:
        assert info.value.msg == f"agent says no to {method}"
        assert str(status.value[0]) in info.value.details


def test_agent_client_success(agent: AioServer) -> None:
    client = AgentClient(agent.socket_path, timeout=5.0)
    assert client.enrol(_enrol_request().SerializeToString()) == \
        {"enrolled": True, "reason": "hello caf\u00e9-0", "host_veth": "veth1234"}
    assert client.release(pb.ReleasePodRequest().SerializeToString()) == {"released": True}
    assert client.status() == {"ready": True, "reason": "ready"}
    valid = [pb.Attachment(container_id="a", ifname="eth0"), pb.Attachment(container_id="b", ifname="net1")]
    assert client.gc(pb.GarbageCollectRequest(valid=valid).SerializeToString()) == ["a", "b"]


def test_agent_client_unreachable_is_try_again(tmp_path: Path, silent_peer: SilentPeer) -> None:
    for path in (str(tmp_path / "none.sock"), silent_peer.listener.getsockname()):
        with pytest.raises(CniError) as info:
            AgentClient(path, timeout=0.3).enrol(_enrol_request().SerializeToString())
        assert info.value.code == spec.TRY_AGAIN_LATER


@pytest.mark.parametrize("peer", ["missing", "silent", "hangup", "error"])
def test_status_unreachable_is_not_available(request: pytest.FixtureRequest, tmp_path: Path, peer: str) -> None:
    if peer == "missing":
        path = str(tmp_path / "none.sock")
    elif peer == "error":
        server: AioServer = request.getfixturevalue("agent")
        server.servicer.fail["PluginStatus"] = (grpc.StatusCode.INTERNAL, "boom")
        path = server.socket_path
    else:
        path = request.getfixturevalue(f"{peer}_peer").listener.getsockname()
    with pytest.raises(CniError) as info:
        AgentClient(path, timeout=0.3).status()
    assert info.value.code == spec.NOT_AVAILABLE
    assert info.value.msg == "ambit agent is not available" and info.value.details
