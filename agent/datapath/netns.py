"""Running code inside another network namespace.

Python 3.11 has no os.setns, and pyroute2's pushns/popns keep a module-level
stack that is not thread-safe, so this uses libc setns(2) on a short-lived
dedicated thread: setns(CLONE_NEWNET) changes only the calling thread, the
thread dies afterwards, and no other thread ever changes namespace. What the
callable creates keeps that namespace: a socket made there can then be used
from any thread (that is how the proxy's listeners are made), and a
/proc/sys/net file opened there belongs to that namespace's sysctls.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/var/run/netns"


def netns_path(name_or_path: str) -> str:
    """`ip netns` names live in /var/run/netns; a path is taken as is."""
    return name_or_path if "/" in name_or_path else os.path.join(NETNS_RUN_DIR, name_or_path)


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def run_in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """Call fn inside netns (a name or path; None = the caller's namespace)."""
    if netns is None:
        return fn()
    fd = os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
    outcome: dict[str, object] = {}

    def body() -> None:
        try:
            _setns(fd)
            outcome["value"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc

    try:
        worker = threading.Thread(target=body, name=f"netns:{netns}", daemon=True)
        worker.start()
        worker.join()
    finally:
        os.close(fd)
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


def write_sysctl(netns: str | None, key: str, value: str | int) -> None:
    """Set a sysctl inside netns; key is its /proc/sys path, e.g.
    net/ipv4/conf/ambit0/rp_filter (slashes, so interface names may hold dots)."""
    path = "/proc/sys/" + key

    def write() -> None:
        with open(path, "w") as f:
            f.write(str(value))

    run_in_netns(netns, write)


def read_sysctl(netns: str | None, key: str) -> str:
    path = "/proc/sys/" + key

    def read() -> str:
        with open(path) as f:
            return f.read().strip()

    return run_in_netns(netns, read)
