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

5. A CONNECT opening a stream at the server (`receive_header_block` without
   END_STREAM, on a new stream): h2's `_receive_headers_frame` inlined, in its
   order (decode, the connection's RECV_HEADERS, the new stream, its
   RECV_HEADERS and RequestReceived) without the steps that change nothing
   for a plain request: the informational-response scan, content-length
   set-up, validation flags and the cookie-joining generator (~20 Python
   calls per tunnel). A block with `:status`, `content-length` or `cookie`
   goes through h2's `H2Stream.receive_headers` after the same decode; a
   stream h2 would refuse before decoding (too many streams, an id too low or
   of the wrong parity, a closed connection) goes to h2's own path whole.
   The open-stream count it makes (h2's walk over every stream) is kept for
   the server's own limit check of that request (`open_inbound_streams_with`).
   Pinned like the rest, and run side by side with h2 in the tests.

6. `receive_end_stream` on a stream h2 would take it on plainly (open or
   half-closed by us, headers received, no content-length, windows not below
   0, connection open): h2's `_receive_data_frame` and `H2Stream.receive_data`
   for an empty DATA frame with END_STREAM, inlined: the connection's
   RECV_DATA, the stream's RECV_DATA and RECV_END_STREAM (h2's own state
   machines, so the same DataReceived and StreamEnded events and states),
   without the frame dispatch, flag lookups, zero-byte window and content
   accounting (~14 Python calls per tunnel and side). Any other stream goes
   through h2's path as before.

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
import h2.stream
import hpack.hpack
from h2.connection import AllowedStreamIDs, ConnectionInputs, ConnectionState, _decode_headers
from h2.stream import H2Stream, StreamInputs, StreamState
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


def _hash_state_machine_enums_by_identity() -> None:
    """h2's state machines look up (state, input) in a dict on every transition
    (~9 per tunnel and side), and Enum.__hash__ is a Python function
    (hash(self._name_)): a Python call per plain-Enum member in the key. A plain
    Enum compares by identity (object.__eq__), so object.__hash__ (C) is as
    valid a hash for it; StreamState is an IntEnum (int's hash and equality, C
    already) and keeps them. The two dicts keyed by these members, built at h2's
    import with the old hashes, are rebuilt. No other container holds them as
    keys (tests/unit/test_h2_connection.py checks h2's modules)."""
    for cls in _IDENTITY_HASHED_ENUMS:
        if cls.__eq__ is not object.__eq__:  # pragma: no cover - an h2 whose enums compare otherwise
            raise TypeError(f"{cls.__qualname__} does not compare by identity")
        cls.__hash__ = object.__hash__  # type: ignore[method-assign,assignment]
    for table in (h2.connection.H2ConnectionStateMachine._transitions, h2.stream._transitions):
        entries = list(table.items())
        table.clear()
        table.update(entries)


_IDENTITY_HASHED_ENUMS = (h2.connection.ConnectionState, h2.connection.ConnectionInputs, h2.stream.StreamInputs)
_hash_state_machine_enums_by_identity()


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
        # Requests may take _receive_new_request: a server that neither validates
        # received headers nor decodes them to str (HBONE's configuration).
        self._counted_request = (0, 0)  # (stream id, open inbound streams with it): _receive_new_request
        self._plain_requests = (not self.config.client_side and not self.config.validate_inbound_headers
                                and not isinstance(self.config.header_encoding, str))
        self._end_stream_frame = DataFrame(1, flags=("END_STREAM",))
        # A whole header block, without and with END_STREAM.
        self._header_block_frames = (HeadersFrame(1, flags=("END_HEADERS",)),
                                     HeadersFrame(1, flags=("END_HEADERS", "END_STREAM")))

    def receive_header_block(self, stream_id: int, block: bytes, end_stream: bool) -> list[h2.events.Event]:
        """`receive_data` of a HEADERS frame with END_HEADERS and neither
        PADDED nor PRIORITY (stream_id not 0): the frame h2's FrameBuffer
        would make of it, one object per connection, reused."""
        if self._plain_requests and not end_stream and stream_id not in self.streams:
            events = self._receive_new_request(stream_id, block)
            if events is not None:
                return events
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

    def _receive_new_request(self, stream_id: int, block: bytes) -> list[h2.events.Event] | None:
        """h2's `_receive_headers_frame` for a request opening `stream_id`
        (module docstring, 5); None, with nothing done, where h2 would refuse
        the stream before decoding: its own path then raises what it raises."""
        if stream_id <= self.highest_inbound_stream_id or not stream_id & 1 \
                or self.state_machine.state is ConnectionState.CLOSED:
            return None
        open_before = self.open_inbound_streams
        if open_before + 1 > self.local_settings.max_concurrent_streams:
            return None
        try:
            headers = _decode_headers(self.decoder, block)
            events = self.state_machine.process_input(ConnectionInputs.RECV_HEADERS)
            stream = self._begin_new_stream(stream_id, AllowedStreamIDs.ODD)
            for name, _ in headers:
                if name == b":status" or name == b"content-length" or name == b"cookie":
                    _, stream_events = stream.receive_headers(headers, False, self.config.header_encoding)
                    break
            else:
                stream_events = stream.state_machine.process_input(StreamInputs.RECV_HEADERS)
                stream_events[0].headers = list(headers)
        except ProtocolError as exc:  # as receive_frame: a GOAWAY is queued, the error raised
            self._terminate_connection(exc.error_code)  # type: ignore[arg-type]
            raise
        self._counted_request = (stream_id, open_before + 1)
        return events + stream_events

    def open_inbound_streams_with(self, stream_id: int) -> int:
        """h2's `open_inbound_streams`, asked while the RequestReceived that
        opened `stream_id` is handled: _receive_new_request counted the open
        streams just before it made this one (nothing has changed since), so
        h2's walk over every stream is not made a second time."""
        counted_id, count = self._counted_request
        if counted_id == stream_id and stream_id == self.highest_inbound_stream_id:
            self._counted_request = (0, 0)
            return count
        return self.open_inbound_streams

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
        """`receive_frame(DataFrame(stream_id, flags=("END_STREAM",)))`, the frame object reused;
        for a stream open on our side, h2's `_receive_data_frame` inlined (module docstring, 6)."""
        stream = self.streams.get(stream_id)
        if stream is not None and self._plain_end_stream(stream):
            events = self.state_machine.process_input(ConnectionInputs.RECV_DATA)
            machine = stream.state_machine
            stream_events = machine.process_input(StreamInputs.RECV_DATA)
            data_event = stream_events[0]
            ended = machine.process_input(StreamInputs.RECV_END_STREAM)
            data_event.stream_ended = ended[0]
            stream_events.extend(ended)
            data_event.data = self._end_stream_frame.data
            data_event.flow_controlled_length = 0
            return events + stream_events
        frame = self._end_stream_frame
        frame.stream_id = stream_id
        return self.receive_frame(frame)

    def _plain_end_stream(self, stream: H2Stream) -> bool:
        """An empty END_STREAM DATA frame on `stream` would take h2's plain
        path: both transitions valid, no content-length to miss, no window
        already below 0 (h2 checks it even for 0 bytes)."""
        machine = stream.state_machine
        return ((self.state_machine.state is ConnectionState.SERVER_OPEN
                 or self.state_machine.state is ConnectionState.CLIENT_OPEN)
                and (machine.state is StreamState.OPEN or machine.state is StreamState.HALF_CLOSED_LOCAL)
                and machine.headers_received
                and (stream._expected_content_length is None
                     or stream._expected_content_length == stream._actual_content_length)
                and stream._inbound_window_manager.current_window_size >= 0
                and self._inbound_flow_control_window_manager.current_window_size >= 0)

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
