"""Transparent listeners of the proxy namespace: 15001, 15006, 15008.

The capture (tc + bpf_sk_assign, see agent/datapath) hands every TCP SYN of an
enrolled pod to one of these listening sockets although the SYN is addressed
to some other IP:port. So for an accepted socket getsockname() is the
connection's ORIGINAL destination and getpeername() is the real client: no
NAT, no map lookup. That only works if the listener has IP_TRANSPARENT (the
kernel otherwise refuses to answer a SYN for an address that is not its own).

A listener only accepts; what happens to a connection is the handler's
business (relay, HBONE server, inbound policy ...).
"""
from __future__ import annotations

import asyncio
import enum
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from ambit.agent.datapath.constants import (
    HBONE_PORT,
    INBOUND_PLAINTEXT_PORT,
    MARK_PROXY,
    OUTBOUND_PORT,
)

from ..netns import NetnsThread, make_socket

log = structlog.get_logger(__name__)

# Linux socket options missing from Python 3.11's socket module (linux/in6.h).
IPV6_TRANSPARENT = 75

DEFAULT_BACKLOG = 4096  # capped by net.core.somaxconn
ACCEPTS_PER_WAKEUP = 64  # fairness: a SYN flood must not starve the relays
ACCEPT_PAUSE_ON_FD_EXHAUSTION = 0.1  # seconds; else EMFILE turns into a busy loop


class ListenerKind(enum.Enum):
    """Which capture path delivered a connection, and the port it listens on."""

    OUTBOUND = "outbound"                    # what enrolled pods send (15001)
    INBOUND_PLAINTEXT = "inbound_plaintext"  # plaintext arriving for enrolled pods (15006)
    HBONE = "hbone"                          # mTLS HTTP/2 CONNECT tunnels (15008)

    @property
    def default_port(self) -> int:
        match self:
            case ListenerKind.OUTBOUND:
                return OUTBOUND_PORT
            case ListenerKind.INBOUND_PLAINTEXT:
                return INBOUND_PLAINTEXT_PORT
            case ListenerKind.HBONE:
                return HBONE_PORT
        raise AssertionError(self)


@dataclass(frozen=True, order=True)
class SocketAddress:
    ip: str
    port: int

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.ip else socket.AF_INET

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"

    @classmethod
    def from_sockaddr(cls, sockaddr: tuple[str, int] | tuple[str, int, int, int]) -> SocketAddress:
        return cls(sockaddr[0], sockaddr[1])


@dataclass(frozen=True)
class AcceptedConnection:
    """What the kernel told us about one captured connection when we accepted it."""

    client: SocketAddress        # the pod (or peer) that opened it: accept(2)'s address (= getpeername())
    original_dst: SocketAddress  # where the client meant to go: getsockname()
    listener: ListenerKind
    accepted_at: float           # wall-clock seconds (time.time())


ConnectionHandler = Callable[[AcceptedConnection, socket.socket], Awaitable[None]]
"""Serves one accepted connection. The socket is non-blocking and belongs to the
handler until its coroutine ends; the listener closes it then (closing twice is
harmless), so a handler that is cancelled or fails never leaks it."""


def _transparent_option(family: socket.AddressFamily) -> tuple[int, int]:
    if family == socket.AF_INET6:
        return socket.IPPROTO_IPV6, IPV6_TRANSPARENT
    return socket.IPPROTO_IP, socket.IP_TRANSPARENT


def set_nodelay_inherited(sock: socket.socket) -> None:
    """TCP_NODELAY on a listening socket: every connection accepted from it
    inherits the option (Linux copies the listener's TCP options to the child
    socket), so the data path never sets it per connection (one setsockopt(2)
    fewer per accepted connection; tests/unit/test_listeners.py pins the inheritance)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def listening_socket_setup(address: SocketAddress, backlog: int) -> Callable[[socket.socket], None]:
    """Options and bind/listen for a transparent listener (run where the
    socket is created, i.e. in the proxy namespace)."""

    def setup(sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Without it the kernel drops the SYN that bpf_sk_assign gave us.
        sock.setsockopt(*_transparent_option(address.family), 1)
        # Our own SYN-ACKs and data carry the proxy mark (constants.MARK_PROXY).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK_PROXY)
        set_nodelay_inherited(sock)
        if address.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address.ip, address.port))
        sock.listen(backlog)
        sock.setblocking(False)

    return setup


def _accepted_socket(family: int, fd: int) -> socket.socket:
    """The socket object for a descriptor accept(2) returned: what
    socket.accept() makes, without its wrapper's per-call work (the listener's
    family and type read through their IntEnum conversions, two Python calls
    each, and the default-timeout check that never applies to a non-blocking
    listener): the listener's family is read once, at start. Closes `fd` if
    no socket can be made of it."""
    try:
        return socket.socket(family, socket.SOCK_STREAM, 0, fileno=fd)
    except BaseException:
        os.close(fd)
        raise


class TransparentListener:
    """One transparent listening socket plus its accept loop.

    `start()` creates the socket inside `netns` (or the caller's namespace
    when None), or adopts one a previous agent handed over, and starts
    accepting on the running loop; `stop()` closes it and cancels the
    handlers still running, whose sockets are then closed. For a drain,
    `stop_accepting()` first lets go of the socket and leaves the handlers
    running (`wait_idle()` waits for them).
    """

    def __init__(
        self,
        kind: ListenerKind,
        handler: ConnectionHandler,
        *,
        netns: NetnsThread | None = None,
        address: str = "0.0.0.0",
        port: int | None = None,
        backlog: int = DEFAULT_BACKLOG,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.kind = kind
        self._handler = handler
        self._netns = netns
        self._requested = SocketAddress(address, kind.default_port if port is None else port)
        self._backlog = backlog
        self._clock = clock
        self._sock: socket.socket | None = None
        self._family = socket.AF_INET  # the listening socket's, set by start()
        self._bound: SocketAddress | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Each running handler and the socket it serves; the socket is closed
        # when the task is done, even if it was cancelled before it ran.
        self._connections: dict[asyncio.Task[None], socket.socket] = {}
        self._paused: asyncio.TimerHandle | None = None
        self._log = log.bind(listener=kind.value)

    @property
    def address(self) -> SocketAddress:
        """Where the socket is (or was last) bound: the real port when 0 was asked for."""
        if self._bound is None:
            raise RuntimeError("listener is not started")
        return self._bound

    @property
    def accepting(self) -> bool:
        return self._sock is not None

    @property
    def active_connections(self) -> int:
        return len(self._connections)

    @property
    def socket(self) -> socket.socket:
        """The listening socket (to hand over to a successor: it keeps the
        same accept queue, IP_TRANSPARENT, mark and namespace)."""
        if self._sock is None:
            raise RuntimeError("listener is not started")
        return self._sock

    async def start(self, adopt: socket.socket | None = None) -> None:
        """Listen, on a new socket or on `adopt`, a listening socket of this
        kind that another process handed over (SCM_RIGHTS)."""
        if self._sock is not None:
            raise RuntimeError("listener already started")
        if adopt is not None:
            sock = adopt
            sock.setblocking(False)
            set_nodelay_inherited(sock)  # a predecessor's socket may not have it
        else:
            setup = listening_socket_setup(self._requested, self._backlog)
            family = self._requested.family
            if self._netns is None:
                sock = make_socket(family, socket.SOCK_STREAM, 0, setup)
            else:
                sock = await self._netns.new_socket_async(family, socket.SOCK_STREAM, 0, setup)
        self._sock = sock
        self._family = sock.family
        self._bound = SocketAddress.from_sockaddr(sock.getsockname())
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._accept_ready)
        self._log = self._log.bind(address=str(self.address))
        self._log.info("listening", adopted=adopt is not None)

    def stop_accepting(self, *, take_queued: bool = False) -> None:
        """Accept no more and close this process's descriptor of the socket;
        running handlers carry on. The socket itself lives on where another
        process holds it (a successor), else the kernel closes it, and
        resets every connection still in its accept queue: handshakes the
        kernel completed for clients that then see a reset, not a retried
        SYN. So with `take_queued` (no successor will accept them) those are
        accepted and served first."""
        sock = self._sock
        if sock is None:
            return
        queued = self._accept_up_to(sock, self._backlog)[0] if take_queued else 0
        self._sock = None
        assert self._loop is not None
        if self._paused is not None:
            self._paused.cancel()
            self._paused = None
        else:
            self._loop.remove_reader(sock.fileno())
        sock.close()  # close(2) only: never shutdown(2), which would stop the successor's copy too
        self._log.info("stopped accepting", running=len(self._connections), taken_from_queue=queued)

    async def wait_idle(self) -> None:
        """Until every handler started so far has finished."""
        while self._connections:
            await asyncio.wait(list(self._connections))

    async def stop(self) -> None:
        """Stop accepting, cancel running handlers and wait for them."""
        self.stop_accepting()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._log.info("stopped", cancelled=len(tasks))

    async def __aenter__(self) -> TransparentListener:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _accept_ready(self) -> None:
        sock = self._sock
        if sock is None:
            return
        _, error = self._accept_up_to(sock, ACCEPTS_PER_WAKEUP)
        if error is not None:
            # EMFILE/ENFILE/ENOBUFS/ENOMEM: the listening socket stays readable,
            # so retrying at once would spin; back off and try again.
            self._pause_accepting(error)

    def _accept_up_to(self, sock: socket.socket, limit: int) -> tuple[int, OSError | None]:
        """Accept and dispatch what the queue holds, at most `limit`: how many,
        and the error that stopped it (None when the queue ran empty or the
        limit was reached)."""
        taken = 0
        family = self._family
        for _ in range(limit):
            try:
                fd, peer = sock._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionAbortedError:
                continue  # the client gave up while queued
            except OSError as exc:
                return taken, exc
            self._dispatch(_accepted_socket(family, fd), peer)
            taken += 1
        return taken, None

    def _pause_accepting(self, exc: OSError) -> None:
        assert self._loop is not None and self._sock is not None
        self._log.warning("accept paused", error=exc.strerror)
        self._loop.remove_reader(self._sock.fileno())
        self._paused = self._loop.call_later(ACCEPT_PAUSE_ON_FD_EXHAUSTION, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._paused = None
        if self._sock is not None and self._loop is not None:
            self._loop.add_reader(self._sock.fileno(), self._accept_ready)

    def _dispatch(self, conn_sock: socket.socket, peer: tuple[str, int] | tuple[str, int, int, int]) -> None:
        """`peer`: the address accept(2) returned (getpeername() would be a second syscall for it)."""
        conn_sock.setblocking(False)
        try:
            accepted = AcceptedConnection(
                client=SocketAddress.from_sockaddr(peer),
                original_dst=SocketAddress.from_sockaddr(conn_sock.getsockname()),
                listener=self.kind,
                accepted_at=self._clock(),
            )
        except OSError:  # reset before we looked at it (ENOTCONN)
            conn_sock.close()
            return
        assert self._loop is not None
        task = self._loop.create_task(self._serve(accepted, conn_sock))
        self._connections[task] = conn_sock
        task.add_done_callback(self._connection_done)

    def _connection_done(self, task: asyncio.Task[None]) -> None:
        self._connections.pop(task).close()

    async def _serve(self, accepted: AcceptedConnection, conn_sock: socket.socket) -> None:
        try:
            await self._handler(accepted, conn_sock)
        except asyncio.CancelledError:
            raise
        except Exception:
            self._log.exception("connection handler failed",
                                client=str(accepted.client), dst=str(accepted.original_dst))
