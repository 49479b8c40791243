"""Inbound HBONE (port 15008): terminate mTLS, vet each CONNECT, splice to the local pod.

For one accepted connection (docs/architecture.md, "A connection", step 4):
1. The certificate presented is the one of the workload the connection was
   addressed to (the accepted socket's original destination); an address
   with no local workload gets the connection closed.
2. TLS 1.3 handshake (bounded by a timeout); the client must present a
   certificate of our trust bundle and trust domain; its SAN becomes the
   principal policy sees.
3. Each CONNECT is refused unless
   - its authority is the IP this connection was sent to (no pivoting to
     another pod through one tunnel) and a workload on this node -> else 400,
   - its port is not one of the proxy's own ports -> else 503,
   - policy allows (peer identity, client IP, destination) -> else 401,
   - the upstream connect succeeds (from the client's IP: with transparency
     the TLS peer address IS the client pod) -> else 503.
   Only then the 200 goes out; bytes that arrived before it are held
   (bounded by the stream window) and delivered after the connect.
Every refusal is logged with its reason, bound to peer= and dst=.

Before any of that, an accepted connection must fit the caps of
`HboneSettings`: connections in total and per peer address (over either, it
is closed at once), and handshakes not yet authenticated (over that cap the
oldest one is dropped: idle handshakes cannot lock a real client out, and
the cap bounds what they cost). Counted in `InboundStats.refused` by reason.

Each tunnel admitted by policy is remembered with what it was admitted as
(`InboundTunnel`) until it ends, so the node can decide again when policy
changes and `revoke` the ones no longer allowed (RST_STREAM to the client,
RST to the pod).
"""
from __future__ import annotations

import asyncio
import collections
import inspect
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from ambit.agent.datapath.constants import PROXY_PORTS
from ambit.agent.identity.spiffe import SpiffeId
from ambit.agent.identity.store import CertificateStore
from ambit.agent.identity.tls import TlsConnection, authenticate_client, require_alpn_h2
from ambit.agent.telemetry.metrics import HboneServerCounters

from .hbone.buffers import ScratchBuffers, tune_allocator
from .hbone.outcomes import TunnelOutcome
from .hbone.protocol import HboneServerProtocol
from .hbone.settings import HboneSettings
from .hbone.tls_contexts import TlsContextCache
from .hbone.tunnel import Tunnel
from .listeners import AcceptedConnection, ListenerKind, SocketAddress
from .sockets import connect, connect_now, errno_name, finish_connect, reset_socket, set_nonblocking
from .tls_stream import TlsStream

__all__ = ["AuthorizeHook", "HboneInbound", "InboundStats", "InboundTunnel", "allow_all"]

_log = structlog.get_logger(__name__)

AuthorizeHook = Callable[[SpiffeId, str, str, int], "tuple[bool, str] | Awaitable[tuple[bool, str]]"]
"""(peer identity, client IP, destination IP, destination port) -> (allowed, reason)."""

UpstreamSocketFactory = Callable[[str], "socket.socket | Awaitable[socket.socket]"]
"""An unconnected TCP socket to connect from the given client IP (the agent
binds it to that IP with IP_TRANSPARENT and marks it 0x200)."""


def allow_all(peer: SpiffeId, client_ip: str, dst_ip: str, dst_port: int) -> tuple[bool, str]:
    """The default policy hook: no AuthorizationPolicy, everything allowed."""
    return True, "no policy"


# Why a connection was refused or dropped before it could carry a tunnel (InboundStats.refused).
REFUSAL_REASONS = ("max_connections", "max_connections_per_peer", "handshake_displaced", "tls_handshake",
                   "client_identity", "no_local_workload", "no_certificate")


_LIMIT_LOG_INTERVAL_S = 10.0


class _Handshake:
    """A TLS handshake in progress, and how to end it early."""

    __slots__ = ("timeout", "displaced")

    def __init__(self) -> None:
        self.timeout: asyncio.Timeout | None = None
        self.displaced = False

    def displace(self) -> None:
        self.displaced = True
        if self.timeout is not None:
            self.timeout.reschedule(asyncio.get_running_loop().time())


class InboundStats:
    """Counters since start (plain attributes: cheap to bump on the data path)."""

    __slots__ = ("connections_accepted", "connections_refused", "tunnels_requested", "tunnels_opened", "tunnels_refused",
                 "tunnels_revoked", "tunnels_set_up_in_task", "upstream_connects_waited", "refused", "goaway_sent", "read_pauses")

    def __init__(self) -> None:
        self.connections_accepted = 0  # mTLS up, client identity accepted
        self.connections_refused = 0  # all reasons
        self.refused: collections.Counter[str] = collections.Counter(dict.fromkeys(REFUSAL_REASONS, 0))
        self.goaway_sent: collections.Counter[str] = collections.Counter()  # by error code, peer's fault
        self.read_pauses = 0  # of connections that ended: times one stopped reading a peer that did not read
        self.tunnels_requested = 0  # well-formed CONNECTs surfaced by the core
        self.tunnels_opened = 0  # answered 200
        self.tunnels_refused = 0  # answered 400/401/503 by us
        self.tunnels_revoked = 0  # admitted, then closed because policy changed
        # Set-ups that had to wait (an asynchronous verdict or socket, a connect in progress) and went on in
        # a task; the rest were answered inline, in the handling of the read that brought the CONNECT.
        self.tunnels_set_up_in_task = 0
        self.upstream_connects_waited = 0  # did not complete inside connect(2): waited for writability


@dataclass(frozen=True, eq=False)
class InboundTunnel:
    """A tunnel policy admitted, with the inputs of that decision."""

    peer_identity: SpiffeId
    client_ip: str
    dst_ip: str
    dst_port: int
    tunnel: Tunnel
    reason: str = ""  # why policy allowed it


class TunnelObserver(Protocol):
    """Told about every tunnel the server decides on (metrics, access log):
    opened once the upstream is connected and 200 sent, closed with its
    outcome, refused with the status it was answered."""

    def tunnel_opened(self, admitted: InboundTunnel) -> None: ...

    def tunnel_closed(self, admitted: InboundTunnel, outcome: TunnelOutcome, client: SocketAddress,
                      seconds: float) -> None: ...

    def tunnel_refused(self, peer: SpiffeId, client: SocketAddress, dst_ip: str, dst_port: int, status: int,
                       reason: str) -> None: ...


class HboneInbound:
    """The HBONE server of one node."""

    def __init__(
        self,
        store: CertificateStore,
        *,
        identity_for_local_ip: Callable[[str], SpiffeId | None],
        is_local_workload: Callable[[str], bool],
        upstream_socket_factory: UpstreamSocketFactory,
        authorize: AuthorizeHook = allow_all,
        settings: HboneSettings | None = None,
        contexts: TlsContextCache | None = None,
        proxy_ports: Collection[int] = PROXY_PORTS,
        log: structlog.typing.FilteringBoundLogger | None = None,
        observer: TunnelObserver | None = None,
    ) -> None:
        self._settings = settings or HboneSettings()
        self._observer = observer
        self._contexts = contexts or TlsContextCache(store)
        self._identity_for_local_ip = identity_for_local_ip
        tune_allocator()  # the data path's buffers must not hit brk/mmap each time
        self._is_local_workload = is_local_workload
        self._upstream_socket_factory = upstream_socket_factory
        self._authorize = authorize
        self._proxy_ports = frozenset(proxy_ports)
        self._log = log or _log
        self._connections: set[HboneServerProtocol] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._admitted: dict[Tunnel, InboundTunnel] = {}
        self._revoked: set[Tunnel] = set()  # closed by policy: the revoker reports those
        self._opened_at: dict[Tunnel, float] = {}  # answered 200, with an observer: when (monotonic)
        self._scratch = ScratchBuffers(tcp_size=self._settings.tcp_read_size)
        self._going_away: str | None = None  # why this server drains (no new streams)
        self.stats = InboundStats()
        self._admitted_total = 0  # connections past the caps: handshaking or established
        self._per_peer: collections.Counter[str] = collections.Counter()
        # Handshakes in progress, oldest first; displacing one expires its timeout now.
        self._handshakes: dict[_Handshake, None] = {}
        self._limit_logged: dict[str, float] = {}

    @property
    def settings(self) -> HboneSettings:
        return self._settings

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    @property
    def tunnel_count(self) -> int:
        return sum(c.tunnel_count for c in self._connections)

    @property
    def connections(self) -> tuple[HboneServerProtocol, ...]:
        """The live connections (peer identity, tunnels, counters)."""
        return tuple(self._connections)

    def counters(self) -> HboneServerCounters:
        """A snapshot for the metrics (safe to take from another thread: copies made in C)."""
        stats = self.stats
        live = tuple(self._connections)
        return HboneServerCounters(
            connections=len(live), handshakes=len(self._handshakes), refused=stats.refused.copy(),
            goaway_sent=stats.goaway_sent.copy(), read_pauses=stats.read_pauses + sum(c.read_pauses for c in live))

    def admitted_tunnels(self) -> tuple[InboundTunnel, ...]:
        """Tunnels policy admitted that have not ended (opening or open)."""
        return tuple(self._admitted.values())

    def revoke(self, admitted: InboundTunnel, reason: str) -> bool:
        """Close a tunnel policy no longer allows: RST_STREAM(CANCEL) to the
        client and RST to the pod, or just stop its upstream connect if the
        200 has not gone out yet. False if it had already ended."""
        if self._admitted.pop(admitted.tunnel, None) is None or admitted.tunnel.done.done():
            return False
        self.stats.tunnels_revoked += 1
        self._revoked.add(admitted.tunnel)
        admitted.tunnel.done.add_done_callback(lambda _: self._revoked.discard(admitted.tunnel))
        admitted.tunnel.abort(reason)
        return True

    # --- connections ---------------------------------------------------------------------

    async def handle(self, accepted: AcceptedConnection, sock: socket.socket) -> None:
        """Serve one accepted connection until it ends (a TransparentListener handler)."""
        log = self._log.bind(peer=str(accepted.client), dst=str(accepted.original_dst))
        peer_ip = accepted.client.ip
        settings = self._settings
        if self._admitted_total >= settings.max_connections:
            self._refuse_at_limit(log, "max_connections", settings.max_connections)
            reset_socket(sock)
            return
        if self._per_peer[peer_ip] >= settings.max_connections_per_peer:
            self._refuse_at_limit(log, "max_connections_per_peer", settings.max_connections_per_peer)
            reset_socket(sock)
            return
        self._admitted_total += 1
        self._per_peer[peer_ip] += 1
        try:
            await self._serve_connection(accepted, sock, log)
        finally:
            self._admitted_total -= 1
            self._per_peer[peer_ip] -= 1
            if not self._per_peer[peer_ip]:
                del self._per_peer[peer_ip]

    async def _serve_connection(
        self, accepted: AcceptedConnection, sock: socket.socket, log: structlog.typing.FilteringBoundLogger
    ) -> None:
        loop = asyncio.get_running_loop()
        identity = self._identity_for_local_ip(accepted.original_dst.ip)
        if identity is None:
            self._refuse_connection(log, "no_local_workload", "no local workload at the destination address")
            sock.close()
            return
        try:
            context = await self._contexts.server(identity)
        except Exception as exc:  # e.g. the certificate cannot be issued
            self._refuse_connection(log, "no_certificate", f"no certificate for {identity}: {exc}")
            sock.close()
            return
        trust_domain = self._contexts.trust_domain

        def check_client(tls: TlsConnection) -> SpiffeId:
            require_alpn_h2(tls)
            return authenticate_client(tls, trust_domain)

        def on_request(connection: HboneServerProtocol, tunnel: Tunnel) -> None:
            self._start_tunnel(connection, tunnel, accepted, log)

        stream = TlsStream(loop, sock, context, server_side=True, read_buffer=self._scratch.tls)
        handshake = _Handshake()
        try:
            async with asyncio.timeout(self._settings.handshake_timeout_s) as handshake.timeout:
                self._begin_handshake(handshake)
                await stream.handshake()
        except Exception as exc:  # bad or missing client certificate, timeout, displaced, reset
            stream.abort()
            if handshake.displaced:
                self._refuse_at_limit(log, "handshake_displaced", self._settings.max_pending_handshakes)
            else:
                self._refuse_connection(log, "tls_handshake", f"TLS handshake failed: {type(exc).__name__}: {exc}")
            return
        except BaseException:
            stream.abort()
            raise
        finally:
            self._end_handshake(handshake)
        connection = HboneServerProtocol(
            self._settings, check_peer=check_client, on_tunnel_requested=on_request, scratch=self._scratch, log=log
        )
        stream.start(connection)
        if connection.failure is not None:
            self._refuse_connection(log, "client_identity", f"client identity refused: {connection.failure}")
            return
        self._connections.add(connection)
        self.stats.connections_accepted += 1
        log.debug("hbone_connection_open", peer_identity=str(connection.peer_identity), server_identity=str(identity))
        if self._going_away is not None:
            connection.go_away(self._going_away)  # accepted just before the drain: the peer goes elsewhere
        try:
            await asyncio.shield(connection.closed)
        except asyncio.CancelledError:
            connection.abort("inbound shutting down")
            raise
        finally:
            self._connections.discard(connection)
            self._connection_ended(connection)

    def _begin_handshake(self, handshake: _Handshake) -> None:
        """Register a handshake; at the cap the oldest one makes room (its timeout fires now)."""
        while len(self._handshakes) >= self._settings.max_pending_handshakes:
            oldest = next(iter(self._handshakes))
            del self._handshakes[oldest]
            oldest.displace()
        self._handshakes[handshake] = None

    def _end_handshake(self, handshake: _Handshake) -> None:
        self._handshakes.pop(handshake, None)

    def _connection_ended(self, connection: HboneServerProtocol) -> None:
        self.stats.read_pauses += connection.read_pauses
        goaway = connection.goaway
        if goaway is not None and not goaway.remote and goaway.error_code:
            self.stats.goaway_sent[getattr(goaway.error_code, "name", str(goaway.error_code))] += 1

    async def serve_socket(self, listening: socket.socket) -> None:
        """Accept loop for a plain listening socket (no transparent capture)."""
        loop = asyncio.get_running_loop()
        listening.setblocking(False)
        handlers: set[asyncio.Task[None]] = set()
        try:
            while True:
                conn_sock, peer = await loop.sock_accept(listening)
                try:
                    accepted = AcceptedConnection(
                        client=SocketAddress.from_sockaddr(peer),
                        original_dst=SocketAddress.from_sockaddr(conn_sock.getsockname()),
                        listener=ListenerKind.HBONE,
                        accepted_at=time.time(),
                    )
                except OSError:
                    conn_sock.close()
                    continue
                task = loop.create_task(self.handle(accepted, conn_sock))
                handlers.add(task)
                task.add_done_callback(handlers.discard)
        finally:
            for task in handlers:
                task.cancel()

    def _refuse_connection(self, log: structlog.typing.FilteringBoundLogger, kind: str, reason: str) -> None:
        self.stats.connections_refused += 1
        self.stats.refused[kind] += 1
        log.info("hbone_connection_refused", reason=reason)

    def _refuse_at_limit(self, log: structlog.typing.FilteringBoundLogger, limit_name: str, limit: int) -> None:
        """A cap refused or displaced a connection: counted always, logged at info
        at most once per 10 s per cap (a flood must not become a log flood)."""
        self.stats.connections_refused += 1
        self.stats.refused[limit_name] += 1
        now = time.monotonic()
        if now - self._limit_logged.get(limit_name, -_LIMIT_LOG_INTERVAL_S) >= _LIMIT_LOG_INTERVAL_S:
            self._limit_logged[limit_name] = now
            log.warning("hbone_connection_limit", limit=limit_name, value=limit,
                        refused_so_far=self.stats.refused[limit_name])
        else:
            log.debug("hbone_connection_refused", reason=f"{limit_name} ({limit}) reached")

    # --- tunnels -----------------------------------------------------------------------------
    #
    # A CONNECT is set up inline, inside the handling of the read that brought
    # it, when nothing has to be waited for: the verdict is a plain value, the
    # upstream socket is at hand and connect(2) completes inside the call (the
    # common case, a pod on this node). The 200 then goes out with that read's
    # own flush, and the set-up makes no task, coroutine or extra callback.
    # Whatever has to wait (an asynchronous verdict or socket factory, a connect
    # in progress) goes on in a task (_continue_later), which a reset or a lost
    # connection cancels and aclose() cancels. Both paths make the same checks
    # in the same order and answer, count, log and report alike.

    def _start_tunnel(
        self,
        connection: HboneServerProtocol,
        tunnel: Tunnel,
        accepted: AcceptedConnection,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self.stats.tunnels_requested += 1
        if not connection.awaiting_answer(tunnel):
            return  # reset in the same read that brought the CONNECT (rapid reset): nothing to connect
        request = tunnel.request
        peer = connection.peer_identity
        assert request is not None and peer is not None
        dst_ip, dst_port = request.authority_host, request.authority_port
        if dst_ip != accepted.original_dst.ip and ipaddress.ip_address(dst_ip) != ipaddress.ip_address(
                accepted.original_dst.ip):
            self._refuse(connection, tunnel, accepted, log, 400,
                         "authority is not the address this connection was sent to", inline=True)
            return
        if not self._is_local_workload(dst_ip):
            self._refuse(connection, tunnel, accepted, log, 400, "authority is not a workload on this node",
                         inline=True)
            return
        if dst_port in self._proxy_ports:
            self._refuse(connection, tunnel, accepted, log, 503, "authority port is one of the proxy's own ports",
                         inline=True)
            return
        verdict = self._authorize(peer, accepted.client.ip, dst_ip, dst_port)
        if type(verdict) is not tuple and inspect.isawaitable(verdict):  # an asynchronous hook (the agent's is not)
            self._continue_later(tunnel, self._decide_later(connection, tunnel, accepted, log, verdict))
            return
        rest = self._decided(connection, tunnel, accepted, log, verdict, inline=True)  # type: ignore[arg-type]
        if rest is not None:
            self._continue_later(tunnel, rest)

    def _continue_later(self, tunnel: Tunnel, rest: Coroutine[Any, Any, None]) -> None:
        """The slow path: the rest of a set-up in a task, cancelled if the
        tunnel ends meanwhile (reset, connection lost) and by aclose()."""
        self.stats.tunnels_set_up_in_task += 1
        task = tunnel.connection.loop.create_task(rest)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        tunnel.done.add_done_callback(lambda _: task.cancel())

    async def _decide_later(
        self,
        connection: HboneServerProtocol,
        tunnel: Tunnel,
        accepted: AcceptedConnection,
        log: structlog.typing.FilteringBoundLogger,
        verdict: Awaitable[tuple[bool, str]],
    ) -> None:
        decided = await verdict
        if tunnel.done.done():
            return  # the client gave up while policy was consulted
        rest = self._decided(connection, tunnel, accepted, log, decided, inline=False)
        if rest is not None:
            await rest

    def _decided(
        self,
        connection: HboneServerProtocol,
        tunnel: Tunnel,
        accepted: AcceptedConnection,
        log: structlog.typing.FilteringBoundLogger,
        verdict: tuple[bool, str],
        *,
        inline: bool,
    ) -> Coroutine[Any, Any, None] | None:
        """Act on policy's verdict: refuse, or admit and connect upstream.
        Returns what is left to wait for (a socket or a connect in progress),
        None when the tunnel is answered."""
        allowed, reason = verdict
        if not allowed:
            self._refuse(connection, tunnel, accepted, log, 401, f"denied by policy: {reason}", inline=inline)
            return None
        request = tunnel.request
        assert request is not None and connection.peer_identity is not None
        dst_ip, dst_port = request.authority_host, request.authority_port
        client_ip = accepted.client.ip
        # Remembered from the decision on, so a policy change made while the
        # upstream connect is pending still reaches this tunnel.
        admitted = InboundTunnel(connection.peer_identity, client_ip, dst_ip, dst_port, tunnel, str(reason))
        self._admitted[tunnel] = admitted
        observer = self._observer

        def ended(done: asyncio.Future[TunnelOutcome]) -> None:
            self._admitted.pop(tunnel, None)
            opened_at = self._opened_at.pop(tunnel, None)
            if opened_at is not None and observer is not None and tunnel not in self._revoked:
                observer.tunnel_closed(admitted, done.result(), accepted.client, time.monotonic() - opened_at)

        tunnel.done.add_done_callback(ended)
        try:
            sock = self._upstream_socket_factory(client_ip)
        except OSError as exc:  # out of descriptors, most likely
            self._refuse(connection, tunnel, accepted, log, 503, f"upstream connect failed: {errno_name(exc)}",
                         inline=inline)
            return None
        if not isinstance(sock, socket.socket):
            return self._connect_later(connection, tunnel, admitted, accepted, log, sock)
        try:
            set_nonblocking(sock)  # the agent's factory made it so already (prepare_upstream)
            connected = connect_now(sock, (dst_ip, dst_port))
        except OSError as exc:
            sock.close()
            self._refuse(connection, tunnel, accepted, log, 503, f"upstream connect failed: {errno_name(exc)}",
                         inline=inline)
            return None
        except BaseException:
            sock.close()
            raise
        if not connected:
            self.stats.upstream_connects_waited += 1
            return self._connect_later(connection, tunnel, admitted, accepted, log, sock)
        self._open(connection, tunnel, admitted, log, sock, inline=inline)
        return None

    async def _connect_later(
        self,
        connection: HboneServerProtocol,
        tunnel: Tunnel,
        admitted: InboundTunnel,
        accepted: AcceptedConnection,
        log: structlog.typing.FilteringBoundLogger,
        sock: socket.socket | Awaitable[socket.socket],
    ) -> None:
        """Wait for the upstream socket (an asynchronous factory) or for a
        connect in progress, then answer."""
        try:
            if isinstance(sock, socket.socket):
                upstream = sock
                try:
                    await finish_connect(upstream, self._settings.upstream_connect_timeout_s)
                except BaseException:
                    upstream.close()
                    raise
            else:
                upstream = await self._connect_upstream(sock, (admitted.dst_ip, admitted.dst_port))
        except (OSError, TimeoutError) as exc:
            self._refuse(connection, tunnel, accepted, log, 503, f"upstream connect failed: {errno_name(exc)}",
                         inline=False)
            return
        self._open(connection, tunnel, admitted, log, upstream, inline=False)

    async def _connect_upstream(self, made: Awaitable[socket.socket] | object,
                                address: tuple[str, int]) -> socket.socket:
        """The socket of an asynchronous factory, connected."""
        if not inspect.isawaitable(made):
            raise TypeError(f"upstream_socket_factory returned {type(made).__name__}, not a socket")
        sock = await made
        if not isinstance(sock, socket.socket):
            raise TypeError(f"upstream_socket_factory returned {type(sock).__name__}, not a socket")
        try:
            set_nonblocking(sock)
            await connect(sock, address, self._settings.upstream_connect_timeout_s)
        except BaseException:
            sock.close()
            raise
        return sock

    def _open(
        self,
        connection: HboneServerProtocol,
        tunnel: Tunnel,
        admitted: InboundTunnel,
        log: structlog.typing.FilteringBoundLogger,
        upstream: socket.socket,
        *,
        inline: bool,
    ) -> None:
        """Upstream connected: the 200, and the tunnel is reported open."""
        if not connection.accept_tunnel(tunnel, upstream, flush=not inline):
            upstream.close()  # the client gave up meanwhile
            return
        self.stats.tunnels_opened += 1
        if log.is_enabled_for(logging.DEBUG):
            tlog = self._tunnel_log(log, connection, tunnel)
            tlog.debug("hbone_tunnel_open")
            tunnel.done.add_done_callback(lambda done: self._log_end(tlog, done.result()))
        observer = self._observer
        if observer is not None:
            observer.tunnel_opened(admitted)
            self._opened_at[tunnel] = time.monotonic()  # the callback of _decided reports the close

    def _refuse(
        self,
        connection: HboneServerProtocol,
        tunnel: Tunnel,
        accepted: AcceptedConnection,
        log: structlog.typing.FilteringBoundLogger,
        status: int,
        reason: str,
        *,
        inline: bool,
    ) -> None:
        """Answer `status`; inline, the read's own flush sends it."""
        self.stats.tunnels_refused += 1
        self._tunnel_log(log, connection, tunnel).info("hbone_tunnel_refused", status=status, reason=reason)
        connection.refuse_tunnel(tunnel, status, reason, flush=not inline)
        if self._observer is not None:
            request = tunnel.request
            assert request is not None and connection.peer_identity is not None
            self._observer.tunnel_refused(connection.peer_identity, accepted.client, request.authority_host,
                                          request.authority_port, status, reason)

    @staticmethod
    def _tunnel_log(log: structlog.typing.FilteringBoundLogger, connection: HboneServerProtocol,
                    tunnel: Tunnel) -> structlog.typing.FilteringBoundLogger:
        # Bound only when something is logged: most tunnels log nothing here.
        return log.bind(authority=tunnel.authority, stream_id=tunnel.stream_id,
                        peer_identity=str(connection.peer_identity))

    @staticmethod
    def _log_end(log: structlog.typing.FilteringBoundLogger, outcome: TunnelOutcome) -> None:
        log.debug(
            "hbone_tunnel_closed",
            end=outcome.end.value,
            detail=outcome.detail,
            bytes_to_upstream=outcome.bytes_to_tcp,
            bytes_to_client=outcome.bytes_to_stream,
        )

    # --- shutdown --------------------------------------------------------------------------

    def go_away(self, reason: str = "draining") -> None:
        """Drain: a graceful GOAWAY on every connection (and on any accepted
        from now on), so peers open their next tunnels elsewhere; the tunnels
        already open carry on, and each connection closes after its last."""
        self._going_away = reason
        for connection in list(self._connections):
            connection.go_away(reason)

    async def aclose(self) -> None:
        """Abort every connection (tunnels are reset) and pending tunnel set-ups."""
        for task in list(self._tasks):
            task.cancel()
        for connection in list(self._connections):
            connection.abort("inbound shutting down")
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
