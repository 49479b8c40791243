"""The agent's log lines: one JSON object per line, each line in one write."""
from __future__ import annotations

import json

import structlog

from ambit.agent import log as logconf
from tests.support.write_recorder import WriteRecorder


def test_each_line_with_its_newline_is_one_write():
    stream = WriteRecorder()
    logconf.configure("info", stream=stream)
    try:
        logger = structlog.get_logger("test.log")  # first used after configure: writes to `stream`
        logger.info("connection", listener="hbone", sent=100, error=None)
        logger.debug("hidden")
        logger.warning("second", reason="why")
    finally:
        logconf.configure("warn")  # as tests/conftest.py left it
    assert len(stream.writes) == 2, stream.writes  # one syscall per line, not line + newline
    assert all(w.endswith("\n") and w.count("\n") == 1 for w in stream.writes)
    first, second = (json.loads(w) for w in stream.writes)
    assert first["event"] == "connection" and first["level"] == "info" and first["sent"] == 100
    assert first["error"] is None and first["timestamp"].endswith("Z")
    assert second["level"] == "warning" and second["reason"] == "why"
