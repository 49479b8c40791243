"""The node proxy: the transparent listeners in the proxy namespace and what
each does with a captured connection.

  15001 outbound  what enrolled pods send; relayed from the pod's own IP
  15006 inbound   plaintext arriving for enrolled pods; relayed from the
                  client's IP
  15008 HBONE     mTLS tunnels for enrolled pods (served by the HBONE
                  inbound handler when one is configured)

Every connection is registered for `ambitctl connections` and logged once
when it closes.
"""
from __future__ import annotations

import socket
import time
from collections.abc import Awaitable, Callable

import structlog

from ..telemetry.access_log import ConnectionRecord, log_connection
from ..telemetry.metrics import Metrics, TcpLabels
from ..workload import Workload
from .connections import ConnectionRegistry
from .listeners import AcceptedConnection, ListenerKind, TransparentListener
from ..netns import NetnsThread
from .relay import NetnsUpstreamSockets, RelayEnd, relay_plain_tcp

log = structlog.get_logger(__name__)

Handler = Callable[[AcceptedConnection, socket.socket], Awaitable[None]]
WorkloadLookup = Callable[[str], Workload | None]

_FAILED = {RelayEnd.CONNECT_REFUSED, RelayEnd.CONNECT_TIMEOUT, RelayEnd.CONNECT_FAILED}
# Envoy-style response flags Istio reports: UF upstream connection failure,
# UR/DR upstream/downstream reset.
_RESPONSE_FLAGS = {RelayEnd.CONNECT_REFUSED: "UF", RelayEnd.CONNECT_TIMEOUT: "UF", RelayEnd.CONNECT_FAILED: "UF",
                   RelayEnd.UPSTREAM_RESET: "UR", RelayEnd.CLIENT_RESET: "DR"}


class NodeProxy:
    def __init__(self, proxy_netns: str, metrics: Metrics, workload_by_ip: WorkloadLookup,
                 hbone_handler: Handler | None = None) -> None:
        self.proxy_netns = proxy_netns
        self.connections = ConnectionRegistry()
        self.metrics = metrics
        self._workload_by_ip = workload_by_ip
        self._hbone_handler = hbone_handler
        self._thread: NetnsThread | None = None
        self._upstream: NetnsUpstreamSockets | None = None
        self._listeners: list[TransparentListener] = []

    @property
    def listening(self) -> bool:
        return len(self._listeners) == 3

    def listener_names(self) -> list[str]:
        return [f"{l.kind.value}:{l.address.port}" for l in self._listeners]

    async def start(self) -> None:
        self._thread = NetnsThread(self.proxy_netns)
        self._upstream = NetnsUpstreamSockets(self._thread)
        handlers = {ListenerKind.OUTBOUND: self._relay, ListenerKind.INBOUND_PLAINTEXT: self._relay,
                    ListenerKind.HBONE: self._hbone}
        for kind, handler in handlers.items():
            listener = TransparentListener(kind, handler, netns=self._thread)
            await listener.start()
            self._listeners.append(listener)
        log.info("proxy listening", netns=self.proxy_netns, listeners=self.listener_names())

    async def stop(self) -> None:
        for listener in self._listeners:
            await listener.stop()
        self._listeners.clear()
        if self._upstream is not None:
            await self._upstream.aclose()
            self._upstream = None
        if self._thread is not None:
            self._thread.close()
            self._thread = None

    def _labels(self, accepted: AcceptedConnection, flags: str = "-") -> TcpLabels:
        src = self._workload_by_ip(accepted.client.ip)
        dst = self._workload_by_ip(accepted.original_dst.ip)
        return TcpLabels(
            reporter="source" if accepted.listener is ListenerKind.OUTBOUND else "destination",
            source_workload=src.pod.name if src else "unknown",
            source_workload_namespace=src.pod.namespace if src else "unknown",
            destination_workload=dst.pod.name if dst else "unknown",
            destination_workload_namespace=dst.pod.namespace if dst else "unknown",
            response_flags=flags, connection_security_policy="none")

    async def _relay(self, accepted: AcceptedConnection, sock: socket.socket) -> None:
        """Plain TCP to the original destination, from the client's IP."""
        assert self._upstream is not None
        tracked = self.connections.add(accepted)
        tracked.meta.reason = "plaintext relay (no policy yet)"
        labels = self._labels(accepted)
        self.metrics.opened(labels)
        try:
            outcome = await relay_plain_tcp(sock, accepted, self._upstream, progress=tracked.progress)
        finally:
            self.connections.remove(tracked.id)
        flags = _RESPONSE_FLAGS.get(outcome.end, "-")
        if flags != "-":
            labels = self._labels(accepted, flags)
        if outcome.end in _FAILED:
            self.metrics.failed(labels)
        self.metrics.closed(labels, outcome.bytes_to_upstream, outcome.bytes_to_client)
        log_connection(ConnectionRecord(
            listener=accepted.listener.value, src=str(accepted.client), dst=str(accepted.original_dst),
            src_identity=None, dst_identity=None, sent=outcome.bytes_to_upstream,
            received=outcome.bytes_to_client, duration_ms=round((time.time() - accepted.accepted_at) * 1000, 1),
            decision="allow", reason="plaintext relay (no policy yet)", end=outcome.end.value,
            error=outcome.error, via="direct"))

    async def _hbone(self, accepted: AcceptedConnection, sock: socket.socket) -> None:
        if self._hbone_handler is None:
            # Fail closed: nothing may reach a pod's 15008 in plaintext.
            log.info("HBONE connection refused: no HBONE server configured", src=str(accepted.client),
                     dst=str(accepted.original_dst))
            return
        await self._hbone_handler(accepted, sock)
