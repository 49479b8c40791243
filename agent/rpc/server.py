"""The agent's gRPC server on a Unix socket (mode 0600), with the standard
gRPC health service beside the CNI and Debug services (unary.py serves
them: unary calls over h2, no grpcio in the agent)."""
from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat

import structlog
from grpc_health.v1 import health_pb2

from ambit.api.v1 import agent_pb2 as pb

from .unary import CallContext, StatusCode, UnaryServer, methods_of

log = structlog.get_logger(__name__)
HEALTH_SERVICES = ("", "ambit.agent.v1.CNI", "ambit.agent.v1.Debug")
MAX_SOCKET_PATH = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux


class SocketInUse(Exception):
    """Another process is serving the socket path, or the path is not ours to
    replace, or it cannot be a socket at all."""


class SocketServed(SocketInUse):
    """A live agent answers at the socket path (it may offer a hand-over)."""


def prepare_socket_path(path: str) -> None:
    """Create the directory and remove a stale socket; never remove a socket
    that someone is still serving, nor anything that is not a socket."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise SocketInUse(f"{path} is too long for a Unix socket path (at most {MAX_SOCKET_PATH} bytes)")
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, mode=0o750, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise SocketInUse(f"cannot create the socket directory {directory}: {exc.strerror}") from None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketInUse(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise SocketInUse(f"cannot tell whether {path} is in use: {exc.strerror}") from None
        os.unlink(path)
        log.info("removed stale agent socket", path=path)
        return
    finally:
        probe.close()
    raise SocketServed(f"another agent is already serving {path}")


class HealthService:
    """grpc.health.v1.Health/Check: SERVING while the API is up, for the
    whole server ("") and each service by name."""

    def __init__(self) -> None:
        self.statuses: dict[str, int] = {}

    def set(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self.statuses = {name: status for name in HEALTH_SERVICES}

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: CallContext) -> health_pb2.HealthCheckResponse:
        if request.service not in self.statuses:
            await context.abort(StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=self.statuses[request.service])


class AgentServer:
    """The API at the agent socket path. It binds a private name and renames
    it to the path: the path never shows a half-set-up socket, and
    `start(take_over=True)` replaces a socket another agent still serves in
    one rename(2) (a hand-over, docs/lifecycle.md). `stop()` removes the path
    only while it is still this server's socket."""

    def __init__(self, socket_path: str, cni_service, debug_service) -> None:
        self.socket_path = socket_path
        self.health = HealthService()
        self._inode = 0
        self._server = UnaryServer({
            **methods_of(cni_service, pb.DESCRIPTOR.services_by_name["CNI"], pb),
            **methods_of(debug_service, pb.DESCRIPTOR.services_by_name["Debug"], pb),
            **methods_of(self.health, health_pb2.DESCRIPTOR.services_by_name["Health"], health_pb2),
        })

    @property
    def serving_the_path(self) -> bool:
        """The socket path is still this server's (no successor renamed over it)."""
        return bool(self._inode) and _same_inode(self.socket_path, self._inode)

    async def start(self, take_over: bool = False) -> None:
        bind_path = f"{self.socket_path}.{os.getpid()}"
        if len(os.fsencode(bind_path)) > MAX_SOCKET_PATH:
            raise SocketInUse(f"{self.socket_path} is too long for a Unix socket path (at most "
                              f"{MAX_SOCKET_PATH - len(bind_path) + len(self.socket_path)} bytes here)")
        if not take_over:
            prepare_socket_path(self.socket_path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(bind_path)
        # The socket must never be reachable by others, not even for the
        # instant between bind() and chmod(): bind under a tight umask.
        old = os.umask(0o177)
        try:
            await self._server.listen(bind_path)
        except OSError as exc:
            raise SocketInUse(f"cannot listen on {bind_path}: {exc.strerror or exc}") from None
        finally:
            os.umask(old)
        os.chmod(bind_path, 0o600)
        os.replace(bind_path, self.socket_path)  # new connections reach this server from now on
        self._inode = os.lstat(self.socket_path).st_ino
        self.health.set(serving=True)
        log.info("serving agent API", socket=self.socket_path, took_over=take_over)

    async def stop(self, grace: float = 5.0) -> None:
        self.health.set(serving=False)
        await self._server.stop(grace)
        if self.serving_the_path:  # a successor's socket stays
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
        self._inode = 0


def _same_inode(path: str, inode: int) -> bool:
    try:
        return os.lstat(path).st_ino == inode
    except FileNotFoundError:
        return False
