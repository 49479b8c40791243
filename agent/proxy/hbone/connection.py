"""Sans-I/O HBONE: TCP tunnels as HTTP/2 CONNECT streams, bytes in, events and bytes out.

`HboneClientConnection` (client.py) and `HboneServerConnection` (server.py) work the way
`h2` itself works: the I/O layer feeds received bytes in, acts on the returned events
(events.py), calls the stream methods, and writes whatever `data_to_send()` returns. Nothing
here touches a socket or a clock other than the injected one. What both sides share lives
here: framing of DATA and WINDOW_UPDATE outside h2, flow control, stream teardown. Why the
core parses DATA itself, its contract with the I/O layer and the abuse limits: docs/hbone.md.
"""
from __future__ import annotations

import mmap
from collections.abc import Callable

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack
import hyperframe.frame
import structlog
from h2.errors import ErrorCodes

from .events import (
    ConnectionClosed,
    DataReceived,
    HboneEvent,
    StreamReset,
    WindowOpened,
)
from .frames import (
    _BORROW_MIN,
    _CLIENT_PREFACE,
    _DEFAULT_WINDOW,
    _FLAG_ACK,
    _FLAG_END_HEADERS,
    _FLAG_END_STREAM,
    _PLAIN_HEADERS_MASK,
    _FLAG_PADDED,
    _FRAME_HEADER,
    _FRAME_HEADER_LENGTH,
    _GOAWAY_DEBUG_MAX,
    _GOAWAY_HEAD,
    _FatalInput,
    _MAX_WINDOW,
    _MIN_READ_ROOM,
    _RECEIVE_BUFFER_SIZE,
    _STREAM_ID_MASK,
    _TYPE_CONTINUATION,
    _TYPE_DATA,
    _TYPE_GOAWAY,
    _TYPE_HEADERS,
    _TYPE_PING,
    _TYPE_PUSH_PROMISE,
    _TYPE_SETTINGS,
    _TYPE_WINDOW_UPDATE,
    _UINT32,
    _WINDOW_UPDATE_FRAME,
    _error_code,
    goaway_frame,
)
from .buffers import mapped_buffer
from .h2_connection import QuietH2Connection, SilentLogger
from .h2_events import _H2EventHandling
from .hpack_decoder import PlainBlockDecoder
from .settings import HboneSettings
from .stream import _Phase, _Tunnel


class HboneProtocolError(Exception):
    """A call on an HBONE connection that cannot be carried out.

    Raised for calls on a closed connection that need a live one (open_stream,
    ping), when the peer's stream limit is reached, and for sending on a tunnel
    that may not carry DATA (unanswered, or already half-closed by us).
    Whatever `data_to_send()` holds (e.g. a GOAWAY) is still valid.
    """


class _PlainLiteralEncoder(hpack.Encoder):
    """HPACK with string literals sent as they are, not Huffman coded.

    hpack codes Huffman strings in Python a bit at a time, and the peer's
    decoder (ours too) undoes it the same way: ~8 us to encode and ~6 us to
    decode one CONNECT's literals (the authority, `forwarded`), for a few
    bytes saved on a block of a few dozen. Dynamic-table indexing is kept.
    """

    def encode(self, headers, huffman: bool = True) -> bytes:  # type: ignore[no-untyped-def]
        return super().encode(headers, huffman=False)


class _HboneConnection(_H2EventHandling):
    """What client and server share: framing, flow control, stream teardown."""

    def __init__(
        self,
        settings: HboneSettings,
        *,
        client_side: bool,
        clock: Callable[[], float],
        log: structlog.typing.FilteringBoundLogger | None,
    ) -> None:
        self._settings = settings
        self._client_side = client_side
        self._clock = clock
        self._log = (log or structlog.get_logger(__name__)).bind(hbone_side="client" if client_side else "server")
        self._header_list_limit = settings.max_header_list_size(client_side=client_side)
        # Between the advertised header list size and twice it we still decode
        # (keeping HPACK state intact) and refuse only the stream.
        self._max_header_block = 2 * self._header_list_limit

        self._h2 = QuietH2Connection(
            h2.config.H2Configuration(
                client_side=client_side,
                header_encoding=None,
                # h2 turns a malformed request into a connection error; HBONE
                # answers it with a 400 on that stream instead, so we validate.
                validate_inbound_headers=False,
                # What we send is made here: the pseudo-headers by us, extra
                # request headers vetted by connect._check_outbound_headers
                # (lower-case names, no connection-specific fields, no CR/LF/NUL).
                # h2's second pass over them cost ~11 us per CONNECT and ~7 us
                # per 200 (an eighth of send_headers), on every connection.
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
                logger=SilentLogger(),  # h2's debug calls, a C no-op (h2_connection.py)
            )
        )
        local: dict[h2.settings.SettingCodes | int, int] = {
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: settings.stream_window,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: settings.max_frame_size,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: self._header_list_limit,
        }
        if client_side:
            local[h2.settings.SettingCodes.ENABLE_PUSH] = 0
        else:
            local[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = settings.max_concurrent_streams
        # Installing the settings before initiate_connection() makes them our
        # state at once, so frames and streams are sized right from the start.
        self._h2.encoder = _PlainLiteralEncoder()  # before anything is encoded
        self._h2.decoder = PlainBlockDecoder()  # before anything is decoded
        self._h2.local_settings = h2.settings.Settings(client=client_side, initial_values=local)
        self._h2.max_inbound_frame_size = settings.max_frame_size
        self._h2.decoder.max_header_list_size = self._max_header_block

        # Flow control (connection level; per stream in _Tunnel).
        self._send_window = _DEFAULT_WINDOW
        self._recv_window = settings.connection_window
        self._recv_credit = 0
        self._max_outbound_frame = self._h2.max_outbound_frame_size
        self._stream_update_at = settings.stream_window // 4
        self._stream_low_water = settings.stream_window // 2
        self._connection_update_at = settings.connection_window // 4
        self._connection_low_water = settings.connection_window // 2

        # Inbound parser state.
        self._preface_left = 0 if client_side else len(_CLIENT_PREFACE)
        self._header_block = -1  # bytes in the open header block; -1: none open
        self._in_data = False  # inside a DATA frame's payload
        self._data_stream = 0
        self._data_tunnel: _Tunnel | None = None  # None: payload is discarded
        self._data_left = 0  # payload bytes of the current DATA frame still to come
        self._pad_left = 0  # padding after it
        self._data_end_stream = False
        self._skip_left = 0  # payload of an unknown (extension) frame, ignored
        self._rbuf: bytearray | mmap.mmap = bytearray()  # a mapping once used (see mapped_buffer)
        self._rview = memoryview(self._rbuf)
        self._rview_ro = self._rview.toreadonly()
        self._rstart = 0  # unparsed input is _rbuf[_rstart:_rend]
        self._rend = 0
        self._lent: list[memoryview] = []  # DataReceived views of _rbuf given out

        self._out = bytearray()  # frames we wrote ourselves, in order with h2's (the tail)
        self._segments: list[bytes | bytearray | memoryview] = []  # output before _out
        self._tunnels: dict[int, _Tunnel] = {}
        self._blocked_streams: set[int] = set()
        self._connection_blocked = False
        self._initiated = False
        self._closed = False
        self._ping_counter = 0
        # PING and SETTINGS acknowledgements queued for the peer and not yet reported
        # written with control_replies_written() (0 for a peer that reads). A plain
        # attribute: the I/O layer reads it after every write (no property call per message).
        self.queued_control_replies = 0
        # Graceful shutdown (RFC 9113 §6.8): the last stream id our GOAWAY
        # named, and the one the peer's named; None until one was sent/received.
        self._goaway_sent: int | None = None
        self._goaway_received: int | None = None

    # --- public state -----------------------------------------------------------

    @property
    def settings(self) -> HboneSettings:
        return self._settings

    @property
    def closed(self) -> bool:
        """True once a GOAWAY went either way; only data_to_send() is left."""
        return self._closed

    @property
    def going_away(self) -> bool:
        """A graceful GOAWAY went either way: no new streams; close once the
        open ones have ended."""
        return self._goaway_sent is not None or self._goaway_received is not None

    @property
    def tunnel_count(self) -> int:
        """Streams the caller still has to deal with (open, pending or unacknowledged)."""
        return len(self._tunnels)

    @property
    def max_outbound_frame_size(self) -> int:
        """Largest DATA frame we may send: the peer's SETTINGS_MAX_FRAME_SIZE."""
        return self._max_outbound_frame

    @property
    def buffered_input(self) -> int:
        """Received bytes held for an incomplete frame (bounded by one frame)."""
        return self._rend - self._rstart

    @property
    def receive_window(self) -> int:
        """Connection bytes the peer may still send before our next WINDOW_UPDATE."""
        return self._recv_window

    def control_replies_written(self, count: int) -> None:
        """The I/O layer wrote `count` queued acknowledgements to the socket."""
        self.queued_control_replies = max(0, self.queued_control_replies - count)

    def send_window(self, stream_id: int) -> int:
        """Bytes send_data() would accept on this stream right now."""
        tunnel = self._tunnels.get(stream_id)
        if self._closed or tunnel is None:
            return 0
        return max(0, min(tunnel.send_window, self._send_window))

    # --- lifecycle ----------------------------------------------------------------

    def initiate_connection(self) -> None:
        """Queue the preface (client), our SETTINGS and the connection WINDOW_UPDATE."""
        if self._initiated:
            raise HboneProtocolError("connection already initiated")
        self._initiated = True
        self._h2.initiate_connection()
        extra = self._settings.connection_window - _DEFAULT_WINDOW
        if extra > 0:
            self._h2.increment_flow_control_window(extra)
        self._after_initiate()

    def _after_initiate(self) -> None:
        """Hook for side-specific set-up once SETTINGS is serialized."""

    def data_to_send(self) -> bytes | bytearray:
        """Bytes to write to the peer (possibly empty); ownership passes to the caller."""
        segments = self.data_to_send_segments()
        if len(segments) == 1:
            return segments[0]  # type: ignore[return-value]
        return b"".join(segments)

    def data_to_send_segments(self) -> list[bytes | bytearray | memoryview]:
        """What to write, in order, as pieces: payloads passed to
        send_data(borrow=True) are referenced, not copied. Write them (or copy
        them) before touching those buffers again."""
        self._pull_h2_output()
        if self._out:
            self._segments.append(self._out)
            self._out = bytearray()
        segments, self._segments = self._segments, []
        return segments

    def ping(self, opaque_data: bytes | None = None) -> bytes:
        """Queue a PING; returns the 8 opaque bytes its PingAcked will carry."""
        self._require_live()
        if opaque_data is None:
            self._ping_counter += 1
            opaque_data = self._ping_counter.to_bytes(8, "big")
        if len(opaque_data) != 8:
            raise ValueError("PING data must be 8 bytes")
        self._h2.ping(opaque_data)
        return opaque_data

    def go_away(self, reason: str = "") -> None:
        """Graceful shutdown: queue a GOAWAY(NO_ERROR) naming the last stream
        the peer opened that we took; the peer opens no more on this
        connection, the open ones carry on (close() once they have ended).
        A CONNECT that crosses it gets RST_STREAM(REFUSED_STREAM)."""
        self._require_live()
        if self._goaway_sent is not None:
            return
        last = 0 if self._client_side else self._h2.highest_inbound_stream_id
        self._pull_h2_output()
        self._out += goaway_frame(last, ErrorCodes.NO_ERROR, reason)
        self._goaway_sent = last

    def close(self, error_code: int = ErrorCodes.NO_ERROR, reason: str = "") -> None:
        """Queue a GOAWAY; the connection and every stream on it end here."""
        if self._closed:
            return
        self._h2.close_connection(error_code, additional_data=reason.encode("utf-8", "replace")[:_GOAWAY_DEBUG_MAX],
                                  last_stream_id=self._goaway_sent)  # never above an earlier GOAWAY's
        self._mark_closed()

    # --- inbound ----------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[HboneEvent]:
        """Feed bytes read from the peer; returns what they meant, in order.

        DataReceived.data are `bytes`. Never raises on anything the peer
        sends; a fatal problem ends the list with ConnectionClosed and queues
        a GOAWAY.
        """
        if not self._initiated:
            raise HboneProtocolError("call initiate_connection() first")
        events: list[HboneEvent] = []
        if self._closed or not data:
            return events
        self._release_lent()
        if self._rend > self._rstart:
            # Finish the carried frame in our buffer; the rest is parsed there too.
            size = len(data)
            self._make_room(size)
            self._rbuf[self._rend : self._rend + size] = data
            self._rend += size
            self._parse_buffer(events, copy=True)
            return events
        with memoryview(data) as view:
            size = len(view)
            try:
                done = self._parse(view, 0, size, events, True)
            except Exception as exc:  # mapped to a GOAWAY, never raised
                self._on_parse_error(exc, events)
                return events
            if not self._closed and done < size:
                carry = size - done
                self._rstart = self._rend = 0
                self._make_room(carry)
                self._rbuf[0:carry] = view[done:]
                self._rend = carry
        return events

    def get_buffer(self, size_hint: int = -1) -> memoryview:
        """Writable space to receive into (asyncio.BufferedProtocol.get_buffer).

        Releases the DataReceived views from the previous buffer_updated().
        """
        self._release_lent()
        if self._rend == 0 and self._rbuf:
            return self._rview  # nothing carried: the whole buffer
        self._make_room(_MIN_READ_ROOM)
        return self._rview[self._rend :]

    def buffer_updated(self, nbytes: int) -> list[HboneEvent]:
        """`nbytes` were written into the last get_buffer(); returns their events.

        DataReceived.data are read-only views into the buffer (see the class doc).
        """
        if not self._initiated:
            raise HboneProtocolError("call initiate_connection() first")
        events: list[HboneEvent] = []
        if self._closed:
            return events
        if not 0 <= nbytes <= len(self._rbuf) - self._rend:
            raise ValueError(f"buffer_updated({nbytes}) beyond the buffer handed out")
        self._rend += nbytes
        self._parse_buffer(events, copy=False)
        return events

    def _parse_buffer(self, events: list[HboneEvent], *, copy: bool) -> None:
        try:
            self._rstart = self._parse(self._rview_ro, self._rstart, self._rend, events, copy)
        except Exception as exc:  # mapped to a GOAWAY, never raised
            self._on_parse_error(exc, events)
        if self._closed or self._rstart == self._rend:
            self._rstart = self._rend = 0

    def _on_parse_error(self, exc: Exception, events: list[HboneEvent]) -> None:
        if isinstance(exc, _FatalInput):
            self._fail(events, exc.error_code, exc.reason)
        elif isinstance(exc, h2.exceptions.ProtocolError):
            self._fail(events, exc.error_code, str(exc) or type(exc).__name__)
        else:  # a bug must cost this connection, not the proxy
            self._log.error("hbone_internal_error", exc_info=exc)
            self._fail(events, ErrorCodes.INTERNAL_ERROR, f"internal error: {type(exc).__name__}")

    def _release_lent(self) -> None:
        if self._lent:
            for view in self._lent:
                view.release()
            self._lent.clear()

    def _make_room(self, wanted: int) -> None:
        """At least `wanted` free bytes after _rend, and room for the carried frame.

        Moves the carried bytes (an incomplete frame header or control frame)
        to the front, or into a larger buffer when a big control frame needs it.
        """
        carry = self._rend - self._rstart
        needed = max(wanted, self._carried_frame_size() - carry)
        size = len(self._rbuf)
        if size - self._rend >= needed:
            return
        if carry + needed <= size and (size <= 2 * _RECEIVE_BUFFER_SIZE or carry + needed > _RECEIVE_BUFFER_SIZE):
            # Slicing the bytearray copies first: overlapping moves are safe.
            self._rbuf[0:carry] = self._rbuf[self._rstart : self._rend]
        else:
            larger = mapped_buffer(max(_RECEIVE_BUFFER_SIZE, carry + needed))
            larger[0:carry] = self._rbuf[self._rstart : self._rend]
            self._rbuf = larger
            self._rview = memoryview(larger)
            self._rview_ro = self._rview.toreadonly()
        self._rstart, self._rend = 0, carry

    def _carried_frame_size(self) -> int:
        """Total size of the incomplete frame being carried (0 if unknown yet)."""
        if self._rend - self._rstart < _FRAME_HEADER_LENGTH or self._in_data or self._skip_left:
            return 0
        hi, lo, frame_type, _, _ = _FRAME_HEADER.unpack_from(self._rbuf, self._rstart)
        if frame_type == _TYPE_DATA or frame_type > _TYPE_CONTINUATION:
            return _FRAME_HEADER_LENGTH + 1  # payloads are streamed, never carried
        return _FRAME_HEADER_LENGTH + min(hi << 16 | lo, self._settings.max_frame_size)

    def _parse(self, view: memoryview, pos: int, end: int, out: list[HboneEvent], copy: bool) -> int:
        """Handle frames (and DATA payload pieces) in view[pos:end]; returns the new pos.

        Stops at an incomplete frame header or control frame, which the caller
        carries over to the next read.
        """
        unpack_header = _FRAME_HEADER.unpack_from
        while not self._closed:
            if self._in_data:
                if self._data_left:
                    if pos >= end:
                        break
                    count = min(self._data_left, end - pos)
                    self._data_left -= count
                    self._deliver(view, pos, count, out, copy)
                    pos += count
                    if self._data_left:
                        break
                if self._pad_left:
                    count = min(self._pad_left, end - pos)
                    self._pad_left -= count
                    pos += count
                    if self._pad_left:
                        break
                self._end_data_frame(out)
                continue
            if self._skip_left:
                count = min(self._skip_left, end - pos)
                self._skip_left -= count
                pos += count
                if self._skip_left:
                    break
                continue
            if self._preface_left:
                pos = self._take_preface(view, pos, end, out)
                if self._preface_left:
                    break
                continue
            if end - pos < _FRAME_HEADER_LENGTH:
                break
            hi, lo, frame_type, flags, stream_id = unpack_header(view, pos)
            length = hi << 16 | lo
            stream_id &= _STREAM_ID_MASK
            if length > self._settings.max_frame_size:
                raise _FatalInput(
                    ErrorCodes.FRAME_SIZE_ERROR, f"frame of {length} bytes exceeds {self._settings.max_frame_size}"
                )
            if self._header_block >= 0 and frame_type != _TYPE_CONTINUATION:
                raise _FatalInput(ErrorCodes.PROTOCOL_ERROR, "header block interrupted by another frame")
            if frame_type == _TYPE_DATA:
                if flags & _FLAG_PADDED:
                    if length == 0:
                        raise _FatalInput(ErrorCodes.FRAME_SIZE_ERROR, "padded DATA frame without pad length")
                    if end - pos < _FRAME_HEADER_LENGTH + 1:
                        break
                    pad = view[pos + _FRAME_HEADER_LENGTH]
                    pos += _FRAME_HEADER_LENGTH + 1
                else:
                    pad = -1
                    pos += _FRAME_HEADER_LENGTH
                self._begin_data_frame(stream_id, length, pad, flags, out)
                continue
            frame_end = pos + _FRAME_HEADER_LENGTH + length
            if frame_type == _TYPE_WINDOW_UPDATE:
                if length != 4:
                    raise _FatalInput(ErrorCodes.FRAME_SIZE_ERROR, "WINDOW_UPDATE payload is not 4 bytes")
                if frame_end > end:
                    break
                increment = _UINT32.unpack_from(view, pos + _FRAME_HEADER_LENGTH)[0] & _STREAM_ID_MASK
                self._on_window_update(stream_id, increment, view[pos:frame_end], out)
                pos = frame_end
                continue
            if frame_type > _TYPE_CONTINUATION:
                # Unknown extension frame types are ignored (RFC 9113 §4.1, §5.5).
                pos += _FRAME_HEADER_LENGTH
                self._skip_left = length
                continue
            block = -1
            if frame_type == _TYPE_HEADERS or frame_type == _TYPE_PUSH_PROMISE:
                block = length
            elif frame_type == _TYPE_CONTINUATION and self._header_block >= 0:
                block = self._header_block + length
            if block > self._max_header_block:
                raise _FatalInput(ErrorCodes.PROTOCOL_ERROR, f"header block over {self._max_header_block} bytes")
            if frame_end > end:
                break
            if (frame_type == _TYPE_PING or frame_type == _TYPE_SETTINGS) and not flags & _FLAG_ACK:
                self._queue_control_reply()  # h2 answers it with an ACK
            if frame_type == _TYPE_GOAWAY and stream_id == 0 and length >= _GOAWAY_HEAD.size:
                last, code = _GOAWAY_HEAD.unpack_from(view, pos + _FRAME_HEADER_LENGTH)
                if code == ErrorCodes.NO_ERROR:
                    # Not shown to h2, whose connection would close: the
                    # streams the peer keeps must carry on.
                    debug = bytes(view[pos + _FRAME_HEADER_LENGTH + _GOAWAY_HEAD.size : frame_end])
                    self._on_graceful_goaway(last & _STREAM_ID_MASK, debug, out)
                    pos = frame_end
                    continue
            if frame_type == _TYPE_HEADERS and flags & _PLAIN_HEADERS_MASK == _FLAG_END_HEADERS and stream_id:
                # A whole header block (a CONNECT, a 200): to h2 as a frame, not
                # bytes for its FrameBuffer to parse again.
                h2_events = self._h2.receive_header_block(
                    stream_id, bytes(view[pos + _FRAME_HEADER_LENGTH : frame_end]), bool(flags & _FLAG_END_STREAM))
            else:
                h2_events = self._h2.receive_data(view[pos:frame_end])
            pos = frame_end
            if block >= 0:
                self._header_block = -1 if flags & _FLAG_END_HEADERS else block
            self._dispatch(h2_events, out)
        return pos

    def _queue_control_reply(self) -> None:
        """Control-frame flood guard: a peer that sends PINGs or SETTINGS and
        does not read the ACKs ends here, before we queue one more. What is
        queued and unsent is dropped so the GOAWAY goes out at once."""
        limit = self._settings.max_outbound_control_frames
        if self.queued_control_replies >= limit:
            self._discard_output()
            raise _FatalInput(
                ErrorCodes.ENHANCE_YOUR_CALM, f"more than {limit} PING/SETTINGS acknowledgements queued, peer not reading"
            )
        self.queued_control_replies += 1

    def _discard_output(self) -> None:
        self._h2.data_to_send()
        self._out = bytearray()
        self._segments = []

    def _take_preface(self, view: memoryview, pos: int, end: int, out: list[HboneEvent]) -> int:
        done = len(_CLIENT_PREFACE) - self._preface_left
        count = min(self._preface_left, end - pos)
        if view[pos : pos + count] != _CLIENT_PREFACE[done : done + count]:
            raise _FatalInput(ErrorCodes.PROTOCOL_ERROR, "not an HTTP/2 client preface")
        self._preface_left -= count
        self._dispatch(self._h2.receive_data(view[pos : pos + count]), out)
        return pos + count

    def _may_receive(self, tunnel: _Tunnel) -> bool:
        """Whether DATA on this tunnel is tunnel bytes (the client's differs)."""
        return not tunnel.remote_ended

    def _begin_data_frame(self, stream_id: int, length: int, pad: int, flags: int, out: list[HboneEvent]) -> None:
        """A DATA frame header (and pad length) arrived: charge windows, pick a target."""
        if stream_id == 0:
            raise _FatalInput(ErrorCodes.PROTOCOL_ERROR, "DATA on stream 0")
        if length > self._recv_window:
            raise _FatalInput(ErrorCodes.FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        self._recv_window -= length
        payload = length
        if pad >= 0:
            payload = length - 1 - pad
            if payload < 0:
                raise _FatalInput(ErrorCodes.PROTOCOL_ERROR, "DATA padding longer than the frame")
        end_stream = bool(flags & _FLAG_END_STREAM)
        tunnel = self._tunnels.get(stream_id)
        if tunnel is None or not self._may_receive(tunnel):
            # Not tunnel bytes: drop them, give the window back, and let h2
            # judge what a DATA frame on this stream means.
            self._credit_connection(length)
            self._feed_h2_data(stream_id, flags & _FLAG_END_STREAM, out)
            tunnel, end_stream = None, False
        elif length > tunnel.recv_window:
            self._credit_connection(length)
            self._abort_stream(stream_id, ErrorCodes.FLOW_CONTROL_ERROR, out, "DATA beyond the stream window")
            tunnel, end_stream = None, False
        else:
            tunnel.recv_window -= length
            if payload < length:  # padding is ours to credit; the caller never sees it
                self._credit_stream(stream_id, tunnel, length - payload)
                self._credit_connection(length - payload)
        self._in_data = True
        self._data_stream = stream_id
        self._data_tunnel = tunnel
        self._data_left = payload
        self._pad_left = max(pad, 0)
        self._data_end_stream = end_stream

    def _deliver(self, view: memoryview, pos: int, count: int, out: list[HboneEvent], copy: bool) -> None:
        tunnel = self._data_tunnel
        if tunnel is None:
            return  # discarded; the window was credited when the frame began
        stream_id = self._data_stream
        if self._tunnels.get(stream_id) is not tunnel:
            # The caller dropped the tunnel while this frame was arriving.
            self._credit_connection(count)
            self._data_tunnel = None
            self._data_end_stream = False
            return
        tunnel.unacked += count
        if copy:
            out.append(DataReceived(stream_id, bytes(view[pos : pos + count]), count))
        else:
            piece = view[pos : pos + count]
            self._lent.append(piece)
            out.append(DataReceived(stream_id, piece, count))

    def _end_data_frame(self, out: list[HboneEvent]) -> None:
        self._in_data = False
        tunnel, self._data_tunnel = self._data_tunnel, None
        if self._data_end_stream and tunnel is not None and self._tunnels.get(self._data_stream) is tunnel:
            self._feed_h2_data(self._data_stream, _FLAG_END_STREAM, out)

    def _feed_h2_data(self, stream_id: int, flags: int, out: list[HboneEvent]) -> None:
        """A zero-length DATA frame: h2 updates the stream state, costs no window.
        Handed over as a frame object (not bytes for h2 to parse again)."""
        if flags & _FLAG_END_STREAM:
            h2_events = self._h2.receive_end_stream(stream_id)
        else:
            h2_events = self._h2.receive_frame(hyperframe.frame.DataFrame(stream_id))
        self._dispatch(h2_events, out)

    def _on_window_update(self, stream_id: int, increment: int, frame: memoryview, out: list[HboneEvent]) -> None:
        if stream_id == 0:
            if increment == 0:
                raise _FatalInput(ErrorCodes.PROTOCOL_ERROR, "connection WINDOW_UPDATE of 0")
            self._send_window += increment
            if self._send_window > _MAX_WINDOW:
                raise _FatalInput(ErrorCodes.FLOW_CONTROL_ERROR, "connection window above 2**31-1")
            if self._connection_blocked and self._send_window > 0:
                self._connection_blocked = False
                out.append(WindowOpened(None))
            return
        tunnel = self._tunnels.get(stream_id)
        if tunnel is None:
            # Not a stream we carry (closed, refused, or never opened): h2 judges.
            self._dispatch(self._h2.receive_data(frame), out)
            return
        if increment == 0:
            self._abort_stream(stream_id, ErrorCodes.PROTOCOL_ERROR, out, "stream WINDOW_UPDATE of 0")
            return
        tunnel.send_window += increment
        if tunnel.send_window > _MAX_WINDOW:
            self._abort_stream(stream_id, ErrorCodes.FLOW_CONTROL_ERROR, out, "stream window above 2**31-1")
            return
        if stream_id in self._blocked_streams and tunnel.send_window > 0:
            self._blocked_streams.discard(stream_id)
            out.append(WindowOpened(stream_id))

    def _fail(self, out: list[HboneEvent], error_code: int, reason: str) -> None:
        """Close the connection because of the peer; GOAWAY goes out with our reason."""
        if self._closed:
            return
        if self._h2.state_machine.state is not h2.connection.ConnectionState.CLOSED:
            self._h2.close_connection(error_code, additional_data=reason.encode("utf-8", "replace")[:_GOAWAY_DEBUG_MAX],
                                      last_stream_id=self._goaway_sent)
        self._mark_closed()
        code = _error_code(error_code)
        out.append(ConnectionClosed(code, reason, self._h2.highest_inbound_stream_id, remote=False))
        self._log.warning("hbone_connection_failed", error_code=getattr(code, "name", code), reason=reason)

    def _mark_closed(self) -> None:
        self._closed = True
        self._tunnels.clear()
        self._blocked_streams.clear()
        self._connection_blocked = False
        self._in_data = False
        self._data_tunnel = None
        self._skip_left = 0
        # Input is dropped; views already in this call's events stay valid
        # until the next get_buffer(), as always.
        self._rstart = self._rend = 0

    # --- stream operations (shared) -------------------------------------------------

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview, *, borrow: bool = False) -> int:
        """Frame as much of `data` as the windows allow; returns the byte count taken.

        Fewer than len(data) means a window is shut: keep the rest, stop
        reading the TCP side, and retry after WindowOpened. 0 for a stream
        that is already gone. The bytes are copied, so `data` may be reused at
        once, unless borrow=True: then big payloads are referenced by the
        output until data_to_send_segments()/data_to_send() hands them over,
        and `data` must not change until they are written (saves one copy
        of every byte on the sending side).
        """
        tunnel = self._tunnels.get(stream_id)
        if self._closed or tunnel is None:
            return 0
        if tunnel.local_ended:
            raise HboneProtocolError(f"stream {stream_id} already half-closed by us")
        self._check_may_send(tunnel)
        stream_window = tunnel.send_window
        connection_window = self._send_window
        wanted = len(data)
        allowed = max(0, min(wanted, stream_window, connection_window))
        if allowed:
            self._pull_h2_output()
            out = self._out
            frame_size = self._max_outbound_frame
            pack = _FRAME_HEADER.pack
            view = data if isinstance(data, memoryview) else memoryview(data)
            sent = 0
            while sent < allowed:
                chunk = min(frame_size, allowed - sent)
                out += pack(chunk >> 16, chunk & 0xFFFF, _TYPE_DATA, 0, stream_id)
                if borrow and chunk >= _BORROW_MIN:
                    # The header travels with what precedes it; the payload is referenced.
                    self._segments.append(out)
                    self._segments.append(view[sent : sent + chunk])
                    out = self._out = bytearray()
                else:
                    out += view[sent : sent + chunk]
                sent += chunk
            tunnel.send_window = stream_window - allowed
            self._send_window = connection_window - allowed
        if allowed < wanted:
            if connection_window <= stream_window:
                self._connection_blocked = True
            if stream_window <= connection_window:
                self._blocked_streams.add(stream_id)
        return allowed

    def _check_may_send(self, tunnel: _Tunnel) -> None:
        """Hook: the server forbids DATA before its 200."""

    def end_stream(self, stream_id: int) -> None:
        """Half-close our direction (END_STREAM = TCP FIN). Idempotent."""
        tunnel = self._tunnels.get(stream_id)
        if self._closed or tunnel is None or tunnel.local_ended:
            return
        self._check_may_send(tunnel)
        try:
            self._h2.end_stream(stream_id)
        except h2.exceptions.ProtocolError:
            self._log.debug("hbone_end_on_dead_stream", stream_id=stream_id)
            return
        tunnel.local_ended = True
        self._blocked_streams.discard(stream_id)
        self._forget_if_done(stream_id, tunnel)

    def reset_stream(self, stream_id: int, error_code: int = ErrorCodes.CANCEL) -> None:
        """Abort the tunnel (RST_STREAM = TCP RST). Unacknowledged data is credited."""
        if self._closed or self._drop(stream_id) is None:
            return
        self._quiet_reset(stream_id, error_code)

    def acknowledge(self, stream_id: int, length: int) -> None:
        """The caller has written out `length` flow-controlled bytes of this stream.

        Credits the stream and connection windows (WINDOW_UPDATEs are batched).
        Over-acknowledging is clamped; acknowledging a gone stream is a no-op
        because the core already credited what was left.
        """
        if length < 0:
            raise ValueError("cannot acknowledge a negative length")
        tunnel = self._tunnels.get(stream_id)
        if self._closed or tunnel is None:
            return
        length = min(length, tunnel.unacked)
        if length == 0:
            return
        tunnel.unacked -= length
        self._credit_stream(stream_id, tunnel, length)
        self._credit_connection(length)
        self._forget_if_done(stream_id, tunnel)

    # --- helpers ------------------------------------------------------------------------

    def _require_live(self) -> None:
        if not self._initiated:
            raise HboneProtocolError("call initiate_connection() first")
        if self._closed:
            raise HboneProtocolError("connection is closed")

    def _pull_h2_output(self) -> None:
        """Move h2's queued frames into ours so frames leave in the order they were made."""
        # h2 keeps its output in a bytearray; peeking at it spares an
        # allocation per call on the data path (falls back if h2 changes).
        if not getattr(self._h2, "_data_to_send", True):
            return
        pending = self._h2.data_to_send()
        if pending:
            self._out += pending

    def _queue_window_update(self, stream_id: int, increment: int) -> None:
        self._pull_h2_output()
        self._out += _WINDOW_UPDATE_FRAME.pack(0, 4, _TYPE_WINDOW_UPDATE, 0, stream_id, increment)

    def _credit_stream(self, stream_id: int, tunnel: _Tunnel, length: int) -> None:
        if tunnel.remote_ended or self._closed:
            return  # the peer sends no more on this stream; nothing to announce
        credit = tunnel.recv_credit + length
        if credit >= self._stream_update_at or tunnel.recv_window < self._stream_low_water:
            tunnel.recv_window += credit
            tunnel.recv_credit = 0
            self._queue_window_update(stream_id, credit)
        else:
            tunnel.recv_credit = credit

    def _credit_connection(self, length: int) -> None:
        if length <= 0 or self._closed:
            return
        credit = self._recv_credit + length
        if credit >= self._connection_update_at or self._recv_window < self._connection_low_water:
            self._recv_window += credit
            self._recv_credit = 0
            self._queue_window_update(0, credit)
        else:
            self._recv_credit = credit

    def _new_tunnel(self, phase: _Phase) -> _Tunnel:
        return _Tunnel(
            phase,
            send_window=self._h2.remote_settings.initial_window_size,
            recv_window=self._settings.stream_window,
        )

    def _drop(self, stream_id: int) -> _Tunnel | None:
        """Forget a stream the caller will not touch again; credit what it held."""
        tunnel = self._tunnels.pop(stream_id, None)
        self._blocked_streams.discard(stream_id)
        if tunnel is not None:
            self._credit_connection(tunnel.unacked)
        return tunnel

    def _forget_if_done(self, stream_id: int, tunnel: _Tunnel) -> None:
        if tunnel.local_ended and tunnel.remote_ended and tunnel.unacked == 0:
            del self._tunnels[stream_id]
            self._blocked_streams.discard(stream_id)

    def _quiet_reset(self, stream_id: int, error_code: int) -> None:
        """RST_STREAM unless h2 already considers the stream closed."""
        try:
            self._h2.reset_stream(stream_id, error_code)
        except h2.exceptions.ProtocolError:
            pass

    def _abort_stream(self, stream_id: int, error_code: int, out: list[HboneEvent], reason: str) -> None:
        """The peer broke the rules on one stream: reset it and tell the caller."""
        if self._drop(stream_id) is None:
            return
        self._quiet_reset(stream_id, error_code)
        out.append(StreamReset(stream_id, _error_code(error_code), remote=False))
        self._log.info("hbone_stream_aborted", stream_id=stream_id, reason=reason)
