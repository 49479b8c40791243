"""The plain-TCP relay and the transparent listeners, in real namespaces.

No eBPF here: the capture is someone else's module. What it would do is
emulated with routing: packets entering the proxy namespace from its links
are looked up in table 100 (`local 0.0.0.0/0 dev lo`), so the namespace
accepts connections addressed to other hosts and answers for the client
addresses its transparent upstream sockets are bound to. (The product marks
packets in tc and selects table 100 by fwmark; this kernel has no tc
skbedit action, and the routing decision is the same.)

Every namespace is named `rly-*` and removed by a finalizer; addresses are
from 10.252.0.0/24.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import os
import queue
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from ambit.agent.datapath.constants import MARK_PROXY, ROUTE_TABLE, RULE_PRIORITY
from ambit.agent.proxy.connections import ConnectionRegistry, ConnectionState
from ambit.agent.proxy.listeners import (
    AcceptedConnection,
    ListenerKind,
    SocketAddress,
    TransparentListener,
    listening_socket_setup,
)
from ambit.agent.netlink import iproute
from ambit.agent.netns import create_netns, remove_netns
from ambit.agent.netns import NetnsSocketPool, NetnsThread, in_netns, make_socket
from ambit.agent.proxy.relay import (
    NetnsUpstreamSockets,
    PlainTcpRelay,
    RelayEnd,
    RelayOptions,
    RelayOutcome,
    prepare_upstream,
)

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(120)]

T = TypeVar("T")
MiB = 1 << 20
IO_TIMEOUT = 20.0

# Single-namespace scenarios: everything on lo.
SERVER_IP = "10.252.0.65"
CLIENT_IP = "10.252.0.66"
PROXY_IP = "10.252.0.67"
# Upstream connects to it vanish: routed out of a link whose peer is down.
BLACKHOLE_IP = "10.252.0.100"

# Three-namespace scenario: cli (10.252.0.130) -> proxy -> srv (10.252.0.2).
SRV_LINK_PROXY_IP, SRV_LINK_SRV_IP = "10.252.0.1", "10.252.0.2"
CLI_LINK_PROXY_IP, CLI_LINK_CLI_IP = "10.252.0.129", "10.252.0.130"


# --------------------------------------------------------------------------
# kernel fixtures


def _unique(tag: str) -> str:
    return f"rly-{tag}-{secrets.token_hex(3)}"


@pytest.fixture
def make_netns() -> Iterator[Callable[[str], str]]:
    """Creates `rly-<tag>-<random>` namespaces (lo up); removes them all."""
    created: list[str] = []

    def make(tag: str) -> str:
        name = _unique(tag)
        create_netns(name)
        created.append(name)
        with iproute(name) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        return name

    yield make
    for name in created:
        remove_netns(name)


def _add_veth(left: str, left_if: str, right: str, right_if: str) -> None:
    with iproute(left) as ns:
        ns.link("add", ifname=left_if, kind="veth", peer={"ifname": right_if, "net_ns_fd": right})


def _configure(name: str, ifname: str, ip: str, prefixlen: int) -> int:
    with iproute(name) as ns:
        index = ns.link_lookup(ifname=ifname)[0]
        ns.addr("add", index=index, address=ip, prefixlen=prefixlen)
        ns.link("set", index=index, state="up")
        return index


def _add_lo_addresses(name: str, *ips: str) -> None:
    with iproute(name) as ns:
        lo = ns.link_lookup(ifname="lo")[0]
        for ip in ips:
            ns.addr("add", index=lo, address=ip, prefixlen=32)


@pytest.fixture
def single_ns(make_netns: Callable[[str], str]) -> Iterator[NetnsThread]:
    """One namespace for client, proxy and server; plus a silent dead end."""
    name = make_netns("one")
    _add_lo_addresses(name, SERVER_IP, CLIENT_IP, PROXY_IP)
    # A veth whose peer stays down: SYNs routed into it disappear, like a
    # firewall that drops (no ICMP, no RST) -> connect timeout.
    _add_veth(name, "rly-bh0", name, "rly-bh1")
    index = _configure(name, "rly-bh0", "10.252.0.97", 27)
    with iproute(name) as ns:
        ns.neigh("add", dst=BLACKHOLE_IP, lladdr="02:00:00:00:00:01", ifindex=index, state="permanent")
    with in_netns(name) as thread:
        yield thread


@dataclasses.dataclass(frozen=True)
class Topology:
    cli: NetnsThread
    proxy: NetnsThread
    srv: NetnsThread


@pytest.fixture
def three_ns(make_netns: Callable[[str], str]) -> Iterator[Topology]:
    """cli ── proxy ── srv; the proxy namespace delivers everything arriving
    from either link locally (table 100), like the capture makes it do."""
    cli, proxy, srv = make_netns("cli"), make_netns("px"), make_netns("srv")
    _add_veth(proxy, "rly-pc", cli, "rly-cp")
    _add_veth(proxy, "rly-ps", srv, "rly-sp")
    _configure(proxy, "rly-pc", CLI_LINK_PROXY_IP, 26)
    _configure(proxy, "rly-ps", SRV_LINK_PROXY_IP, 26)
    _configure(cli, "rly-cp", CLI_LINK_CLI_IP, 26)
    _configure(srv, "rly-sp", SRV_LINK_SRV_IP, 26)
    with iproute(cli) as ns:
        ns.route("add", dst="0.0.0.0", dst_len=0, gateway=CLI_LINK_PROXY_IP)
    with iproute(srv) as ns:  # replies to pods go back through the proxy
        ns.route("add", dst="0.0.0.0", dst_len=0, gateway=SRV_LINK_PROXY_IP)
    with iproute(proxy) as ns:
        lo = ns.link_lookup(ifname="lo")[0]
        ns.route("add", dst="0.0.0.0", dst_len=0, type="local", scope=254,
                 table=ROUTE_TABLE, oif=lo, family=socket.AF_INET)
        for link in ("rly-pc", "rly-ps"):
            ns.rule("add", iifname=link, table=ROUTE_TABLE, priority=RULE_PRIORITY)
    with in_netns(cli) as c, in_netns(proxy) as p, in_netns(srv) as s:
        yield Topology(c, p, s)


# --------------------------------------------------------------------------
# the proxy under test, on its own event loop thread


class ProxyLoop:
    """An asyncio loop on a thread, so test bodies can be plain blocking code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="rly-proxy-loop")
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = IO_TIMEOUT) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(IO_TIMEOUT)
        if self._thread.is_alive():
            pytest.fail("the proxy's event loop is stuck")
        self.loop.close()


@pytest.fixture
def proxy_loop() -> Iterator[ProxyLoop]:
    loop = ProxyLoop()
    yield loop
    loop.close()


@dataclasses.dataclass
class RunningRelay:
    """A listener whose handler relays to `target` (or to the real original
    destination when target is None) and reports every outcome."""

    listener: TransparentListener
    registry: ConnectionRegistry
    accepted: "queue.Queue[AcceptedConnection]"
    outcomes: "queue.Queue[RelayOutcome]"

    @property
    def address(self) -> SocketAddress:
        return self.listener.address

    def next_outcome(self, timeout: float = IO_TIMEOUT) -> RelayOutcome:
        return self.outcomes.get(timeout=timeout)


@contextlib.contextmanager
def running_relay(
    proxy_loop: ProxyLoop,
    netns_thread: NetnsThread,
    *,
    target: SocketAddress | None,
    address: str,
    port: int = 0,
    options: RelayOptions = RelayOptions(),
) -> Iterator[RunningRelay]:
    registry = ConnectionRegistry()
    accepted_q: queue.Queue[AcceptedConnection] = queue.Queue()
    outcomes: queue.Queue[RelayOutcome] = queue.Queue()
    sockets = NetnsUpstreamSockets(netns_thread)
    relay = PlainTcpRelay(sockets, registry, options)

    async def handler(accepted: AcceptedConnection, sock: socket.socket) -> None:
        accepted_q.put(accepted)
        if target is not None:
            accepted = dataclasses.replace(accepted, original_dst=target)
        outcomes.put(await relay.serve(accepted, sock))

    listener = TransparentListener(ListenerKind.OUTBOUND, handler, netns=netns_thread,
                                   address=address, port=port)
    proxy_loop.call(listener.start())
    try:
        yield RunningRelay(listener, registry, accepted_q, outcomes)
    finally:
        proxy_loop.call(listener.stop())
        proxy_loop.call(sockets.aclose())


# --------------------------------------------------------------------------
# blocking peers


def listen(ns: NetnsThread, ip: str, port: int = 0) -> socket.socket:
    def setup(sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((ip, port))
        sock.listen(16)
        sock.settimeout(IO_TIMEOUT)

    return ns.new_socket(setup=setup)


def connect(ns: NetnsThread, dst: SocketAddress, source_ip: str | None = None) -> socket.socket:
    def setup(sock: socket.socket) -> None:
        sock.settimeout(IO_TIMEOUT)
        if source_ip is not None:
            sock.bind((source_ip, 0))
        sock.connect((dst.ip, dst.port))

    return ns.new_socket(setup=setup)


def accept(server: socket.socket) -> tuple[socket.socket, tuple[str, int]]:
    """accept() whose connection also times out (a hung relay fails the test)."""
    conn, peer = server.accept()
    conn.settimeout(IO_TIMEOUT)
    return conn, peer


def read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def reset_close(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@contextlib.contextmanager
def background() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        yield pool


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --------------------------------------------------------------------------
# (1) relay correctness, one namespace, original destination given explicitly


@pytest.fixture
def server_socket(single_ns: NetnsThread) -> Iterator[socket.socket]:
    sock = listen(single_ns, SERVER_IP)
    yield sock
    sock.close()


def _server_address(sock: socket.socket) -> SocketAddress:
    return SocketAddress.from_sockaddr(sock.getsockname())


def test_relay_moves_8_mib_each_way_intact_and_counts_bytes(
        single_ns: NetnsThread, proxy_loop: ProxyLoop, server_socket: socket.socket) -> None:
    upload, download = os.urandom(8 * MiB), os.urandom(8 * MiB)

    def server() -> bytes:
        conn, peer = accept(server_socket)
        with conn:
            sender = threading.Thread(target=lambda: (conn.sendall(download),
                                                      conn.shutdown(socket.SHUT_WR)))
            sender.start()
            received = read_to_eof(conn)
            sender.join()
            assert peer[0] == CLIENT_IP  # bound to the client's address
            return received

    def client(dst: SocketAddress) -> bytes:
        with connect(single_ns, dst, source_ip=CLIENT_IP) as sock:
            sender = threading.Thread(target=lambda: (sock.sendall(upload),
                                                      sock.shutdown(socket.SHUT_WR)))
            sender.start()
            received = read_to_eof(sock)
            sender.join()
            return received

    target = _server_address(server_socket)
    with running_relay(proxy_loop, single_ns, target=target, address=PROXY_IP) as relay, \
            background() as pool:
        server_got = pool.submit(server)
        client_got = pool.submit(client, relay.address)
        assert hashlib.sha256(server_got.result()).digest() == hashlib.sha256(upload).digest()
        assert hashlib.sha256(client_got.result()).digest() == hashlib.sha256(download).digest()
        outcome = relay.next_outcome()
        accepted = relay.accepted.get_nowait()
        listener_address = relay.address
    assert outcome == RelayOutcome(RelayEnd.CLOSED, 8 * MiB, 8 * MiB)
    assert accepted.listener is ListenerKind.OUTBOUND
    assert accepted.client.ip == CLIENT_IP
    assert accepted.original_dst == listener_address  # no capture: the listener's own address
    assert len(relay.registry) == 0


def test_client_half_close_reaches_server_and_reply_still_flows_back(
        single_ns: NetnsThread, proxy_loop: ProxyLoop, server_socket: socket.socket) -> None:
    def server() -> bytes:
        conn, _ = accept(server_socket)
        with conn:
            request = read_to_eof(conn)  # returns only once the client's FIN came through
            conn.sendall(b"reply to " + request)
            return request

    target = _server_address(server_socket)
    with running_relay(proxy_loop, single_ns, target=target, address=PROXY_IP) as relay, \
            background() as pool:
        server_got = pool.submit(server)
        with connect(single_ns, relay.address, source_ip=CLIENT_IP) as sock:
            sock.sendall(b"request")
            sock.shutdown(socket.SHUT_WR)
            assert read_to_eof(sock) == b"reply to request"
        assert server_got.result() == b"request"
        outcome = relay.next_outcome()
    assert outcome.end is RelayEnd.CLOSED
    assert (outcome.bytes_to_upstream, outcome.bytes_to_client) == (7, 16)


def test_server_half_close_reaches_client_and_upload_still_flows(
        single_ns: NetnsThread, proxy_loop: ProxyLoop, server_socket: socket.socket) -> None:
    def server() -> bytes:
        conn, _ = accept(server_socket)
        with conn:
            conn.sendall(b"banner")
            conn.shutdown(socket.SHUT_WR)
            return read_to_eof(conn)

    target = _server_address(server_socket)
    with running_relay(proxy_loop, single_ns, target=target, address=PROXY_IP) as relay, \
            background() as pool:
        server_got = pool.submit(server)
        with connect(single_ns, relay.address, source_ip=CLIENT_IP) as sock:
            assert read_to_eof(sock) == b"banner"  # the server's FIN came through
            # ... while the relay still carries what the client sends
            assert wait_for(lambda: _states(relay) == [ConnectionState.HALF_CLOSED])
            sock.sendall(b"late upload")
            sock.shutdown(socket.SHUT_WR)
            assert server_got.result() == b"late upload"
            assert sock.recv(1) == b""
        outcome = relay.next_outcome()
    assert outcome == RelayOutcome(RelayEnd.CLOSED, 11, 6)


def _states(relay: RunningRelay) -> list[ConnectionState]:
    return [info.state for info in relay.registry.snapshot()]


def wait_for(predicate: Callable[[], bool], timeout: float = IO_TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_server_reset_resets_the_client(
        single_ns: NetnsThread, proxy_loop: ProxyLoop, server_socket: socket.socket) -> None:
    def server() -> None:
        conn, _ = accept(server_socket)
        assert conn.recv(5) == b"hello"
        reset_close(conn)

    target = _server_address(server_socket)
    with running_relay(proxy_loop, single_ns, target=target, address=PROXY_IP) as relay, \
            background() as pool:
        done = pool.submit(server)
        with connect(single_ns, relay.address, source_ip=CLIENT_IP) as sock:
            sock.sendall(b"hello")
            done.result()
            with pytest.raises(ConnectionResetError):
                sock.recv(1)  # a RST, not an orderly EOF
        outcome = relay.next_outcome()
    assert outcome.end is RelayEnd.UPSTREAM_RESET
    assert outcome.error == "ECONNRESET"


def test_client_reset_resets_the_server(
        single_ns: NetnsThread, proxy_loop: ProxyLoop, server_socket: socket.socket) -> None:
    target = _server_address(server_socket)
    with running_relay(proxy_loop, single_ns, target=target, address=PROXY_IP) as relay:
        client = connect(single_ns, relay.address, source_ip=CLIENT_IP)
        conn, _ = accept(server_socket)
        with conn:
            client.sendall(b"x")
            assert conn.recv(1) == b"x"  # the relay is established
            reset_close(client)
            with pytest.raises(ConnectionResetError):
                conn.recv(1)
        outcome = relay.next_outcome()
    assert outcome.end is RelayEnd.CLIENT_RESET
    assert outcome.bytes_to_upstream == 1


def test_refused_upstream_resets_the_client_at_once(
        single_ns: NetnsThread, proxy_loop: ProxyLoop, server_socket: socket.socket) -> None:
    closed_port = _server_address(server_socket)
    server_socket.close()  # nothing listens there any more: the kernel answers RST
    with running_relay(proxy_loop, single_ns, target=closed_port, address=PROXY_IP) as relay:
        started = time.monotonic()
        # The relay's refused connect(2) and its reset can both happen before
        # the client's own connect() has returned (the listener completed the
        # handshake): then connect() itself reports the reset. Either way the
        # client sees a reset, at once.
        with pytest.raises(ConnectionResetError):
            with connect(single_ns, relay.address, source_ip=CLIENT_IP) as sock:
                sock.recv(1)
        elapsed = time.monotonic() - started
        outcome = relay.next_outcome()
    assert elapsed < 1.0
    assert outcome == RelayOutcome(RelayEnd.CONNECT_REFUSED, 0, 0, "ECONNREFUSED")


def test_upstream_connect_timeout_resets_the_client(
        single_ns: NetnsThread, proxy_loop: ProxyLoop) -> None:
    options = RelayOptions(connect_timeout=0.5)
    target = SocketAddress(BLACKHOLE_IP, 80)
    with running_relay(proxy_loop, single_ns, target=target, address=PROXY_IP,
                       options=options) as relay:
        started = time.monotonic()
        with connect(single_ns, relay.address, source_ip=CLIENT_IP) as sock:
            assert wait_for(lambda: _states(relay) == [ConnectionState.CONNECTING], 2.0)
            with pytest.raises(ConnectionResetError):
                sock.recv(1)
        elapsed = time.monotonic() - started
        outcome = relay.next_outcome()
    assert 0.4 < elapsed < 3.0
    assert outcome.end is RelayEnd.CONNECT_TIMEOUT


def test_default_connect_timeout_is_ten_seconds() -> None:
    assert RelayOptions().connect_timeout == 10.0


def test_slow_reader_pauses_the_writer_instead_of_buffering(
        single_ns: NetnsThread, proxy_loop: ProxyLoop, server_socket: socket.socket) -> None:
    target = _server_address(server_socket)
    with running_relay(proxy_loop, single_ns, target=target, address=PROXY_IP) as relay:
        client = connect(single_ns, relay.address, source_ip=CLIENT_IP)
        conn, _ = accept(server_socket)
        with client, conn:
            # The server does not read: the client must eventually block.
            client.setblocking(False)
            chunk, pushed = b"\0" * MiB, 0
            deadline = time.monotonic() + IO_TIMEOUT
            stalled_since = None
            while time.monotonic() < deadline:
                try:
                    pushed += client.send(chunk)
                    stalled_since = None
                except BlockingIOError:
                    stalled_since = stalled_since or time.monotonic()
                    if time.monotonic() - stalled_since > 0.5:
                        break
                    time.sleep(0.01)
            assert stalled_since is not None, "client never blocked: relay buffers without bound"
            # What is in flight fits in the socket buffers + one pipe, far below 256 MiB.
            assert pushed < 256 * MiB
            in_relay = relay.registry.snapshot()[0].bytes_to_upstream
            client.shutdown(socket.SHUT_WR)
            assert len(read_to_eof(conn)) == pushed  # nothing lost either
            assert in_relay <= pushed
            conn.shutdown(socket.SHUT_WR)
            client.setblocking(True)
            assert client.recv(1) == b""
        assert relay.next_outcome() == RelayOutcome(RelayEnd.CLOSED, pushed, 0)


def test_stopping_the_listener_resets_live_relays_and_leaks_no_descriptor(
        single_ns: NetnsThread, proxy_loop: ProxyLoop, server_socket: socket.socket) -> None:
    target = _server_address(server_socket)
    before = open_fds()
    with running_relay(proxy_loop, single_ns, target=target, address=PROXY_IP) as relay:
        clients = [connect(single_ns, relay.address, source_ip=CLIENT_IP) for _ in range(5)]
        servers = [accept(server_socket)[0] for _ in clients]
        assert wait_for(lambda: _states(relay) == [ConnectionState.ESTABLISHED] * 5)
        proxy_loop.call(relay.listener.stop())
        assert relay.listener.active_connections == 0
        for sock in clients + servers:
            with sock, pytest.raises(ConnectionResetError):
                sock.recv(1)
    assert wait_for(lambda: open_fds() == before, 5.0), (before, open_fds())


def test_upstream_socket_carries_proxy_mark_and_client_address(single_ns: NetnsThread) -> None:
    accepted = AcceptedConnection(SocketAddress("10.252.0.200", 41000),
                                  SocketAddress(SERVER_IP, 80), ListenerKind.OUTBOUND, 0.0)
    with single_ns.new_socket() as sock:
        # 10.252.0.200 is not an address of this namespace: only IP_TRANSPARENT allows it.
        single_ns.run(prepare_upstream, sock, accepted.client.ip, RelayOptions())
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == MARK_PROXY
        assert sock.getsockopt(socket.IPPROTO_IP, socket.IP_TRANSPARENT) == 1
        assert sock.getsockname()[0] == "10.252.0.200"
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


# --------------------------------------------------------------------------
# (2) transparency end to end: cli -> proxy (captured by routing) -> srv


def test_pod_reaches_server_through_proxy_and_server_sees_the_pods_address(
        three_ns: Topology, proxy_loop: ProxyLoop) -> None:
    server_port = 8080
    server_socket = listen(three_ns.srv, "0.0.0.0", server_port)

    def server() -> tuple[str, bytes]:
        conn, peer = accept(server_socket)
        with conn:
            request = read_to_eof(conn)
            conn.sendall(f"you are {peer[0]}".encode())
            return peer[0], request

    # The proxy listens on the server's port on all addresses; table 100
    # delivers the pod's SYN for 10.252.0.2:8080 to it, as bpf_sk_assign would.
    with server_socket, running_relay(proxy_loop, three_ns.proxy, target=None,
                                      address="0.0.0.0", port=server_port) as relay, \
            background() as pool:
        seen = pool.submit(server)
        with connect(three_ns.cli, SocketAddress(SRV_LINK_SRV_IP, server_port)) as sock:
            client_port = sock.getsockname()[1]
            sock.sendall(b"GET /")
            sock.shutdown(socket.SHUT_WR)
            reply = read_to_eof(sock)
        peer_ip, request = seen.result()
        accepted = relay.accepted.get(timeout=IO_TIMEOUT)
        outcome = relay.next_outcome()
    assert accepted.original_dst == SocketAddress(SRV_LINK_SRV_IP, server_port)
    assert accepted.client == SocketAddress(CLI_LINK_CLI_IP, client_port)
    assert peer_ip == CLI_LINK_CLI_IP  # not the proxy's 10.252.0.1
    assert request == b"GET /"
    assert reply == f"you are {CLI_LINK_CLI_IP}".encode()
    assert outcome == RelayOutcome(RelayEnd.CLOSED, 5, len(reply))


# --------------------------------------------------------------------------
# (3) listeners and sockets made in a namespace by netns.py


SO_NETNS_COOKIE = 71  # Linux 5.14+: which network namespace a socket belongs to


def _netns_cookie(sock: socket.socket) -> bytes:
    return sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)


def test_socket_pool_makes_its_sockets_in_the_namespace_and_the_loop_thread_stays_home(
        single_ns: NetnsThread) -> None:
    home = os.stat("/proc/thread-self/ns/net").st_ino

    async def take_across_batches() -> list[socket.socket]:
        pool = NetnsSocketPool(single_ns, socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK, batch=4)
        try:
            return [await pool.take() for _ in range(6)]  # two batches
        finally:
            await pool.aclose()

    taken = asyncio.run(take_across_batches())
    try:
        assert os.stat("/proc/thread-self/ns/net").st_ino == home
        with single_ns.new_socket() as inside, socket.socket() as here:
            assert {_netns_cookie(sock) for sock in taken} == {_netns_cookie(inside)}
            assert _netns_cookie(inside) != _netns_cookie(here)
        assert all(not sock.getblocking() for sock in taken)
    finally:
        for sock in taken:
            sock.close()


def test_netns_thread_runs_in_the_namespace(make_netns: Callable[[str], str]) -> None:
    name = make_netns("ns")
    with in_netns(name) as thread:
        inside = thread.run(lambda: os.stat("/proc/thread-self/ns/net").st_ino)
    assert inside == os.stat(f"/var/run/netns/{name}").st_ino
    assert inside != os.stat("/proc/thread-self/ns/net").st_ino


def test_netns_thread_refuses_a_missing_namespace() -> None:
    with pytest.raises(FileNotFoundError):
        NetnsThread("rly-does-not-exist")


def test_listener_socket_options(single_ns: NetnsThread) -> None:
    setup = listening_socket_setup(SocketAddress(PROXY_IP, 0), 128)
    with single_ns.new_socket(setup=setup) as sock:
        assert sock.getsockopt(socket.IPPROTO_IP, socket.IP_TRANSPARENT) == 1
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == MARK_PROXY
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1


def test_listener_made_in_a_namespace_accepts_there_only_and_frees_its_port(
        single_ns: NetnsThread, proxy_loop: ProxyLoop) -> None:
    seen: queue.Queue[AcceptedConnection] = queue.Queue()
    marks: queue.Queue[int] = queue.Queue()

    async def handler(accepted: AcceptedConnection, sock: socket.socket) -> None:
        seen.put(accepted)
        marks.put(sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK))
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, b"hi")

    clock = iter([1234.5]).__next__
    listener = TransparentListener(ListenerKind.INBOUND_PLAINTEXT, handler, netns=single_ns,
                                   address=PROXY_IP, port=15006, clock=clock)
    before = open_fds()
    proxy_loop.call(listener.start())
    try:
        assert listener.address == SocketAddress(PROXY_IP, 15006)
        with connect(single_ns, listener.address, source_ip=CLIENT_IP) as sock:
            assert read_to_eof(sock) == b"hi"  # the listener closed it after the handler
            client_port = sock.getsockname()[1]
        # From the node's (this process's) namespace that address does not exist.
        with socket.socket() as outside:
            with pytest.raises(OSError):
                outside.bind((PROXY_IP, 0))
    finally:
        proxy_loop.call(listener.stop())
    assert seen.get_nowait() == AcceptedConnection(
        SocketAddress(CLIENT_IP, client_port), SocketAddress(PROXY_IP, 15006),
        ListenerKind.INBOUND_PLAINTEXT, 1234.5)
    assert marks.get_nowait() == MARK_PROXY  # accepted sockets inherit the listener's mark
    assert open_fds() == before
    # The port can be listened on again (Linux refuses while a listener holds it,
    # SO_REUSEADDR only skips the TIME_WAIT of the connection served above).
    listen(single_ns, PROXY_IP, 15006).close()


@pytest.mark.parametrize("take_queued", [True, False], ids=["no-successor", "successor-holds-the-socket"])
def test_connections_queued_when_a_listener_stops_are_served_without_a_successor(
        single_ns: NetnsThread, proxy_loop: ProxyLoop, take_queued: bool) -> None:
    """A drain with no successor (SIGTERM on node shutdown) must not reset
    handshakes the kernel already completed: closing a listener resets its
    accept queue, so those connections are accepted and served first. With
    a successor holding the same socket, they are left for it (here nobody
    holds it, so the close resets them: the control case)."""

    async def handler(accepted: AcceptedConnection, sock: socket.socket) -> None:
        await asyncio.get_running_loop().sock_sendall(sock, b"served")

    listener = TransparentListener(ListenerKind.INBOUND_PLAINTEXT, handler, netns=single_ns,
                                   address=PROXY_IP, port=15006)
    proxy_loop.call(listener.start())
    clients: list[socket.socket] = []

    async def queue_then_stop() -> None:
        # The loop is busy in this coroutine, so nothing is accepted while the
        # clients connect: their handshakes complete into the accept queue.
        for _ in range(5):
            clients.append(connect(single_ns, listener.address, source_ip=CLIENT_IP))
        listener.stop_accepting(take_queued=take_queued)

    try:
        proxy_loop.call(queue_then_stop())
        outcomes = []
        for sock in clients:
            try:
                outcomes.append(read_to_eof(sock))
            except ConnectionResetError:
                outcomes.append("reset")
        proxy_loop.call(listener.wait_idle())
    finally:
        for sock in clients:
            sock.close()
        proxy_loop.call(listener.stop())
    assert outcomes == ([b"served"] * 5 if take_queued else ["reset"] * 5)


def test_listener_default_ports() -> None:
    assert [k.default_port for k in ListenerKind] == [15001, 15006, 15008]


def test_make_socket_closes_the_socket_when_setup_fails() -> None:
    before = open_fds()

    def failing(sock: socket.socket) -> None:
        raise OSError("setup failed")

    with pytest.raises(OSError, match="setup failed"):
        make_socket(setup=failing)
    assert open_fds() == before
