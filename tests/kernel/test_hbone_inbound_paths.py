"""The inbound HBONE server's two ways of setting up a tunnel (agent/proxy/inbound.py):

- inline, inside the handling of the read that brought the CONNECT, when nothing
  has to be waited for (a plain verdict, a socket at hand, connect(2) done inside
  the call: the agent's common case);
- in a task when something has to be waited for: an asynchronous policy hook, an
  asynchronous socket factory, or a connect still in progress.

Every case runs on each path and must give the same answers, counts, refusal
log lines and observer reports (what feeds the access log and the metrics).
Real TLS 1.3 (our inbound, h2 as the client), real TCP to a real app socket,
in a namespace of our own (`hbp-*`):

    10.253.0.1  the client pod      10.253.0.2  the destination pod (app + :15008)
    10.253.0.4  has an identity, but no workload on this node
"""
from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.events
import pytest
import structlog

from ambit.agent.datapath.constants import HBONE_PORT
from ambit.agent.identity.spiffe import SpiffeId
from ambit.agent.identity.tls import client_context
from ambit.agent.proxy.hbone.outcomes import TunnelEnd, TunnelOutcome
from ambit.agent.proxy.hbone.settings import HboneSettings
from ambit.agent.proxy.inbound import HboneInbound, InboundTunnel
from ambit.agent.proxy.listeners import ListenerKind, SocketAddress, TransparentListener
from ambit.agent.proxy.pool import HboneClientPool, PoolKey
from tests.support.hbone_lab import (
    CART,
    CLIENT_IP,
    NOT_LOCAL_IP,
    PAYMENTS,
    SERVER_IP,
    STALE,
    TRUST_DOMAIN,
    AppServer,
    Identities,
    RawH2Client,
    bound_socket,
    listening_socket,
    make_identities,
    namespace,
    read_to_eof,
    run_in_netns,
    send_all_then_eof,
    start_app_server,
    status_of,
    tcp_pair,
)
from tests.support.waiting import until

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(240)]

TD = TRUST_DOMAIN

# How the set-up is made to take each path: the verdict and the socket come
# plainly (inline), or the policy hook / the socket factory is a coroutine.
PATHS = ("inline", "async_verdict", "async_socket")


@dataclass
class Recorder:
    """The TunnelObserver: what the agent turns into access-log lines and metrics."""

    opened: list[tuple[Any, ...]] = field(default_factory=list)
    closed: list[tuple[Any, ...]] = field(default_factory=list)
    refused: list[tuple[Any, ...]] = field(default_factory=list)

    def tunnel_opened(self, admitted: InboundTunnel) -> None:
        self.opened.append((admitted.peer_identity, admitted.client_ip, admitted.dst_ip, admitted.dst_port,
                            admitted.reason))

    def tunnel_closed(self, admitted: InboundTunnel, outcome: TunnelOutcome, client: SocketAddress,
                      seconds: float) -> None:
        assert seconds >= 0
        self.closed.append((admitted.dst_port, outcome.end, outcome.bytes_to_tcp, outcome.bytes_to_stream,
                            client.ip))

    def tunnel_refused(self, peer: SpiffeId, client: SocketAddress, dst_ip: str, dst_port: int, status: int,
                       reason: str) -> None:
        self.refused.append((peer, client.ip, dst_ip, dst_port, status, reason))


@dataclass
class Node:
    ids: Identities
    inbound: HboneInbound
    listener: TransparentListener
    app: AppServer
    recorder: Recorder
    logs: list[dict[str, Any]]
    authorized: list[tuple[Any, ...]]
    held: dict[int, asyncio.Future[tuple[bool, str]]]  # port -> the verdict a test hands out itself
    denied_ports: set[int] = field(default_factory=set)

    async def client(self, ip: str = SERVER_IP) -> RawH2Client:
        return await RawH2Client.connect(ip, HBONE_PORT, client_context(self.ids.store, CART), source_ip=CLIENT_IP)

    def refusal_lines(self) -> list[tuple[Any, Any]]:
        return [(e["status"], e["reason"]) for e in self.logs if e["event"] == "hbone_tunnel_refused"]

    def counts(self) -> tuple[int, int, int]:
        stats = self.inbound.stats
        return stats.tunnels_requested, stats.tunnels_opened, stats.tunnels_refused


async def start_node(ids: Identities, path: str, settings: HboneSettings | None = None) -> Node:
    logs: list[dict[str, Any]] = []

    def record(logger: Any, method: str, event: dict[str, Any]) -> Any:
        logs.append(dict(event, level=method))
        raise structlog.DropEvent

    log = structlog.wrap_logger(None, processors=[record], wrapper_class=structlog.make_filtering_bound_logger(0))
    authorized: list[tuple[Any, ...]] = []
    held: dict[int, asyncio.Future[tuple[bool, str]]] = {}
    holder: dict[str, Node] = {}

    def decide(peer: SpiffeId, client_ip: str, dst_ip: str, dst_port: int) -> tuple[bool, str]:
        authorized.append((peer, client_ip, dst_ip, dst_port))
        if dst_port in holder["node"].denied_ports:
            return False, "port denied for the test"
        return True, "allowed"

    async def decide_later(peer: SpiffeId, client_ip: str, dst_ip: str, dst_port: int) -> tuple[bool, str]:
        await asyncio.sleep(0)  # a real suspension: the verdict arrives in a later loop round
        if dst_port in held:
            return await held[dst_port]
        return decide(peer, client_ip, dst_ip, dst_port)

    def authorize(peer: SpiffeId, client_ip: str, dst_ip: str, dst_port: int) -> Any:
        if path == "async_verdict" or dst_port in held:
            return decide_later(peer, client_ip, dst_ip, dst_port)
        return decide(peer, client_ip, dst_ip, dst_port)

    async def socket_later(ip: str) -> socket.socket:
        await asyncio.sleep(0)
        return bound_socket(ip)

    recorder = Recorder()
    inbound = HboneInbound(
        ids.store,
        identity_for_local_ip={SERVER_IP: PAYMENTS, NOT_LOCAL_IP: STALE}.get,
        is_local_workload=lambda ip: ip == SERVER_IP,
        upstream_socket_factory=socket_later if path == "async_socket" else bound_socket,
        authorize=authorize,
        settings=settings,
        log=log,
        observer=recorder,
    )
    listener = TransparentListener(ListenerKind.HBONE, inbound.handle, address="0.0.0.0", port=HBONE_PORT)
    await listener.start()
    app = await start_app_server(SERVER_IP)
    node = Node(ids, inbound, listener, app, recorder, logs, authorized, held)
    holder["node"] = node
    return node


async def stop_node(node: Node) -> None:
    await node.listener.stop()
    await node.inbound.aclose()
    node.app.close()


@dataclass
class Lab:
    ns: str
    ids: Identities
    loop: str

    def run(self, scenario: Any, path: str, settings: HboneSettings | None = None) -> None:
        async def body() -> None:
            node = await start_node(self.ids, path, settings)
            try:
                await scenario(node)
            finally:
                await stop_node(node)

        run_in_netns(self.ns, body, 120, self.loop)


@pytest.fixture(params=["asyncio", "uvloop"])
def lab(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Lab]:
    ids = make_identities(tmp_path / "pki")
    with namespace("hbp", (CLIENT_IP, SERVER_IP, NOT_LOCAL_IP)) as ns:
        yield Lab(ns, ids, request.param)


def connect_request(raw: RawH2Client, authority: str) -> int:
    stream_id = raw.h2.get_next_available_stream_id()
    raw.h2.send_headers(stream_id, [(":method", "CONNECT"), (":authority", authority)])
    return stream_id


async def answer(raw: RawH2Client, stream_id: int) -> int:
    response = await raw.wait_for(lambda e: isinstance(e, h2.events.ResponseReceived) and e.stream_id == stream_id)
    assert response is not None, f"no answer to the CONNECT on stream {stream_id}"
    return status_of(response)


async def ping_pong(raw: RawH2Client, stream_id: int, app: AppServer) -> None:
    """4 bytes up with END_STREAM, 4 bytes down and the app's FIN."""
    raw.h2.send_data(stream_id, b"ping", end_stream=True)
    await raw.flush()
    upstream, peer = await app.next()
    try:
        assert peer[0] == CLIENT_IP  # transparency: the app sees the client pod
        assert await read_to_eof(upstream) == b"ping"
        await asyncio.get_running_loop().sock_sendall(upstream, b"pong")
    finally:
        upstream.close()
    data = await raw.wait_for(lambda e: isinstance(e, h2.events.DataReceived) and e.stream_id == stream_id)
    assert data is not None and data.data == b"pong"
    ended = await raw.wait_for(lambda e: isinstance(e, h2.events.StreamEnded) and e.stream_id == stream_id)
    assert ended is not None


def closed_port() -> int:
    """A port of the destination pod where nothing listens."""
    with listening_socket(SERVER_IP) as sock:
        return sock.getsockname()[1]


# --- the same answers, counts, log lines and reports on every path ---------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_each_set_up_path_answers_counts_logs_and_reports_alike(lab: Lab, path: str) -> None:
    async def scenario(node: Node) -> None:
        app_port = node.app.port
        denied = closed_port()
        node.denied_ports.add(denied)
        refused_port = closed_port()
        raw = await node.client()
        try:
            # Allowed: 200, the bytes both ways, one open and one close reported.
            stream_id = connect_request(raw, f"{SERVER_IP}:{app_port}")
            await raw.flush()
            assert await answer(raw, stream_id) == 200
            await ping_pong(raw, stream_id, node.app)
            await until(lambda: node.recorder.closed, what="the tunnel's close reported to the observer")
            # Denied by policy: 401 with the policy's reason.
            stream_id = connect_request(raw, f"{SERVER_IP}:{denied}")
            await raw.flush()
            assert await answer(raw, stream_id) == 401
            # Allowed, but the pod refuses the upstream connect: 503 naming the errno.
            stream_id = connect_request(raw, f"{SERVER_IP}:{refused_port}")
            await raw.flush()
            assert await answer(raw, stream_id) == 503
        finally:
            await raw.close()
        # Unknown destination (an identity, but no workload on this node): 400, fail closed.
        raw = await node.client(NOT_LOCAL_IP)
        try:
            stream_id = connect_request(raw, f"{NOT_LOCAL_IP}:{app_port}")
            await raw.flush()
            assert await answer(raw, stream_id) == 400
        finally:
            await raw.close()

        assert node.recorder.opened == [(CART, CLIENT_IP, SERVER_IP, app_port, "allowed")]
        assert node.recorder.closed == [(app_port, TunnelEnd.CLOSED, 4, 4, CLIENT_IP)]
        assert node.recorder.refused == [
            (CART, CLIENT_IP, SERVER_IP, denied, 401, "denied by policy: port denied for the test"),
            (CART, CLIENT_IP, SERVER_IP, refused_port, 503, "upstream connect failed: ECONNREFUSED"),
            (CART, CLIENT_IP, NOT_LOCAL_IP, app_port, 400, "authority is not a workload on this node"),
        ]
        assert node.refusal_lines() == [(status, reason) for *_, status, reason in node.recorder.refused]
        assert node.counts() == (4, 1, 3)
        # The verdict of the three CONNECTs that got that far; the unknown destination never asks.
        assert [entry[3] for entry in node.authorized] == [app_port, denied, refused_port]
        # Which path: inline makes a task only for a connect that did not complete inside connect(2) (on
        # loopback it nearly always does; a loaded machine may defer the handshake); an asynchronous hook or
        # factory makes one per set-up that needs it, and waits for such a connect in that same task.
        stats = node.inbound.stats
        waited = {"inline": stats.upstream_connects_waited, "async_verdict": 3, "async_socket": 2}[path]
        assert stats.tunnels_set_up_in_task == waited
        assert not node.inbound.admitted_tunnels()

    lab.run(scenario, path)


@pytest.mark.parametrize("path", PATHS)
def test_a_connect_reset_in_the_same_read_gets_no_verdict_and_no_upstream_connect(lab: Lab, path: str) -> None:
    async def scenario(node: Node) -> None:
        raw = await node.client()
        try:
            stream_id = connect_request(raw, f"{SERVER_IP}:{node.app.port}")
            raw.h2.reset_stream(stream_id)
            await raw.flush()  # HEADERS and RST_STREAM in one write: one read on the server
            # A CONNECT after it is served, and its upstream connection is the first the app sees.
            stream_id = connect_request(raw, f"{SERVER_IP}:{node.app.port}")
            await raw.flush()
            assert await answer(raw, stream_id) == 200
            await ping_pong(raw, stream_id, node.app)
        finally:
            await raw.close()
        assert len(node.authorized) == 1
        assert node.counts() == (2, 1, 0)
        assert node.app.accepted.empty()

    lab.run(scenario, path)


# --- a connect still in progress goes on in a task ----------------------------------------------------------


def test_a_connect_in_progress_is_answered_from_a_task_and_a_stalled_one_gets_503(lab: Lab) -> None:
    """The app's accept queue is full, so its SYNs are dropped: connect(2)
    returns EINPROGRESS and the set-up leaves the inline path. Freed, the
    retransmitted SYN completes it and the 200 follows; left full, the
    connect deadline answers 503."""
    async def scenario(node: Node) -> None:
        loop = asyncio.get_running_loop()
        with listening_socket(SERVER_IP, backlog=0) as full:
            port = full.getsockname()[1]
            fillers: list[socket.socket] = []
            try:
                while True:  # fill the accept queue until a connect no longer completes inside connect(2)
                    sock = bound_socket(CLIENT_IP)
                    fillers.append(sock)
                    if sock.connect_ex((SERVER_IP, port)) != 0:
                        try:
                            sock.getpeername()
                        except OSError:
                            fillers.pop().close()  # its SYN is dropped: no retransmission to compete with ours
                            break
                filler_ends = {sock.getsockname() for sock in fillers}
                raw = await node.client()
                try:
                    stalled = connect_request(raw, f"{SERVER_IP}:{port}")
                    await raw.flush()
                    assert await answer(raw, stalled) == 503  # after upstream_connect_timeout_s
                    stream_id = connect_request(raw, f"{SERVER_IP}:{port}")
                    await raw.flush()
                    await until(lambda: node.inbound.stats.tunnels_set_up_in_task == 2,
                                what="the second connect waiting in a task")
                    assert node.inbound.stats.upstream_connects_waited == 2  # both left connect(2) in progress
                    full.setblocking(False)
                    while True:  # free the queue: the inbound's retransmitted SYN now completes
                        try:
                            full.accept()[0].close()
                        except BlockingIOError:
                            break
                    assert await answer(raw, stream_id) == 200
                    raw.h2.send_data(stream_id, b"ping", end_stream=True)
                    await raw.flush()
                    upstream, peer = await loop.sock_accept(full)
                    assert peer[0] == CLIENT_IP and peer not in filler_ends
                    upstream.setblocking(False)
                    assert await read_to_eof(upstream) == b"ping"
                    await loop.sock_sendall(upstream, b"pong")
                    upstream.close()
                    ended = await raw.wait_for(lambda e: isinstance(e, h2.events.StreamEnded)
                                               and e.stream_id == stream_id)
                    assert ended is not None
                finally:
                    await raw.close()
            finally:
                for sock in fillers:
                    sock.close()
        await until(lambda: node.recorder.closed, what="the tunnel's close reported to the observer")
        assert node.recorder.refused == [
            (CART, CLIENT_IP, SERVER_IP, port, 503, "upstream connect failed: TimeoutError")]
        assert node.recorder.opened == [(CART, CLIENT_IP, SERVER_IP, port, "allowed")]
        assert node.recorder.closed == [(port, TunnelEnd.CLOSED, 4, 4, CLIENT_IP)]
        assert node.counts() == (2, 1, 1)

    lab.run(scenario, "inline", HboneSettings(upstream_connect_timeout_s=3.0))


# --- drain: the tunnels set up either way carry on until they end -------------------------------------------


def test_a_drain_keeps_serving_tunnels_set_up_inline_and_in_a_task_until_they_end(lab: Lab) -> None:
    """Our own client pool (it keeps its tunnels through a graceful GOAWAY, as
    a peer agent does): one tunnel set up inline, one whose verdict the test
    holds while the drain starts. Both are answered and relay to the end, and
    the connection, counted by the listener until then, closes after the last."""
    async def scenario(node: Node) -> None:
        loop = asyncio.get_running_loop()
        pool = HboneClientPool(node.ids.store, bound_socket)
        key = PoolKey(CART, CLIENT_IP, SERVER_IP, frozenset({PAYMENTS}), HBONE_PORT)
        authority = f"{SERVER_IP}:{node.app.port}"
        sockets: list[socket.socket] = []
        try:
            pod1, side1 = await tcp_pair(CLIENT_IP)
            sockets += [pod1, side1]
            await pool.open_tunnel(key, authority, side1)
            stats = node.inbound.stats
            inline = stats.tunnels_set_up_in_task
            assert inline == stats.upstream_connects_waited  # no task unless connect(2) left it in progress
            upstream1, _ = await node.app.next()
            sockets.append(upstream1)
            node.held[node.app.port] = loop.create_future()  # the next CONNECT's verdict: the test's to give
            pod2, side2 = await tcp_pair(CLIENT_IP)
            sockets += [pod2, side2]
            opening = loop.create_task(pool.open_tunnel(key, authority, side2))
            await until(lambda: stats.tunnels_set_up_in_task == inline + 1, what="the held set-up's task")
            node.inbound.go_away("draining for the test")
            (connection,) = node.inbound.connections
            assert connection.going_away and node.listener.active_connections == 1
            node.held.pop(node.app.port).set_result((True, "allowed"))
            await opening
            upstream2, _ = await node.app.next()
            sockets.append(upstream2)
            for pod, upstream in ((pod1, upstream1), (pod2, upstream2)):
                assert node.listener.active_connections == 1  # a tunnel is left: the connection stays
                await send_all_then_eof(pod, b"ping")
                assert await read_to_eof(upstream) == b"ping"
                await send_all_then_eof(upstream, b"pong")
                assert await read_to_eof(pod) == b"pong"
            await until(lambda: node.listener.active_connections == 0,
                        what="the drained connection closed after its last tunnel")
        finally:
            await pool.aclose()
            for sock in sockets:
                sock.close()
        await until(lambda: len(node.recorder.closed) == 2, what="both closes reported")
        assert [entry[1:] for entry in node.recorder.closed] == [(TunnelEnd.CLOSED, 4, 4, CLIENT_IP)] * 2
        assert node.counts() == (2, 2, 0)

    lab.run(scenario, "inline")
