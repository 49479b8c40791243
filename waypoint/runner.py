"""Run Envoy as a waypoint and keep its certificate current (`ambit waypoint --run`).

The supervisor starts Envoy with the bootstrap, reports ready once Envoy
listens on the HBONE port, then sleeps until the certificate is due and
rewrites the identity Secret (Envoy reloads it, credentials.py). It exits
with Envoy's status; SIGTERM/SIGINT are passed on to Envoy.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import structlog

from .credentials import CertificateRotator

log = structlog.get_logger(__name__)

# Also the longest a rotation can be late (e.g. after the machine slept).
MAX_CHECK_INTERVAL_S = 60.0
# How often --watch looks at the cluster files.
REFRESH_INTERVAL_S = 2.0
# After a failed rotation (e.g. the CA unreadable): retry, without an error per second.
RETRY_AFTER_FAILURE_S = 10.0


def envoy_argv(envoy: str, config: str, concurrency: int, log_level: str) -> list[str]:
    """Envoy for one waypoint: no hot restart, access log flushed every 100 ms
    (Envoy's default is 10 s)."""
    return [envoy, "-c", config, "--disable-hot-restart", "--base-id", str(os.getpid()),
            "--concurrency", str(concurrency), "-l", log_level, "--file-flush-interval-msec", "100"]


def is_listening(port: int, pid: int | str = "self") -> bool:
    """A LISTEN socket on `port` at any address (`--listen-address` need not be
    0.0.0.0), IPv4 or IPv6, in the network namespace of process `pid`
    (default: this one)."""
    suffix = f":{port:04X}"
    for path in (f"/proc/{pid}/net/tcp", f"/proc/{pid}/net/tcp6"):
        try:
            with open(path) as table:
                rows = [line.split() for line in table.readlines()[1:]]
        except FileNotFoundError:  # no IPv6 in this kernel
            continue
        if any(row[1].endswith(suffix) and row[3] == "0A" for row in rows):
            return True
    return False


def child_pids(pid: int) -> list[int]:
    """The processes `pid` started (e.g. a supervisor's Envoy); [] once it is gone."""
    children: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            children += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        return []
    return sorted(children)


def seconds_until(moment: datetime, now: datetime | None = None) -> float:
    now = now or datetime.now(timezone.utc)
    return (moment - now).total_seconds()


def next_check_in(rotator: CertificateRotator | None, now: datetime | None = None) -> float:
    """How long to sleep before looking at the certificate again (pure but for the clock)."""
    if rotator is None or rotator.current is None:
        return MAX_CHECK_INTERVAL_S
    return min(MAX_CHECK_INTERVAL_S, max(1.0, seconds_until(rotator.due_at(), now)))


def supervise(argv: list[str], port: int, rotator: CertificateRotator | None = None,
              ready: Callable[[], None] | None = None, listen_timeout: float = 30.0,
              refresh: Callable[[], object] | None = None, refresh_interval: float = REFRESH_INTERVAL_S) -> int:
    """Run `argv` (Envoy) until it exits; returns its exit status (1 if it never listened).
    Meanwhile keep the certificate current (`rotator`) and call `refresh` every
    `refresh_interval` seconds (the cluster files, live.py)."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    stopping: list[int] = []

    def stop(signum: int, _frame: Any) -> None:
        stopping.append(signum)
        if proc.poll() is None:
            proc.terminate()

    # Handlers only from the main thread (Python's rule); elsewhere the caller stops Envoy.
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)} if on_main_thread else {}
    try:
        deadline = time.monotonic() + listen_timeout
        while not is_listening(port):
            if proc.poll() is not None:
                print(f"waypoint: envoy exited with {proc.returncode} before listening on {port}", file=sys.stderr)
                return 1
            if stopping:
                return proc.wait()
            if time.monotonic() > deadline:
                proc.terminate()
                proc.wait()
                print(f"waypoint: envoy did not listen on {port} within {listen_timeout:.0f}s", file=sys.stderr)
                return 1
            time.sleep(0.05)
        if ready is not None:
            ready()
        retry_rotation_at = 0.0  # monotonic; after a failed rotation, not before this
        while True:
            wait = next_check_in(rotator)
            if retry_rotation_at:
                wait = max(wait, retry_rotation_at - time.monotonic())
            if refresh is not None:
                wait = min(wait, refresh_interval)
            try:
                return proc.wait(timeout=max(wait, 0.1))
            except subprocess.TimeoutExpired:
                pass
            if stopping:
                continue  # Envoy is on its way out; wait() returns its status
            if rotator is not None and time.monotonic() >= retry_rotation_at:
                try:
                    rotator.rotate_if_due()
                    retry_rotation_at = 0.0
                except Exception as exc:  # keep serving on the current certificate; retry later
                    retry_rotation_at = time.monotonic() + RETRY_AFTER_FAILURE_S
                    log.error("waypoint.cert_rotation_failed", error=f"{type(exc).__name__}: {exc}",
                              retry_in_s=RETRY_AFTER_FAILURE_S)
            if refresh is not None:
                try:
                    refresh()
                except Exception as exc:  # a bug here must not take the waypoint down
                    log.exception("waypoint.refresh_failed", error=f"{type(exc).__name__}: {exc}")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:
            proc.terminate()
            proc.wait()
