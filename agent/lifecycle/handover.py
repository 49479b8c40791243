"""Hand-over between two agents on one node, over a Unix socket next to the
agent API socket (docs/lifecycle.md has the sequence and why).

`HandoverOffer` runs in the serving agent: it answers one successor at a
time and calls back into the agent (`HandoverHost`) to freeze its records
and give up its listening sockets. `HandoverClient` is the successor's side.
The socket is SOCK_SEQPACKET (one message per record, the descriptors on the
`frozen` one); the few blocking exchanges run on worker threads.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Mapping
from typing import Protocol

import structlog

from ..rpc.server import MAX_SOCKET_PATH
from .messages import (
    PROTOCOL,
    ApiTaken,
    Draining,
    Frozen,
    HandoverProtocolError,
    Hello,
    Message,
    NodeSettings,
    Ready,
    Refuse,
    Welcome,
    decode,
    encode,
    expect,
)

log = structlog.get_logger(__name__)

HELLO_TIMEOUT_S = 10.0
# The successor syncs discovery and compiles its programs between hello and
# api-taken: waiting is cheap, and its death shows at once as EOF.
PREPARE_TIMEOUT_S = 300.0
READY_TIMEOUT_S = 60.0
MAX_SOCKETS = 16


def handover_path(agent_socket: str) -> str:
    """Where the serving agent offers the hand-over: beside its API socket."""
    return f"{agent_socket}.handover"


class HandoverRefused(Exception):
    """The serving agent will not hand over (the reason says why)."""


class PredecessorGone(Exception):
    """The serving agent went away during the hand-over."""


class HandoverHost(Protocol):
    """What the serving agent does at each step."""

    def refusal(self) -> str | None:
        """Why no hand-over is possible now (e.g. draining), or None."""

    async def freeze(self, successor_pid: int) -> Mapping[str, socket.socket]:
        """Change no record from now on (in-flight changes finished); the
        listening sockets to pass, by name."""

    async def unfreeze(self, why: str) -> None:
        """The successor went away before it was ready: carry on serving."""

    def handed_over(self, successor_pid: int) -> int:
        """The successor serves the node: stop accepting and drain. Returns
        how many connections are being drained."""


def _send(sock: socket.socket, message: Message, fds: list[int] | None = None) -> None:
    data = encode(message)
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


def _receive(sock: socket.socket, timeout: float) -> tuple[Message, list[socket.socket]]:
    """One message and the sockets that came with it (owned by the caller)."""
    sock.settimeout(timeout)
    try:
        data, fds, flags, _ = socket.recv_fds(sock, 65536, MAX_SOCKETS)
    except TimeoutError:
        raise HandoverProtocolError(f"no message within {timeout:g}s") from None
    received = [socket.socket(fileno=fd) for fd in fds]
    try:
        if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            raise HandoverProtocolError("message or descriptors truncated")
        return decode(data), received
    except BaseException:
        for s in received:
            s.close()
        raise


def _bind_seqpacket(path: str) -> socket.socket:
    """A listening SOCK_SEQPACKET socket at `path` (mode 0600), replacing
    whatever stale socket is there in one rename(2)."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise OSError(f"{path} is too long for a Unix socket path")
    temp = f"{path}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temp)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    old = os.umask(0o177)
    try:
        sock.bind(temp)
        sock.listen(4)
        os.replace(temp, path)
    except BaseException:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    finally:
        os.umask(old)
    return sock


def _same_file(path: str, inode: int) -> bool:
    try:
        return os.lstat(path).st_ino == inode
    except FileNotFoundError:
        return False


class HandoverOffer:
    """The serving agent's side: one successor at a time."""

    def __init__(self, path: str, settings: NodeSettings, version: str, host: HandoverHost) -> None:
        self.path = path
        self.settings = settings
        self.version = version
        self.host = host
        self._sock: socket.socket | None = None
        self._inode = 0
        self._task: asyncio.Task[None] | None = None
        self._session: asyncio.Task[None] | None = None
        self._stage = ""

    def start(self) -> None:
        self._sock = _bind_seqpacket(self.path)
        self._inode = os.lstat(self.path).st_ino
        self._sock.setblocking(False)
        self._task = asyncio.get_running_loop().create_task(self._accept_loop())
        log.info("offering hand-over", path=self.path)

    async def close(self) -> None:
        """Offer no more. A hand-over whose successor already holds the
        sockets runs to its end (up to READY_TIMEOUT_S); an earlier one is
        abandoned (the successor then starts afresh)."""
        if self._sock is None:
            return
        sock, self._sock = self._sock, None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        session = self._session
        if session is not None and not session.done():
            if self._stage != "ready":
                session.cancel()
            await asyncio.wait([session], timeout=READY_TIMEOUT_S)
        sock.close()
        if _same_file(self.path, self._inode):  # never a successor's
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            peer, _ = await loop.sock_accept(self._sock)
            if self._session is not None and not self._session.done():
                await asyncio.to_thread(_send_and_close, peer, Refuse("a hand-over is already under way"))
                continue
            self._session = loop.create_task(self._serve(peer))

    async def _serve(self, peer: socket.socket) -> None:
        peer.setblocking(True)
        self._stage = stage = "hello"
        frozen = False
        try:
            uid = peer.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            peer_uid = int.from_bytes(uid[4:8], "little")
            message, _ = await asyncio.to_thread(_receive, peer, HELLO_TIMEOUT_S)
            hello = expect(message, Hello)
            assert isinstance(hello, Hello)
            why = self._refusal(hello, peer_uid)
            if why is not None:
                log.warning("hand-over refused", successor_pid=hello.pid, reason=why)
                await asyncio.to_thread(_send, peer, Refuse(why))
                return
            log.info("hand-over starting", successor_pid=hello.pid, successor_version=hello.version,
                     version=self.version)
            await asyncio.to_thread(_send, peer, Welcome(os.getpid(), self.version))
            self._stage = stage = "api-taken"
            message, _ = await asyncio.to_thread(_receive, peer, PREPARE_TIMEOUT_S)
            expect(message, ApiTaken)
            sockets = await self.host.freeze(hello.pid)
            frozen = True
            names = tuple(sockets)
            await asyncio.to_thread(_send, peer, Frozen(names), [s.fileno() for s in sockets.values()])
            log.info("hand-over: records frozen, sockets passed", successor_pid=hello.pid, sockets=list(names))
            self._stage = stage = "ready"
            message, _ = await asyncio.to_thread(_receive, peer, READY_TIMEOUT_S)
            expect(message, Ready)
            frozen = False
            connections = self.host.handed_over(hello.pid)
            with contextlib.suppress(OSError):
                await asyncio.to_thread(_send, peer, Draining(connections))
            log.info("handed over", successor_pid=hello.pid, draining=connections)
        except (HandoverProtocolError, OSError) as exc:
            log.warning("hand-over abandoned", stage=stage, error=str(exc))
        except asyncio.CancelledError:
            log.warning("hand-over abandoned: this agent is stopping", stage=stage)
            raise
        finally:
            with contextlib.suppress(OSError):
                peer.shutdown(socket.SHUT_RDWR)  # wakes a worker thread still waiting in recv
            peer.close()
            self._stage = ""
            if frozen:
                await self.host.unfreeze(f"the successor went away before it was ready (waiting for {stage})")

    def _refusal(self, hello: Hello, peer_uid: int) -> str | None:
        if hello.protocol != PROTOCOL:
            return f"hand-over protocol {hello.protocol} is not {PROTOCOL}"
        if peer_uid != os.geteuid():
            return f"the successor runs as uid {peer_uid}, this agent as {os.geteuid()}"
        return self.settings.mismatch(hello.settings) or self.host.refusal()


def _send_and_close(peer: socket.socket, message: Message) -> None:
    try:
        peer.setblocking(True)
        peer.settimeout(1.0)
        _send(peer, message)
    except OSError:
        pass
    finally:
        peer.close()


class HandoverClient:
    """The successor's side of one hand-over."""

    def __init__(self, sock: socket.socket, welcome: Welcome) -> None:
        self._sock = sock
        self.predecessor_pid = welcome.pid
        self.predecessor_version = welcome.version

    @classmethod
    async def connect(cls, path: str, hello: Hello) -> "HandoverClient":
        """Raises FileNotFoundError/ConnectionRefusedError when nobody offers
        a hand-over there, HandoverRefused when the serving agent says no."""
        def dial() -> HandoverClient:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                sock.settimeout(HELLO_TIMEOUT_S)
                sock.connect(path)
                _send(sock, hello)
                answer, _ = _receive(sock, HELLO_TIMEOUT_S)
                if isinstance(answer, Refuse):
                    raise HandoverRefused(answer.reason)
                welcome = expect(answer, Welcome)
                assert isinstance(welcome, Welcome)
                return cls(sock, welcome)
            except BaseException:
                sock.close()
                raise

        return await asyncio.to_thread(dial)

    async def take_sockets(self) -> dict[str, socket.socket]:
        """Say the API socket is ours; get the listening sockets once the
        predecessor has frozen its records. PredecessorGone if it went away."""
        def exchange() -> dict[str, socket.socket]:
            _send(self._sock, ApiTaken())
            message, received = _receive(self._sock, READY_TIMEOUT_S)
            try:
                frozen = expect(message, Frozen)
                assert isinstance(frozen, Frozen)
                if len(frozen.sockets) != len(received):
                    raise HandoverProtocolError(f"{len(received)} descriptors for {len(frozen.sockets)} sockets")
            except BaseException:
                for s in received:
                    s.close()
                raise
            return dict(zip(frozen.sockets, received))

        try:
            return await asyncio.to_thread(exchange)
        except (HandoverProtocolError, OSError) as exc:
            raise PredecessorGone(str(exc)) from None

    async def ready(self) -> int:
        """Tell the predecessor to stop accepting; how many connections it drains (-1 if it did not say)."""
        def exchange() -> int:
            _send(self._sock, Ready())
            message, _ = _receive(self._sock, HELLO_TIMEOUT_S)
            draining = expect(message, Draining)
            assert isinstance(draining, Draining)
            return draining.connections

        try:
            return await asyncio.to_thread(exchange)
        except (HandoverProtocolError, OSError):
            return -1
        finally:
            self._sock.close()

    def close(self) -> None:
        self._sock.close()
