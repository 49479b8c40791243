"""h2's connection with two cuts on the frames every tunnel hands it (its CONNECT
or 200 HEADERS and its END_STREAM, once per side per connection).

1. `_receive_frame` without its trace line. h2 4.x formats `repr(frame)` for a
   `logger.trace(...)` call before the logger sees it, and the default logger
   (DummyLogger, ours) throws the text away: ~5.6 us per HEADERS frame and
   ~1.8 us per DATA frame of formatting nobody reads. The override is h2's own
   method otherwise: same dispatch, same handling of frames on closed or
   too-old streams. It overrides a private method, so
   tests/unit/test_h2_connection.py pins h2's source of `_receive_frame` and
   `receive_data` (it fails when h2 changes them: re-check this copy then) and
   runs the closed-stream paths side by side with h2's own class.
2. `receive_frame(frame)`: a frame the HBONE core has framed itself (the
   zero-length DATA that carries a stream's END_STREAM to h2, see
   connection._feed_h2_data) goes to the dispatch without being serialized and
   parsed again through h2's FrameBuffer (~2.4 us each); errors are handled as
   `receive_data` handles them for one frame. The END_STREAM frame is one
   object per connection, reused (`receive_end_stream`): h2 reads a received
   DATA frame and keeps nothing of it (its `_receive_data_frame` and
   `_handle_data_on_closed_stream` are pinned too). Likewise a HEADERS frame
   that is a whole header block with no padding or priority (a CONNECT, a
   200: `receive_header_block`), whose bytes h2's FrameBuffer would parse
   into such a frame again (~15 Python calls per tunnel and side); frames
   with anything else go to `receive_data` as bytes.

3. `send_response_200(stream_id)`: h2's `send_headers(stream_id, [(":status",
   "200")])` for a stream the peer opened, in three steps instead of ~25 Python
   calls (~27 us per tunnel, the server's 200 answer): the connection's and the
   stream's state-machine transitions as h2 makes them, the stream's
   `request_method` as h2 leaves it (None: a response carries no method), and
   the frame h2 would serialize: HEADERS with END_HEADERS, one block byte 0x88
   (`:status 200` is HPACK static index 8: an indexed field, no dynamic-table
   change). h2's own path runs whenever that reasoning does not hold: an
   unknown stream, a stream already answered (h2 would make it trailers), or
   a pending table-size update the encoder must send first.
   tests/unit/test_h2_connection.py pins the source of every h2/hpack method
   this bypasses and checks bytes, states and errors against h2's own class.

4. `end_stream(stream_id)`: h2's own method (a tunnel's FIN: the empty DATA
   frame with END_STREAM, once per tunnel and side) with the frame written as
   the 9 bytes h2 would serialize instead of a DataFrame object built, flagged
   and serialized in Python; the same connection and stream transitions, the
   same errors for an unknown or closed stream (pinned the same way).

The client side's (tests/unit/test_connect_block.py pins the h2 code each
stands in for and compares bytes, states, events and errors with h2's class):

7. `begin_request(stream_id, ...)` and `send_header_block(stream_id, block)`:
   h2's `send_headers` opening a client stream, split around the encoding so
   the caller encodes the CONNECT block itself (connect_block.py): the same
   checks, transitions and frames, without h2's header list work.

8. A client stream's bare 200 (block 0x88, what our server sends) in
   `receive_header_block`: h2's `_receive_headers_frame` without the decoder,
   which would change nothing (`_receive_response_200`).

And the debug lines of both libraries, which nobody reads, cost no Python
call: h2 calls its logger's `debug` ~9 times per tunnel and side (its
DummyLogger's no-op is a Python function), hpack ~11 times per tunnel and side
(`logging.Logger.debug`, then `isEnabledFor`: two Python calls each, for a
stdlib logger the agent never configures below WARNING). `SilentLogger` is
h2's logger (connection.py passes it) and hpack's module logger (set when this
module is imported); its methods are a C no-op.
"""
from __future__ import annotations

import struct

import h2.config
import h2.connection
import h2.events
import hpack.hpack
from h2.connection import ConnectionInputs
from h2.stream import StreamInputs
from h2.exceptions import ProtocolError, StreamClosedError, StreamIDTooLowError
from hyperframe.frame import DataFrame, Frame, HeadersFrame, RstStreamFrame
from h2.errors import ErrorCodes

# The client side's shortcuts (7. and 8. above).
from h2.connection import AllowedStreamIDs
from h2.exceptions import TooManyStreamsError
from h2.stream import H2Stream, StreamState
from hpack import HeaderTuple


class SilentLogger:
    """A logger whose `debug` and `trace` drop their arguments in C (str.format
    of an empty string takes any arguments and returns "")."""

    __slots__ = ()
    debug = trace = "".format


# hpack logs through its module's `log` (debug only); the agent's JSON logs
# never carried those lines (the stdlib root logger stays at WARNING).
hpack.hpack.log = SilentLogger()  # type: ignore[assignment]


_STATUS_200 = ((":status", "200"),)
# A HEADERS frame header (length 1, type 0x1, flags END_HEADERS) up to the stream id.
_HEADERS_200 = struct.Struct(">HBBBLB")
_HEADERS = 0x1
_END_HEADERS = 0x4
_INDEXED_STATUS_200 = 0x80 | 8  # HPACK indexed field, static table index 8
# An empty DATA frame (length 0, type 0x0) with END_STREAM.
_EMPTY_DATA = struct.Struct(">HBBBL")
_DATA = 0x0
_END_STREAM = 0x1

# The client side's (7. and 8. above).
_CONTINUATION = 0x9
# A frame header: length (its upper 16 bits, its low byte), type, flags, stream id.
_FRAME_HEAD = struct.Struct(">HBBBL")
_STATUS_200_BLOCK = b"\x88"  # the whole header block of a bare 200 (see 3. above)
# Streams held (open or closed) past which begin_request has h2 count and drop the closed ones.
_PURGE_AT = 32
# Client stream states a response may arrive in (h2's stream transitions for RECV_HEADERS).
_AWAITING_RESPONSE = (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL)


class QuietH2Connection(h2.connection.H2Connection):
    """See the module docstring."""

    def __init__(self, config: h2.config.H2Configuration | None = None) -> None:
        super().__init__(config)
        self._end_stream_frame = DataFrame(1, flags=("END_STREAM",))
        # A whole header block, without and with END_STREAM.
        self._header_block_frames = (HeadersFrame(1, flags=("END_HEADERS",)),
                                     HeadersFrame(1, flags=("END_HEADERS", "END_STREAM")))

    def receive_header_block(self, stream_id: int, block: bytes, end_stream: bool) -> list[h2.events.Event]:
        """`receive_data` of a HEADERS frame with END_HEADERS and neither
        PADDED nor PRIORITY (stream_id not 0): the frame h2's FrameBuffer
        would make of it, one object per connection, reused."""
        if block == _STATUS_200_BLOCK and not end_stream:
            stream = self.streams.get(stream_id)
            if stream is not None:
                machine = stream.state_machine
                if machine.client is True and not machine.headers_received and machine.state in _AWAITING_RESPONSE:
                    try:
                        return self._receive_response_200(stream)
                    except ProtocolError as exc:  # as receive_frame: a GOAWAY is queued, the error raised
                        self._terminate_connection(exc.error_code)  # type: ignore[arg-type]
                        raise
        frame = self._header_block_frames[end_stream]
        frame.stream_id = stream_id
        frame.data = block
        frame.body_len = len(block)
        try:
            return self.receive_frame(frame)
        finally:
            frame.data = b""  # the block is not kept

    def _receive_response_200(self, stream: H2Stream) -> list[h2.events.Event]:
        """A client stream's first response, the bare 200 (block 0x88, no
        END_STREAM), as h2's `_receive_headers_frame` takes it in: the same
        connection and stream transitions, the content-length check, and the
        ResponseReceived with the header list its decoder would give (an indexed
        static field: no HPACK state changes). Skipped: the decoder, the header
        validation flags and the generators h2 runs the list through (~25
        Python calls per tunnel on the client)."""
        events = self.state_machine.process_input(ConnectionInputs.RECV_HEADERS)
        headers = [HeaderTuple(b":status", b"200")]
        stream_events = stream.state_machine.process_input(StreamInputs.RECV_HEADERS)
        stream._initialize_content_length(headers)
        stream_events[0].headers = headers
        return events + stream_events

    def receive_end_stream(self, stream_id: int) -> list[h2.events.Event]:
        """`receive_frame(DataFrame(stream_id, flags=("END_STREAM",)))`, the frame object reused."""
        frame = self._end_stream_frame
        frame.stream_id = stream_id
        return self.receive_frame(frame)

    def send_response_200(self, stream_id: int) -> None:
        """`send_headers(stream_id, [(":status", "200")])`, same states, same bytes."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.state_machine.headers_sent or self.encoder.header_table.resized:
            self.send_headers(stream_id, _STATUS_200)
            return
        self.state_machine.process_input(ConnectionInputs.SEND_HEADERS)
        stream.state_machine.process_input(StreamInputs.SEND_HEADERS)
        stream.request_method = None
        self._data_to_send += _HEADERS_200.pack(0, 1, _HEADERS, _END_HEADERS, stream_id, _INDEXED_STATUS_200)

    def begin_request(self, stream_id: int, method: bytes, authority: bytes) -> None:
        """The first half of `send_headers(stream_id, headers)` opening a new
        stream of ours, before its header block is encoded (as in h2: encoding
        changes the HPACK context for good, so the transitions come first): the
        same checks, the same connection and stream transitions, the stream's
        `request_method` and `_authority` as h2 sets them from `headers`.
        `send_header_block` queues the block (connect_block.ConnectBlockEncoder
        encodes it). What the two skip is h2's header list work: the list made
        into bytes, searched for the method and authority, encoded field by
        field, and the frames built as objects (~40 Python calls per CONNECT)."""
        if stream_id in self.streams:
            raise ProtocolError(f"stream {stream_id} is already open")  # h2 would send trailers: not a request
        max_open_streams = self.remote_settings.max_concurrent_streams
        held = len(self.streams)
        # h2's count of open streams walks every stream it holds (a Python call
        # each) and drops the closed ones; below the limit in streams held is
        # below it in open streams, so it is made only near the limit, or once
        # _PURGE_AT streams are held (they are dropped then, as h2 drops them).
        if held >= max_open_streams or held >= _PURGE_AT:
            value = self.open_outbound_streams
            if value + 1 > max_open_streams:
                raise TooManyStreamsError(f"Max outbound streams is {max_open_streams}, {value} open")
        self.state_machine.process_input(ConnectionInputs.SEND_HEADERS)
        stream = self._begin_new_stream(stream_id, AllowedStreamIDs(self.config.client_side))
        stream.state_machine.process_input(StreamInputs.SEND_HEADERS)
        stream._authority = authority
        stream.request_method = method

    def send_header_block(self, stream_id: int, block: bytes) -> None:
        """The HEADERS frame (and, past the peer's frame size, CONTINUATION
        frames) h2 would serialize for `block`, without END_STREAM."""
        size = len(block)
        limit = self.max_outbound_frame_size
        if size <= limit:
            self._data_to_send += _FRAME_HEAD.pack(size >> 8, size & 0xFF, _HEADERS, _END_HEADERS, stream_id)
            self._data_to_send += block
            return
        kind = _HEADERS
        for start in range(0, size, limit):
            piece = block[start : start + limit]
            flags = _END_HEADERS if start + limit >= size else 0
            self._data_to_send += _FRAME_HEAD.pack(len(piece) >> 8, len(piece) & 0xFF, kind, flags, stream_id)
            self._data_to_send += piece
            kind = _CONTINUATION

    def end_stream(self, stream_id: int) -> None:
        """h2's end_stream: an empty DATA frame with END_STREAM, written directly."""
        self.state_machine.process_input(ConnectionInputs.SEND_DATA)
        self._get_stream_by_id(stream_id).state_machine.process_input(StreamInputs.SEND_END_STREAM)
        self._data_to_send += _EMPTY_DATA.pack(0, 0, _DATA, _END_STREAM, stream_id)

    def receive_frame(self, frame: Frame) -> list[h2.events.Event]:
        """One whole frame already parsed (no padding, no header block): its events."""
        try:
            return self._receive_frame(frame)
        except ProtocolError as exc:  # as receive_data: a GOAWAY is queued, the error raised
            self._terminate_connection(exc.error_code)  # type: ignore[arg-type]
            raise

    def _receive_frame(self, frame: Frame) -> list[h2.events.Event]:
        # h2 4.4.1's H2Connection._receive_frame without `repr(frame)` for its trace line.
        events: list[h2.events.Event]
        try:
            frames, events = self._frame_dispatch_table[frame.__class__](frame)
        except StreamClosedError as exc:
            # Closed by RST_STREAM: answer with RST_STREAM; else a connection error.
            if self._stream_is_closed_by_reset(exc.stream_id):
                reset = RstStreamFrame(exc.stream_id)
                reset.error_code = exc.error_code
                self._prepare_for_sending([reset])
                events = exc._events
            else:
                raise
        except StreamIDTooLowError as exc:
            # A stream id below the highest seen: a stream error if that stream
            # was reset, a connection error if it ended, PROTOCOL_ERROR otherwise.
            if self._stream_is_closed_by_reset(exc.stream_id):
                reset = RstStreamFrame(exc.stream_id)
                reset.error_code = ErrorCodes.STREAM_CLOSED
                self._prepare_for_sending([reset])
                events = []
            elif self._stream_is_closed_by_end(exc.stream_id):
                raise StreamClosedError(exc.stream_id) from exc
            else:
                raise
        else:
            self._prepare_for_sending(frames)
        return events
