"""The metrics and readiness ports on loopback: what Prometheus and the kubelet see, and what idle,
slow or oversized clients get (a bounded place, then the door)."""
from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Gauge

from ambit.agent.telemetry.http import HttpLimits, TelemetryServer
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(60)


class Server:
    def __init__(self, limits: HttpLimits) -> None:
        self.registry = CollectorRegistry()
        Gauge("ambit_test_value", "a value", registry=self.registry).set(7)
        self.ready = (True, "ready")
        self.http = TelemetryServer(self.registry, lambda: self.ready, "127.0.0.1", 0, 0, limits)
        self.sockets: list[socket.socket] = []

    @property
    def metrics_port(self) -> int:
        return self.http.ports[0]

    @property
    def ready_port(self) -> int:
        return self.http.ports[1]

    def connect(self, port: int) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sockets.append(sock)
        return sock

    def closed_count(self, reason: str, port: int) -> float:
        value = self.registry.get_sample_value("ambit_telemetry_connections_closed_total",
                                               {"port": str(port), "reason": reason})
        return value or 0.0


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    limits = getattr(request, "param", HttpLimits())
    s = Server(limits)
    s.http.start()
    try:
        yield s
    finally:
        for sock in s.sockets:
            sock.close()
        s.http.stop()


def response(sock: socket.socket, *, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
    """One response (status, headers, body) read off a keep-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(data)
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    length = 0 if head_only else int(headers["content-length"])
    while len(body) < length:
        body += sock.recv(65536)
    return int(status_line.split()[1]), headers, body


def get(sock: socket.socket, path: str, *, method: str = "GET", extra: str = "") -> tuple[int, dict[str, str], bytes]:
    sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
    return response(sock, head_only=method == "HEAD")


def closed_by_server(sock: socket.socket) -> bool:
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


def test_readiness_and_metrics_over_one_keep_alive_connection(server: Server) -> None:
    ready = server.connect(server.ready_port)
    assert get(ready, "/healthz/ready")[::2] == (200, b"ready\n")
    server.ready = (False, "waiting for discovery")
    status, headers, body = get(ready, "/healthz/ready")  # same connection
    assert (status, body) == (503, b"not ready: waiting for discovery\n")
    assert headers["connection"] == "keep-alive"
    metrics = server.connect(server.metrics_port)
    status, headers, body = get(metrics, "/metrics")
    assert status == 200 and b"ambit_test_value 7.0" in body
    assert headers["content-type"].startswith("text/plain")
    assert get(metrics, "/stats/prometheus?x=1")[0] == 200
    assert get(metrics, "/nope")[0] == 404
    assert get(metrics, "/metrics", method="POST")[0] == 405
    status, headers, body = get(metrics, "/metrics", method="HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0


def test_connection_close_is_honoured(server: Server) -> None:
    sock = server.connect(server.ready_port)
    status, headers, _ = get(sock, "/healthz/ready", extra="Connection: close\r\n")
    assert status == 200 and headers["connection"] == "close"
    assert sock.recv(10) == b""


@pytest.mark.parametrize("request_bytes,status,reason", [
    (b"GARBAGE\r\n\r\n", 400, "bad_request"),
    (b"GET / HTTP/2.0\r\n\r\n", 400, "bad_request"),
    (b"GET /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", 400, "bad_request"),
    (b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"p" * 10_000 + b"\r\n\r\n", 431, "too_large"),
])
def test_bad_requests_get_an_error_and_the_door(server: Server, request_bytes: bytes, status: int, reason: str) -> None:
    sock = server.connect(server.metrics_port)
    sock.sendall(request_bytes)
    assert response(sock)[0] == status
    assert closed_by_server(sock)
    assert server.closed_count(reason, server.metrics_port) == 1


@pytest.mark.parametrize("server", [HttpLimits(request_timeout_s=0.3)], indirect=True)
def test_a_client_that_never_sends_a_request_is_timed_out(server: Server) -> None:
    silent = server.connect(server.metrics_port)
    assert response(silent)[0] == 408
    assert closed_by_server(silent)
    assert server.closed_count("timeout", server.metrics_port) == 1
    # Slowloris: a head trickled in slower than the timeout is cut off the same way.
    slow = server.connect(server.metrics_port)
    slow.sendall(b"GET /metrics HTTP/1.1\r\n")
    assert response(slow)[0] == 408


@pytest.mark.parametrize("server", [HttpLimits(max_connections=8)], indirect=True)
def test_idle_connections_make_room_and_readiness_still_answers(server: Server) -> None:
    threads = threading.active_count()
    idle = [server.connect(server.ready_port) for _ in range(50)]
    wait_until(lambda: server.closed_count("displaced", server.ready_port) == 42, "42 idle connections displaced")
    assert sum(closed_by_server(s) for s in idle[:42]) == 42
    probe = server.connect(server.ready_port)
    assert get(probe, "/healthz/ready")[0] == 200  # displaces one more idle connection
    assert server.closed_count("displaced", server.ready_port) == 43
    assert threading.active_count() == threads  # connections are not threads
    # The other port has its own room.
    assert get(server.connect(server.metrics_port), "/metrics")[0] == 200


def test_limits_reject_nonsense() -> None:
    with pytest.raises(ValueError):
        HttpLimits(max_connections=0)
    with pytest.raises(ValueError):
        HttpLimits(request_timeout_s=0)


def test_a_taken_port_is_an_oserror_at_start() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        http = TelemetryServer(CollectorRegistry(), lambda: (True, ""), "127.0.0.1", taken.getsockname()[1], 0)
        with pytest.raises(OSError):
            http.start()
