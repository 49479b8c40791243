"""Echo clients the lab scenario tests run inside a pod's namespace.

  python labclient.py fanout HOST PORT --connections 200 --size 65536
      opens every connection first (so all are open at once), then sends each
      its own random payload, half-closes, and checks the echo byte for byte
  python labclient.py loop HOST PORT --until-file PATH
      one short echo exchange after another until PATH exists, noting each
      result with its time
  python labclient.py hold HOST PORT --until-file PATH --ready-file READY [--progress-file COUNT]
      one connection, kept open: an echo exchange on it every 0.1 s until
      PATH exists (READY appears after the first, COUNT holds the number
      done so far), noting any that fails

Each prints one JSON object. Run as a script (`lab.exec(pod, [python, path,
...])`), so the test process never has to enter the pod's namespace itself.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes) -> bytes:
    """Send, half-close, read until the server closes; return what came back."""
    async def send() -> None:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    received = bytearray()
    while chunk := await reader.read(65536):
        received += chunk
    await sender
    return bytes(received)


async def fanout(host: str, port: int, connections: int, size: int, timeout: float) -> dict[str, Any]:
    started = time.monotonic()
    opened = await asyncio.gather(*(asyncio.wait_for(asyncio.open_connection(host, port), timeout)
                                    for _ in range(connections)), return_exceptions=True)
    all_open = time.monotonic() - started
    payloads = [os.urandom(size) for _ in range(connections)]

    async def one(index: int) -> str | None:
        conn = opened[index]
        if isinstance(conn, BaseException):
            return f"connect: {conn!r}"
        reader, writer = conn
        try:
            echoed = await asyncio.wait_for(_echo(reader, writer, payloads[index]), timeout)
        except (TimeoutError, OSError) as exc:
            return f"exchange: {exc!r}"
        finally:
            writer.close()
        if len(echoed) != size or hashlib.sha256(echoed).digest() != hashlib.sha256(payloads[index]).digest():
            return f"mismatch: sent {size} bytes, got {len(echoed)} back with another digest"
        return None

    errors = await asyncio.gather(*(one(i) for i in range(connections)))
    failures = {str(i): e for i, e in enumerate(errors) if e is not None}
    return {"connections": connections, "verified": connections - len(failures), "failures": failures,
            "bytes_each_way": size * (connections - len(failures)), "all_open_after_s": round(all_open, 3),
            "seconds": round(time.monotonic() - started, 3)}


def loop(host: str, port: int, until_file: str, max_seconds: float, timeout: float,
         progress_file: str | None = None) -> dict[str, Any]:
    """Echo exchanges one after another until `until_file` exists; the number
    that succeeded so far is written to `progress_file` after each one."""
    started = time.monotonic()
    attempts: list[dict[str, Any]] = []
    while not os.path.exists(until_file) and time.monotonic() - started < max_seconds:
        at = round(time.monotonic() - started, 3)
        payload = os.urandom(32)
        try:
            with socket.create_connection((host, port), timeout=timeout) as sock:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                echoed = b""
                while chunk := sock.recv(4096):
                    echoed += chunk
            attempts.append({"at": at, "ok": echoed == payload})
        except OSError as exc:
            attempts.append({"at": at, "ok": False, "error": repr(exc)})
        if progress_file:
            _write_count(progress_file, sum(1 for a in attempts if a["ok"]))
        time.sleep(0.05)  # pacing: about 20 exchanges a second
    return {"attempts": len(attempts), "ok": sum(1 for a in attempts if a["ok"]),
            "failures": [a for a in attempts if not a["ok"]], "seconds": round(time.monotonic() - started, 3)}


def _write_count(path: str, count: int) -> None:
    """Replace `path` with `count` whole: a reader never sees half a number."""
    with open(f"{path}.tmp", "w") as f:
        f.write(str(count))
    os.replace(f"{path}.tmp", path)


def hold(host: str, port: int, until_file: str, ready_file: str, max_seconds: float, timeout: float,
         progress_file: str | None = None) -> dict[str, Any]:
    """Many exchanges on one connection: it (and the tunnel under it) must outlive whatever the test does."""
    started = time.monotonic()
    exchanges, failures = 0, []
    with socket.create_connection((host, port), timeout=timeout) as sock:
        while not os.path.exists(until_file) and time.monotonic() - started < max_seconds:
            payload = os.urandom(16).hex().encode() + b"\n"
            try:
                sock.sendall(payload)
                echoed = b""
                while len(echoed) < len(payload):
                    chunk = sock.recv(len(payload) - len(echoed))
                    if not chunk:
                        raise ConnectionError("the connection was closed")
                    echoed += chunk
                if echoed != payload:
                    raise ValueError("the echo differs")
                exchanges += 1
                if progress_file:
                    _write_count(progress_file, exchanges)
            except (OSError, ValueError) as exc:
                failures.append({"at": round(time.monotonic() - started, 3), "error": repr(exc)})
                break  # a dead connection stays dead: that is the failure being looked for
            if exchanges == 1:
                open(ready_file, "w").close()
            time.sleep(0.1)  # pacing: about ten exchanges a second
    return {"exchanges": exchanges, "failures": failures, "seconds": round(time.monotonic() - started, 3)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    fan = sub.add_parser("fanout")
    fan.add_argument("host")
    fan.add_argument("port", type=int)
    fan.add_argument("--connections", type=int, default=200)
    fan.add_argument("--size", type=int, default=64 * 1024)
    fan.add_argument("--timeout", type=float, default=60.0)
    lp = sub.add_parser("loop")
    lp.add_argument("host")
    lp.add_argument("port", type=int)
    lp.add_argument("--until-file", required=True)
    lp.add_argument("--max-seconds", type=float, default=60.0)
    lp.add_argument("--timeout", type=float, default=3.0)
    lp.add_argument("--progress-file", help="where to keep the count of exchanges that succeeded so far")
    hd = sub.add_parser("hold")
    hd.add_argument("host")
    hd.add_argument("port", type=int)
    hd.add_argument("--until-file", required=True)
    hd.add_argument("--ready-file", required=True)
    hd.add_argument("--max-seconds", type=float, default=180.0)
    hd.add_argument("--timeout", type=float, default=5.0)
    hd.add_argument("--progress-file", help="where to keep the count of exchanges done so far")
    args = parser.parse_args(argv)
    if args.mode == "fanout":
        result = asyncio.run(fanout(args.host, args.port, args.connections, args.size, args.timeout))
    elif args.mode == "hold":
        result = hold(args.host, args.port, args.until_file, args.ready_file, args.max_seconds, args.timeout,
                      args.progress_file)
    else:
        result = loop(args.host, args.port, args.until_file, args.max_seconds, args.timeout, args.progress_file)
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
