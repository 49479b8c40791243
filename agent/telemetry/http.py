"""The agent's two plain-HTTP ports, in the node's namespace (hostNetwork):

  15020  /metrics (and /stats/prometheus, Istio's path) for Prometheus
  15021  /healthz/ready for the kubelet's readiness probe: 200 once the
         datapath is installed and the listeners are up, 503 with the
         reason otherwise

Anything that can reach the node can connect to these ports, so what a
client may hold is bounded (`HttpLimits`): both ports are served by one
asyncio loop on one thread of their own (a connection is a coroutine, not a
thread, and the proxy's loop never waits for a scrape), each port keeps at
most `max_connections` connections (a new one displaces the connection that
has waited longest for a request, so idle connections cannot lock the
kubelet out), a request head must arrive within `request_timeout_s` and fit
in `max_request_bytes`, a response must be taken within `write_timeout_s`,
and metrics are rendered by one worker thread, at most `max_renders` at a
time (more get 503). Only what Prometheus and the kubelet send is spoken:
HTTP/1.x GET or HEAD without a body, keep-alive.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

log = structlog.get_logger(__name__)

Readiness = Callable[[], tuple[bool, str]]
Response = tuple[int, str, bytes]
Route = Callable[[], Awaitable[Response]]

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
            431: "Request Header Fields Too Large", 503: "Service Unavailable"}
_LIMIT_LOG_INTERVAL_S = 10.0
_BACKLOG = 1024  # a burst of connects waits in the kernel, not in SYN retransmissions
_PORT_NAMES = ("metrics", "readiness")  # the order of TelemetryServer.ports; names in a hand-over


@dataclass(frozen=True)
class HttpLimits:
    """What one client of 15020/15021 can make the agent hold."""

    max_connections: int = 128  # per port
    request_timeout_s: float = 10.0  # from connect or the last response to a complete request head
    write_timeout_s: float = 10.0  # for the client to take a response
    max_request_bytes: int = 8192  # request line and headers
    max_renders: int = 4  # /metrics renderings in flight (one worker thread renders them in turn)

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_request_bytes", "max_renders"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        for name in ("request_timeout_s", "write_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


class _BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True)
class _Request:
    method: str
    path: str
    keep_alive: bool


def _parse_head(head: bytes) -> _Request:
    """Request line and headers of one HTTP/1.x request (no body allowed)."""
    try:
        text = head.decode("latin-1")
        request_line, *header_lines = text.split("\r\n")
        method, target, version = request_line.split(" ")
    except ValueError:
        raise _BadRequest(400, "malformed request line") from None
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise _BadRequest(400, f"unsupported version {version!r}")
    headers: dict[str, str] = {}
    for line in header_lines:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _BadRequest(400, "malformed header")
        headers[name.lower()] = value.strip()
    if headers.get("content-length", "0") != "0" or "transfer-encoding" in headers:
        raise _BadRequest(400, "a request body is not accepted")
    connection = headers.get("connection", "").lower()
    keep_alive = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
    return _Request(method, target.split("?", 1)[0], keep_alive)


def _response(status: int, ctype: str, body: bytes, *, keep_alive: bool, head_only: bool = False) -> bytes:
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n")
    return head.encode("latin-1") + (b"" if head_only else body)


class _Port:
    """One listening port: its routes and the connections it holds."""

    def __init__(self, name: str, sock: socket.socket, routes: dict[str, Route],
                 limits: HttpLimits, closed: Counter) -> None:
        self.name = name
        self.sock = sock
        self.routes = routes
        self.limits = limits
        self._closed = closed
        self.connections: dict[asyncio.StreamWriter, None] = {}  # all, oldest first
        self.waiting: dict[asyncio.StreamWriter, None] = {}  # waiting for a request head, longest first
        self._logged_at = -_LIMIT_LOG_INTERVAL_S

    def count(self, reason: str) -> None:
        self._closed.labels(self.name, reason).inc()

    def admit(self, writer: asyncio.StreamWriter) -> bool:
        """Make room for a new connection: the longest-waiting idle one goes; if
        every connection is busy with a request, the new one is turned away."""
        if len(self.connections) >= self.limits.max_connections:
            if not self.waiting:
                self.count("busy")
                self._log_limit()
                return False
            oldest = next(iter(self.waiting))
            del self.waiting[oldest]
            del self.connections[oldest]
            oldest.transport.abort()
            self.count("displaced")
            self._log_limit()
        self.connections[writer] = None
        return True

    def _log_limit(self) -> None:
        now = time.monotonic()
        if now - self._logged_at >= _LIMIT_LOG_INTERVAL_S:
            self._logged_at = now
            log.warning("telemetry_connection_limit", port=self.name, max_connections=self.limits.max_connections)


class TelemetryServer:
    def __init__(self, registry: CollectorRegistry, readiness: Readiness, address: str = "0.0.0.0",
                 metrics_port: int = 15020, readiness_port: int = 15021, limits: HttpLimits | None = None) -> None:
        self._registry = registry
        self._readiness = readiness
        self._address = address
        self._port_numbers = (metrics_port, readiness_port)
        self.limits = limits or HttpLimits()
        self._closed = Counter("ambit_telemetry_connections_closed",
                               "Connections to 15020/15021 the agent closed before the client did, by reason "
                               "(timeout, displaced, busy, bad_request, too_large)", ("port", "reason"),
                               registry=registry)
        self._ports: list[_Port] = []
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._renderer: concurrent.futures.ThreadPoolExecutor | None = None
        self._renders = 0

    @property
    def ports(self) -> tuple[int, int]:
        return tuple(p.sock.getsockname()[1] for p in self._ports)  # type: ignore[return-value]

    def listening_sockets(self) -> dict[str, socket.socket]:
        """The two listening sockets by name (what a successor takes over)."""
        return dict(zip(_PORT_NAMES, (p.sock for p in self._ports)))

    def start(self, adopt: Mapping[str, socket.socket] | None = None) -> None:
        """Bind both ports (OSError if taken), or serve the sockets `adopt`
        holds by name (handed over by the agent this one replaces), on the
        telemetry thread. Two processes may accept from an adopted socket
        during a hand-over; asyncio's accept is non-blocking, so the one that
        loses the race just waits for the next connection."""
        adopt = adopt or {}
        socks: list[socket.socket] = []
        try:
            for name, port in zip(_PORT_NAMES, self._port_numbers):
                socks.append(adopt[name] if name in adopt
                             else socket.create_server((self._address, port), backlog=_BACKLOG))
        except OSError:
            for sock in socks:
                sock.close()
            raise
        metrics_routes: dict[str, Route] = {"/metrics": self._render_metrics, "/stats/prometheus": self._render_metrics}
        self._ports = [_Port(str(socks[0].getsockname()[1]), socks[0], metrics_routes, self.limits, self._closed),
                       _Port(str(socks[1].getsockname()[1]), socks[1], {"/healthz/ready": self._ready}, self.limits,
                             self._closed)]
        self._renderer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics-render")
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), name="telemetry-http", daemon=True)
        self._thread.start()
        started.wait()
        log.info("telemetry serving", metrics_port=self.ports[0], readiness_port=self.ports[1],
                 max_connections=self.limits.max_connections, request_timeout_s=self.limits.request_timeout_s)

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if self._stop is not None:
            loop.call_soon_threadsafe(self._stop.set)
        thread.join(timeout=5)
        if self._renderer is not None:
            self._renderer.shutdown(wait=False, cancel_futures=True)
        self._thread = self._loop = self._stop = self._renderer = None
        self._ports = []

    # --- the telemetry thread ----------------------------------------------------------------------

    def _run(self, started: threading.Event) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve(started))
        finally:
            self._loop.close()

    async def _serve(self, started: threading.Event) -> None:
        self._stop = asyncio.Event()
        servers = []
        try:
            for port in self._ports:
                servers.append(await asyncio.start_server(
                    lambda r, w, port=port: self._client(port, r, w), sock=port.sock, backlog=_BACKLOG,
                    limit=self.limits.max_request_bytes))
            started.set()
            await self._stop.wait()
        finally:
            started.set()
            for server in servers:
                server.close()
            for port in self._ports:
                for writer in list(port.connections):
                    writer.transport.abort()
            clients = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in clients:
                task.cancel()
            await asyncio.gather(*clients, return_exceptions=True)

    async def _client(self, port: _Port, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not port.admit(writer):
            writer.transport.abort()
            return
        try:
            await self._requests(port, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away (or was displaced)
        finally:
            port.connections.pop(writer, None)
            port.waiting.pop(writer, None)
            writer.transport.abort()

    async def _requests(self, port: _Port, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        limits = self.limits
        while True:
            port.waiting[writer] = None
            try:
                async with asyncio.timeout(limits.request_timeout_s):
                    head = await reader.readuntil(b"\r\n\r\n")
            except TimeoutError:
                port.count("timeout")
                await self._answer(writer, 408, b"request timeout\n", keep_alive=False)
                return
            except asyncio.LimitOverrunError:
                port.count("too_large")
                await self._answer(writer, 431, b"request head too large\n", keep_alive=False)
                return
            finally:
                port.waiting.pop(writer, None)
            try:
                request = _parse_head(head)
            except _BadRequest as exc:
                port.count("bad_request")
                await self._answer(writer, exc.status, f"{exc}\n".encode(), keep_alive=False)
                return
            if request.method not in ("GET", "HEAD"):
                status, ctype, body = 405, "text/plain", b"only GET\n"
            else:
                route = port.routes.get(request.path)
                if route is None:
                    status, ctype, body = 404, "text/plain", b"not found\n"
                else:
                    status, ctype, body = await route()
            await self._answer(writer, status, body, ctype=ctype, keep_alive=request.keep_alive,
                               head_only=request.method == "HEAD")
            if not request.keep_alive:
                return

    async def _answer(self, writer: asyncio.StreamWriter, status: int, body: bytes, *, ctype: str = "text/plain",
                      keep_alive: bool, head_only: bool = False) -> None:
        writer.write(_response(status, ctype, body, keep_alive=keep_alive, head_only=head_only))
        try:
            async with asyncio.timeout(self.limits.write_timeout_s):
                await writer.drain()
        except TimeoutError:
            raise ConnectionError("client did not take the response") from None

    async def _ready(self) -> Response:
        ok, reason = self._readiness()
        return (200, "text/plain", b"ready\n") if ok else (503, "text/plain", f"not ready: {reason}\n".encode())

    async def _render_metrics(self) -> Response:
        if self._renders >= self.limits.max_renders or self._renderer is None:
            return 503, "text/plain", b"busy: too many scrapes at once\n"
        self._renders += 1
        try:
            body = await asyncio.get_running_loop().run_in_executor(self._renderer, generate_latest, self._registry)
        finally:
            self._renders -= 1
        return 200, CONTENT_TYPE_LATEST, body
