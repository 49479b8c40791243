"""QuietH2Connection overrides h2's private `_receive_frame` (without the eager
repr for a trace line) and adds `receive_frame` for frames the HBONE core framed
itself. Pinned here: h2's own source of the two methods the override mirrors
(a changed h2 fails this file: re-check agent/proxy/hbone/h2_connection.py),
and the behaviour, side by side with h2's class, on the paths it copies."""
from __future__ import annotations

import hashlib
import logging
import inspect

import h2.config
import h2.connection
import h2.events
import pytest
from h2.exceptions import StreamClosedError
from hyperframe.frame import DataFrame, Frame

from ambit.agent.proxy.hbone.h2_connection import QuietH2Connection

# sha256 of inspect.getsource() of h2 4.4.1's methods.
H2_SOURCES = {
    "_receive_frame": "39b2e16b4fd74ed014ca144a0c6e388aef3dc51f116d6f0a874b70d92bd92873",
    "receive_data": "4470c8fafce8153ac77aedb1a8daff284ed7691cd7650c986fd608a5f723a69e",
}


@pytest.mark.parametrize("method", sorted(H2_SOURCES))
def test_h2s_methods_are_the_ones_the_override_copies(method: str) -> None:
    source = inspect.getsource(getattr(h2.connection.H2Connection, method))
    assert hashlib.sha256(source.encode()).hexdigest() == H2_SOURCES[method], (
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
