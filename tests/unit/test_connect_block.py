"""The client's CONNECT without h2's send_headers: ConnectBlockEncoder
(agent/proxy/hbone/connect_block.py) encodes the block, QuietH2Connection's
begin_request/send_header_block open the stream and frame it. Side by side
with h2's own class sending the same header list through the same kind of
encoder: the same bytes, states, HPACK tables and errors, block after block
(repeats, new authorities, evictions, size changes, long values, a block past
the frame size); and every block decodes to exactly the headers asked for.
The h2/hpack code this stands in for is pinned (a change fails here)."""
from __future__ import annotations

import h2.config
import h2.connection
import h2.exceptions
import hpack
import pytest
from hpack import NeverIndexedHeaderTuple
from hyperframe.frame import HeadersFrame

from ambit.agent.proxy.hbone.connect_block import ConnectBlockEncoder
from ambit.agent.proxy.hbone.connection import _PlainLiteralEncoder
from ambit.agent.proxy.hbone.h2_connection import QuietH2Connection
from tests.support.pinned_source import source_digest

# sha256 of inspect.getsource() of the h2/hpack code begin_request, send_header_block and
# ConnectBlockEncoder reproduce (h2's send_headers and H2Stream.send_headers are pinned in
# test_h2_connection.py): re-check them against it, then update the hash.
SOURCES = {
    "h2.connection.H2Connection._begin_new_stream":
        "de40fc0b03dfa4434922e6b06f37843398eaabab8035a66a873239ea08d546c0",
    "h2.stream.H2StreamStateMachine.request_sent":
        "8cc77458173d7f8a767a0b33804c1dcbc556f24f2b49cc257e27994080c10e1a",
    "h2.utilities.utf8_encode_headers":
        "bdbdcd2afed892373e32889b91558afd75304b7a32723f07c7eaa2ea2d44c191",
    "h2.utilities.authority_from_headers":
        "38a36e5f9a6d6e6e09787e482c77ccf0814c4adc4f5ea20df5b1c62626cb93ad",
    "hpack.hpack.Encoder._encode_literal":
        "f06d1862f9920b0178602c439e8b9011a43f75aa4c31a55b9743614d73aa2dfc",
    "hpack.table.HeaderTable.add":
        "1ddcd125d93e2da6ff3459679c3f410e3e56c4a66f9f51e229480454c3d2f1d7",
}


@pytest.mark.parametrize("dotted", sorted(SOURCES))
def test_the_code_the_shortcut_stands_in_for_is_unchanged(dotted: str) -> None:
    assert source_digest(dotted) == SOURCES[dotted], (
        f"{dotted} changed: re-check QuietH2Connection.begin_request/send_header_block and "
        "ConnectBlockEncoder against it, then update SOURCES")


def _client(cls: type[h2.connection.H2Connection]) -> h2.connection.H2Connection:
    conn = cls(h2.config.H2Configuration(client_side=True, header_encoding=None, validate_outbound_headers=False,
                                         normalize_outbound_headers=False))
    conn.encoder = _PlainLiteralEncoder()
    conn.initiate_connection()
    conn.data_to_send()
    return conn


class _Side:
    """One way of sending CONNECTs: h2's send_headers, or ours."""

    def __init__(self, ours: bool) -> None:
        self.ours = ours
        self.conn = _client(QuietH2Connection if ours else h2.connection.H2Connection)
        self.blocks = ConnectBlockEncoder(self.conn.encoder)

    def connect(self, authority: str, extras: list[tuple[str, str]]) -> object:
        conn = self.conn
        try:
            stream_id = conn.get_next_available_stream_id()
            if self.ours:
                conn.begin_request(stream_id, b"CONNECT", authority.encode())  # type: ignore[attr-defined]
                conn.send_header_block(stream_id, self.blocks.encode(authority.encode(), extras))  # type: ignore[attr-defined]
            else:
                conn.send_headers(stream_id, [(":method", "CONNECT"), (":authority", authority)]
                                  + [NeverIndexedHeaderTuple(n, v) for n, v in extras])
            out: object = bytes(conn.data_to_send())
        except Exception as exc:  # noqa: BLE001 - the exception is the observed result
            out = (type(exc).__name__, str(exc), bytes(conn.data_to_send()))
        stream = conn.streams.get(conn.highest_outbound_stream_id)
        table = conn.encoder.header_table
        return (out, conn.state_machine.state, conn.highest_outbound_stream_id,
                None if stream is None else (stream.state_machine.state, stream.state_machine.headers_sent,
                                             stream.request_method, stream._authority,
                                             stream.outbound_flow_control_window, stream.max_outbound_frame_size),
                list(table.dynamic_entries), table.resized, table.maxsize)


def _frames(wire: bytes) -> list[tuple[int, int, int, bytes]]:
    frames, pos = [], 0
    while pos < len(wire):
        length = int.from_bytes(wire[pos:pos + 3], "big")
        frames.append((wire[pos + 3], wire[pos + 4], int.from_bytes(wire[pos + 5:pos + 9], "big") & 0x7FFFFFFF,
                       wire[pos + 9:pos + 9 + length]))
        pos += 9 + length
    return frames


def _run(steps: list[object]) -> list[object]:
    """Each step: (authority, extras) to send, or a callable applied to both connections first."""
    h2s, ours = _Side(False), _Side(True)
    decoder = hpack.Decoder()
    seen = []
    for step in steps:
        if callable(step):
            step(h2s.conn)
            step(ours.conn)
            continue
        authority, extras = step  # type: ignore[misc]
        theirs, mine = h2s.connect(authority, extras), ours.connect(authority, extras)
        assert mine == theirs, step
        wire = mine[0]  # type: ignore[index]
        if isinstance(wire, bytes):
            block = b"".join(payload for _, _, _, payload in _frames(wire))
            assert decoder.decode(block, raw=True) == (
                [(b":method", b"CONNECT"), (b":authority", authority.encode())]
                + [(n.encode(), v.encode()) for n, v in extras])
        seen.append(mine)
    return seen


FWD = "forwarded"


def test_repeated_connects_are_h2s_bytes_and_states_and_shrink_to_indexed_fields() -> None:
    seen = _run([("10.0.0.5:8080", [(FWD, f'for="10.1.0.{i}:{40000 + i}"')]) for i in range(5)])
    first, later = seen[0][0], seen[2][0]  # type: ignore[index]
    assert len(later) < len(first)  # type: ignore[arg-type]
    # HEADERS, END_HEADERS, stream 5: two indexed fields, then the never-indexed literal
    assert later[:11] == b"\x00\x00\x22\x01\x04\x00\x00\x00\x05\xbf\xbe"  # type: ignore[index]


def test_many_authorities_extras_of_every_kind_and_a_small_table_are_h2s() -> None:
    steps: list[object] = []
    for i in range(40):
        authority = f"10.0.{i % 7}.{i % 5}:{7000 + i % 3}" if i % 4 else "[fd00::1]:443"
        extras = [(FWD, f'for="10.1.0.{i}:{i}"')]
        if i % 3 == 0:
            extras.append(("via", "ambit"))  # a static-table name: hpack's own add
        if i % 5 == 0:
            extras.append(("baggage", "k=" + "v" * (120 + i)))  # a length past the 7-bit prefix
        if i % 6 == 0:
            extras.append(("traceparent", "00-" + "a" * 32 + "-" + "b" * 16 + "-01"))
        steps.append((authority, extras))
        if i == 10:
            steps.append(lambda conn: setattr(conn.encoder, "header_table_size", 160))  # evictions from here
        if i == 25:
            steps.append(lambda conn: setattr(conn.encoder, "header_table_size", 0))
        if i == 30:
            steps.append(lambda conn: setattr(conn.encoder, "header_table_size", 4096))
    _run(steps)


def test_no_extras_and_a_block_past_the_frame_size_are_h2s() -> None:
    seen = _run([("10.0.0.5:8080", []), ("10.0.0.5:8080", []),
                 ("10.0.0.6:8080", [("x-big", "b" * 20000)]), ("10.0.0.6:8080", [(FWD, "for=x")])])
    assert [frame[0] for frame in _frames(seen[2][0])] == [0x1, 0x9]  # type: ignore[index]


def test_the_peers_stream_limit_and_a_closed_connection_fail_as_in_h2() -> None:
    import h2.settings

    def limit(conn: h2.connection.H2Connection) -> None:
        conn.remote_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 2})
        conn.remote_settings.acknowledge()

    seen = _run([limit, ("10.0.0.5:80", []), ("10.0.0.5:80", []), ("10.0.0.5:80", [])])
    assert seen[2][0][0] == "TooManyStreamsError"  # type: ignore[index]
    seen = _run([("10.0.0.5:80", []), lambda conn: conn.close_connection(), ("10.0.0.5:80", [])])
    assert seen[1][0][0] == "ProtocolError"  # type: ignore[index]


# --- the client's 200: QuietH2Connection.receive_header_block skips h2's decoder for a bare 200 ---------

RESPONSE_SOURCES = {
    "h2.connection.H2Connection._receive_headers_frame":
        "4a014e7d795a15a583ef2172f88dc19a9bac01edff850fd91eb69c5611b19fa5",
    "h2.stream.H2Stream.receive_headers":
        "6bb0626547ebe2da852f315e90d261ebb198f236ef78350b26146e601d6f18ba",
    "h2.stream.H2Stream._process_received_headers":
        "991976183ebe21dfe36246c077562d9cc4cd96aad3ff5d7c53cd1691edc67488",
    "h2.stream.H2StreamStateMachine.response_received":
        "c9686cfcd479e093725bf905c55cafae0a51485ed09785cf343e8c5f751f51e8",
}


@pytest.mark.parametrize("dotted", sorted(RESPONSE_SOURCES))
def test_the_code_the_200_shortcut_stands_in_for_is_unchanged(dotted: str) -> None:
    assert source_digest(dotted) == RESPONSE_SOURCES[dotted], (
        f"{dotted} changed: re-check QuietH2Connection._receive_response_200 against it, then update "
        "RESPONSE_SOURCES")


def _responses_side_by_side(before, block: bytes = b"\x88", end_stream: bool = False,  # type: ignore[no-untyped-def]
                            stream_id: int = 1, times: int = 1) -> list[object]:
    """The same response block to a client of h2's class (as bytes) and ours (receive_header_block)."""
    results = []
    for cls in (h2.connection.H2Connection, QuietH2Connection):
        conn = _client(cls)
        conn.send_headers(1, [(":method", "CONNECT"), (":authority", "10.0.0.5:80")])
        before(conn)
        conn.data_to_send()
        seen: list[object] = []
        for _ in range(times):
            try:
                if cls is QuietH2Connection:
                    events = conn.receive_header_block(stream_id, block, end_stream)  # type: ignore[attr-defined]
                else:
                    frame = HeadersFrame(stream_id, data=block, flags=["END_HEADERS"] + (["END_STREAM"] if end_stream
                                                                                       else []))
                    events = conn.receive_data(frame.serialize())
                out: object = [(type(e).__name__, getattr(e, "stream_id", None), getattr(e, "headers", None),
                                type(getattr(e, "headers", [None])[0]).__name__,
                                getattr(e, "stream_ended", None) is not None) for e in events]
            except Exception as exc:  # noqa: BLE001 - the exception is the observed result
                out = (type(exc).__name__, str(exc))
            seen.append((out, bytes(conn.data_to_send())))
        stream = conn.streams.get(1)
        seen.append((conn.state_machine.state, None if stream is None else (
            stream.state_machine.state, stream.state_machine.headers_received, stream.state_machine.trailers_received,
            stream._expected_content_length)))
        results.append(seen)
    assert results[0] == results[1]
    return results[1]


def test_a_200_is_h2s_events_and_states_while_open_and_half_closed() -> None:
    seen = _responses_side_by_side(lambda conn: None)
    assert seen[0][0][0][:3] == ("ResponseReceived", 1, [(b":status", b"200")])  # type: ignore[index]
    _responses_side_by_side(lambda conn: conn.end_stream(1))


def test_a_second_200_a_200_with_end_stream_and_other_blocks_are_h2s() -> None:
    _responses_side_by_side(lambda conn: None, times=2)  # trailers without END_STREAM: h2's error
    _responses_side_by_side(lambda conn: None, end_stream=True)
    _responses_side_by_side(lambda conn: None, block=b"\x8d")  # 404
    _responses_side_by_side(lambda conn: None, block=b"\x88\x0f\x0d\x010")  # 200 with content-length 0


def test_a_200_on_a_reset_unknown_or_closed_stream_is_h2s() -> None:
    _responses_side_by_side(lambda conn: conn.reset_stream(1))
    _responses_side_by_side(lambda conn: None, stream_id=3)
    _responses_side_by_side(lambda conn: conn.close_connection())


def test_streams_ended_by_the_thousand_are_dropped_as_h2_drops_them_and_the_limit_holds() -> None:
    """begin_request has h2 count open streams (and drop the closed ones) only
    near the peer's limit or past _PURGE_AT held: what h2 holds stays bounded,
    and the limit is h2's at every step."""
    import h2.settings

    from ambit.agent.proxy.hbone.h2_connection import _PURGE_AT

    for limit in (5, 100):
        h2s, ours = _Side(False), _Side(True)
        for side in (h2s, ours):
            side.conn.remote_settings = h2.settings.Settings(client=False, initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: limit})
            side.conn.remote_settings.acknowledge()
        opened: list[int] = []
        for i in range(1000):
            theirs, mine = h2s.connect("10.0.0.5:80", []), ours.connect("10.0.0.5:80", [])
            assert (mine[0][0] if isinstance(mine[0], tuple) else "ok") == (  # type: ignore[index]
                theirs[0][0] if isinstance(theirs[0], tuple) else "ok")  # type: ignore[index]
            if not isinstance(mine[0], tuple):  # type: ignore[index]
                opened.append(ours.conn.highest_outbound_stream_id)
            if i % 3 != 2 and opened:  # end two of every three
                stream_id = opened.pop(0)
                for side in (h2s, ours):
                    side.conn.reset_stream(stream_id)
                    side.conn.data_to_send()
            assert len(ours.conn.streams) <= max(_PURGE_AT, limit) + 1
            assert _open_streams(ours.conn) == _open_streams(h2s.conn)  # counted without dropping any


def _open_streams(conn: h2.connection.H2Connection) -> int:
    return sum(1 for stream in conn.streams.values() if stream.open)
