"""Network namespaces: create them, run code in them, make sockets in them,
all without forking (see agent/netlink.py for why the agent never forks).

A socket belongs to the namespace it was created in for its whole life, and
setsockopt/bind/connect/accept on it act in *that* namespace whatever thread
calls them. So the proxy only needs a thread that sits in the proxy namespace
to call `socket()`; the agent's event loop (in the node namespace) then serves
the socket like any other.

`setns(CLONE_NEWNET)` changes the namespace of the calling thread only, so it
is done once, on a dedicated thread that never runs anything else (never on a
shared executor thread, which would leak the namespace into unrelated work).
The one exception, NetnsSocketPool, enters and leaves within one synchronous
call that only creates sockets.
Python 3.11 has no `os.setns`, hence libc via ctypes.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import functools
import os
import socket
import threading
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

from pyroute2 import netns as pyroute2_netns

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/var/run/netns"  # where `ip netns` and pyroute2 mount named namespaces

_P = ParamSpec("_P")
_T = TypeVar("_T")

SocketSetup = Callable[[socket.socket], None]


def netns_path(name_or_path: str) -> str:
    """A namespace file path: absolute paths (e.g. /proc/<pid>/ns/net) are kept,
    bare names are looked up where `ip netns add` puts them."""
    if os.path.isabs(name_or_path):
        return name_or_path
    if "/" in name_or_path or name_or_path in ("", ".", ".."):
        raise ValueError(f"not a network namespace name: {name_or_path!r}")
    return os.path.join(NETNS_RUN_DIR, name_or_path)


@functools.cache
def _libc_setns() -> Callable[[int, int], int]:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    setns = libc.setns
    setns.argtypes = (ctypes.c_int, ctypes.c_int)
    setns.restype = ctypes.c_int
    return setns


def _setns(fd: int, what: str) -> None:
    """setns(fd, CLONE_NEWNET) for the calling thread; OSError naming `what` on failure."""
    if _libc_setns()(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns({what}, CLONE_NEWNET): {os.strerror(err)}")


def enter_netns(path: str) -> None:
    """Move the *calling thread* into the network namespace at `path`.

    Low level: only call it on a thread you own and that will not run
    anything meant for another namespace afterwards.
    """
    fd = os.open(netns_path(path), os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(fd, path)
    finally:
        os.close(fd)


def make_socket(
    family: socket.AddressFamily = socket.AF_INET,
    type: socket.SocketKind = socket.SOCK_STREAM,
    proto: int = 0,
    setup: SocketSetup | None = None,
) -> socket.socket:
    """Create a socket in the calling thread's namespace and apply `setup`
    (setsockopt, bind, listen ...); the socket is closed if `setup` fails."""
    sock = socket.socket(family, type, proto)
    try:
        if setup is not None:
            setup(sock)
    except BaseException:
        sock.close()
        raise
    return sock


class NetnsThread:
    """One thread living in one network namespace, running what it is given.

    Use `run`/`run_async` for any sync callable (pyroute2 calls, sysctl
    writes, socket creation) and `new_socket`/`new_socket_async` for the common case.
    """

    def __init__(self, path: str) -> None:
        self.path = netns_path(path)
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"network namespace {self.path} does not exist")
        self._entry_error: list[BaseException] = []
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix=f"netns:{os.path.basename(self.path)}",
            initializer=self._enter,
        )
        try:
            # Start the thread now so that a failing setns surfaces here, with
            # its own message, rather than as BrokenThreadPool on first use.
            self._executor.submit(lambda: None).result()
        except concurrent.futures.BrokenExecutor as exc:
            self._executor.shutdown(wait=True)
            if self._entry_error:
                raise self._entry_error[0] from exc
            raise

    def _enter(self) -> None:
        try:
            enter_netns(self.path)
        except BaseException as exc:
            self._entry_error.append(exc)
            raise

    def run(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Run `fn` in the namespace and wait for it (blocking)."""
        return self._executor.submit(fn, *args, **kwargs).result()

    async def run_async(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Run `fn` in the namespace without blocking the event loop."""
        return await asyncio.wrap_future(self._executor.submit(fn, *args, **kwargs))

    def new_socket(
        self,
        family: socket.AddressFamily = socket.AF_INET,
        type: socket.SocketKind = socket.SOCK_STREAM,
        proto: int = 0,
        setup: SocketSetup | None = None,
    ) -> socket.socket:
        return self.run(make_socket, family, type, proto, setup)

    async def new_socket_async(
        self,
        family: socket.AddressFamily = socket.AF_INET,
        type: socket.SocketKind = socket.SOCK_STREAM,
        proto: int = 0,
        setup: SocketSetup | None = None,
    ) -> socket.socket:
        return await self.run_async(make_socket, family, type, proto, setup)

    def close(self) -> None:
        """Stop the thread (after what it is running); safe to call twice."""
        self._executor.shutdown(wait=True)

    def __enter__(self) -> NetnsThread:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@contextlib.contextmanager
def in_netns(path: str) -> Iterator[NetnsThread]:
    """`with in_netns("ambit-proxy") as ns: ns.run(fn)` - a namespace thread for
    the duration of the block."""
    thread = NetnsThread(path)
    try:
        yield thread
    finally:
        thread.close()


def socket_in_netns(
    path: str,
    family: socket.AddressFamily = socket.AF_INET,
    type: socket.SocketKind = socket.SOCK_STREAM,
    proto: int = 0,
    setup: SocketSetup | None = None,
) -> socket.socket:
    """One-shot: create one socket in the namespace at `path` on a throwaway
    thread (keep a `NetnsThread` when making many)."""
    return run_in_netns(path, lambda: make_socket(family, type, proto, setup))


class NetnsSocketPool:
    """Ready-made, unbound sockets of one namespace for code running elsewhere.

    Every socket of a relayed connection's upstream comes from here, so the
    batch is made on the caller's own thread (the event loop's): it enters
    the namespace, creates `batch` sockets and returns to its own namespace
    in one synchronous step (two setns(2), ~8 us, per batch). No thread hop:
    handing the batch to a NetnsThread and back cost a queue, two wake-ups,
    an eventfd round and a GIL hand-over per socket() call while the loop
    was busy (futex 1.1-1.6 per connection on the destination agent). Nothing
    else can run on the thread meanwhile (no await, no callback); if the
    thread cannot return to its namespace the process aborts, since all it
    would do next would happen in the wrong one.
    """

    def __init__(
        self,
        thread: NetnsThread,
        family: socket.AddressFamily = socket.AF_INET,
        type: int = socket.SOCK_STREAM,  # a SocketKind, | SOCK_NONBLOCK for sockets ready for a loop
        *,
        batch: int = 32,
    ) -> None:
        self._family = family
        self._type = type
        self._batch = batch
        self._ready: list[socket.socket] = []
        self._closed = False
        self._target_path = thread.path
        self._target = os.open(thread.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            os.close(self._target)
            raise
        self._home_thread = threading.get_ident()

    def _make_batch(self, count: int) -> list[socket.socket]:
        if threading.get_ident() != self._home_thread:
            raise RuntimeError("NetnsSocketPool is used from the thread that made it only")
        made: list[socket.socket] = []
        _setns(self._target, self._target_path)
        try:
            for _ in range(count):
                made.append(socket.socket(self._family, self._type))
        except OSError:
            if not made:  # out of descriptors: report it to the caller
                raise
        finally:
            try:
                _setns(self._home, "the thread's own namespace")
            except OSError:
                os.abort()  # stuck in the other namespace: nothing this thread does next would be right
        return made

    def take_now(self) -> socket.socket:
        """An unbound socket of the pool's namespace; the caller owns it
        (synchronous: a batch is made on this thread when the pool is empty)."""
        if self._closed:
            raise RuntimeError("socket pool is closed")
        if not self._ready:
            self._ready = self._make_batch(self._batch)
        return self._ready.pop()

    async def take(self) -> socket.socket:
        """`take_now` for callers that await a socket source."""
        return self.take_now()

    async def aclose(self) -> None:
        """Close the spare sockets and the namespace descriptors."""
        if self._closed:
            return
        self._closed = True
        for sock in self._ready:
            sock.close()
        self._ready.clear()
        os.close(self._target)
        os.close(self._home)


def _on_new_thread(fn: Callable[[], _T], name: str) -> _T:
    """Run fn on a thread of its own and wait; the thread (with whatever
    namespace it entered) ends with it. Exceptions are re-raised here."""
    outcome: dict[str, object] = {}

    def body() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=body, name=name, daemon=True)
    worker.start()
    worker.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


def run_in_netns(netns: str | None, fn: Callable[[], _T]) -> _T:
    """Call fn inside netns (a name or path; None = the caller's namespace)."""
    if netns is None:
        return fn()

    def inside() -> _T:
        enter_netns(netns)
        return fn()

    return _on_new_thread(inside, f"netns:{os.path.basename(netns)}")


def write_sysctl(netns: str | None, key: str, value: str | int) -> None:
    """Set a sysctl inside netns; key is its /proc/sys path, e.g.
    net/ipv4/conf/ambit0/rp_filter (slashes, so interface names may hold dots)."""
    def write() -> None:
        with open("/proc/sys/" + key, "w") as f:
            f.write(str(value))

    run_in_netns(netns, write)


def read_sysctl(netns: str | None, key: str) -> str:
    def read() -> str:
        with open("/proc/sys/" + key) as f:
            return f.read().strip()

    return run_in_netns(netns, read)


@functools.cache
def _libc_unshare() -> Callable[[int], int]:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return libc.unshare


def create_netns(name: str) -> str:
    """A named network namespace (as `ip netns add` makes it), without forking:
    unshare on a throwaway thread (it affects only that thread) and bind-mount
    it from /proc/thread-self. Loopback is left down; callers bring it up."""
    def unshare_and_mount() -> None:
        if _libc_unshare()(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
        pyroute2_netns.attach(name, "thread-self")

    _on_new_thread(unshare_and_mount, f"netns-create:{name}")
    return netns_path(name)


def remove_netns(name: str) -> bool:
    """Unmount and delete a named namespace; False if it was not there."""
    try:
        pyroute2_netns.remove(name)
        return True
    except FileNotFoundError:
        return False
