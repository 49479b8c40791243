"""HBONE on asyncio: one protocol object per mTLS connection, driving one sans-I/O core.

The protocol decisions live in the core (connection.py, client.py, server.py); this module
only moves bytes and maps the core's events to its tunnels (tunnel.py):

    TLS socket -- TlsStream -- HboneConnection (one core) -- Tunnels
    Tunnel: one HTTP/2 stream  <->  one TCP socket (raw, non-blocking)

HboneConnection has the shape of an asyncio.BufferedProtocol, so it also runs over asyncio's
own SSL transport; the pool and the inbound use TlsStream (tls_stream.py), which costs fewer
Python calls per read and write. Back-pressure and the data path: docs/hbone.md.
"""
from __future__ import annotations

import asyncio
import collections
import socket
import time
from collections.abc import Callable

import structlog
from h2.errors import ErrorCodes

from ambit.agent.identity.spiffe import SpiffeId
from ambit.agent.identity.tls import TlsConnection

from ..sockets import errno_name
from . import events
from .buffers import ScratchBuffers
from .client import HboneClientConnection
from .events import HboneEvent, TunnelRequested
from .outcomes import TunnelEnd, TunnelRefused
from .server import HboneServerConnection
from .settings import HboneSettings
from .tunnel import Tunnel


_log = structlog.get_logger(__name__)


PeerCheck = Callable[[TlsConnection], SpiffeId]
"""Checks the peer of a finished TLS handshake and returns its identity (raises to refuse)."""


class HboneConnection(asyncio.BufferedProtocol):
    """One mTLS HTTP/2 connection driving one sans-I/O core; shared by its tunnels.

    Driven by a TlsStream (or any transport with write/writelines/close/abort
    and the ssl_object extra): connection_made after the handshake checks the
    peer before a single HTTP/2 byte goes out.
    """

    def __init__(
        self,
        connection: HboneClientConnection | HboneServerConnection,
        *,
        check_peer: PeerCheck,
        idle_timeout_s: float | None,
        scratch: ScratchBuffers | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self.core = connection
        # The transport asks for a buffer before every read: the core's own answers it
        # (one Python call per read instead of two; same as the method below).
        self.get_buffer = connection.get_buffer  # type: ignore[method-assign]
        self._scratch = scratch or ScratchBuffers(tcp_size=connection.settings.tcp_read_size)
        self.settings: HboneSettings = connection.settings
        self.loop = loop or asyncio.get_running_loop()
        self._check_peer = check_peer
        self._idle_timeout_s = idle_timeout_s
        self._log = log or _log
        self._transport: asyncio.Transport | None = None
        self.tunnels: dict[int, Tunnel] = {}
        self.blocked: set[Tunnel] = set()  # tunnels waiting for a window
        self._bursts_possible = True  # what _hint_bursts last told the transport (its default)
        self.touched: list[Tunnel] = []  # tunnels with DATA batched in this receive round
        self.write_paused = False
        self.reading_paused = False  # our write queue is past settings.max_write_queue
        self.read_pauses = 0
        # PING/SETTINGS ACKs handed to the transport: (transport byte mark, count);
        # they have left once transport.bytes_sent reaches the mark.
        self._reply_marks: collections.deque[tuple[int, int]] = collections.deque()
        self._replies_marked = 0
        self.goaway: events.ConnectionClosed | None = None  # how the connection ended, if by GOAWAY
        self._closing = False
        self.peer_identity: SpiffeId | None = None
        self.failure: BaseException | None = None  # why the connection was refused
        self.ready: asyncio.Future[None] = self.loop.create_future()  # handshake checked
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self._lost = False
        self._ping_timer: asyncio.TimerHandle | None = None
        self._ping_deadline: asyncio.TimerHandle | None = None
        self._ping_outstanding: bytes | None = None
        self.pings_sent = 0
        self.pings_acked = 0
        self._idle_timer: asyncio.TimerHandle | None = None
        self.created_at = time.monotonic()

    # --- state ------------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """Usable for new tunnels: up, and not closing or aborted (even if the
        socket's connection_lost has not run yet)."""
        return self._transport is not None and not self._lost and not self._closing and not self.core.closed

    @property
    def tunnel_count(self) -> int:
        return len(self.tunnels)

    @property
    def write_queue_size(self) -> int:
        """Bytes written to the transport and not yet taken by the kernel."""
        return self._transport.get_write_buffer_size() if self._transport is not None and not self._lost else 0

    def read_buffer(self) -> memoryview:
        """The buffer tunnels read their TCP sockets into (used synchronously, then reused)."""
        return self._scratch.tcp

    # --- asyncio protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        self._transport = transport  # type: ignore[assignment]
        try:
            self.peer_identity = self._check_peer(transport.get_extra_info("ssl_object"))
        except Exception as exc:
            # Refused before a single HTTP/2 byte: no preface, no CONNECT.
            self.failure = exc
            self._lost = True
            transport.abort()
            self.ready.set_result(None)
            return
        self._log = self._log.bind(peer_identity=str(self.peer_identity))
        self.core.initiate_connection()
        self.flush()
        self._schedule_ping()
        self._arm_idle()
        self.ready.set_result(None)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.core.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        if self._lost:
            return
        if self._reply_marks:
            self._release_control_replies()
        events = self.core.buffer_updated(nbytes)
        if events:
            self._handle(events)
        self.flush()

    def eof_received(self) -> bool | None:
        return None  # TLS close_notify / FIN: the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._cancel_timers()
        detail = f"connection lost: {errno_name(exc)}" if exc else "connection closed"
        for tunnel in list(self.tunnels.values()):
            tunnel._on_connection_lost(detail)
        self.tunnels.clear()
        self.blocked.clear()
        if not self.ready.done():
            self.ready.set_result(None)
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True
        # The queue grew unchecked while writing was not paused (the transport
        # sends at the end of a loop round): check it now, not at the next read,
        # so it passes the bound by at most what one read made us write.
        if not self.reading_paused and self._transport is not None and not self._lost:
            self._bound_write_queue(self._transport)
        for tunnel in self.tunnels.values():
            tunnel._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.reading_paused:
            self.reading_paused = False
            if self._transport is not None:
                self._transport.resume_reading()
        if self.blocked:
            for tunnel in list(self.blocked):
                tunnel._on_window_opened()  # held back while paused, or its window is still shut
            self.flush()
        for tunnel in list(self.tunnels.values()):
            tunnel._update_reading()

    # --- output -----------------------------------------------------------------------------

    def flush(self) -> None:
        """Write whatever the core has queued (TLS encrypts it at once). With
        nothing queued there is nothing to account: an acknowledgement is
        queued output, and only a write grows the transport's queue."""
        segments = self.core.data_to_send_segments()
        if not segments:
            return
        transport = self._transport
        if transport is None or self._lost:
            return
        if len(segments) == 1:
            transport.write(segments[0])
        else:
            transport.writelines(segments)
        if self.core.queued_control_replies:
            self._mark_control_replies(transport)
        if self.write_paused and not self.reading_paused:
            self._bound_write_queue(transport)

    def _mark_control_replies(self, transport: asyncio.Transport) -> None:
        """Note where the acknowledgements just written end in the transport's
        byte stream, so the core learns when they have left (its flood guard
        counts the ones that have not)."""
        new = self.core.queued_control_replies - self._replies_marked
        if new > 0:
            sent = getattr(transport, "bytes_sent", None)
            if sent is None:  # a transport that cannot tell: only an empty queue proves it
                if not transport.get_write_buffer_size():
                    self.core.control_replies_written(new)
                return
            self._reply_marks.append((sent + transport.get_write_buffer_size(), new))
            self._replies_marked += new
        self._release_control_replies()

    def _release_control_replies(self) -> None:
        marks = self._reply_marks
        sent = getattr(self._transport, "bytes_sent", 0)
        while marks and marks[0][0] <= sent:
            _, count = marks.popleft()
            self._replies_marked -= count
            self.core.control_replies_written(count)

    def _bound_write_queue(self, transport: asyncio.Transport) -> None:
        """Stop reading a peer that does not read: what it sends makes us write
        (acknowledgements, answers), and that must not pile up here."""
        queued = transport.get_write_buffer_size()
        if queued > self.settings.max_write_queue:
            self.reading_paused = True
            self.read_pauses += 1
            transport.pause_reading()
            self._log.info("hbone_reading_paused", write_queue=queued, limit=self.settings.max_write_queue)

    @property
    def going_away(self) -> bool:
        """A graceful GOAWAY went either way: the connection closes when its last tunnel ends."""
        return self.core.going_away

    def go_away(self, reason: str = "") -> None:
        """Drain: tell the peer to open no more streams here (GOAWAY with
        NO_ERROR); the tunnels already open carry on, and the connection
        closes when the last one ends (at once if there is none)."""
        if self._lost or self._closing or self.core.closed:
            return
        self.core.go_away(reason)
        self.flush()
        self._log.info("hbone_connection_draining", reason=reason, tunnels=len(self.tunnels))
        if not self.tunnels:
            self.close(reason or "drained")

    def close(self, reason: str = "") -> None:
        """Close now: GOAWAY, reset the tunnels, close the TLS connection."""
        if self._lost or self._closing:
            return
        self._closing = True
        self.core.close(ErrorCodes.NO_ERROR, reason)
        self.flush()
        self._drop_tunnels(f"closed: {reason}" if reason else "closed")
        self._cancel_timers()
        if self._transport is not None:
            self._transport.close()

    def abort(self, reason: str = "") -> None:
        """Drop the connection at once (keep-alive timeout, shutdown)."""
        self._closing = True
        self._drop_tunnels(f"aborted: {reason}" if reason else "aborted")
        self._cancel_timers()
        if self._transport is not None:
            self._transport.abort()

    def _drop_tunnels(self, detail: str) -> None:
        for tunnel in list(self.tunnels.values()):
            tunnel._on_connection_lost(detail)

    # --- events -----------------------------------------------------------------------------

    def _handle(self, events: list[HboneEvent]) -> None:
        for event in events:
            try:
                if self._dispatch(event):
                    return
            except Exception:
                # A bug around one tunnel must cost that tunnel, not the rest of
                # this batch (a lost WindowOpened would stall other streams).
                self._log.exception("hbone_event_handler_failed", hbone_event=type(event).__name__)
                tunnel = self.tunnels.get(getattr(event, "stream_id", None) or 0)
                if tunnel is not None:
                    tunnel.abort("internal error")
        self._flush_touched()

    def _dispatch(self, event: HboneEvent) -> bool:
        """Act on one event; True once the connection is finished."""
        tunnels = self.tunnels
        kind = type(event)
        if kind is events.DataReceived:
            tunnel = tunnels.get(event.stream_id)  # type: ignore[union-attr]
            if tunnel is not None:
                tunnel._on_data(event.data, event.flow_controlled_length)  # type: ignore[union-attr]
        elif kind is events.WindowOpened:
            self._on_window_opened(event.stream_id)  # type: ignore[union-attr]
        elif kind is events.StreamEnded:
            tunnel = tunnels.get(event.stream_id)  # type: ignore[union-attr]
            if tunnel is not None:
                tunnel._on_stream_ended()
        elif kind is events.StreamReset:
            self._flush_touched()
            tunnel = tunnels.get(event.stream_id)  # type: ignore[union-attr]
            if tunnel is not None:
                tunnel._on_stream_reset(event.error_code)  # type: ignore[union-attr]
        elif kind is events.ConnectionClosed:
            self._flush_touched()
            self._on_connection_closed(event)  # type: ignore[arg-type]
            return True
        elif kind is events.GoingAway:
            self._flush_touched()
            if not self.tunnels:
                self.close("peer going away")
        elif kind is events.PingAcked:
            self._on_ping_acked(event.opaque_data)  # type: ignore[union-attr]
        else:
            self._handle_side_event(event)
        return False

    def _flush_touched(self) -> None:
        touched = self.touched
        if touched:
            self.touched = []
            for tunnel in touched:
                tunnel._flush_batch()

    def _handle_side_event(self, event: HboneEvent) -> None:
        """Client/server specific events (TunnelAccepted, TunnelRequested ...)."""

    def _on_window_opened(self, stream_id: int | None) -> None:
        if stream_id is None:
            for tunnel in list(self.blocked):
                tunnel._on_window_opened()
        else:
            tunnel = self.tunnels.get(stream_id)
            if tunnel is not None and tunnel in self.blocked:
                tunnel._on_window_opened()

    def _on_connection_closed(self, event: events.ConnectionClosed) -> None:
        self.goaway = event
        who = "peer" if event.remote else "us"
        code = getattr(event.error_code, "name", event.error_code)
        self._log.info("hbone_connection_goaway", by=who, error_code=code, reason=event.reason)
        self.flush()  # our GOAWAY, if it is ours
        self._closing = True
        self._drop_tunnels(f"GOAWAY from {who} ({code})")
        self._cancel_timers()
        if self._transport is not None:
            self._transport.close()

    # --- tunnels ------------------------------------------------------------------------------

    def _add_tunnel(self, tunnel: Tunnel) -> None:
        self.tunnels[tunnel.stream_id] = tunnel
        if not self._bursts_possible:
            self._hint_bursts(True)  # a second tunnel, or a new one that is no conversation yet
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _tunnel_finished(self, tunnel: Tunnel) -> None:
        if self.tunnels.get(tunnel.stream_id) is tunnel:
            del self.tunnels[tunnel.stream_id]
            self._check_lone_conversation()
        self.blocked.discard(tunnel)
        if not self.tunnels and not self._lost and not self._closing:
            if self.core.going_away:
                self.close("drained")
            else:
                self._on_no_tunnels()

    def _check_lone_conversation(self) -> None:
        """No bursts while the connection carries one tunnel and that tunnel is
        a conversation: checked when a tunnel turns out to be one and when a
        tunnel ends."""
        if self._bursts_possible and len(self.tunnels) == 1 and next(iter(self.tunnels.values())).is_conversation:
            self._hint_bursts(False)

    def _hint_bursts(self, possible: bool) -> None:
        """Tell a TlsStream whether writes may come several per loop round. They
        cannot while the connection carries one tunnel whose messages are a
        conversation (one at a time, Tunnel.is_conversation): its writes need
        no round-end booking (tls_stream). Any other time they may: a second
        tunnel, or short exchanges opening and closing (bench/connrate.py)."""
        self._bursts_possible = possible
        expect_bursts = getattr(self._transport, "expect_bursts", None)
        if expect_bursts is not None:
            expect_bursts(possible)

    def _on_no_tunnels(self) -> None:
        self._arm_idle()

    # --- timers -------------------------------------------------------------------------------

    def _arm_idle(self) -> None:
        if self._idle_timeout_s is None or self._lost or self.tunnels:
            return
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._idle_timer = self.loop.call_later(self._idle_timeout_s, self._idle_expired)

    def _idle_expired(self) -> None:
        self._idle_timer = None
        if not self.tunnels:
            self._log.debug("hbone_connection_idle_close")
            self.close("idle")

    def _schedule_ping(self) -> None:
        if not self._lost:
            self._ping_timer = self.loop.call_later(self.settings.ping_interval_s, self._send_ping)

    def _send_ping(self) -> None:
        self._ping_timer = None
        if self._lost or self.core.closed:
            return
        self._ping_outstanding = self.core.ping()
        self.pings_sent += 1
        self.flush()
        self._ping_deadline = self.loop.call_later(self.settings.ping_timeout_s, self._ping_timed_out)

    def _on_ping_acked(self, opaque: bytes) -> None:
        if opaque != self._ping_outstanding:
            return
        self._ping_outstanding = None
        self.pings_acked += 1
        if self._ping_deadline is not None:
            self._ping_deadline.cancel()
            self._ping_deadline = None
        self._schedule_ping()

    def _ping_timed_out(self) -> None:
        self._ping_deadline = None
        self._log.warning("hbone_keepalive_timeout", timeout_s=self.settings.ping_timeout_s)
        self.abort("keep-alive PING unanswered")

    def _cancel_timers(self) -> None:
        for timer in (self._ping_timer, self._ping_deadline, self._idle_timer):
            if timer is not None:
                timer.cancel()
        self._ping_timer = self._ping_deadline = self._idle_timer = None


class HboneClientProtocol(HboneConnection):
    """Client side: opens CONNECT tunnels (the pool decides which connection)."""

    core: HboneClientConnection

    def __init__(
        self,
        settings: HboneSettings,
        *,
        check_peer: PeerCheck,
        idle_timeout_s: float | None = None,
        scratch: ScratchBuffers | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        log = log or _log
        super().__init__(
            HboneClientConnection(settings, log=log),
            check_peer=check_peer,
            idle_timeout_s=settings.pool_idle_timeout_s if idle_timeout_s is None else idle_timeout_s,
            scratch=scratch,
            loop=loop,
            log=log,
        )

    @property
    def can_open_stream(self) -> bool:
        return self.is_open and self.core.can_open_stream

    def retire(self, reason: str) -> None:
        """No new tunnel on this connection; it closes when its last tunnel
        ends, at once if it has none (the pool's rule, e.g. on a rotation)."""
        if self._lost or self._closing or self.core.closed:
            return
        self.core.retire()
        self._log.debug("hbone_connection_retired", reason=reason, tunnels=len(self.tunnels))
        if not self.tunnels:
            self.close(reason)

    def start_tunnel(
        self,
        authority: str,
        extra_headers: tuple[tuple[str, str], ...] | list[tuple[str, str]] = (),
        sock: socket.socket | None = None,
    ) -> Tunnel:
        """Send the CONNECT now; `tunnel.opened` resolves on the 200.

        With `sock` the tunnel attaches it as soon as the 200 arrives;
        without, call `tunnel.attach(sock)` after `opened`.
        """
        stream_id = self.core.open_stream(authority, extra_headers)
        tunnel = Tunnel(self, stream_id, authority)
        tunnel._sock_waiting = sock
        self._add_tunnel(tunnel)
        self.flush()
        return tunnel

    async def open_tunnel(
        self,
        authority: str,
        sock: socket.socket,
        extra_headers: tuple[tuple[str, str], ...] | list[tuple[str, str]] = (),
        timeout_s: float | None = None,
    ) -> Tunnel:
        """CONNECT, wait for the 200, then splice `sock`; raises TunnelError,
        or TimeoutError when no answer came within `timeout_s` (the stream is
        then reset).

        The socket is read only after the 200 (a pod's bytes never go out as
        DATA before it). On failure the socket is left untouched to the caller.
        The deadline is one timer handle, not an asyncio.timeout around the
        wait (a Timeout object, a task cancellation path and their bookkeeping
        on every connection of the client side).
        """
        tunnel = self.start_tunnel(authority, extra_headers, sock)
        deadline = None if timeout_s is None else self.loop.call_later(timeout_s, _connect_unanswered, tunnel)
        try:
            await tunnel.opened
        except asyncio.CancelledError:
            if not tunnel._accepted:
                tunnel._sock_waiting = None  # still the caller's
            tunnel.abort("cancelled while opening")
            raise
        finally:
            if deadline is not None:
                deadline.cancel()
        return tunnel

    def _handle_side_event(self, event: HboneEvent) -> None:
        kind = type(event)
        if kind is events.TunnelAccepted:
            tunnel = self.tunnels.get(event.stream_id)  # type: ignore[union-attr]
            if tunnel is not None:
                tunnel._on_accepted()
        elif kind is events.TunnelRefused:
            tunnel = self.tunnels.get(event.stream_id)  # type: ignore[union-attr]
            if tunnel is not None:
                tunnel._on_refused(event.status)  # type: ignore[union-attr]

    def _on_no_tunnels(self) -> None:
        if not self.core.can_open_stream and not self.core.closed:
            # Retired (or the peer's limit reached with nothing open): nothing more will come.
            self.close("retired")
            return
        self._arm_idle()


def _connect_unanswered(tunnel: Tunnel) -> None:
    """open_tunnel's deadline: fail the wait and reset the stream in one step,
    so a 200 arriving later can never take the caller's socket."""
    if tunnel.opened.done():
        return
    tunnel._sock_waiting = None  # still the caller's
    tunnel.opened.set_exception(TimeoutError())
    tunnel.opened.exception()  # the waiter raises it; no "never retrieved" noise if it was cancelled
    tunnel.abort("no answer to CONNECT")


TunnelRequestHandler = Callable[["HboneServerProtocol", Tunnel], None]
"""Server: called for each CONNECT; must eventually call accept_tunnel or refuse_tunnel."""


class HboneServerProtocol(HboneConnection):
    """Server side (port 15008): surfaces CONNECTs, splices accepted ones."""

    core: HboneServerConnection

    def __init__(
        self,
        settings: HboneSettings,
        *,
        check_peer: PeerCheck,
        on_tunnel_requested: TunnelRequestHandler,
        idle_timeout_s: float | None = None,
        scratch: ScratchBuffers | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        log = log or _log
        super().__init__(
            HboneServerConnection(settings, log=log),
            check_peer=check_peer,
            idle_timeout_s=settings.server_idle_timeout_s if idle_timeout_s is None else idle_timeout_s,
            scratch=scratch,
            loop=loop,
            log=log,
        )
        self._on_tunnel_requested = on_tunnel_requested

    def accept_tunnel(self, tunnel: Tunnel, sock: socket.socket, *, flush: bool = True) -> bool:
        """Send the 200 and splice `sock`; False if the stream is already gone (close sock then).

        flush=False: the caller answers from the on_tunnel_requested handler,
        i.e. while a read's events are handled, and the read's own flush sends
        the 200 (with the other answers of that read, in one TLS write)."""
        if tunnel._finished or not self.core.accept(tunnel.stream_id):
            return False
        tunnel._on_accepted()
        tunnel.attach(sock)
        if flush:
            self.flush()
        return True

    def refuse_tunnel(self, tunnel: Tunnel, status: int, detail: str = "", *, flush: bool = True) -> None:
        """Answer `status` (see accept_tunnel for flush)."""
        self.core.refuse(tunnel.stream_id, status)
        if flush:
            self.flush()
        tunnel._fail_open(TunnelRefused(status), TunnelEnd.REFUSED, detail or f"status {status}")

    def awaiting_answer(self, tunnel: Tunnel) -> bool:
        """The tunnel's CONNECT is still to be answered (see HboneServerConnection.awaiting_answer)."""
        return not tunnel._finished and self.core.awaiting_answer(tunnel.stream_id)

    def _handle_side_event(self, event: HboneEvent) -> None:
        if type(event) is TunnelRequested:
            request: TunnelRequested = event  # type: ignore[assignment]
            tunnel = Tunnel(self, request.stream_id, request.authority, request)
            self._add_tunnel(tunnel)
            self._on_tunnel_requested(self, tunnel)
