"""The agent's two plain-HTTP ports, in the node's namespace (hostNetwork):

  15020  /metrics (and /stats/prometheus, Istio's path) for Prometheus
  15021  /healthz/ready for the kubelet's readiness probe: 200 once the
         datapath is installed and the listeners are up, 503 with the
         reason otherwise

Served by the standard library's threading HTTP server so a slow scrape
never blocks the proxy's event loop.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ..datapath.constants import METRICS_PORT, READINESS_PORT

log = structlog.get_logger(__name__)

Readiness = Callable[[], tuple[bool, str]]


def _handler(routes: dict[str, Callable[[], tuple[int, str, bytes]]]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            route = routes.get(self.path.split("?", 1)[0])
            status, ctype, body = route() if route else (404, "text/plain", b"not found\n")
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # probes every few seconds would drown the agent's log

    return Handler


class TelemetryServer:
    def __init__(self, registry: CollectorRegistry, readiness: Readiness, address: str = "0.0.0.0",
                 metrics_port: int = METRICS_PORT, readiness_port: int = READINESS_PORT) -> None:
        def metrics() -> tuple[int, str, bytes]:
            return 200, CONTENT_TYPE_LATEST, generate_latest(registry)

        def ready() -> tuple[int, str, bytes]:
            ok, reason = readiness()
            return (200, "text/plain", b"ready\n") if ok else (503, "text/plain", f"not ready: {reason}\n".encode())

        self._specs = [((address, metrics_port), {"/metrics": metrics, "/stats/prometheus": metrics}),
                       ((address, readiness_port), {"/healthz/ready": ready})]
        self._servers: list[ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []

    @property
    def ports(self) -> tuple[int, int]:
        return tuple(s.server_address[1] for s in self._servers)  # type: ignore[return-value]

    def start(self) -> None:
        """Bind both ports (OSError if taken) and serve them on threads."""
        try:
            for address, routes in self._specs:
                server = ThreadingHTTPServer(address, _handler(routes))
                server.daemon_threads = True
                self._servers.append(server)
        except OSError:
            self.stop()
            raise
        for server in self._servers:
            thread = threading.Thread(target=server.serve_forever, name=f"http:{server.server_address[1]}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("telemetry serving", metrics_port=self.ports[0], readiness_port=self.ports[1])

    def stop(self) -> None:
        for server, thread in zip(self._servers, self._threads):
            server.shutdown()
        for server in self._servers:
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers.clear()
        self._threads.clear()
