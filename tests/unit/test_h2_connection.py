"""QuietH2Connection overrides h2's private `_receive_frame` (without the eager
repr for a trace line), adds `receive_frame` for frames the HBONE core framed
itself and `send_response_200` for the server's 200. Pinned here: h2's own source of the two methods the override mirrors
(a changed h2 fails this file: re-check agent/proxy/hbone/h2_connection.py),
and the behaviour, side by side with h2's class, on the paths it copies."""
from __future__ import annotations

import logging

import h2.config
import h2.connection
import h2.events
import pytest
from h2.exceptions import StreamClosedError
from hyperframe.frame import DataFrame, Frame

from ambit.agent.proxy.hbone.h2_connection import QuietH2Connection
from tests.support.pinned_source import source_digest

# sha256 of inspect.getsource() of h2 4.4.1's methods.
H2_SOURCES = {
    "_receive_frame": "39b2e16b4fd74ed014ca144a0c6e388aef3dc51f116d6f0a874b70d92bd92873",
    "receive_data": "4470c8fafce8153ac77aedb1a8daff284ed7691cd7650c986fd608a5f723a69e",
}


@pytest.mark.parametrize("method", sorted(H2_SOURCES))
def test_h2s_methods_are_the_ones_the_override_copies(method: str) -> None:
    assert source_digest(f"h2.connection.H2Connection.{method}") == H2_SOURCES[method], (
        f"h2's H2Connection.{method} changed: compare it with QuietH2Connection "
        "(agent/proxy/hbone/h2_connection.py), adapt the copy, then update H2_SOURCES")


def _server(cls: type[h2.connection.H2Connection]) -> h2.connection.H2Connection:
    conn = cls(h2.config.H2Configuration(client_side=False, header_encoding=None))
    conn.initiate_connection()
    conn.data_to_send()
    return conn


def _client_wire() -> tuple[h2.connection.H2Connection, bytes]:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    client.send_headers(1, [(":method", "CONNECT"), (":authority", "10.0.0.5:8080")])
    return client, client.data_to_send()


def _kinds(events: list[h2.events.Event]) -> list[str]:
    return [type(event).__name__ for event in events]


def _side_by_side(steps: list[bytes | Frame], *, reset_first: bool = False) -> list[tuple[list[str] | str, bytes]]:
    """Run the same input through h2's class and ours; each step's events (or
    the exception's name) and output, which must be equal. reset_first: we
    reset stream 1 after the first step."""
    results = []
    for cls in (h2.connection.H2Connection, QuietH2Connection):
        conn, seen = _server(cls), []
        for step in steps:
            try:
                if isinstance(step, Frame):
                    feed = conn.receive_frame if isinstance(conn, QuietH2Connection) else (
                        lambda frame, conn=conn: conn.receive_data(frame.serialize()))
                    events: list[str] | str = _kinds(feed(step))
                else:
                    events = _kinds(conn.receive_data(step))
            except Exception as exc:  # noqa: BLE001 - the exception is the observed result
                events = type(exc).__name__
            seen.append((events, conn.data_to_send()))
            if reset_first and step is steps[0]:
                conn.reset_stream(1)
        results.append(seen)
    assert results[0] == results[1]
    return results[1]


def test_a_request_and_its_end_stream_give_h2s_events_and_bytes() -> None:
    _, wire = _client_wire()
    seen = _side_by_side([wire, DataFrame(1, flags=("END_STREAM",))])
    assert "RequestReceived" in seen[0][0] and seen[1][0] == ["DataReceived", "StreamEnded"]


def test_data_on_a_stream_we_reset_is_answered_with_rst_stream_as_h2_does() -> None:
    _, wire = _client_wire()
    seen = _side_by_side([wire, DataFrame(1, flags=("END_STREAM",))], reset_first=True)
    assert seen[1][0] == [] and seen[1][1]  # no event, an RST_STREAM out


def test_data_after_the_peers_end_stream_resets_the_stream_as_in_h2() -> None:
    _, wire = _client_wire()
    seen = _side_by_side([wire, DataFrame(1, flags=("END_STREAM",)), DataFrame(1, flags=("END_STREAM",))])
    assert seen[2][0] == ["StreamReset"] and seen[2][1]  # an RST_STREAM(STREAM_CLOSED) out


def test_headers_on_a_stream_closed_by_end_stream_are_a_connection_error_as_in_h2() -> None:
    client, wire = _client_wire()
    client.end_stream(1)
    wire += client.data_to_send()
    client.send_headers(3, [(":method", "CONNECT"), (":authority", "10.0.0.5:8080")], end_stream=True)
    later = client.data_to_send()
    results = []
    for cls in (h2.connection.H2Connection, QuietH2Connection):
        conn = _server(cls)
        conn.receive_data(wire)
        conn.send_headers(1, [(":status", "200")], end_stream=True)  # stream 1 now closed by END_STREAM both ways
        conn.receive_data(later)
        conn.data_to_send()
        stale = h2.connection.HeadersFrame(1, flags=("END_HEADERS",))
        stale.data = b"\x82"
        with pytest.raises(StreamClosedError):
            conn.receive_data(stale.serialize())
        results.append(conn.data_to_send())
    assert results[0] == results[1] and results[1]  # the same GOAWAY


def test_no_repr_of_a_received_frame() -> None:
    class Loud(DataFrame):
        def __repr__(self) -> str:
            raise AssertionError("repr(frame) on the receive path")

    conn = _server(QuietH2Connection)
    _, wire = _client_wire()
    conn.receive_data(wire)
    conn._frame_dispatch_table[Loud] = conn._frame_dispatch_table[DataFrame]  # the frame's class is the key
    assert _kinds(conn.receive_frame(Loud(1, flags=("END_STREAM",)))) == ["DataReceived", "StreamEnded"]


def test_hpack_and_h2_debug_lines_are_dropped_without_a_python_call(caplog) -> None:
    """hpack's module logger and our h2 connections' logger are SilentLogger:
    nothing reaches a handler even with the stdlib logger at DEBUG, HPACK still
    round-trips, and the no-op takes whatever h2 and hpack pass it."""
    import hpack
    import hpack.hpack

    from ambit.agent.proxy.hbone.h2_connection import SilentLogger
    from ambit.agent.proxy.hbone.client import HboneClientConnection
    from ambit.agent.proxy.hbone.settings import HboneSettings

    assert isinstance(hpack.hpack.log, SilentLogger)
    assert type(SilentLogger.debug).__name__ == "builtin_function_or_method"  # no Python frame per call
    assert SilentLogger().debug("Process input %s", 1, extra={"x": 2}) == ""
    assert SilentLogger().trace("Received frame: %s", "{0} {}") == ""
    with caplog.at_level(logging.DEBUG):
        headers = [(b":method", b"CONNECT"), (b":authority", b"10.0.0.5:8080"), (b"forwarded", b'for="10.0.0.2"')]
        block = hpack.Encoder().encode(headers)
        assert [(bytes(n), bytes(v)) for n, v in hpack.Decoder().decode(block, raw=True)] == headers
        client = HboneClientConnection(HboneSettings())
        client.initiate_connection()
        client.open_stream("10.0.0.5:8080")
        assert client.data_to_send()
    assert isinstance(client._h2.config.logger, SilentLogger)
    assert not [r for r in caplog.records if r.name.startswith(("hpack", "h2"))]


# --- the h2 code each shortcut below stands in for, pinned ------------------------------------------

# sha256 of inspect.getsource() of the h2/hpack/hyperframe code a QuietH2Connection shortcut stands in for
# (the bytes and states it reproduces, or the frame use it relies on): a change fails here; re-check the
# shortcut named against it, then update the hash.
SHORTCUT_SOURCES = {
    "h2.connection.H2Connection.send_headers":
        ("0b3368f81906b27a6aae538c9f57b09f78e9e3e05755a0012e3845509b003885", "send_response_200"),
    "h2.connection.H2Connection._prepare_for_sending":
        ("6be16b5970454a30f26185221c6d744febde7ec9450d08b3165f5adc4b7400c5", "send_response_200"),
    "h2.stream.H2Stream.send_headers":
        ("174255442235241edfb4eec013dd597d7ed31adb8db6f11e0a768504e44fbea5", "send_response_200"),
    "h2.stream.H2Stream._build_headers_frames":
        ("493a6b6df9e19c1e2416bd95fb05882a7ce3b3fd5d8d375ce7851416cd9515d8", "send_response_200"),
    "h2.stream.H2StreamStateMachine.response_sent":
        ("66fef81aefb6880c30a42823bc30203e745e6474ce1926838c55756b54b4ec1e", "send_response_200"),
    "h2.utilities.extract_method_header":
        ("671d238d41dc3a92335c6246020ea214e3e212ca3136eab1446e9f78ec5018c9", "send_response_200"),
    "h2.utilities.is_informational_response":
        ("7536750fe84e55999a17be3b984638ba6cd5340eaeb6bc5a03480ce4f11165b8", "send_response_200"),
    "hpack.hpack.Encoder.encode":
        ("b262c86579bcfceb425de0d92443ca0605d87d6615288db2f982d92a99be3f84", "send_response_200"),
    "hpack.hpack.Encoder.add":
        ("1d6a1a43f300198428e2531d21246504d6c50290c1b4e0657c9fc47451e88db0", "send_response_200"),
    "hpack.table.HeaderTable.search":
        ("5c80da889c55ddf27dc9f43151717482f3227b928a41c678e9b73d9b6bec9a57", "send_response_200"),
    "h2.connection.H2Connection.end_stream":
        ("ecf22cf45690b53888d3c3dc8fa5d7d128a8f3592a736fe0924e0eb5021314e0", "end_stream"),
    "h2.stream.H2Stream.end_stream":
        ("b7ff029819a7f5f13e669f494c019e1e3315b608b48bde54507f0376678c781f", "end_stream"),
    "hyperframe.frame.Frame.serialize":
        ("5c92f6c5f9777350da14e1fc543db2b9f1b03f92e7b5a0a3800c1447969e6d20", "end_stream"),
    "hyperframe.frame.DataFrame.serialize_body":
        ("daf544275aa68941949dd80d614ad0abfdbaa1d5d15913acb1f408f4f22d5019", "end_stream"),
    "h2.connection.H2Connection._receive_data_frame":
        ("09803eef3f564140481608e07cfdf626cdff9896090ecdc091ef7a8b8cfe6848", "receive_end_stream"),
    "h2.connection.H2Connection._handle_data_on_closed_stream":
        ("c24bc43847fcac200e870a6f8bc40092b5ced5e084d7a8015bad3fded925e05f", "receive_end_stream"),
    "h2.frame_buffer.FrameBuffer.__next__":
        ("54792a1319f7ef527854b575b731c9f6e8d526b216b94f2e80753e0da0f073fa", "receive_header_block"),
    "h2.frame_buffer.FrameBuffer._update_header_buffer":
        ("e32970a56626afccf99b0d9a15c9ac564e3a3c203be17486a2833df6bd3e114c", "receive_header_block"),
    "hyperframe.frame.HeadersFrame.parse_body":
        ("a405987b1e458e87208991a73ca9c40f9d80daee9c15151d3286dcefa479f589", "receive_header_block"),
    "h2.connection.H2Connection._receive_headers_frame":
        ("4a014e7d795a15a583ef2172f88dc19a9bac01edff850fd91eb69c5611b19fa5", "receive_header_block"),
    "h2.stream.H2Stream.receive_headers":
        ("6bb0626547ebe2da852f315e90d261ebb198f236ef78350b26146e601d6f18ba", "_receive_new_request"),
    "h2.stream.H2Stream._process_received_headers":
        ("991976183ebe21dfe36246c077562d9cc4cd96aad3ff5d7c53cd1691edc67488", "_receive_new_request"),
    "h2.stream.H2Stream._initialize_content_length":
        ("268409356c435b4e7c7981079683f36e275b4492d1115f8eb9cb22b00e304956", "_receive_new_request"),
    "h2.utilities.normalize_inbound_headers":
        ("41eb3a6269808e1dedaf7acf4954540a126f7aa4f4ab7807716dbcff9b788d78", "_receive_new_request"),
    "h2.utilities._combine_cookie_fields":
        ("542f76bb5ee7ba4aaa079c14e7984c9e622bce22769b7d0f3b66585d742c1eda", "_receive_new_request"),
    "h2.connection._decode_headers":
        ("ee1b71503327698a66c61ea6c66898b5d9c973de637aeebe7abfbd6e7c292e7e", "_receive_new_request"),
    "h2.connection.H2Connection._begin_new_stream":
        ("de40fc0b03dfa4434922e6b06f37843398eaabab8035a66a873239ea08d546c0", "_receive_new_request"),
    "h2.stream.H2StreamStateMachine.request_received":
        ("102c95b6a5f0f7fc9905edae330eaefea31a7b7836ed5ff4a6a5ed5b4e4eb7d0", "_receive_new_request"),
    "h2.stream.H2Stream.receive_data":
        ("50acc2e021f36c398c9446eb938aa8d0ea55c45e075a9ab87e6db3a17d3e8463", "receive_end_stream"),
    "h2.stream.H2StreamStateMachine.data_received":
        ("403edf4d8eec67ad9cf0b5f9a096e69650d351cffd2dc442689668571bff1449", "receive_end_stream"),
    "h2.stream.H2StreamStateMachine.stream_half_closed":
        ("622af811e0e91f8f3739dbc777acd268f290570ca6f83c00de2a14c12436b0ef", "receive_end_stream"),
    "h2.stream.H2StreamStateMachine.stream_ended":
        ("6d490789fb26e48e06721275e7cf52685e78780fdcf80d265814696421be7d79", "receive_end_stream"),
    "h2.stream.H2Stream._track_content_length":
        ("a4580a2f3c858963d38d18e7b7db099570e2afa2275cd757d3186244b62007aa", "receive_end_stream"),
    "h2.windows.WindowManager.window_consumed":
        ("db17e4434e9a0aca67a19dd9b493e1003d73344f1d6bee220b7e867353cc6c86", "receive_end_stream"),
}


@pytest.mark.parametrize("dotted", sorted(SHORTCUT_SOURCES))
def test_what_the_shortcuts_stand_in_for_is_unchanged(dotted: str) -> None:
    digest, shortcut = SHORTCUT_SOURCES[dotted]
    assert source_digest(dotted) == digest, (
        f"{dotted} changed: re-check QuietH2Connection.{shortcut} "
        "(agent/proxy/hbone/h2_connection.py) against it, then update SHORTCUT_SOURCES")


# --- send_response_200: h2's send_headers(stream, [(":status", "200")]) in three steps ---------------

def _answer_side_by_side(wire: bytes, *, twice: bool = False, stream_id: int = 1) -> list[object]:
    """The same input to h2's class (send_headers) and ours (send_response_200):
    bytes out, exceptions, connection and stream states, HPACK state."""
    results = []
    for cls in (h2.connection.H2Connection, QuietH2Connection):
        conn = _server(cls)
        conn.receive_data(wire)
        conn.data_to_send()
        seen: list[object] = []
        for _ in range(2 if twice else 1):
            try:
                if cls is QuietH2Connection:
                    conn.send_response_200(stream_id)  # type: ignore[attr-defined]
                else:
                    conn.send_headers(stream_id, [(":status", "200")])
                seen.append(bytes(conn.data_to_send()))
            except Exception as exc:  # noqa: BLE001 - the exception is the observed result
                seen.append((type(exc).__name__, str(exc), bytes(conn.data_to_send())))
        stream = conn.streams.get(stream_id)
        machine = stream.state_machine if stream is not None else None
        seen.append((
            conn.state_machine.state,
            None if machine is None else (machine.state, machine.headers_sent, machine.trailers_sent),
            None if stream is None else stream.request_method,
            list(conn.encoder.header_table.dynamic_entries), conn.encoder.header_table.resized,
        ))
        results.append(seen)
    assert results[0] == results[1]
    return results[1]


def test_a_200_is_h2s_bytes_and_states_and_the_client_reads_it() -> None:
    client, wire = _client_wire()
    seen = _answer_side_by_side(wire)
    assert seen[0] == b"\x00\x00\x01\x01\x04\x00\x00\x00\x01\x88"  # HEADERS, END_HEADERS, stream 1, index 8
    events = client.receive_data(seen[0])
    assert [(type(e).__name__, e.headers) for e in events] == [("ResponseReceived", [(b":status", b"200")])]


def test_a_200_after_the_peers_end_stream_is_h2s() -> None:
    client, wire = _client_wire()
    client.end_stream(1)
    _answer_side_by_side(wire + client.data_to_send())


def test_a_200_after_a_header_table_size_change_carries_h2s_size_update() -> None:
    import h2.settings

    client, wire = _client_wire()
    client.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 1024})
    seen = _answer_side_by_side(wire + client.data_to_send())
    assert len(seen[0]) > 10  # the size update came first: h2's own path


def test_a_second_answer_a_reset_stream_and_an_unknown_stream_fail_as_in_h2() -> None:
    client, wire = _client_wire()
    seen = _answer_side_by_side(wire, twice=True)
    assert isinstance(seen[1], tuple)  # h2 would make the second one trailers: it refuses
    client.reset_stream(1)
    seen = _answer_side_by_side(wire + client.data_to_send())
    assert isinstance(seen[0], tuple) and seen[0][0] == "StreamClosedError"
    seen = _answer_side_by_side(wire, stream_id=3)
    assert isinstance(seen[0], tuple)


# --- end_stream: h2's, with the empty DATA frame written as bytes ------------------------------------

def _end_side_by_side(wire: bytes, *, stream_id: int = 1, answered: bool = True,
                      times: int = 1) -> list[object]:
    """end_stream through h2's class and ours after the same input: bytes, errors, states."""
    results = []
    for cls in (h2.connection.H2Connection, QuietH2Connection):
        conn = _server(cls)
        conn.receive_data(wire)
        if answered:
            conn.send_headers(1, [(":status", "200")])
        conn.data_to_send()
        seen: list[object] = []
        for _ in range(times):
            try:
                conn.end_stream(stream_id)
                seen.append(bytes(conn.data_to_send()))
            except Exception as exc:  # noqa: BLE001 - the exception is the observed result
                seen.append((type(exc).__name__, str(exc), bytes(conn.data_to_send())))
        stream = conn.streams.get(stream_id)
        seen.append((conn.state_machine.state, None if stream is None else stream.state_machine.state))
        results.append(seen)
    assert results[0] == results[1]
    return results[1]


def test_end_stream_is_h2s_bytes_and_states_and_the_client_reads_it() -> None:
    client, wire = _client_wire()
    seen = _end_side_by_side(wire)
    assert seen[0] == b"\x00\x00\x00\x00\x01\x00\x00\x00\x01"  # DATA, END_STREAM, stream 1, empty
    client.receive_data(b"\x00\x00\x01\x01\x04\x00\x00\x00\x01\x88")
    assert [type(e).__name__ for e in client.receive_data(seen[0])] == ["DataReceived", "StreamEnded"]


def test_end_stream_after_the_peers_end_and_on_bad_streams_is_h2s() -> None:
    client, wire = _client_wire()
    client.end_stream(1)
    closing = wire + client.data_to_send()
    seen = _end_side_by_side(closing)  # closes the stream both ways
    assert seen[-1][1] is not None and seen[-1][1].name == "CLOSED"
    seen = _end_side_by_side(closing, times=2)  # a second end on the closed stream
    assert isinstance(seen[1], tuple) and seen[1][0] == "StreamClosedError"
    seen = _end_side_by_side(wire, answered=False)  # before any response: h2's state machine decides
    seen = _end_side_by_side(wire, stream_id=3)
    assert isinstance(seen[0], tuple) and seen[0][0] == "NoSuchStreamError"
    client.reset_stream(1)
    seen = _end_side_by_side(wire + client.data_to_send(), answered=False)
    assert isinstance(seen[0], tuple)


# --- receive_end_stream: one reused END_STREAM frame per connection ---------------------------------

def test_the_reused_end_stream_frame_gives_h2s_events_and_bytes_stream_after_stream() -> None:
    client, wire = _client_wire()
    client.send_headers(3, [(":method", "CONNECT"), (":authority", "10.0.0.5:8080")])
    wire += client.data_to_send()
    results = []
    for reused in (False, True):
        conn = _server(QuietH2Connection)
        conn.receive_data(wire)
        conn.data_to_send()
        seen = []
        for stream_id in (1, 3, 1, 5):  # two ends, an end on a closed stream, one on a stream never opened
            try:
                if reused:
                    events: list[str] | str = _kinds(conn.receive_end_stream(stream_id))
                else:
                    events = _kinds(conn.receive_data(DataFrame(stream_id, flags=("END_STREAM",)).serialize()))
            except Exception as exc:  # noqa: BLE001 - the exception is the observed result
                events = type(exc).__name__
            seen.append((stream_id, events, bytes(conn.data_to_send())))
        results.append(seen)
    assert results[0] == results[1]
    assert [events for _, events, _ in results[1][:2]] == [["DataReceived", "StreamEnded"]] * 2


# --- receive_header_block: a whole HEADERS frame handed over as a (reused) frame object ----------------

def _headers_frame(stream_id: int, block: bytes, end_stream: bool) -> bytes:
    frame = h2.connection.HeadersFrame(stream_id, flags=("END_HEADERS", "END_STREAM") if end_stream else ("END_HEADERS",))
    frame.data = block
    return frame.serialize()


def _blocks_side_by_side(client_side: bool, prelude: bytes, blocks: list[tuple[int, bytes, bool]], *,
                         validate: bool = True, max_streams: int | None = None) -> list[object]:
    """The same HEADERS frames as bytes to h2's class and as blocks to ours:
    events (with their headers), exceptions, bytes out and the streams'
    states must be equal. validate=False: HBONE's configuration (a server's
    requests then take _receive_new_request)."""
    results = []
    for cls in (h2.connection.H2Connection, QuietH2Connection):
        conn = cls(h2.config.H2Configuration(client_side=client_side, header_encoding=None,
                                             validate_inbound_headers=validate))
        if max_streams is not None:
            conn.local_settings.max_concurrent_streams = max_streams
            conn.local_settings.acknowledge()
        conn.initiate_connection()
        if prelude:
            conn.receive_data(prelude)
        conn.data_to_send()
        seen: list[object] = []
        for stream_id, block, end_stream in blocks:
            try:
                if cls is QuietH2Connection:
                    events = conn.receive_header_block(stream_id, block, end_stream)  # type: ignore[attr-defined]
                else:
                    events = conn.receive_data(_headers_frame(stream_id, block, end_stream))
                got: object = [(type(e).__name__, getattr(e, "headers", None), getattr(e, "stream_ended", None)
                                is not None) for e in events]
            except Exception as exc:  # noqa: BLE001 - the exception is the observed result
                got = type(exc).__name__
            seen.append((got, bytes(conn.data_to_send()), _stream_states(conn)))
        results.append(seen)
    assert results[0] == results[1]
    return results[1]


def _stream_states(conn: h2.connection.H2Connection) -> object:
    """What a received request leaves in h2's connection and streams."""
    streams = {sid: (st.state_machine.state, st.state_machine.client, st.state_machine.headers_received,
                     st.request_method, st._expected_content_length, st._actual_content_length,
                     st.inbound_flow_control_window, st.outbound_flow_control_window, st.max_outbound_frame_size)
               for sid, st in conn.streams.items()}
    return (conn.state_machine.state, conn.highest_inbound_stream_id, conn.highest_outbound_stream_id, streams,
            conn.decoder.header_table.dynamic_entries.copy())


def _encoded(headers: list[tuple[str, str]]) -> bytes:
    import hpack

    return hpack.Encoder().encode(headers)


def test_a_connect_block_gives_h2s_events_and_bytes_and_later_blocks_too() -> None:
    connect = [(":method", "CONNECT"), (":authority", "10.0.0.5:8080")]
    seen = _blocks_side_by_side(False, _client_preface(), [
        (1, _encoded(connect), False),
        (3, _encoded(connect), True),
        (1, _encoded([("x-trailer", "1")]), True),  # trailers ending stream 1
        (1, _encoded(connect), True),  # headers again on a stream the peer ended: h2 judges
        (2, _encoded(connect), False),  # an even stream id from a client
    ])
    assert seen[0][0][0][0] == "RequestReceived" and seen[1][0][0][2]


def test_a_bad_block_and_a_response_block_are_h2s() -> None:
    seen = _blocks_side_by_side(False, _client_preface(), [(1, b"\xff\xff\xff\xff", False)])
    assert seen[0][0] == "ProtocolError" and seen[0][1]  # a GOAWAY out, as h2 sends
    server_settings = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server_settings.initiate_connection()
    results = []
    for cls in (h2.connection.H2Connection, QuietH2Connection):
        conn = cls(h2.config.H2Configuration(client_side=True, header_encoding=None))
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "CONNECT"), (":authority", "10.0.0.5:8080")])
        conn.receive_data(server_settings.data_to_send())
        conn.data_to_send()
        if cls is QuietH2Connection:
            events = conn.receive_header_block(1, b"\x88", False)  # type: ignore[attr-defined]
        else:
            events = conn.receive_data(_headers_frame(1, b"\x88", False))
        results.append(([(type(e).__name__, e.headers) for e in events], bytes(conn.data_to_send())))
    assert results[0] == results[1] and results[1][0] == [("ResponseReceived", [(b":status", b"200")])]


def _client_preface() -> bytes:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    return client.data_to_send()


# --- _receive_new_request: a server's CONNECT opening a stream, h2's receive path inlined ---------------

def test_requests_on_new_streams_are_h2s_with_hbones_configuration() -> None:
    import hpack

    encoder = hpack.Encoder()  # one encoder: later blocks refer to the dynamic table
    connect = [(":method", "CONNECT"), (":authority", "10.0.0.5:8080")]
    never = hpack.NeverIndexedHeaderTuple("forwarded", 'for="10.0.1.9:40000"')
    seen = _blocks_side_by_side(False, _client_preface(), [
        (1, encoder.encode(connect), False),
        (3, encoder.encode([*connect, never]), False),
        (5, encoder.encode([*connect, ("cookie", "a=1"), ("x", "y"), ("cookie", "b=2")]), False),  # joined, last
        (7, encoder.encode([*connect, ("content-length", "0")]), False),
        (9, encoder.encode([*connect, ("content-length", "x")]), False),  # h2's ProtocolError
    ], validate=False)
    assert [step[0][0][0] for step in seen[:4]] == ["RequestReceived"] * 4
    assert seen[2][0][0][1][-1] == (b"cookie", b"a=1; b=2")
    assert seen[4][0] == "ProtocolError"


def test_a_status_in_a_request_block_is_h2s() -> None:
    for status in ("103", "200"):
        seen = _blocks_side_by_side(False, _client_preface(), [
            (1, _encoded([(":status", status), (":method", "CONNECT")]), False)], validate=False)
        if status == "103":
            assert seen[0][0] == "ProtocolError"  # informational headers may not open a stream


def test_streams_h2_refuses_before_decoding_go_to_h2() -> None:
    connect = _encoded([(":method", "CONNECT"), (":authority", "10.0.0.5:8080")])
    seen = _blocks_side_by_side(False, _client_preface(), [
        (3, connect, False),
        (1, connect, False),  # below the highest: h2's StreamIDTooLowError path
        (4, connect, False),  # even
        (5, b"\xff\xff\xff\xff", False),  # undecodable: GOAWAY, connection closed
        (7, connect, False),  # on a closed connection
    ], validate=False)
    assert seen[3][0] == "ProtocolError" and seen[3][1]
    full = _blocks_side_by_side(False, _client_preface(), [(1, connect, False), (3, connect, False),
                                                           (5, connect, False)], validate=False, max_streams=2)
    assert full[2][0] == "TooManyStreamsError"


def test_the_fast_path_is_taken_for_a_plain_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    conn = QuietH2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None,
                                                      validate_inbound_headers=False))
    conn.initiate_connection()
    conn.receive_data(_client_preface())
    monkeypatch.setattr(conn, "receive_frame", lambda frame: pytest.fail("went through receive_frame"))
    events = conn.receive_header_block(1, _encoded([(":method", "CONNECT"), (":authority", "10.0.0.5:80")]), False)
    assert [type(e).__name__ for e in events] == ["RequestReceived"]
    assert events[0].headers == [(b":method", b"CONNECT"), (b":authority", b"10.0.0.5:80")]


# --- receive_end_stream inlined for a stream h2 takes it on plainly ------------------------------------

def _end_state(conn: h2.connection.H2Connection) -> object:
    return (conn.state_machine.state, conn._inbound_flow_control_window_manager.current_window_size,
            {sid: (st.state_machine.state, st._actual_content_length, st._inbound_window_manager.current_window_size)
             for sid, st in conn.streams.items()})


def _events(events: list[h2.events.Event]) -> list[object]:
    return [(type(e).__name__, e.stream_id, getattr(e, "data", None), getattr(e, "flow_controlled_length", None),
             type(getattr(e, "stream_ended", None)).__name__) for e in events]


def test_received_end_streams_are_h2s_events_and_states_in_every_stream_state() -> None:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    for stream_id in (1, 3, 5, 7):
        client.send_headers(stream_id, [(":method", "CONNECT"), (":authority", "10.0.0.5:8080")])
    client.send_headers(9, [(":method", "POST"), (":path", "/"), (":scheme", "http"), (":authority", "a"),
                            ("content-length", "3")])
    wire = client.data_to_send()
    results = []
    for cls in (h2.connection.H2Connection, QuietH2Connection):
        conn = _server(cls)
        conn.receive_data(wire)
        conn.send_headers(3, [(":status", "200")], end_stream=True)  # half-closed by us
        conn.reset_stream(5)
        conn.data_to_send()
        seen: list[object] = []
        for stream_id in (1, 3, 5, 9, 1, 11):  # open, half-closed local, reset, content-length unmet, ended, unknown
            try:
                if cls is QuietH2Connection:
                    got: object = _events(conn.receive_end_stream(stream_id))  # type: ignore[attr-defined]
                else:
                    got = _events(conn.receive_data(DataFrame(stream_id, flags=("END_STREAM",)).serialize()))
            except Exception as exc:  # noqa: BLE001 - the exception is the observed result
                got = type(exc).__name__
            seen.append((got, bytes(conn.data_to_send()), _end_state(conn)))
        results.append(seen)
    assert results[0] == results[1]
    assert [step[0][0][0] for step in results[1][:2]] == ["DataReceived"] * 2


def test_the_inlined_end_stream_skips_the_frame_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    _, wire = _client_wire()
    conn = _server(QuietH2Connection)
    conn.receive_data(wire)
    monkeypatch.setattr(conn, "receive_frame", lambda frame: pytest.fail("went through receive_frame"))
    assert _kinds(conn.receive_end_stream(1)) == ["DataReceived", "StreamEnded"]


# --- h2's state-machine enums hash by identity (C) -----------------------------------------------------

def test_h2s_state_machine_enums_hash_by_identity_and_every_transition_is_found() -> None:
    import h2.stream

    enums = (h2.connection.ConnectionState, h2.connection.ConnectionInputs, h2.stream.StreamInputs)
    for cls in enums:
        assert cls.__eq__ is object.__eq__  # identity equality: an identity hash is consistent with it
        for member in cls:
            assert hash(member) == object.__hash__(member)
    for state in h2.stream.StreamState:  # an IntEnum: int's hash and equality, left alone
        assert hash(state) == hash(int(state)) and state == int(state)
    for table in (h2.connection.H2ConnectionStateMachine._transitions, h2.stream._transitions):
        assert table and all(table[key] is value for key, value in list(table.items()))


def test_no_other_h2_container_is_keyed_by_those_enums() -> None:
    """Rebuilding the two transition tables is all the re-hash needs: no other
    dict or set in h2's modules (or their classes) holds those members as keys."""
    import types

    import h2

    enums = (h2.connection.ConnectionState, h2.connection.ConnectionInputs, h2.stream.StreamInputs)
    tables = {id(h2.connection.H2ConnectionStateMachine._transitions), id(h2.stream._transitions)}

    def keyed_by_them(container: object) -> bool:
        if isinstance(container, (dict, set, frozenset)) and id(container) not in tables:
            for key in container:
                parts = key if isinstance(key, tuple) else (key,)
                if any(isinstance(part, enums) for part in parts):
                    return True
        return False

    found = []
    for name, module in list(vars(h2).items()):
        if not isinstance(module, types.ModuleType):
            continue
        for attr, value in vars(module).items():
            if keyed_by_them(value):
                found.append(f"{name}.{attr}")
            if isinstance(value, type) and value.__module__ == module.__name__:
                found += [f"{name}.{attr}.{k}" for k, v in vars(value).items() if keyed_by_them(v)]
    assert not found


def test_the_open_stream_count_of_a_new_request_is_h2s() -> None:
    conn = QuietH2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None,
                                                      validate_inbound_headers=False))
    conn.initiate_connection()
    conn.receive_data(_client_preface())
    block = _encoded([(":method", "CONNECT"), (":authority", "10.0.0.5:80")])
    for stream_id in (1, 3, 5):
        conn.receive_header_block(stream_id, block, False)
        assert conn.open_inbound_streams_with(stream_id) == conn.open_inbound_streams == (stream_id + 1) // 2
    conn.reset_stream(3)
    conn.receive_header_block(7, block, True)  # with END_STREAM: h2's own path, h2's own count
    assert conn.open_inbound_streams_with(7) == conn.open_inbound_streams == 3
    assert conn.open_inbound_streams_with(5) == conn.open_inbound_streams  # not the latest request: counted anew
