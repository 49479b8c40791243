"""Scaffolding for HBONE scenarios on real sockets: a namespace, identities, TCP pods.

Everything runs in one network namespace of our own (`hbt-*`) with the "pod"
addresses on its loopback (10.253.0.0/16), and the scenario itself is an
asyncio coroutine run on a thread that entered that namespace, so every socket
it creates (listeners, pods, HBONE connections, Envoy children) lives there.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import secrets
import socket
import struct
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from ambit.agent import eventloop
from ambit.agent.identity.ca import LocalCA
from ambit.agent.identity.spiffe import SpiffeId
from ambit.agent.identity.store import CertificateStore
from ambit.agent.netlink import iproute
from ambit.agent.netns import create_netns, enter_netns, netns_path, remove_netns
from ambit.agent.proxy.hbone.settings import HboneSettings
from ambit.agent.proxy.inbound import HboneInbound
from ambit.agent.proxy.pool import HboneClientPool, PoolKey

T = TypeVar("T")

TRUST_DOMAIN = "cluster.local"
MiB = 1 << 20

# The scenarios' pods on the namespace's loopback, and their identities
# (test_hbone_tls, test_hbone_envoy, test_hbone_inbound_paths).
CLIENT_IP = "10.253.0.1"
SERVER_IP = "10.253.0.2"
OTHER_POD_IP = "10.253.0.3"
NOT_LOCAL_IP = "10.253.0.4"
CART = SpiffeId(TRUST_DOMAIN, "shop", "cart")
PAYMENTS = SpiffeId(TRUST_DOMAIN, "shop", "payments")
ORDERS = SpiffeId(TRUST_DOMAIN, "shop", "orders")
STALE = SpiffeId(TRUST_DOMAIN, "shop", "gone")


def make_netns(prefix: str, addresses: tuple[str, ...]) -> str:
    """A fresh `<prefix>-<random>` namespace with lo up and `addresses` on lo."""
    name = f"{prefix}-{secrets.token_hex(3)}"
    create_netns(name)  # no fork: the test process may hold gRPC threads
    try:
        with iproute(name) as ns:
            lo = ns.link_lookup(ifname="lo")[0]
            ns.link("set", index=lo, state="up")
            for address in addresses:
                ns.addr("add", index=lo, address=address, prefixlen=32)
    except BaseException:
        remove_netns(name)
        raise
    return name


def run_in_netns(name: str, scenario: Callable[[], Awaitable[T]], timeout: float = 120.0, loop: str = "asyncio") -> T:
    """Run `scenario()` on a fresh event loop (`loop`: "asyncio" or "uvloop",
    see ambit.agent.eventloop) on a thread inside the namespace.

    Threads and processes started from that thread inherit the namespace.
    """
    result: list[Any] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            enter_netns(netns_path(name))
            result.append(eventloop.run(asyncio.wait_for(scenario(), timeout), loop))
        except BaseException as exc:  # handed to the test thread
            error.append(exc)

    thread = threading.Thread(target=body, name=f"ns:{name}")
    thread.start()
    thread.join(timeout + 30)
    if thread.is_alive():
        raise TimeoutError(f"scenario in {name} did not finish")
    if error:
        raise error[0]
    return result[0]


# --- identities -----------------------------------------------------------------------------


@dataclasses.dataclass
class Identities:
    """A CA, a certificate store on disk, and the service accounts of a scenario."""

    ca: LocalCA
    store: CertificateStore
    directory: Path

    def id(self, namespace: str, service_account: str) -> SpiffeId:
        return SpiffeId(self.ca.trust_domain, namespace, service_account)

    def pem_files(self, identity: SpiffeId) -> tuple[Path, Path, Path]:
        """(certificate, key, trust bundle) paths, e.g. for Envoy."""
        paths = self.store.get(identity).paths
        return paths.cert_file, paths.key_file, paths.bundle_file


def make_identities(directory: Path, trust_domain: str = TRUST_DOMAIN) -> Identities:
    ca = LocalCA.create(trust_domain)
    return Identities(ca, CertificateStore(ca, directory), directory)


# --- TCP helpers ---------------------------------------------------------------------------------


def bound_socket(ip: str) -> socket.socket:
    """An unconnected TCP socket bound to `ip` (a socket factory for pool/inbound)."""
    sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_IP, 24, 1)  # IP_BIND_ADDRESS_NO_PORT
        sock.bind((ip, 0))
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


@dataclasses.dataclass
class LoopbackHbone:
    """A client pool and an inbound in front of an app, on this namespace's loopback."""

    pool: HboneClientPool
    inbound: HboneInbound
    key: PoolKey  # the pool key of the client's tunnels to the server
    authority: str  # the app's address


@contextlib.asynccontextmanager
async def loopback_hbone(store: CertificateStore, client: tuple[SpiffeId, str], server: tuple[SpiffeId, str],
                         app: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
                         settings: HboneSettings | None = None) -> AsyncIterator[LoopbackHbone]:
    """Real TLS between a pool for `client` (identity, ip) and an inbound for
    `server` (identity, ip), whose app is served by `app`; all closed on the way out."""
    (client_id, client_ip), (server_id, server_ip) = client, server
    upstream = await asyncio.start_server(app, server_ip, 0)
    inbound = HboneInbound(store, identity_for_local_ip=lambda ip: server_id, is_local_workload=lambda ip: True,
                           upstream_socket_factory=lambda ip: bound_socket(server_ip), settings=settings)
    listener = socket.create_server((server_ip, 0))
    serving = asyncio.get_running_loop().create_task(inbound.serve_socket(listener))
    pool = HboneClientPool(store, bound_socket, settings=settings)
    key = PoolKey(client_id, client_ip, server_ip, frozenset({server_id}), listener.getsockname()[1])
    try:
        yield LoopbackHbone(pool, inbound, key, f"{server_ip}:{upstream.sockets[0].getsockname()[1]}")
    finally:
        await pool.aclose()
        serving.cancel()
        listener.close()
        upstream.close()


def listening_socket(ip: str, port: int = 0, backlog: int = 1024) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((ip, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


async def tcp_pair(ip: str) -> tuple[socket.socket, socket.socket]:
    """(pod side, proxy side) of a real TCP connection on `ip`: the proxy side is
    what a TransparentListener would have accepted from the pod."""
    loop = asyncio.get_running_loop()
    with listening_socket(ip) as listener:
        pod = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        pod.setblocking(False)
        connecting = loop.create_task(loop.sock_connect(pod, listener.getsockname()))
        proxy_side, _ = await loop.sock_accept(listener)
        await connecting
    proxy_side.setblocking(False)
    return pod, proxy_side


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def send_all_then_eof(sock: socket.socket, data: bytes, chunk: int = 256 * 1024) -> None:
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    for offset in range(0, len(view), chunk):
        await loop.sock_sendall(sock, view[offset : offset + chunk])
    sock.shutdown(socket.SHUT_WR)


async def read_to_eof(sock: socket.socket, limit: int | None = None) -> bytes:
    """Everything until FIN; raises ConnectionResetError on RST."""
    loop = asyncio.get_running_loop()
    received = bytearray()
    while True:
        chunk = await loop.sock_recv(sock, 256 * 1024)
        if not chunk:
            return bytes(received)
        received += chunk
        if limit is not None and len(received) > limit:
            raise AssertionError(f"more than {limit} bytes")


async def read_exactly(sock: socket.socket, count: int) -> bytes:
    loop = asyncio.get_running_loop()
    received = bytearray()
    while len(received) < count:
        chunk = await loop.sock_recv(sock, count - len(received))
        if not chunk:
            raise EOFError(f"EOF after {len(received)} of {count} bytes")
        received += chunk
    return bytes(received)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclasses.dataclass
class AppServer:
    """The destination pod: accepts connections and hands them to a queue."""

    sock: socket.socket
    accepted: asyncio.Queue[tuple[socket.socket, tuple[str, int]]]
    task: asyncio.Task[None]

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    async def next(self, timeout: float = 10.0) -> tuple[socket.socket, tuple[str, int]]:
        return await asyncio.wait_for(self.accepted.get(), timeout)

    def close(self) -> None:
        self.task.cancel()
        self.sock.close()


async def start_app_server(ip: str, port: int = 0) -> AppServer:
    loop = asyncio.get_running_loop()
    sock = listening_socket(ip, port)
    queue: asyncio.Queue[tuple[socket.socket, tuple[str, int]]] = asyncio.Queue()

    async def accept_forever() -> None:
        while True:
            conn, peer = await loop.sock_accept(sock)
            conn.setblocking(False)
            await queue.put((conn, peer))

    return AppServer(sock, queue, loop.create_task(accept_forever()))


def rss_bytes(pid: int | None = None) -> int:
    with open(f"/proc/{pid or os.getpid()}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def namespace(prefix: str, addresses: tuple[str, ...]) -> Iterator[str]:
    name = make_netns(prefix, addresses)
    try:
        yield name
    finally:
        remove_netns(name)


# --- a bare HTTP/2 client over real TLS (for requests our own client would never make) ------


class RawH2Client:
    """h2 over an asyncio TLS stream: send odd or hostile frames, collect h2 events."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, **config: Any) -> None:
        import h2.config
        import h2.connection

        self.reader = reader
        self.writer = writer
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None, **config)
        )
        self.h2.initiate_connection()
        self.events: list[Any] = []
        self.closed = False

    @classmethod
    async def connect(cls, ip: str, port: int, context: Any, source_ip: str | None = None, **config: Any) -> RawH2Client:
        reader, writer = await asyncio.open_connection(
            ip, port, ssl=context, server_hostname="", local_addr=(source_ip, 0) if source_ip else None
        )
        client = cls(reader, writer, **config)
        await client.flush()
        return client

    async def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.closed:
            self.writer.write(data)
            with contextlib.suppress(ConnectionError):
                await self.writer.drain()

    async def wait_for(self, predicate: Callable[[Any], bool], timeout: float = 10.0) -> Any:
        """The first event (collected or new) that matches; None if the connection ended first."""
        import h2.exceptions

        async def pump() -> Any:
            while True:
                for event in self.events:
                    if predicate(event):
                        self.events.remove(event)
                        return event
                if self.closed:
                    return None
                try:
                    data = await self.reader.read(65536)
                except (ConnectionError, OSError):
                    data = b""
                if not data:
                    self.closed = True
                    continue
                try:
                    self.events += self.h2.receive_data(data)
                except h2.exceptions.ProtocolError:
                    self.closed = True
                await self.flush()

        return await asyncio.wait_for(pump(), timeout)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


def status_of(event: Any) -> int:
    return int(dict(event.headers)[b":status"])
