"""One HBONE tunnel on asyncio: one HTTP/2 CONNECT stream spliced to one raw, non-blocking TCP socket.

TCP semantics through a tunnel (FIN, RST), back-pressure and the copy-free data path: docs/hbone.md.
"""
from __future__ import annotations

import asyncio
import socket
import time
from typing import TYPE_CHECKING

from h2.errors import ErrorCodes

from ..sockets import errno_name, reset_socket, set_nonblocking
from .events import TunnelRequested
from .outcomes import HboneConnectionLost, TunnelEnd, TunnelError, TunnelOutcome, TunnelRefused, TunnelReset

if TYPE_CHECKING:  # the connection creates its tunnels: a type, never an import at run time
    from .protocol import HboneConnection


_MAX_IOVECS = 512  # well under IOV_MAX (1024)
_FIN_PEEKS = 2  # a request and its response's close: the short exchanges whose FIN is worth peeking for


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
        "_fin_peeks",
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
        request: TunnelRequested | None = None,
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
        self._fin_peeks = _FIN_PEEKS  # short reads left to peek for a FIN after (see _fin_follows)
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
    def peer_stopped_reading(self) -> bool:
        """The peer sent RST_STREAM(NO_ERROR) after its END_STREAM: its bytes
        are complete and it takes no more of ours."""
        return self._peer_stopped_reading

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

    def attach(self, sock: socket.socket, *, read_now: bool = False) -> None:
        """Take over the TCP socket and start moving bytes (after the 200).

        read_now: read the socket at once, before registering it with the
        loop. The client side attaches the pod's socket when the 200 arrives,
        a round trip after the pod connected: a client-first pod has sent its
        bytes (often its FIN too) meanwhile, and taking them now spares the
        reader registration, the wake-up and its removal (uvloop makes and
        frees a poll handle, three epoll_ctl calls) for a short exchange. When
        nothing is there yet this costs one recv(2) that says EAGAIN.

        TCP_NODELAY is the socket's maker's: the agent's pod sockets inherit it
        from their listener (listeners.set_nodelay_inherited) and its upstream
        sockets get it in relay.prepare_upstream, so no setsockopt(2) here.
        """
        if self._finished:
            raise TunnelError(f"tunnel already ended ({self.done.result().end.value})")
        if self._attached:
            raise TunnelError("tunnel already has a socket")
        set_nonblocking(sock)
        self._sock = sock
        self._fd = sock.fileno()
        self._attached = True
        if self._wbuf:  # server: DATA that arrived before the upstream connect
            self._write_buffered()
        elif self._eof_to_tcp:
            self._shut_tcp()
        if read_now and not self._reading and self._wants_reading():
            self._on_readable()
        if not self._finished:
            self._update_reading()

    # --- TCP -> stream ----------------------------------------------------------------------

    def _wants_reading(self) -> bool:
        return (
            self._attached
            and not self._finished
            and not self._tcp_eof
            and not self._peer_stopped_reading
            and not self._window_blocked
            and not self._conn.write_paused
        )

    def _update_reading(self) -> None:
        want = self._wants_reading()
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
        elif self._fin_peeks and count < len(buf) and not self._finished and self._fin_follows():
            self._on_tcp_eof()  # flushes the DATA and END_STREAM together
            return
        conn.flush()

    def _fin_follows(self) -> bool:
        """After a short read: whether the peer's FIN is next (a peek, nothing
        consumed). A short exchange's last bytes and FIN arrive together; seen
        now, they leave as one write (DATA + END_STREAM) instead of two loop
        rounds, two TLS records and two sends, on this side and the peer's.
        Only the first `_FIN_PEEKS` short reads peek: a connection whose FIN
        did not follow them is a conversation, where a peek per message (a
        syscall, ~1.6 us) would buy nothing."""
        self._fin_peeks -= 1
        try:
            fin = self._sock.recv(1, socket.MSG_PEEK) == b""  # type: ignore[union-attr]
        except OSError:  # nothing yet (EAGAIN), or a reset the next read reports
            fin = False
        if not fin and not self._fin_peeks:
            self._conn._check_lone_conversation()
        return fin

    @property
    def is_conversation(self) -> bool:
        """Its peer's FIN did not follow its first short reads: message after
        message, one at a time (what _fin_follows stops peeking for)."""
        return not self._fin_peeks

    def _on_window_opened(self) -> None:
        pending = self._pending
        if pending is None:
            self._window_blocked = False
            self._update_reading()
            return
        conn = self._conn
        if conn.write_paused:
            return  # the TLS queue is full: resume_writing() retries, so a window burst cannot pile up here
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
                self.attach(sock, read_now=True)  # at once: the server may already be sending
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
