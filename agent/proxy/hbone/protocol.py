"""HBONE on asyncio: one protocol object per mTLS connection, one Tunnel per CONNECT stream.

The protocol decisions live in the sans-I/O core (hbone_core); this module only
moves bytes and maps events to socket operations:

    TLS socket -- TlsStream -- HboneConnection (one core) -- Tunnels
    Tunnel: one HTTP/2 stream  <->  one TCP socket (raw, non-blocking)

HboneConnection has the shape of an asyncio.BufferedProtocol, so it also runs
over asyncio's own SSL transport; the pool and the inbound use TlsStream
(tls_stream.py), which costs fewer Python calls per read and write.

TCP semantics carried through a tunnel
- TCP bytes -> DATA; a TCP FIN -> END_STREAM; END_STREAM -> shutdown(SHUT_WR).
- RST_STREAM -> the TCP socket is closed with RST (SO_LINGER 0); a TCP reset
  or socket error -> RST_STREAM(CANCEL). A lost HBONE connection resets every
  tunnel on it. One exception: RST_STREAM(NO_ERROR) after the peer's
  END_STREAM (RFC 9113 §8.1, "stop sending, the response is complete")
  delivers everything and closes with FIN, since an RST would drop bytes
  still queued in our socket.

Back-pressure (why memory stays bounded)
- stream -> TCP: DATA is acknowledged to the core only once the kernel took
  it, so a stalled TCP reader closes the stream window; what waits in the
  tunnel's buffer is at most one stream window.
- TCP -> stream: when send_data() comes back short the remainder (at most one
  read) is kept and reading that socket stops until WindowOpened; when the
  TLS socket's send queue is over its high-water mark every tunnel of that
  connection stops reading.

Data path (measured: fewer copies mattered more than anything else)
- TLS decrypts straight into the core's receive buffer; DATA payloads are
  memoryviews into it and are written to the TCP sockets with one
  send/sendmsg per tunnel per read, before the buffer is reused.
- TCP bytes are read into a scratch buffer shared by all connections of a
  pool or inbound, framed by the core without copying the payload
  (send_data(borrow=True)) and encrypted before the scratch buffer is
  reused; an idle tunnel holds no buffer at all.
- The TCP side uses raw sockets rather than asyncio transports: recv_into and
  sendmsg avoid per-chunk copies, and a transport would keep references to
  the memoryviews we hand it.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import enum
import errno
import functools
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from h2.errors import ErrorCodes

from ambit.agent.identity.spiffe import SpiffeId
from ambit.agent.identity.store import CertificateStore
from ambit.agent.identity.tls import TlsConnection, client_context, server_context

from . import hbone_core as core
from .hbone_settings import HboneSettings

__all__ = [
    "ScratchBuffers",
    "HboneClientProtocol",
    "HboneConnection",
    "HboneConnectionLost",
    "HboneServerProtocol",
    "TlsContextCache",
    "Tunnel",
    "TunnelEnd",
    "TunnelError",
    "TunnelOutcome",
    "TunnelRefused",
    "TunnelReset",
    "reset_socket",
    "tune_allocator",
]

_log = structlog.get_logger(__name__)

_LINGER_RESET = struct.pack("ii", 1, 0)
_MAX_IOVECS = 512  # well under IOV_MAX (1024)


# --- outcomes and errors ---------------------------------------------------------------


class TunnelEnd(enum.Enum):
    """How a tunnel ended (access log, metrics)."""

    CLOSED = "closed"  # FIN both ways
    STREAM_RESET = "stream_reset"  # the HBONE peer reset the stream; TCP got RST
    TCP_RESET = "tcp_reset"  # the TCP side failed; the stream got RST_STREAM
    CONNECTION_LOST = "connection_lost"  # the HBONE connection went away
    REFUSED = "refused"  # never opened (non-200, or refused by us)
    ABORTED = "aborted"  # we aborted it (shutdown, cancellation)


@dataclass(frozen=True)
class TunnelOutcome:
    end: TunnelEnd
    bytes_to_stream: int  # read from TCP, sent as DATA
    bytes_to_tcp: int  # received as DATA, written to TCP
    detail: str = ""


class TunnelError(Exception):
    """A tunnel could not be opened."""


class TunnelRefused(TunnelError):
    """The HBONE server answered the CONNECT with a non-200 status."""

    def __init__(self, status: int) -> None:
        super().__init__(f"CONNECT refused with status {status}")
        self.status = status


class TunnelReset(TunnelError):
    """The stream was reset before the server answered."""

    def __init__(self, error_code: int) -> None:
        name = getattr(error_code, "name", str(error_code))
        super().__init__(f"CONNECT stream reset ({name})")
        self.error_code = error_code


class HboneConnectionLost(TunnelError):
    """The HBONE connection ended before the server answered."""


def reset_socket(sock: socket.socket) -> None:
    """Close with RST instead of FIN (SO_LINGER 0)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass  # already dead; close() is all that is left
    sock.close()


def errno_name(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__


# --- allocator ----------------------------------------------------------------------------

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3


@functools.cache
def tune_allocator() -> bool:
    """Keep glibc from returning heap memory to the kernel after every large buffer.

    The TLS layer allocates and frees buffers of 100 KiB - 1 MiB per read and
    write (ssl's MemoryBIO reads, asyncio's write buffers). With glibc's
    defaults each such free trims the heap (brk) or unmaps it, and the next
    allocation faults fresh zeroed pages in: measured here as 6,800 brk calls
    in 4 s and 40% less throughput. Raising the trim threshold and the mmap
    threshold makes those buffers reuse the same memory. Process-wide and
    idempotent; returns False where mallopt is unavailable (not glibc).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, 8 * 1024 * 1024)
    ok &= mallopt(_M_TRIM_THRESHOLD, 64 * 1024 * 1024)
    ok &= mallopt(_M_TOP_PAD, 16 * 1024 * 1024)
    return bool(ok)


# --- scratch buffers ---------------------------------------------------------------------------


class ScratchBuffers:
    """Read buffers used synchronously and then reused: one set serves every
    connection of a pool or an inbound (an idle connection holds none).

    tls: ciphertext read from a TLS socket, copied into its BIO at once;
    tcp: bytes read from a tunnel's TCP socket, framed into DATA at once.
    """

    __slots__ = ("_tls_size", "_tcp_size", "_tls", "_tcp")

    def __init__(self, tls_size: int = 256 * 1024, tcp_size: int = 256 * 1024) -> None:
        self._tls_size, self._tcp_size = tls_size, tcp_size
        self._tls: memoryview | None = None
        self._tcp: memoryview | None = None

    @property
    def tls(self) -> memoryview:
        if self._tls is None:
            self._tls = memoryview(bytearray(self._tls_size))
        return self._tls

    @property
    def tcp(self) -> memoryview:
        if self._tcp is None:
            self._tcp = memoryview(bytearray(self._tcp_size))
        return self._tcp


# --- TLS contexts --------------------------------------------------------------------------


class TlsContextCache:
    """HBONE TLS contexts per workload identity, rebuilt when its certificate rotates.

    Building a context loads a key and a certificate from disk; doing that per
    connection would cost more than the handshake. The serial of the store's
    current certificate is part of the key, so a rotation is picked up by the
    next connection.
    """

    def __init__(self, store: CertificateStore) -> None:
        self._store = store
        self._contexts: dict[tuple[bool, SpiffeId], tuple[int, ssl.SSLContext]] = {}

    @property
    def trust_domain(self) -> str:
        return self._store.trust_domain

    def server(self, identity: SpiffeId) -> ssl.SSLContext:
        return self._get(True, identity)

    def client(self, identity: SpiffeId) -> ssl.SSLContext:
        return self._get(False, identity)

    def _get(self, server_side: bool, identity: SpiffeId) -> ssl.SSLContext:
        serial = self._store.get(identity).serial
        cached = self._contexts.get((server_side, identity))
        if cached is not None and cached[0] == serial:
            return cached[1]
        make = server_context if server_side else client_context
        context = make(self._store, identity)
        self._contexts[(server_side, identity)] = (serial, context)
        return context


# --- tunnel ----------------------------------------------------------------------------------


class Tunnel:
    """One CONNECT stream spliced to one TCP socket.

    Created by the connection (client: open_tunnel; server: for each
    TunnelRequested). The socket is attached once the tunnel is accepted and
    belongs to the tunnel from then on; `done` resolves with the outcome when
    both directions are finished or the tunnel was reset.
    """

    __slots__ = (
        "_conn",
        "stream_id",
        "authority",
        "request",
        "_loop",
        "_sock",
        "_fd",
        "_reading",
        "_writing",
        "_window_blocked",
        "_pending",
        "_wbuf",
        "_batch",
        "_eof_to_tcp",
        "_tcp_eof",
        "_tcp_shut",
        "_accepted",
        "_attached",
        "_sock_waiting",
        "_peer_stopped_reading",
        "_finished",
        "bytes_to_stream",
        "bytes_to_tcp",
        "window_stalls",
        "opened",
        "done",
        "started_at",
    )

    def __init__(
        self,
        connection: HboneConnection,
        stream_id: int,
        authority: str,
        request: core.TunnelRequested | None = None,
    ) -> None:
        self._conn = connection
        self.stream_id = stream_id
        self.authority = authority
        self.request = request  # server side: the CONNECT as received
        self._loop = connection.loop
        self._sock: socket.socket | None = None
        self._fd = -1
        self._reading = False
        self._writing = False
        self._window_blocked = False
        self._pending: bytes | None = None  # TCP bytes the windows did not take yet
        self._wbuf: bytearray | None = None  # stream bytes the TCP socket did not take yet
        self._batch: list[memoryview | bytes] | None = None  # this receive round's DATA
        self._eof_to_tcp = False  # END_STREAM received, FIN to send once written out
        self._tcp_eof = False  # the TCP peer's FIN was seen and END_STREAM sent
        self._tcp_shut = False  # our FIN went out on the TCP socket
        self._accepted = False  # the 200 went out / came in
        self._attached = False  # the TCP socket is ours
        self._sock_waiting: socket.socket | None = None  # client: attached on the 200
        self._peer_stopped_reading = False  # RST_STREAM(NO_ERROR) after the peer's END_STREAM
        self._finished = False
        self.bytes_to_stream = 0
        self.bytes_to_tcp = 0
        self.window_stalls = 0  # times send_data came back short and reading paused
        # Client: resolves when the 200 arrives (or fails with a TunnelError).
        self.opened: asyncio.Future[None] = self._loop.create_future()
        self.done: asyncio.Future[TunnelOutcome] = self._loop.create_future()
        self.started_at = time.time()

    def __repr__(self) -> str:
        return f"<Tunnel stream={self.stream_id} authority={self.authority}>"

    @property
    def connection(self) -> HboneConnection:
        return self._conn

    @property
    def is_reading(self) -> bool:
        """Whether the TCP side is being read (False while a window or TLS is shut)."""
        return self._reading

    @property
    def pending_to_stream(self) -> int:
        """TCP bytes read but not yet taken by the stream's windows."""
        return len(self._pending) if self._pending else 0

    @property
    def pending_to_tcp(self) -> int:
        """Stream bytes received but not yet taken by the TCP socket."""
        return len(self._wbuf) if self._wbuf else 0

    def abort(self, detail: str = "aborted") -> None:
        """Reset both sides (cancellation, shutdown)."""
        if self._finished:
            return
        self._conn.core.reset_stream(self.stream_id, ErrorCodes.CANCEL)
        self._conn.flush()
        self._finish(TunnelEnd.ABORTED, detail, rst=True)

    # --- attach / start ---------------------------------------------------------------

    def attach(self, sock: socket.socket) -> None:
        """Take over the TCP socket and start moving bytes (after the 200)."""
        if self._finished:
            raise TunnelError(f"tunnel already ended ({self.done.result().end.value})")
        if self._attached:
            raise TunnelError("tunnel already has a socket")
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # not TCP (tests may use a socketpair)
        self._sock = sock
        self._fd = sock.fileno()
        self._attached = True
        if self._wbuf:  # server: DATA that arrived before the upstream connect
            self._write_buffered()
        elif self._eof_to_tcp:
            self._shut_tcp()
        if not self._finished:
            self._update_reading()

    # --- TCP -> stream ----------------------------------------------------------------------

    def _update_reading(self) -> None:
        want = (
            self._attached
            and not self._finished
            and not self._tcp_eof
            and not self._peer_stopped_reading
            and not self._window_blocked
            and not self._conn.write_paused
        )
        if want and not self._reading:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reading = True
        elif not want and self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def _on_readable(self) -> None:
        conn = self._conn
        buf = conn.read_buffer()
        try:
            count = self._sock.recv_into(buf)  # type: ignore[union-attr]
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._tcp_failed(exc)
            return
        if count == 0:
            self._on_tcp_eof()
            return
        # borrow: the DATA payload references the scratch buffer; flush() below
        # hands it to TLS (which copies it) before the buffer is read into again.
        taken = conn.core.send_data(self.stream_id, buf[:count], borrow=True)
        self.bytes_to_stream += taken
        if taken < count:
            # A window is shut (a gone stream's event finishes us first).
            self._pending = bytes(buf[taken:count])
            self.window_stalls += 1
            self._window_blocked = True
            conn.blocked.add(self)
            self._update_reading()
        conn.flush()

    def _on_window_opened(self) -> None:
        pending = self._pending
        if pending is None:
            self._window_blocked = False
            self._update_reading()
            return
        conn = self._conn
        taken = conn.core.send_data(self.stream_id, pending, borrow=True)  # bytes: immutable
        self.bytes_to_stream += taken
        if taken < len(pending):
            self._pending = pending[taken:]
            return
        self._pending = None
        self._window_blocked = False
        conn.blocked.discard(self)
        self._update_reading()

    def _on_tcp_eof(self) -> None:
        self._tcp_eof = True
        self._update_reading()
        self._conn.core.end_stream(self.stream_id)
        self._conn.flush()
        self._maybe_done()

    def _tcp_failed(self, exc: BaseException) -> None:
        self._conn.core.reset_stream(self.stream_id, ErrorCodes.CANCEL)
        self._conn.flush()
        self._finish(TunnelEnd.TCP_RESET, errno_name(exc), rst=True)

    # --- stream -> TCP ----------------------------------------------------------------------

    def _on_data(self, data: memoryview | bytes, flow_controlled_length: int) -> None:
        extra = flow_controlled_length - len(data)
        if extra > 0:  # never from our core today; keep the window honest anyway
            self._conn.core.acknowledge(self.stream_id, extra)
        if self._wbuf or not self._attached:
            # Behind earlier bytes (or before the upstream connect): copy and
            # wait. Bounded: none of it is acknowledged, so the stream window caps it.
            if self._wbuf is None:
                self._wbuf = bytearray(data)
            else:
                self._wbuf += data
            return
        if self._batch is None:
            self._batch = [data]
            self._conn.touched.append(self)
        else:
            self._batch.append(data)

    def _on_stream_ended(self) -> None:
        self._eof_to_tcp = True
        if self._batch is None and not self._wbuf and self._attached:
            self._shut_tcp()
        # else: after the batch / buffer is written out

    def _flush_batch(self) -> None:
        """Write this receive round's DATA to the socket (before the views are reused)."""
        batch, self._batch = self._batch, None
        if batch is None or self._finished:
            return
        if len(batch) == 1:
            total = len(batch[0])
        else:
            total = 0
            for piece in batch:
                total += len(piece)
        try:
            if len(batch) == 1:
                sent = self._sock.send(batch[0])  # type: ignore[union-attr]
            else:
                sent = 0
                for start in range(0, len(batch), _MAX_IOVECS):
                    group = batch[start : start + _MAX_IOVECS]
                    wrote = self._sock.sendmsg(group)  # type: ignore[union-attr]
                    sent += wrote
                    if wrote < sum(len(piece) for piece in group):
                        break
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._tcp_failed(exc)
            return
        if sent:
            self.bytes_to_tcp += sent
            self._conn.core.acknowledge(self.stream_id, sent)
        if sent < total:
            rest = bytearray()
            skip = sent
            for piece in batch:
                size = len(piece)
                if skip >= size:
                    skip -= size
                    continue
                rest += piece[skip:] if skip else piece
                skip = 0
            self._wbuf = rest
            self._want_writable()
        elif self._eof_to_tcp:
            self._shut_tcp()

    def _write_buffered(self) -> None:
        wbuf = self._wbuf
        if not wbuf:
            return
        try:
            sent = self._sock.send(wbuf)  # type: ignore[union-attr]
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._tcp_failed(exc)
            return
        if sent:
            del wbuf[:sent]  # cheap: bytearray drops from the front without moving
            self.bytes_to_tcp += sent
            self._conn.core.acknowledge(self.stream_id, sent)
            self._conn.flush()
        if wbuf:
            self._want_writable()
            return
        self._wbuf = None
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False
        if self._eof_to_tcp:
            self._shut_tcp()

    def _want_writable(self) -> None:
        if not self._writing:
            self._loop.add_writer(self._fd, self._write_buffered)
            self._writing = True

    def _shut_tcp(self) -> None:
        if self._tcp_shut or self._finished:
            return
        try:
            self._sock.shutdown(socket.SHUT_WR)  # type: ignore[union-attr]
        except OSError as exc:
            self._tcp_failed(exc)
            return
        self._tcp_shut = True
        self._maybe_done()

    # --- events from the connection -------------------------------------------------------------

    def _on_accepted(self) -> None:
        self._accepted = True
        if not self.opened.done():
            self.opened.set_result(None)
        sock, self._sock_waiting = self._sock_waiting, None
        if sock is not None:
            try:
                self.attach(sock)  # at once: the server may already be sending
            except (OSError, ValueError) as exc:  # the caller's socket is unusable
                self._tcp_failed(exc)

    def _on_refused(self, status: int) -> None:
        self._fail_open(TunnelRefused(status), TunnelEnd.REFUSED, f"status {status}")

    def _on_stream_reset(self, error_code: int) -> None:
        name = getattr(error_code, "name", str(error_code))
        if not self._accepted:
            self._fail_open(TunnelReset(error_code), TunnelEnd.STREAM_RESET, name)
            return
        if error_code == ErrorCodes.NO_ERROR and self._eof_to_tcp and self._attached:
            # RFC 9113 §8.1: the peer sent all it had (END_STREAM) and asks us
            # to stop sending, "without error" (Envoy does this when its
            # upstream closes first). Its bytes are complete: write them out
            # and FIN; an RST here could discard them from our socket buffer.
            self._peer_stopped_reading = True
            self._pending = None
            self._window_blocked = False
            self._conn.blocked.discard(self)
            self._update_reading()
            self._maybe_done()
            return
        self._finish(TunnelEnd.STREAM_RESET, name, rst=True)

    def _on_connection_lost(self, detail: str) -> None:
        if not self._accepted:
            self._fail_open(HboneConnectionLost(detail), TunnelEnd.CONNECTION_LOST, detail)
            return
        self._finish(TunnelEnd.CONNECTION_LOST, detail, rst=True)

    def _fail_open(self, exc: TunnelError, end: TunnelEnd, detail: str) -> None:
        """Never opened: the socket (if any) stays the caller's."""
        self._sock_waiting = None
        if not self.opened.done():
            self.opened.set_exception(exc)
            self.opened.exception()  # awaiting still raises; no "never retrieved" noise
        self._finish(end, detail, rst=False)

    # --- ending -----------------------------------------------------------------------------------

    def _maybe_done(self) -> None:
        if self._finished or not self._tcp_shut:
            return
        if self._tcp_eof:
            self._finish(TunnelEnd.CLOSED, "", rst=False)
        elif self._peer_stopped_reading:
            # Whatever the pod still sends now meets a closed socket (RST from the kernel).
            self._finish(TunnelEnd.CLOSED, "peer stopped reading: RST_STREAM(NO_ERROR) after its END_STREAM", rst=False)

    def _finish(self, end: TunnelEnd, detail: str, *, rst: bool) -> None:
        if self._finished:
            return
        self._finished = True
        self._sock_waiting = None
        self._batch = None
        self._pending = None
        self._wbuf = None
        sock = self._sock
        if sock is not None:
            if self._reading:
                self._loop.remove_reader(self._fd)
            if self._writing:
                self._loop.remove_writer(self._fd)
            self._reading = self._writing = False
            if rst:
                reset_socket(sock)
            else:
                sock.close()
        if not self.opened.done():
            # Ended before the 200 reached a caller: nobody else will say why.
            self.opened.set_exception(HboneConnectionLost(f"tunnel ended: {end.value} {detail}"))
            self.opened.exception()  # awaiting still raises; no "never retrieved" noise
        self._conn._tunnel_finished(self)
        if not self.done.done():
            self.done.set_result(TunnelOutcome(end, self.bytes_to_stream, self.bytes_to_tcp, detail))


# --- connection ----------------------------------------------------------------------------------

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
        connection: core.HboneClientConnection | core.HboneServerConnection,
        *,
        check_peer: PeerCheck,
        idle_timeout_s: float | None,
        scratch: ScratchBuffers | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self.core = connection
        self._scratch = scratch or ScratchBuffers(tcp_size=connection.settings.tcp_read_size)
        self.settings: HboneSettings = connection.settings
        self.loop = loop or asyncio.get_running_loop()
        self._check_peer = check_peer
        self._idle_timeout_s = idle_timeout_s
        self._log = log or _log
        self._transport: asyncio.Transport | None = None
        self.tunnels: dict[int, Tunnel] = {}
        self.blocked: set[Tunnel] = set()  # tunnels waiting for a window
        self.touched: list[Tunnel] = []  # tunnels with DATA batched in this receive round
        self.write_paused = False
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
        for tunnel in self.tunnels.values():
            tunnel._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        for tunnel in list(self.tunnels.values()):
            tunnel._update_reading()

    # --- output -----------------------------------------------------------------------------

    def flush(self) -> None:
        """Write whatever the core has queued (TLS encrypts it at once)."""
        segments = self.core.data_to_send_segments()
        if segments and self._transport is not None and not self._lost:
            if len(segments) == 1:
                self._transport.write(segments[0])
            else:
                self._transport.writelines(segments)

    def close(self, reason: str = "") -> None:
        """Graceful: GOAWAY, reset the tunnels, close the TLS connection."""
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

    def _handle(self, events: list[core.HboneEvent]) -> None:
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

    def _dispatch(self, event: core.HboneEvent) -> bool:
        """Act on one event; True once the connection is finished."""
        tunnels = self.tunnels
        kind = type(event)
        if kind is core.DataReceived:
            tunnel = tunnels.get(event.stream_id)  # type: ignore[union-attr]
            if tunnel is not None:
                tunnel._on_data(event.data, event.flow_controlled_length)  # type: ignore[union-attr]
        elif kind is core.WindowOpened:
            self._on_window_opened(event.stream_id)  # type: ignore[union-attr]
        elif kind is core.StreamEnded:
            tunnel = tunnels.get(event.stream_id)  # type: ignore[union-attr]
            if tunnel is not None:
                tunnel._on_stream_ended()
        elif kind is core.StreamReset:
            self._flush_touched()
            tunnel = tunnels.get(event.stream_id)  # type: ignore[union-attr]
            if tunnel is not None:
                tunnel._on_stream_reset(event.error_code)  # type: ignore[union-attr]
        elif kind is core.ConnectionClosed:
            self._flush_touched()
            self._on_connection_closed(event)  # type: ignore[arg-type]
            return True
        elif kind is core.PingAcked:
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

    def _handle_side_event(self, event: core.HboneEvent) -> None:
        """Client/server specific events (TunnelAccepted, TunnelRequested ...)."""

    def _on_window_opened(self, stream_id: int | None) -> None:
        if stream_id is None:
            for tunnel in list(self.blocked):
                tunnel._on_window_opened()
        else:
            tunnel = self.tunnels.get(stream_id)
            if tunnel is not None and tunnel in self.blocked:
                tunnel._on_window_opened()

    def _on_connection_closed(self, event: core.ConnectionClosed) -> None:
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
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _tunnel_finished(self, tunnel: Tunnel) -> None:
        if self.tunnels.get(tunnel.stream_id) is tunnel:
            del self.tunnels[tunnel.stream_id]
        self.blocked.discard(tunnel)
        if not self.tunnels and not self._lost and not self._closing:
            self._on_no_tunnels()

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

    core: core.HboneClientConnection

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
            core.HboneClientConnection(settings, log=log),
            check_peer=check_peer,
            idle_timeout_s=settings.pool_idle_timeout_s if idle_timeout_s is None else idle_timeout_s,
            scratch=scratch,
            loop=loop,
            log=log,
        )

    @property
    def can_open_stream(self) -> bool:
        return self.is_open and self.core.can_open_stream

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
    ) -> Tunnel:
        """CONNECT, wait for the 200, then splice `sock`; raises TunnelError.

        The socket is read only after the 200 (a pod's bytes never go out as
        DATA before it). On failure the socket is left untouched to the caller.
        """
        tunnel = self.start_tunnel(authority, extra_headers, sock)
        try:
            await tunnel.opened
        except asyncio.CancelledError:
            if not tunnel._accepted:
                tunnel._sock_waiting = None  # still the caller's
            tunnel.abort("cancelled while opening")
            raise
        return tunnel

    def _handle_side_event(self, event: core.HboneEvent) -> None:
        kind = type(event)
        if kind is core.TunnelAccepted:
            tunnel = self.tunnels.get(event.stream_id)  # type: ignore[union-attr]
            if tunnel is not None:
                tunnel._on_accepted()
        elif kind is core.TunnelRefused:
            tunnel = self.tunnels.get(event.stream_id)  # type: ignore[union-attr]
            if tunnel is not None:
                tunnel._on_refused(event.status)  # type: ignore[union-attr]

    def _on_no_tunnels(self) -> None:
        if not self.core.can_open_stream and not self.core.closed:
            # Every stream this connection may carry has been used: retire it.
            self.close("stream budget used")
            return
        self._arm_idle()


TunnelRequestHandler = Callable[["HboneServerProtocol", Tunnel], None]
"""Server: called for each CONNECT; must eventually call accept_tunnel or refuse_tunnel."""


class HboneServerProtocol(HboneConnection):
    """Server side (port 15008): surfaces CONNECTs, splices accepted ones."""

    core: core.HboneServerConnection

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
            core.HboneServerConnection(settings, log=log),
            check_peer=check_peer,
            idle_timeout_s=settings.server_idle_timeout_s if idle_timeout_s is None else idle_timeout_s,
            scratch=scratch,
            loop=loop,
            log=log,
        )
        self._on_tunnel_requested = on_tunnel_requested

    def accept_tunnel(self, tunnel: Tunnel, sock: socket.socket) -> bool:
        """Send the 200 and splice `sock`; False if the stream is already gone (close sock then)."""
        if tunnel._finished or not self.core.accept(tunnel.stream_id):
            return False
        tunnel._on_accepted()
        tunnel.attach(sock)
        self.flush()
        return True

    def refuse_tunnel(self, tunnel: Tunnel, status: int, detail: str = "") -> None:
        self.core.refuse(tunnel.stream_id, status)
        self.flush()
        tunnel._fail_open(TunnelRefused(status), TunnelEnd.REFUSED, detail or f"status {status}")

    def _handle_side_event(self, event: core.HboneEvent) -> None:
        if type(event) is core.TunnelRequested:
            request: core.TunnelRequested = event  # type: ignore[assignment]
            authority = core.format_authority(request.authority_host, request.authority_port)
            tunnel = Tunnel(self, request.stream_id, authority, request)
            self._add_tunnel(tunnel)
            self._on_tunnel_requested(self, tunnel)
