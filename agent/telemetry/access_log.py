"""One structured JSON line per connection, when it closes: who talked to
whom (addresses and identities), how much, how long, what policy decided
and why. Logged under `ambit.access` so it can be routed separately.

A line is written on every connection on both sides, so it is rendered here
rather than by structlog's processor chain (context copy, contextvars,
level, timestamp, stack and exception processors, then a dict to JSON):
21.3 us a line through the chain, 7.8 us rendered here (micro, to
/dev/null). The parts that only depend on the workload pair, the decision
and the route are JSON text made once per such tuple, and the timestamp's
date and time once a second (`UtcIsoStamp`). The line is the one structlog
would write: same keys in the same order, its TimeStamper's text, its output (the configured logger factory, so the same file and lock) and its
level filter. When structlog is not configured the way agent/log.py does it
(JSON lines through a filtering logger), lines go through structlog itself.
"""
from __future__ import annotations

import datetime
import json
import logging
import math
import time
from collections.abc import Callable
from json.encoder import encode_basestring_ascii as _json_str  # what json.dumps uses for str
from typing import Final

import structlog

LOGGER_NAME: Final = "ambit.access"
# Distinct (listener, identities, decision, reason, route) tuples whose JSON
# text is kept (~300 B each); refusal reasons name addresses, so the cache is bounded.
MAX_CACHED_FRAGMENTS: Final = 1024

_Fragments = tuple[str, str, str, str]


def log_connection(*, listener: str, src: str, dst: str, src_identity: str | None, dst_identity: str | None,
                   sent: int, received: int, duration_ms: float, decision: str, reason: str, end: str,
                   error: str | None = None, via: str = "direct") -> None:
    """listener: outbound | inbound_plaintext | hbone; src: the client's ip:port; dst: the original
    destination ip:port; sent: bytes client -> destination; received: bytes destination -> client;
    decision: allow | deny; end: closed, upstream_reset, connect_refused, denied, ...;
    via: direct | hbone | waypoint | passthrough | local. Through structlog's chain (AccessLog.connection
    is the per-connection path)."""
    structlog.get_logger(LOGGER_NAME).info(
        "connection", listener=listener, src=src, dst=dst, src_identity=src_identity, dst_identity=dst_identity,
        sent=sent, received=received, duration_ms=duration_ms, decision=decision, reason=reason, end=end,
        error=error, via=via)


def _json_number(value: float) -> str:
    """What json.dumps makes of a number, without its call overhead (a finite
    float is its repr there too)."""
    if type(value) is float and math.isfinite(value):
        return float.__repr__(value)
    return json.dumps(value)


class UtcIsoStamp:
    """The text of structlog's TimeStamper(fmt="iso", utc=True) for now
    (`datetime.now(utc).isoformat()` with "Z" for "+00:00"), the date and time
    formatted once per second, not per line (a datetime and isoformat each time:
    ~10k instructions a line)."""

    __slots__ = ("_second", "_prefix")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self) -> str:
        # datetime.now truncates the system clock to microseconds, as // does.
        second, micro = divmod(time.time_ns() // 1000, 1_000_000)
        if second != self._second:
            self._prefix = datetime.datetime.fromtimestamp(second, datetime.timezone.utc).isoformat()[:-6]
            self._second = second
        if micro:  # isoformat leaves out a zero fraction
            return f"{self._prefix}.{micro:06d}Z"
        return f"{self._prefix}Z"


class AccessLog:
    """The access log of one proxy: `connection()` writes a line (log_connection's fields).

    What structlog is configured with is looked up at the first line; a
    configuration made later is not seen (the agent configures logging once,
    before its proxy starts).
    """

    def __init__(self) -> None:
        self._fragments: dict[tuple[str, str | None, str | None, str, str, str], _Fragments] = {}
        self._resolved = False
        self._enabled = True
        self._write: Callable[[str], object] | None = None  # None: through structlog
        self._stamp: Callable[[], str] | None = None
        self._stamp_key = "timestamp"

    def connection(self, *, listener: str, src: str, dst: str, src_identity: str | None, dst_identity: str | None,
                   sent: int, received: int, duration_ms: float, decision: str, reason: str, end: str,
                   error: str | None = None, via: str = "direct") -> None:
        """One connection's line; the fields are log_connection's."""
        if not self._resolved:
            self._resolve()
        if not self._enabled:
            return
        write = self._write
        if write is None:
            log_connection(listener=listener, src=src, dst=dst, src_identity=src_identity, dst_identity=dst_identity,
                           sent=sent, received=received, duration_ms=duration_ms, decision=decision, reason=reason,
                           end=end, error=error, via=via)
            return
        key = (listener, src_identity, dst_identity, decision, reason, via)
        parts = self._fragments.get(key)
        if parts is None:
            parts = self._make_fragments(key)
        head, identities, verdict, tail = parts
        stamp = self._stamp()  # type: ignore[misc]
        write(f"{head}{_json_str(src)}, \"dst\": {_json_str(dst)}{identities}{sent}, \"received\": {received}, "
              f"\"duration_ms\": {_json_number(duration_ms)}{verdict}{_json_str(end)}, \"error\": "
              f"{'null' if error is None else _json_str(error)}{tail}{_json_str(stamp)}}}")

    def _make_fragments(self, key: tuple[str, str | None, str | None, str, str, str]) -> _Fragments:
        listener, src_identity, dst_identity, decision, reason, via = key
        dumps = json.dumps
        parts = (
            f"{{\"listener\": {dumps(listener)}, \"src\": ",
            f", \"src_identity\": {dumps(src_identity)}, \"dst_identity\": {dumps(dst_identity)}, \"sent\": ",
            f", \"decision\": {dumps(decision)}, \"reason\": {dumps(reason)}, \"end\": ",
            f", \"via\": {dumps(via)}, \"event\": \"connection\", \"level\": \"info\", {dumps(self._stamp_key)}: ",
        )
        if len(self._fragments) >= MAX_CACHED_FRAGMENTS:
            self._fragments.clear()
        self._fragments[key] = parts
        return parts

    def _resolve(self) -> None:
        """Render here only for the chain agent/log.py configures; else use structlog."""
        self._resolved = True
        config = structlog.get_config()
        bound = structlog.get_logger(LOGGER_NAME).bind()
        is_enabled_for = getattr(bound, "is_enabled_for", None)
        if is_enabled_for is None:
            return  # not a filtering logger: structlog decides
        if not is_enabled_for(logging.INFO):
            self._enabled = False
            return
        processors = list(config["processors"])
        known = (
            len(processors) == 6
            and processors[0] is structlog.contextvars.merge_contextvars
            and processors[1] is structlog.processors.add_log_level
            and isinstance(processors[2], structlog.processors.TimeStamper)
            and isinstance(processors[3], structlog.processors.StackInfoRenderer)
            and processors[4] is structlog.processors.format_exc_info
            and type(processors[5]) is structlog.processors.JSONRenderer
            and not structlog.get_context(bound)  # nothing bound globally
        )
        if not known:
            return
        renderer: structlog.processors.JSONRenderer = processors[5]
        if getattr(renderer, "_dumps", None) is not json.dumps or set(getattr(renderer, "_dumps_kw", ("?",))) - {"default"}:
            return  # a renderer with other JSON options renders its own lines
        output = config["logger_factory"]()
        write = getattr(output, "msg", None)
        if not isinstance(output, (structlog.WriteLogger, structlog.PrintLogger)) or write is None:
            return
        stamper: structlog.processors.TimeStamper = processors[2]
        if stamper.fmt is not None and stamper.fmt.upper() == "ISO" and stamper.utc:
            self._stamp = UtcIsoStamp()
        else:
            self._stamp = lambda: stamper(None, "info", {})[stamper.key]  # type: ignore[no-any-return]
        self._stamp_key = stamper.key
        self._write = write
