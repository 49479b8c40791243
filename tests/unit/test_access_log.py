"""The per-connection access line rendered without structlog's chain is the
line structlog writes: same keys, same order, same values, same output and
level filter; anything else configured goes through structlog."""
from __future__ import annotations

import json
from typing import Any

import pytest
import structlog

from ambit.agent import log as logconf
from ambit.agent.telemetry.access_log import MAX_CACHED_FRAGMENTS, AccessLog, log_connection
from tests.support.write_recorder import WriteRecorder


_CASES: list[dict[str, Any]] = [
    dict(listener="outbound", src="10.244.1.5:43210", dst="10.244.2.7:8080",
         src_identity="spiffe://cluster.local/ns/default/sa/client",
         dst_identity="spiffe://cluster.local/ns/default/sa/server", sent=100, received=2**40,
         duration_ms=3.4, decision="allow", reason="allowed: no policy", end="closed", via="hbone"),
    dict(listener="hbone", src="[fd00::5]:1", dst="[fd00::7]:80", src_identity=None, dst_identity=None,
         sent=0, received=0, duration_ms=0.0, decision="deny", reason='HTTP 401: denied by "p\u00e9" \\ \n\t\x01',
         end="refused", error="ECONNRESET \"quoted\"", via="hbone"),
    dict(listener="inbound_plaintext", src="10.0.0.1:2", dst="10.0.0.2:3", src_identity="", dst_identity="x",
         sent=1, received=2, duration_ms=123456.7, decision="allow", reason="", end="upstream_reset",
         error=None),
]


def _lines(writes: list[str]) -> list[str]:
    assert all(w.endswith("\n") and w.count("\n") == 1 for w in writes), writes  # one write per line
    return [w[:-1] for w in writes]


@pytest.fixture
def recorder():
    stream = WriteRecorder()
    logconf.configure("info", stream=stream)
    try:
        yield stream
    finally:
        logconf.configure("warn")  # as tests/conftest.py left it


def test_the_direct_line_is_structlogs_line(recorder: WriteRecorder) -> None:
    access = AccessLog()
    for fields in _CASES * 2:  # the second round uses the cached fragments
        log_connection(**fields)
        access.connection(**fields)
    lines = _lines(recorder.writes)
    assert len(lines) == 2 * len(_CASES) * 2
    assert access._write is not None  # the direct path was taken
    for chain_line, direct_line in zip(lines[0::2], lines[1::2]):
        chain, direct = json.loads(chain_line), json.loads(direct_line)
        assert list(direct) == list(chain)  # same keys in the same order
        assert direct.pop("timestamp").endswith("Z") and chain.pop("timestamp").endswith("Z")
        assert direct == chain
        # Byte for byte, up to the timestamp.
        assert direct_line.rsplit('"timestamp": ', 1)[0] == chain_line.rsplit('"timestamp": ', 1)[0]


def test_below_info_nothing_is_written() -> None:
    stream = WriteRecorder()
    logconf.configure("warn", stream=stream)
    AccessLog().connection(**_CASES[0])
    assert stream.writes == []


def test_another_renderer_goes_through_structlog() -> None:
    stream = WriteRecorder()
    logconf.configure("info", stream=stream, json_output=False)
    try:
        access = AccessLog()
        access.connection(**_CASES[0])
    finally:
        logconf.configure("warn")
    assert access._write is None
    (line,) = stream.writes
    assert "connection" in line and "10.244.1.5:43210" in line and not line.startswith("{")


def test_fragments_are_bounded(recorder: WriteRecorder) -> None:
    access = AccessLog()
    for n in range(MAX_CACHED_FRAGMENTS + 10):
        access.connection(**{**_CASES[0], "reason": f"refused {n}"})
    assert len(access._fragments) <= MAX_CACHED_FRAGMENTS
    assert json.loads(recorder.writes[-1])["reason"] == f"refused {MAX_CACHED_FRAGMENTS + 9}"


def test_a_line_is_one_json_object_per_write_under_structlog_default_config() -> None:
    structlog.reset_defaults()
    try:
        access = AccessLog()
        access.connection(**_CASES[0])  # default config: PrintLogger to stdout, console renderer: structlog's path
        assert access._write is None
    finally:
        logconf.configure("warn")


def test_the_iso_stamp_is_structlogs_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """UtcIsoStamp against TimeStamper(fmt="iso", utc=True) at the same instants: a zero fraction
    (isoformat leaves it out), a new second, the same second again, a leap day, the epoch."""
    import datetime
    import time

    from ambit.agent.telemetry.access_log import UtcIsoStamp

    stamp = UtcIsoStamp()
    stamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    instants = [1_765_000_000_000_000_000, 1_765_000_000_000_001_999, 1_765_000_000_999_999_999,
                1_765_000_001_000_000_000, 1_765_000_001_123_456_789, 1_709_164_799_500_000_000, 0]
    for ns in instants:
        monkeypatch.setattr(time, "time_ns", lambda ns=ns: ns)
        at = datetime.datetime.fromtimestamp(ns // 1000 / 1e6, datetime.timezone.utc).replace(
            microsecond=ns // 1000 % 1_000_000)

        class Frozen(datetime.datetime):
            @classmethod
            def now(cls, tz=None):  # type: ignore[override]
                return at

        monkeypatch.setattr(datetime, "datetime", Frozen)
        want = stamper(None, "info", {})["timestamp"]
        monkeypatch.undo()
        monkeypatch.setattr(time, "time_ns", lambda ns=ns: ns)
        assert stamp() == want, ns
        monkeypatch.undo()


def test_the_direct_line_carries_the_current_time(recorder: WriteRecorder) -> None:
    import datetime

    access = AccessLog()
    before = datetime.datetime.now(datetime.timezone.utc)
    access.connection(**_CASES[0])
    after = datetime.datetime.now(datetime.timezone.utc)
    stamp = json.loads(_lines(recorder.writes)[0])["timestamp"]
    at = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    assert before <= at <= after
