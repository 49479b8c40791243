"""Outbound HBONE connection pool: many tunnels share few mTLS HTTP/2 connections.

Connections are keyed as ztunnel keys them: (source identity, source IP,
next-hop address, expected destination identities). The source IP is part of
the key because the proxy connects *from the pod's IP* (IP_TRANSPARENT), so
two pods never share a connection even with one service account; the
expected identities are part of it so a connection verified for one set of
identities is never reused for a destination expecting another.

Rules (ztunnel's, numbers in HboneSettings)
- A connection takes new tunnels while fewer than
  `pool_max_streams_per_connection` (100) are open on it at once. The tunnel
  that brings it to 100 is its last: it is retired (no new tunnel, ever) and
  closed when its last tunnel ends. Open tunnels are counted, not tunnels
  over its life, as ztunnel counts them today (its earlier hyper-based pool
  counted over the life): short connections made one after another share one
  TLS connection for as long as it is in use, instead of paying a handshake
  on both agents every 100.
- Retired too: a connection about to run out of stream ids
  (`pool_max_stream_id`), one the peer sent GOAWAY on, and one made with a
  certificate of ours that has since been replaced or removed.
- A connection without tunnels for `pool_idle_timeout_s` (5 min) is closed.
- Concurrent openers for one key share the connection being set up (no
  thundering herd): one TCP connect, one TLS handshake.
- The server's certificate must carry one of the expected identities; that is
  checked right after the TLS handshake, before a single HTTP/2 byte is sent,
  so a mismatch costs no CONNECT (`IdentityMismatch`).

What a cap on a connection's lifetime used to give, and what gives it now:
- Our certificate rotation: TLS authenticates once, at the handshake, so a
  connection presents the certificate it was made with for as long as it
  lives. The store replaces a certificate at half its lifetime; the pool
  then retires that identity's connections made with the old one (ztunnel
  keeps them until they idle out), so none outlives its certificate's
  replacement by more than its open tunnels. The peer's rotation is the
  peer's to act on (its GOAWAY retires ours); it is not visible here.
- The upgrade hand-over: the draining agent sends GOAWAY; the connection is
  retired at once and the next tunnel dials the new agent.
- Load spreading: none is lost. A connection goes to one next hop, which is
  part of the key; the endpoint of a Service is chosen per TCP connection,
  before the pool.
"""
from __future__ import annotations

import asyncio
import inspect
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import structlog
from h2.errors import ErrorCodes

from ambit.agent.datapath.constants import HBONE_PORT
from ambit.agent.identity.spiffe import SpiffeId
from ambit.agent.identity.store import CertificateStore
from ambit.agent.identity.tls import IdentityMismatch, TlsConnection, require_alpn_h2, verify_server_identity

from .hbone.buffers import ScratchBuffers, tune_allocator
from .hbone.outcomes import HboneConnectionLost, TunnelError, TunnelRefused, TunnelReset
from .hbone.protocol import HboneClientProtocol
from .hbone.settings import HboneSettings
from .hbone.tls_contexts import TlsContextCache
from .hbone.tunnel import Tunnel
from .sockets import connect, set_nonblocking
from .tls_stream import TlsStream

__all__ = [
    "HboneClientPool",
    "HboneConnectionLost",
    "IdentityMismatch",
    "PoolKey",
    "PoolStats",
    "SocketFactory",
    "TunnelError",
    "TunnelRefused",
    "TunnelReset",
]

_log = structlog.get_logger(__name__)

SocketFactory = Callable[[str], "socket.socket | Awaitable[socket.socket]"]
"""Makes an unconnected TCP socket to connect from `source_ip` (bound, marked, in
the right namespace: the agent's does IP_TRANSPARENT + bind + SO_MARK 0x200 in
the proxy namespace)."""


@dataclass(frozen=True)
class PoolKey:
    """Which connections a tunnel may share."""

    source_identity: SpiffeId
    source_ip: str
    next_hop_ip: str
    expected_identities: frozenset[SpiffeId]
    next_hop_port: int = HBONE_PORT

    def __str__(self) -> str:
        expected = ",".join(sorted(str(i) for i in self.expected_identities))
        return f"{self.source_identity}@{self.source_ip}->{self.next_hop_ip}:{self.next_hop_port}[{expected}]"


@dataclass(frozen=True)
class PoolStats:
    """What the pool holds right now (for metrics and `ambitctl`)."""

    connections: int  # open connections
    connecting: int  # connections being set up
    tunnels: int  # tunnels on open connections (opening or open)
    keys: int  # distinct keys with a connection


async def _maybe_await(value: object) -> object:
    if inspect.isawaitable(value):
        return await value
    return value


class HboneClientPool:
    """Opens tunnels over pooled HBONE connections."""

    def __init__(
        self,
        store: CertificateStore,
        socket_factory: SocketFactory,
        *,
        settings: HboneSettings | None = None,
        contexts: TlsContextCache | None = None,
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self._settings = settings or HboneSettings()
        self._store = store
        self._contexts = contexts or TlsContextCache(store)
        self._socket_factory = socket_factory
        self._scratch = ScratchBuffers(tcp_size=self._settings.tcp_read_size)
        tune_allocator()  # the data path's buffers must not hit brk/mmap each time
        self._log = log or _log
        self._connections: dict[PoolKey, list[HboneClientProtocol]] = {}
        self._connecting: dict[PoolKey, asyncio.Task[HboneClientProtocol]] = {}
        # The serial of the certificate each open connection presents.
        self._serials: dict[HboneClientProtocol, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None  # set by the first connection made
        self._closed = False
        store.subscribe(self._on_certificate)

    # --- state ---------------------------------------------------------------------------

    @property
    def settings(self) -> HboneSettings:
        return self._settings

    def stats(self) -> PoolStats:
        connections = [c for conns in self._connections.values() for c in conns]
        return PoolStats(
            connections=len(connections),
            connecting=len(self._connecting),
            tunnels=sum(c.tunnel_count for c in connections),
            keys=sum(1 for conns in self._connections.values() if conns),
        )

    def connections(self, key: PoolKey) -> tuple[HboneClientProtocol, ...]:
        """The open connections of one key, oldest first."""
        return tuple(self._connections.get(key, ()))

    # --- tunnels -------------------------------------------------------------------------

    async def open_tunnel(
        self,
        key: PoolKey,
        authority: str,
        sock: socket.socket,
        extra_headers: Iterable[tuple[str, str]] = (),
    ) -> Tunnel:
        """A tunnel to `authority` over a pooled connection, once the server said 200.

        `sock` is the TCP side (e.g. the pod's accepted connection); it is
        read only after the 200 and belongs to the tunnel from then on.
        Raises TunnelRefused(status) on a non-200, IdentityMismatch when the
        server is not who `key` expects, TunnelError / OSError / TimeoutError
        when the connection cannot be made; the socket is then left untouched.
        """
        if self._closed:
            raise TunnelError("pool is closed")
        headers = tuple(extra_headers)
        retried = False
        while True:
            connection = self._usable(key)
            if connection is None:
                connection = await self._shared_connect(key)
                if not connection.can_open_stream:
                    continue  # others took its streams first; go round again
            # open_tunnel sends the CONNECT before its first await, so nobody
            # can take the last stream of the budget between check and use.
            try:
                return await connection.open_tunnel(authority, sock, headers,
                                                    self._settings.connect_response_timeout_s)
            except TimeoutError:
                # open_tunnel reset the stream on its way out; the socket is still the caller's.
                raise TunnelError(f"no answer to CONNECT {authority} within "
                                  f"{self._settings.connect_response_timeout_s:g}s") from None
            except (HboneConnectionLost, TunnelReset) as exc:
                # The connection went away before the answer (e.g. the server's
                # idle GOAWAY crossed our CONNECT), or the server refused the
                # stream unprocessed (REFUSED_STREAM: it is draining, or at its
                # stream limit). No pod byte was sent before a 200, so one
                # retry on a fresh connection is safe.
                if retried or (isinstance(exc, TunnelReset) and exc.error_code != ErrorCodes.REFUSED_STREAM):
                    raise
                retried = True
                self._log.debug("hbone_connect_retry", pool_key=str(key), reason=str(exc))

    def _usable(self, key: PoolKey) -> HboneClientProtocol | None:
        for connection in self._connections.get(key, ()):
            if connection.can_open_stream:
                return connection
        return None

    async def _shared_connect(self, key: PoolKey) -> HboneClientProtocol:
        task = self._connecting.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._connect(key))
            # Retrieved here too: if every opener gave up, nobody else awaits it.
            task.add_done_callback(lambda done: done.cancelled() or done.exception())
            self._connecting[key] = task
        # shield: one opener giving up must not cancel the others' connection.
        return await asyncio.shield(task)

    async def _connect(self, key: PoolKey) -> HboneClientProtocol:
        log = self._log.bind(pool_key=str(key))
        self._loop = asyncio.get_running_loop()
        try:
            connection, serial = await self._dial(key, log)
        except BaseException as exc:
            log.info("hbone_connect_failed", error=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            self._connecting.pop(key, None)
        if self._closed:
            connection.close("pool closed")
            raise TunnelError("pool is closed")
        self._connections.setdefault(key, []).append(connection)
        self._serials[connection] = serial
        connection.closed.add_done_callback(lambda _: self._forget(key, connection))
        log.debug("hbone_connected")
        current = self._store.current(key.source_identity)
        if current is None or current.serial != serial:  # replaced while we dialled
            connection.retire("certificate replaced")  # its openers go round again
        return connection

    async def _dial(self, key: PoolKey,
                    log: structlog.typing.FilteringBoundLogger) -> tuple[HboneClientProtocol, int]:
        """A connection ready for tunnels, and the serial of the certificate it presents."""
        loop = asyncio.get_running_loop()
        settings = self._settings
        serial, context = await self._contexts.client_with_serial(key.source_identity)
        sock = await _maybe_await(self._socket_factory(key.source_ip))
        if not isinstance(sock, socket.socket):
            raise TypeError(f"socket_factory returned {type(sock).__name__}, not a socket")
        try:
            set_nonblocking(sock)
            await connect(sock, (key.next_hop_ip, key.next_hop_port), settings.upstream_connect_timeout_s)
        except BaseException:
            sock.close()
            raise
        expected = key.expected_identities

        def check_server(tls: TlsConnection) -> SpiffeId:
            require_alpn_h2(tls)
            return verify_server_identity(tls, expected)

        stream = TlsStream(loop, sock, context, server_side=False, read_buffer=self._scratch.tls)  # no SNI, as ztunnel
        try:
            async with asyncio.timeout(settings.handshake_timeout_s):
                await stream.handshake()
        except BaseException:
            stream.abort()
            raise
        connection = HboneClientProtocol(settings, check_peer=check_server, scratch=self._scratch, log=log)
        stream.start(connection)  # checks the server's identity before any HTTP/2 byte
        if connection.failure is not None:
            raise connection.failure
        return connection, serial

    def _forget(self, key: PoolKey, connection: HboneClientProtocol) -> None:
        self._serials.pop(connection, None)
        connections = self._connections.get(key)
        if connections is None:
            return
        if connection in connections:
            connections.remove(connection)
        if not connections:
            del self._connections[key]

    # --- certificate rotation --------------------------------------------------------------

    def _on_certificate(self, identity: SpiffeId, cert: object) -> None:
        """The store replaced or removed `identity`'s certificate (maybe on a
        worker thread, when a local CA issued it while a context was built)."""
        loop = self._loop
        if loop is None:
            return  # no connection made yet
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._retire_replaced(identity)
        elif not loop.is_closed():
            loop.call_soon_threadsafe(self._retire_replaced, identity)

    def _retire_replaced(self, identity: SpiffeId) -> None:
        """Retire `identity`'s connections that present another certificate than the current one."""
        current = self._store.current(identity)
        serial = None if current is None else current.serial
        for key, connections in self._connections.items():
            if key.source_identity != identity:
                continue
            for connection in list(connections):
                if self._serials.get(connection) != serial:
                    connection.retire("certificate replaced" if serial is not None else "identity removed")

    # --- shutdown --------------------------------------------------------------------------

    def drain(self, reason: str = "draining") -> None:
        """Put no new tunnel on the open connections: each closes when its
        last tunnel ends (a GOAWAY tells the server so at once). A tunnel
        asked for later (a connection accepted before the drain) gets a
        connection of its own, closed by aclose()."""
        for connection in [c for conns in self._connections.values() for c in conns]:
            connection.go_away(reason)

    async def aclose(self) -> None:
        """Close every connection (their tunnels are reset) and wait for them."""
        self._closed = True
        for task in list(self._connecting.values()):
            task.cancel()
        connections = [c for conns in self._connections.values() for c in conns]
        for connection in connections:
            connection.close("pool closed")
        if connections:
            await asyncio.wait([c.closed for c in connections], timeout=5)
        for connection in connections:
            if not connection.closed.done():
                connection.abort("pool closed")
