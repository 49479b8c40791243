#!/usr/bin/env python3
"""Continuous load with one outcome per connection, run inside a pod's
network namespace (bench/upgrade.py starts it there).

  steady_load.py --short web1=10.244.2.2:8080 --short web0=10.244.1.2:8080 --rate 50
                 --stream web1=10.244.2.2:9000 --streams 2 --until-file PATH --out PATH

Short connections: every 1/rate seconds, per --short target, a new TCP
connection sends `GET /` and reads the whole answer; it counts as failed
unless it reads a 200 within --timeout (connect included, so a SYN the
datapath drops and the client retransmits shows up as latency, not as a
failure, when the retransmission succeeds in time).

Long-lived streams: --streams connections per --stream target (an echo
server), opened at start, each sending a numbered byte pattern at
--stream-rate bytes per second and checking that every byte comes back in
order. A stream fails if it is reset, closed or returns a wrong byte; the
bytes it sent that never came back are its bytes lost. Each chunk starts
with a marker so a capture can tell plaintext of ours on a wire.

When --until-file exists, streams half-close and must get every byte back;
the result (wall-clock times, comparable with the bench's) is written as
one JSON object to --out.

With --progress-file, what has happened so far is kept there (replaced
whole, about ten times a second), so a caller waits on observed traffic
rather than on time: per --short target the connections answered 200 and
the ones failed, the start time of the oldest connection still in flight,
and per stream the bytes echoed and whether it ended.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

MARKER = b"AMBIT-UPGRADE-CANARY:"
CHUNK = 4096
PATTERN_PERIOD = 251  # prime, so the pattern never lines up with chunk boundaries
READ_SIZE = 65536


def _pattern_table() -> bytes:
    """One period of the stream's bytes (plus a read's worth, so any slice
    is contiguous): a marker at every chunk start, then bytes that depend on
    their offset, so a lost or repeated byte shows."""
    period = CHUNK * PATTERN_PERIOD
    out = bytearray(position % PATTERN_PERIOD for position in range(period + READ_SIZE))
    for start in range(0, len(out), CHUNK):
        out[start:start + len(MARKER)] = MARKER[:len(out) - start]
    return bytes(out)


def pattern(table: bytes, offset: int, length: int) -> bytes:
    """The stream's bytes [offset, offset + length), length <= READ_SIZE."""
    start = offset % (CHUNK * PATTERN_PERIOD)
    return table[start:start + length]


@dataclass
class ShortResult:
    target: str
    started: float
    ended: float
    ok: bool
    error: str = ""


@dataclass
class StreamResult:
    target: str
    opened: float
    ended: float = 0.0
    sent: int = 0
    echoed: int = 0
    ok: bool = False
    error: str = ""
    errors_at: list[float] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return self.sent - self.echoed


async def short_connection(name: str, host: str, port: int, timeout: float) -> ShortResult:
    started = time.time()
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            answer = await reader.read()
        ok = answer.startswith(b"HTTP/1.1 200")
        return ShortResult(name, started, time.time(), ok, "" if ok else f"answer {answer[:40]!r}")
    except TimeoutError:
        return ShortResult(name, started, time.time(), False, "timeout")
    except OSError as exc:
        return ShortResult(name, started, time.time(), False, type(exc).__name__)
    finally:
        if writer is not None:
            writer.close()


async def short_load(targets: list[tuple[str, str, int]], rate: float, timeout: float, stop: asyncio.Event,
                     results: list[ShortResult], pending: dict[asyncio.Task[ShortResult], float]) -> None:
    """New connections at `rate` per target; `pending` maps those in flight to
    their start (wall clock)."""
    interval = 1.0 / rate
    next_at = time.monotonic()
    while not stop.is_set():
        for name, host, port in targets:
            task = asyncio.ensure_future(short_connection(name, host, port, timeout))
            pending[task] = time.time()
            task.add_done_callback(lambda t: (pending.pop(t, None), results.append(t.result())))
        next_at += interval
        delay = next_at - time.monotonic()
        if delay > 0:
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except TimeoutError:
                pass
    if pending:
        await asyncio.wait(pending)


async def stream(name: str, host: str, port: int, byte_rate: float, stop: asyncio.Event, timeout: float,
                 table: bytes, result: StreamResult) -> None:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError) as exc:
        result.error, result.ended = f"connect: {type(exc).__name__}", time.time()
        return

    async def send() -> None:
        interval = CHUNK / byte_rate
        while not stop.is_set():
            writer.write(pattern(table, result.sent, CHUNK))
            result.sent += CHUNK
            await writer.drain()
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except TimeoutError:
                pass
        writer.write_eof()

    async def receive() -> None:
        while data := await reader.read(READ_SIZE):
            if data != pattern(table, result.echoed, len(data)):
                raise ValueError(f"wrong bytes at offset {result.echoed}")
            result.echoed += len(data)

    sender = asyncio.ensure_future(send())
    try:
        await receive()
        await sender
        result.ok = result.echoed == result.sent
        if not result.ok:
            result.error = f"closed early: {result.echoed} of {result.sent} bytes came back"
    except (OSError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        result.errors_at.append(time.time())
        sender.cancel()
    finally:
        result.ended = time.time()
        writer.close()


def progress(shorts: list[ShortResult], pending: dict[asyncio.Task[ShortResult], float],
             streams: list[StreamResult]) -> dict:
    """What has happened so far (the --progress-file's content)."""
    short: dict[str, dict[str, int]] = {}
    for result in shorts:
        counts = short.setdefault(result.target, {"ok": 0, "failed": 0})
        counts["ok" if result.ok else "failed"] += 1
    return {"at": time.time(), "short": short, "oldest_in_flight": min(pending.values(), default=None),
            "streams": [{"target": s.target, "echoed": s.echoed, "ended": s.ended > 0,
                         "error": s.error} for s in streams]}


async def report_progress(path: str, snapshot: Callable[[], dict]) -> None:
    """Keep `path` current until cancelled; a reader never sees half a file."""
    while True:
        with open(path + ".tmp", "w") as out:
            json.dump(snapshot(), out)
        os.replace(path + ".tmp", path)
        await asyncio.sleep(0.1)  # pacing of the report, not a wait for anything


async def watch_file(path: str, stop: asyncio.Event) -> None:
    while not os.path.exists(path):
        await asyncio.sleep(0.05)
    stop.set()


def _target(text: str) -> tuple[str, str, int]:
    name, _, address = text.partition("=")
    host, _, port = address.rpartition(":")
    return name, host, int(port)


async def run(args: argparse.Namespace) -> dict:
    stop = asyncio.Event()
    shorts: list[ShortResult] = []
    pending: dict[asyncio.Task[ShortResult], float] = {}
    streams = [StreamResult(name, time.time()) for name, _, _ in map(_target, args.stream)
               for _ in range(args.streams)]
    targets = [_target(t) for t in args.stream for _ in range(args.streams)]
    table = _pattern_table()
    tasks = [asyncio.ensure_future(stream(name, host, port, args.stream_rate, stop, args.timeout, table, result))
             for (name, host, port), result in zip(targets, streams)]
    if args.short:
        tasks.append(asyncio.ensure_future(short_load([_target(t) for t in args.short], args.rate, args.timeout,
                                                      stop, shorts, pending)))
    watcher = asyncio.ensure_future(watch_file(args.until_file, stop))
    reporter = (asyncio.ensure_future(report_progress(args.progress_file, lambda: progress(shorts, pending, streams)))
                if args.progress_file else None)
    await asyncio.gather(*tasks)
    watcher.cancel()
    if reporter is not None:
        reporter.cancel()
    return {"short": [asdict(s) for s in shorts],
            "streams": [{**asdict(s), "lost": s.lost} for s in streams]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="append", default=[], metavar="NAME=HOST:PORT")
    parser.add_argument("--rate", type=float, default=50.0, help="new connections per second per --short target")
    parser.add_argument("--stream", action="append", default=[], metavar="NAME=HOST:PORT")
    parser.add_argument("--streams", type=int, default=2, help="long-lived connections per --stream target")
    parser.add_argument("--stream-rate", type=float, default=64 * 1024, help="bytes per second per stream")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds a short connection may take")
    parser.add_argument("--until-file", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--progress-file", help="where to keep counts of what has happened so far")
    args = parser.parse_args()
    try:
        import uvloop
        result = uvloop.run(run(args))
    except ImportError:
        result = asyncio.run(run(args))
    with open(args.out + ".tmp", "w") as out:
        json.dump(result, out)
    os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
