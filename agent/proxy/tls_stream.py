"""TLS on a raw non-blocking socket, driven by the event loop's readiness callbacks.

Why not asyncio's SSL transport: on the HBONE data path every read and write
crosses asyncio's sslproto state machine (15-25 Python calls and an
SSLWantReadError per read), which measured as a large share of the added
round-trip time of a small message. This is the same MemoryBIO technique
with only what HBONE needs:

- reads: recv_into one buffer -> incoming BIO -> SSLObject.read straight into
  the protocol's buffer (`get_buffer`/`buffer_updated`, like
  asyncio.BufferedProtocol); no exception when whole records arrived;
- writes: SSLObject.write -> outgoing BIO at once (callers reuse their
  buffers). When the connection is busy (its last event-loop round had
  more than one write: other streams' frames, a CONNECT and another
  tunnel's DATA), a round's writes go out together in one send at the
  round's end instead of one each: under many short connections a send
  per write was half of an agent's CPU (the kernel's send path, the
  receiver's included). When it is not (one message at a time, a
  conversation), a round's first write is sent at once: deferring it would
  add a loop round to every small message's trip (bench/hbone.py RTT +8%),
  and the later writes of that round still wait for its end. Counting a
  round's writes books its end (a loop handle and two Python calls per
  write, ~4.5% of an agent's instructions per round trip of a
  conversation, callgrind), so the protocol says when a burst is possible
  (`expect_bursts()`; not while an HBONE connection carries one tunnel
  whose messages are a conversation); when it is not, a quiet connection's
  write is sent at once and books nothing. More than `high_water` pending
  is sent at once.
  What the socket does not take waits in one buffer; the protocol is told to pause producing above
  `high_water` and to resume below `low_water` (like asyncio's
  pause_writing/resume_writing);
- `pause_reading()`/`resume_reading()` stop and restart reading the socket
  (the protocol's back-pressure on a peer that does not read our replies);
- `close()` sends close_notify and FIN once the buffer is written out, then
  reads and drops whatever the peer still sends until its FIN (at most
  `_CLOSE_TIMEOUT_S`): closing a socket with unread input makes the kernel
  answer RST and throw away what we sent and it has not delivered yet, such
  as the GOAWAY telling an abusive peer why; `abort()` drops everything at once.

The protocol object is duck-typed the way asyncio protocols are:
connection_made(stream), get_buffer(n), buffer_updated(n), eof_received(),
connection_lost(exc), pause_writing(), resume_writing().
"""
from __future__ import annotations

import asyncio
import collections
import socket
import ssl
from typing import Any, Protocol

__all__ = ["StreamProtocol", "TlsStream"]

_READ_SIZE = 256 * 1024
_HIGH_WATER = 1024 * 1024
_LOW_WATER = 256 * 1024
_CLOSE_TIMEOUT_S = 5.0


class StreamProtocol(Protocol):
    def connection_made(self, transport: Any) -> None: ...
    def get_buffer(self, sizehint: int) -> memoryview: ...
    def buffer_updated(self, nbytes: int) -> None: ...
    def eof_received(self) -> bool | None: ...
    def connection_lost(self, exc: Exception | None) -> None: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...


class TlsStream:
    """One TLS connection; `await handshake()`, then `start(protocol)`."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        read_buffer: memoryview | None = None,
        high_water: int = _HIGH_WATER,
        low_water: int = _LOW_WATER,
    ) -> None:
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        # server_hostname=None: no SNI (HBONE identities are URI SANs, checked after the handshake).
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side, server_hostname=None)
        # Used synchronously (copied into the incoming BIO at once), so one
        # buffer can serve every stream of a loop.
        self._read_view = read_buffer if read_buffer is not None else memoryview(bytearray(_READ_SIZE))
        # Ciphertext the socket did not take yet, as the pieces it came in (no copies).
        self._wq: collections.deque[bytes | memoryview] = collections.deque()
        self._wq_size = 0
        self._high_water = high_water
        self._low_water = low_water
        self._protocol: StreamProtocol | None = None
        self._reading = False
        self._read_paused = False  # by the protocol
        self._peer_eof = False
        self._writing = False
        self._write_paused = False
        # Ciphertext handed to the kernel since the start: with get_write_buffer_size()
        # it tells the protocol when bytes it wrote have left (control-frame accounting).
        self.bytes_sent = 0
        self._closing = False  # close() called: no more writes, FIN after the buffer
        self._closed = False  # socket closed, connection_lost scheduled
        self._close_timer: asyncio.TimerHandle | None = None
        self._send_scheduled = False  # a send at the end of this loop round is booked
        self._round_writes = 0  # writes since it was booked
        self._coalescing = False  # the last round was busy: this round's first write waits too
        self._may_burst = True  # the protocol's hint: several writes may come in one loop round
        self._extra: dict[str, Any] = {"socket": sock, "ssl_object": self._ssl}
        try:
            self._extra["peername"] = sock.getpeername()
            self._extra["sockname"] = sock.getsockname()
        except OSError:
            pass

    # --- asyncio-transport-like surface ------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def is_closing(self) -> bool:
        return self._closing or self._closed

    def get_write_buffer_size(self) -> int:
        return self._wq_size + self._outgoing.pending

    def pause_reading(self) -> None:
        """Stop reading the socket (and decrypting what is buffered) until resume_reading()."""
        self._read_paused = True
        if not self._closing:
            self._stop_reading()

    def resume_reading(self) -> None:
        if not self._read_paused:
            return
        self._read_paused = False
        if self._closing or self._protocol is None:
            return
        self._start_reading()
        if self._incoming.pending or self._ssl.pending():
            self._loop.call_soon(self._decrypt_if_reading)

    def _start_reading(self) -> None:
        if not self._reading and not self._closed:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reading = True

    def _stop_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    # --- handshake ----------------------------------------------------------------------------------

    async def handshake(self) -> None:
        """Run the TLS handshake (wrap it in a timeout). Raises ssl.SSLError / OSError."""
        loop = self._loop
        while True:
            try:
                self._ssl.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                self._send_alert()  # tell the peer why (bad certificate ...)
                raise
            await self._flush_handshake()
            data = await loop.sock_recv(self._sock, 65536)
            if not data:
                raise ConnectionResetError("peer closed the connection during the TLS handshake")
            self._incoming.write(data)
        await self._flush_handshake()

    def _send_alert(self) -> None:
        data = self._outgoing.read()
        if data:
            try:
                self._sock.send(data)
            except OSError:
                pass

    async def _flush_handshake(self) -> None:
        data = self._outgoing.read()
        if data:
            await self._loop.sock_sendall(self._sock, data)

    def start(self, protocol: StreamProtocol) -> None:
        """Hand the connection to `protocol` and start reading."""
        self._protocol = protocol
        protocol.connection_made(self)
        if self._closed or self._closing or self._read_paused:
            return
        self._start_reading()
        if self._incoming.pending or self._ssl.pending():
            # Application data that arrived with the end of the handshake.
            self._decrypt()

    # --- reading ----------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            count = self._sock.recv_into(self._read_view)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fatal(exc)
            return
        if self._closing:
            # After close(): dropped unread (see the module doc); the peer's FIN ends it.
            if count == 0:
                self._peer_eof = True
                self._stop_reading()
                if not self._wq:
                    self._shutdown(None)
            return
        if count == 0:
            self._on_eof()
            return
        self._incoming.write(self._read_view[:count])
        self._decrypt()

    def _decrypt_if_reading(self) -> None:
        if self._reading and not self._closing:
            self._decrypt()

    def _decrypt(self) -> None:
        """Decrypt everything buffered into the protocol's buffer, filling it
        with many records (SSL_read returns one 16 KiB record per call) before
        handing it over, so the protocol sees big reads."""
        protocol = self._protocol
        assert protocol is not None
        tls = self._ssl
        incoming = self._incoming
        more = True
        while more and not self._closing and not self._read_paused:
            buffer = protocol.get_buffer(-1)
            size = len(buffer)
            filled = 0
            eof = False
            while filled < size:
                try:
                    count = tls.read(size - filled, buffer[filled:] if filled else buffer)
                except ssl.SSLWantReadError:
                    more = False
                    break
                except ssl.SSLError as exc:
                    if filled:
                        protocol.buffer_updated(filled)
                    self._fatal(exc)
                    return
                if count == 0:  # close_notify
                    eof = True
                    break
                filled += count
                if not incoming.pending and not tls.pending():
                    more = False  # every record consumed: skip the SSLWantReadError round
                    break
            if filled:
                protocol.buffer_updated(filled)
            if eof:
                self._on_eof()
                return
        if self._outgoing.pending and not self._closed:
            self._send_outgoing()  # e.g. a KeyUpdate answer

    def _on_eof(self) -> None:
        if self._protocol is not None:
            self._protocol.eof_received()
        self._shutdown(None)

    # --- writing ----------------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt `data` now (it may be reused right after) and send what the socket takes."""
        if self._closing or self._closed or not data:
            return
        try:
            self._ssl.write(data)  # into the memory BIO: always whole
        except ssl.SSLError as exc:
            self._fatal(exc)
            return
        self._send_soon()

    def writelines(self, pieces: list[bytes | bytearray | memoryview]) -> None:
        """write() for several pieces, sent together."""
        if self._closing or self._closed:
            return
        try:
            for piece in pieces:
                if piece:
                    self._ssl.write(piece)
        except ssl.SSLError as exc:
            self._fatal(exc)
            return
        self._send_soon()

    def _send_soon(self) -> None:
        """Send at the end of this loop round, or now: the round's first write
        when the connection is not busy, or when much is pending (module doc)."""
        if self._send_scheduled:
            self._round_writes += 1
        elif not self._coalescing and not self._may_burst:
            self._send_outgoing()  # a conversation: no round to count
            return
        else:
            self._send_scheduled = True
            self._round_writes = 1
            self._loop.call_soon(self._send_booked)
            if not self._coalescing:
                self._send_outgoing()
                return
        if self._outgoing.pending >= self._high_water:
            self._send_outgoing()

    def expect_bursts(self, possible: bool) -> None:
        """The protocol's hint: whether several writes may come in one loop
        round (module doc). When they become possible, this round is counted
        from now as if a write had gone out already, so a second write in it
        waits for the round's end with the rest instead of being sent alone."""
        if possible and not self._may_burst and not self._send_scheduled and not self._closed:
            self._send_scheduled = True
            self._round_writes = 1
            self._loop.call_soon(self._send_booked)
        self._may_burst = possible

    def _send_booked(self) -> None:
        """The round's end: what it wrote goes out together, and whether it was
        busy decides whether the next round's first write waits."""
        self._send_scheduled = False
        self._coalescing = self._round_writes > 1
        if self._outgoing.pending and not self._closing and not self._closed:  # close() sent what was pending
            self._send_outgoing()

    def _send_outgoing(self) -> None:
        data = self._outgoing.read()
        if not data:
            return
        if self._wq:
            self._wq.append(data)
            self._wq_size += len(data)
        else:
            try:
                sent = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._fatal(exc)
                return
            self.bytes_sent += sent
            if sent == len(data):
                return
            rest = memoryview(data)[sent:]
            self._wq.append(rest)
            self._wq_size += len(rest)
            if not self._writing:
                self._loop.add_writer(self._fd, self._on_writable)
                self._writing = True
        if not self._write_paused and self._wq_size > self._high_water and self._protocol is not None:
            self._write_paused = True
            self._protocol.pause_writing()

    def _on_writable(self) -> None:
        wq = self._wq
        try:
            sent = self._sock.sendmsg(list(wq) if len(wq) <= 64 else [wq[i] for i in range(64)])
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fatal(exc)
            return
        self._wq_size -= sent
        self.bytes_sent += sent
        while sent:
            first = wq[0]
            if len(first) <= sent:
                sent -= len(first)
                wq.popleft()
            else:
                wq[0] = memoryview(first)[sent:]
                sent = 0
        if not wq:
            self._loop.remove_writer(self._fd)
            self._writing = False
            if self._closing:
                self._finish_close()
                return
        if self._write_paused and self._wq_size <= self._low_water and self._protocol is not None:
            self._write_paused = False
            self._protocol.resume_writing()

    # --- closing ----------------------------------------------------------------------------------

    def close(self) -> None:
        """close_notify, then FIN once everything queued is written."""
        if self._closing or self._closed:
            return
        self._closing = True
        try:
            self._ssl.unwrap()
        except ssl.SSLError:
            pass  # SSLWantRead: the peer's close_notify is not awaited
        self._close_timer = self._loop.call_later(_CLOSE_TIMEOUT_S, self.abort)
        self._send_outgoing_raw()
        if not self._wq:
            self._finish_close()

    def _finish_close(self) -> None:
        """Everything is written: FIN, then drop input until the peer's FIN."""
        if self._peer_eof or self._closed:
            self._shutdown(None)
            return
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._shutdown(None)
            return
        self._start_reading()

    def _send_outgoing_raw(self) -> None:
        """Like _send_outgoing, but usable while closing (no pause/resume)."""
        data = self._outgoing.read()
        if not data:
            return
        if not self._wq:
            try:
                sent = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                return
            self.bytes_sent += sent
            data = data[sent:]
        if data:
            self._wq.append(data)
            self._wq_size += len(data)
            if not self._writing:
                self._loop.add_writer(self._fd, self._on_writable)
                self._writing = True

    def abort(self) -> None:
        """Drop the connection now; queued bytes are discarded."""
        self._shutdown(None)

    def _fatal(self, exc: BaseException) -> None:
        self._shutdown(exc if isinstance(exc, Exception) else None)

    def _shutdown(self, exc: Exception | None) -> None:
        if self._closed:
            return
        self._closed = True
        self._closing = True
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        self._stop_reading()
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False
        self._wq.clear()
        self._wq_size = 0
        self._sock.close()
        if self._protocol is not None:
            self._loop.call_soon(self._protocol.connection_lost, exc)
            # Let go of the protocol, as asyncio's transports do: it holds this stream
            # too, and the pair would otherwise wait for the cyclic GC with the SSL
            # object and buffers (minutes in a long-lived agent; see bench/memory.py (d)).
            self._protocol = None
