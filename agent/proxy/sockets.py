"""Socket helpers the relay and the HBONE tunnels share: connecting, closing with a reset, naming an error."""
from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct

_LINGER_RESET = struct.pack("ii", 1, 0)


def reset_socket(sock: socket.socket) -> None:
    """Close with RST instead of FIN (SO_LINGER 0)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass  # already dead; close() is all that is left
    sock.close()


def errno_name(exc: BaseException) -> str:
    """ECONNRESET and the like for an OSError, else the exception's type (logs, access log, metrics)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__


_CONNECTING = frozenset({errno.EINPROGRESS, errno.EINTR})


def set_nonblocking(sock: socket.socket) -> None:
    """setblocking(False), without the ioctl(2) when Python already made the
    socket non-blocking (a socket on the connection path is handed over
    several times: one syscall each saved per connection)."""
    if sock.gettimeout() != 0.0:
        sock.setblocking(False)


def connect_now(sock: socket.socket, address: tuple[str, int]) -> bool:
    """connect(2) of a non-blocking socket to a numeric `address`: True when
    the handshake completed inside the call (the common case to a pod on this
    node, a veth), False while it is still in progress (`finish_connect`
    waits for it); raises the OSError of a failure known at once.

    Synchronous, so a caller that needs no wait needs no coroutine or task
    (the inbound HBONE server answers such a CONNECT inline)."""
    err = sock.connect_ex(address)
    if err == 0:
        return True
    if err not in _CONNECTING:
        raise OSError(err, os.strerror(err))
    try:
        # To a pod on this node the handshake has usually completed inside
        # connect(2) already: then no writability wait, no watcher.
        sock.getpeername()
        return True
    except OSError:
        pass  # ENOTCONN: still connecting, or already refused (the pod's RST came inside the call too)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))
    return False


async def finish_connect(sock: socket.socket, timeout_s: float | None = None) -> None:
    """Wait for a connect that `connect_now` left in progress: one
    writability wait (raises its OSError, or TimeoutError after
    `timeout_s`). The deadline is armed only here, so a connect that
    completed inside connect(2) costs no timer."""
    loop = asyncio.get_running_loop()
    connected: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()
    loop.add_writer(fd, _writable, connected)
    try:
        if timeout_s is None:
            await connected
        else:
            async with asyncio.timeout(timeout_s):
                await connected
    finally:
        loop.remove_writer(fd)  # before any close: the loop must not watch a closed descriptor
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


async def connect(sock: socket.socket, address: tuple[str, int], timeout_s: float | None = None) -> None:
    """Connect a non-blocking socket to a numeric `address` (raises the
    OSError of the failure: ConnectionRefusedError, ..., or TimeoutError
    after `timeout_s`): `connect_now`, then `finish_connect` if needed.

    Not loop.sock_connect: uvloop's resolves every address first, and with
    no socket type given that is a getaddrinfo on its thread pool, i.e. a
    thread hop, a futex wake-up and an eventfd round per upstream connect
    (most of the destination side's share of a short connection's CPU
    besides the kernel's)."""
    if not connect_now(sock, address):
        await finish_connect(sock, timeout_s)


def _writable(connected: asyncio.Future[None]) -> None:
    if not connected.done():
        connected.set_result(None)
