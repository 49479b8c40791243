"""The node proxy: the transparent listeners in the proxy namespace and what
each does with a captured connection.

  15001 outbound  what enrolled pods send: routed by agent/proxy/routing.py
                  (same node: policy in-process then plain TCP; other node:
                  HBONE; destination behind a waypoint: HBONE to the
                  waypoint; not a mesh destination: plain TCP passthrough),
                  always from the pod's own IP
  15006 inbound   plaintext arriving for enrolled pods: the destination's
                  policy (PeerAuthentication STRICT refuses it), then plain
                  TCP from the client's IP
  15008 HBONE     mTLS tunnels for enrolled pods (agent/proxy/inbound.py)

Without discovery (no identities, no policies) outbound and inbound
connections are relayed as plain TCP and 15008 is refused. With discovery
that has not synced every kind yet (`Mesh.pending`), all three refuse new
connections: a partial view would skip policies not seen yet. So do they
until a (re)starting agent has loaded its enrolment records (`records_loaded`):
who a client is comes from them. A connection that arrives before either
waits up to SYNC_WAIT_S for both first: a restarted agent opens its listeners
before its records and view are whole (so captured pods are served again
sooner), and must not reset the clients of that moment. Every
connection is registered for `ambitctl connections`, counted in the Istio
metrics and logged once when it closes.

Policy is decided once per connection, at the destination side: 15006
plaintext, same-node relays and 15008 tunnels, for the workload the
destination address is attributed to (agent/discovery/attribution.py); an
address that cannot be attributed is denied as an unknown destination.
Refusals where the agent cannot decide are counted in
ambit_connections_failed_closed_total{listener,reason}, with the reason in
the access log. When policies (or a destination pod's labels) change, every
live connection this node admitted is decided again with the same inputs and
the ones no longer allowed are reset ("connection closed by policy",
response flag UAEX).
"""
from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import structlog

from ..datapath.constants import HBONE_PORT
from ..discovery.attribution import Attributor
from ..discovery.model import KIND_POD, POLICY_KINDS
from ..discovery.state import EVENT_DELETED, EVENT_MODIFIED, ClusterState
from ..identity.spiffe import SpiffeId
from ..identity.store import CertificateStore
from ..identity.tls import IdentityError
from ..netns import NetnsThread
from ..policy.authz import DISCOVERY_NOT_SYNCED, RECORDS_NOT_LOADED, UNKNOWN_DESTINATION, Decision
from ..policy.enforce import Authorizer
from ..telemetry.access_log import AccessLog
from ..telemetry.metrics import Metrics, TcpLabels, TcpSeries
from ..workload import Workload
from .connections import ConnectionRegistry, DestinationCheck, TrackedConnection
from .hbone.outcomes import TunnelEnd, TunnelError, TunnelOutcome, TunnelRefused
from .hbone.settings import HboneSettings
from .inbound import HboneInbound, InboundTunnel
from .listeners import AcceptedConnection, ListenerKind, SocketAddress, TransparentListener
from .pool import HboneClientPool, PoolKey
from .relay import NetnsUpstreamSockets, RelayEnd, RelayOptions, prepare_upstream, relay_plain_tcp
from .sockets import reset_socket
from .routing import OutboundPlan, OutboundRouter, Route

log = structlog.get_logger(__name__)

WorkloadLookup = Callable[[str], Workload | None]

_FAILED = {RelayEnd.CONNECT_REFUSED, RelayEnd.CONNECT_TIMEOUT, RelayEnd.CONNECT_FAILED}
# Envoy-style response flags Istio reports: UF upstream connection failure,
# UR/DR upstream/downstream reset, UAEX unauthorized (policy).
_RESPONSE_FLAGS = {RelayEnd.CONNECT_REFUSED: "UF", RelayEnd.CONNECT_TIMEOUT: "UF", RelayEnd.CONNECT_FAILED: "UF",
                   RelayEnd.UPSTREAM_RESET: "UR", RelayEnd.CLIENT_RESET: "DR"}
# The same for the destination side of a tunnel: policy (UAEX), upstream
# connect failure (UF), a reset by either end (UR / DR), the HBONE connection lost (UC).
_REFUSAL_FLAGS = {401: "UAEX", 503: "UF"}
_TUNNEL_FLAGS = {TunnelEnd.TCP_RESET: "UR", TunnelEnd.STREAM_RESET: "DR", TunnelEnd.CONNECTION_LOST: "UC"}
# An inbound tunnel's end -> (response flags, the access log's `end`): one lookup per close.
_TUNNEL_END_FIELDS = {end: (_TUNNEL_FLAGS.get(end, "-"), end.value) for end in TunnelEnd}
# Read once: an Enum member's .value is two Python calls on 3.11, and these go into every HBONE access-log line.
_HBONE_LISTENER = ListenerKind.HBONE.value
_VIA_HBONE = Route.HBONE.value
_UPSTREAM_OPTIONS = RelayOptions()  # the upstream sockets' (defaults): not made again per connection
MAX_LABEL_SETS = 4096  # cached metric label sets (pod pairs x flags); cleared when full
MAX_POOL_KEYS = 4096  # HBONE pool keys kept per (client, next hop, identities); cleared when full
# How long a new connection waits for discovery to sync before it is refused:
# long enough for a (re)starting agent's first lists (~0.1-0.5 s), short enough
# that a client is answered well within its connect timeout.
SYNC_WAIT_S = 2.0


def _not_synced(pending: str) -> str:
    return f"refused: discovery has not synced, the cluster view is partial ({pending})"


_RECORDS_NOT_LOADED = "refused: the agent has not loaded its enrolment records yet (starting)"


def _known(principal: str) -> str | None:
    """A metrics label's principal for the access log, where unknown is null."""
    return None if principal == "unknown" else principal


@dataclass(frozen=True)
class Mesh:
    """What the proxy needs to act as a mesh node (absent without discovery)."""

    state: ClusterState
    router: OutboundRouter
    authorizer: Authorizer
    certificates: CertificateStore
    pending: Callable[[], str] = lambda: ""  # why the cluster view is partial, "" once discovery synced
    until_synced: Callable[[], Awaitable[None]] | None = None  # returns once discovery has synced

    @property
    def attributor(self) -> Attributor:
        """Who holds a destination address (the one the authorizer decides for)."""
        return self.authorizer.attributor


@dataclass(frozen=True)
class _Outcome:
    end: str
    sent: int
    received: int
    error: str | None = None
    flags: str = "-"
    failed: bool = False


class NodeProxy:
    def __init__(self, proxy_netns: str, metrics: Metrics, workload_by_ip: WorkloadLookup,
                 mesh: Mesh | None = None, hbone: HboneSettings | None = None,
                 records_loaded: asyncio.Event | None = None) -> None:
        self.proxy_netns = proxy_netns
        self.records_loaded = records_loaded  # None: the caller's records are loaded already
        self.hbone_settings = hbone or HboneSettings()
        self.connections = ConnectionRegistry()
        self.metrics = metrics
        self.mesh = mesh
        self._workload_by_ip = workload_by_ip
        self._thread: NetnsThread | None = None
        self._upstream: NetnsUpstreamSockets | None = None
        # The loop start() ran on: asyncio.current_task(loop) skips get_running_loop(),
        # whose pid check is a getpid(2) per connection (CPython 3.11).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listeners: list[TransparentListener] = []
        self.pool: HboneClientPool | None = None
        self.inbound: HboneInbound | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._recheck: asyncio.Handle | None = None
        # Metric label sets per (who, whom, how), built once: a pod event empties it.
        self._label_sets: dict[tuple[Any, ...], TcpLabels] = {}
        self._pool_keys: dict[tuple[str, str, str, str], PoolKey] = {}  # see _tunnel
        self._series_sets: dict[tuple[Any, ...], TcpSeries] = {}  # the same for 15001 / 15006, bound (_series)
        self.access_log = AccessLog()  # one line per connection (both listeners, both HBONE sides)

    @property
    def listening(self) -> bool:
        return len(self._listeners) == 3

    def listener_names(self) -> list[str]:
        return [f"{l.kind.value}:{l.address.port}" for l in self._listeners]

    def listening_sockets(self) -> dict[ListenerKind, socket.socket]:
        """The listening sockets, by kind (what a successor takes over)."""
        return {listener.kind: listener.socket for listener in self._listeners if listener.accepting}

    @property
    def active_connections(self) -> int:
        """Connections (and HBONE connections) still being served."""
        return sum(listener.active_connections for listener in self._listeners)

    async def start(self, adopt: dict[ListenerKind, socket.socket] | None = None) -> None:
        """Open the listeners, or serve the ones `adopt` holds (handed over
        by the agent this one replaces: same sockets, same queues)."""
        adopt = adopt or {}
        self._loop = asyncio.get_running_loop()
        self._thread = NetnsThread(self.proxy_netns)
        self._upstream = NetnsUpstreamSockets(self._thread)
        if self.mesh is not None:
            self.pool = HboneClientPool(self.mesh.certificates, self._socket_from, settings=self.hbone_settings)
            self.inbound = HboneInbound(
                self.mesh.certificates, identity_for_local_ip=self._local_identity,
                is_local_workload=lambda ip: self._local_identity(ip) is not None,
                upstream_socket_factory=self._upstream_socket, authorize=self._authorize_hbone, observer=self,
                settings=self.hbone_settings)
            self.metrics.watch_hbone_server(lambda: self.inbound.counters() if self.inbound else None)
            self.metrics.pool_connections.set_function(lambda: self.pool.stats().connections if self.pool else 0)
            self.metrics.pool_streams.set_function(lambda: self.pool.stats().tunnels if self.pool else 0)
            self._unsubscribe = self.mesh.state.subscribe(self._on_cluster_change)
        handlers = {ListenerKind.OUTBOUND: self._outbound, ListenerKind.INBOUND_PLAINTEXT: self._inbound_plaintext,
                    ListenerKind.HBONE: self._hbone}
        for kind, handler in handlers.items():
            listener = TransparentListener(kind, handler, netns=self._thread)
            await listener.start(adopt.get(kind))
            self._listeners.append(listener)
        log.info("proxy listening", netns=self.proxy_netns, listeners=self.listener_names(),
                 mesh=self.mesh is not None)

    def stop_accepting(self, *, successor: bool = True) -> None:
        """New connections are no longer ours: the listening sockets are
        closed here (a successor that took them over keeps them open, else
        the datapath drops new SYNs: fail closed, and clients retry). With
        no successor, connections already in an accept queue are served
        here rather than reset by the close."""
        for listener in self._listeners:
            listener.stop_accepting(take_queued=not successor)

    async def drain(self, seconds: float, reason: str) -> int:
        """Stop accepting, GOAWAY on every HBONE connection (both sides), and
        wait up to `seconds` for the connections being served to end.
        Returns how many are left (stop() resets them)."""
        self.stop_accepting()
        if self.inbound is not None:
            self.inbound.go_away(reason)
        if self.pool is not None:
            self.pool.drain(reason)
        before = self.active_connections
        log.info("draining", connections=before, deadline_s=seconds, reason=reason)
        try:
            async with asyncio.timeout(seconds):
                for listener in self._listeners:
                    await listener.wait_idle()
        except TimeoutError:
            pass
        left = self.active_connections
        log.info("drained" if not left else "drain deadline reached", connections_at_start=before, left=left)
        return left

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._recheck is not None:
            self._recheck.cancel()
            self._recheck = None
        for listener in self._listeners:
            await listener.stop()
        self._listeners.clear()
        for closable in (self.pool, self.inbound):
            if closable is not None:
                await closable.aclose()
        if self._upstream is not None:
            await self._upstream.aclose()
            self._upstream = None
        if self._thread is not None:
            self._thread.close()
            self._thread = None

    # -- helpers for the HBONE client and server ---------------------------
    async def _socket_from(self, source_ip: str) -> socket.socket:
        """`_upstream_socket` for callers that await their socket factory (the HBONE client pool)."""
        return self._upstream_socket(source_ip)

    def _upstream_socket(self, source_ip: str) -> socket.socket:
        """An upstream socket in the proxy namespace that connects from
        `source_ip` (the client pod's address: transparency). Synchronous:
        the inbound HBONE server answers a CONNECT inline when nothing has to
        be waited for."""
        assert self._upstream is not None
        sock = self._upstream.take_now(socket.AF_INET6 if ":" in source_ip else socket.AF_INET)
        try:
            prepare_upstream(sock, source_ip, _UPSTREAM_OPTIONS)
        except BaseException:
            sock.close()
            raise
        return sock

    def _local_identity(self, ip: str) -> SpiffeId | None:
        """The identity of an in-mesh pod of this node at `ip`, else None."""
        assert self.mesh is not None
        pod = self.mesh.attributor.pod(ip)
        if pod is None or pod.node_name != self.mesh.router.node_name:
            return None
        in_mesh, _ = self.mesh.state.ambient_decision(pod)
        return self.mesh.router.identity(pod) if in_mesh else None

    def _authorize_hbone(self, peer: SpiffeId, client_ip: str, dst_ip: str, dst_port: int) -> tuple[bool, str]:
        assert self.mesh is not None
        decision = self.mesh.authorizer.check(source_ip=client_ip, source_identity=peer, dst_ip=dst_ip,
                                              dst_port=dst_port)
        if decision.fail_closed:
            self.metrics.failed_closed.labels(ListenerKind.HBONE.value, decision.fail_closed).inc()
        return decision.allowed, decision.reason

    # -- telemetry ------------------------------------------------------------
    def _pod_at(self, ip: str) -> tuple[str, str]:
        """(name, namespace) of the pod at `ip`: the cluster view when there
        is one (remote pods too), else this node's records."""
        if self.mesh is not None:
            pod = self.mesh.attributor.pod(ip)
            return (pod.name, pod.namespace) if pod else ("unknown", "unknown")
        workload = self._workload_by_ip(ip)
        return (workload.pod.name, workload.pod.namespace) if workload else ("unknown", "unknown")

    def _label_set(self, key: tuple[Any, ...], make: Callable[[], TcpLabels]) -> TcpLabels:
        """The label set for `key`, made once (the pods at both addresses and
        the identities do not change between a pair's connections; a pod
        event clears the lot, see _on_cluster_change)."""
        labels = self._label_sets.get(key)
        if labels is None:
            labels = make()
            if self.mesh is not None:  # without discovery nothing says when a pod changed: no caching
                if len(self._label_sets) >= MAX_LABEL_SETS:
                    self._label_sets.clear()
                self._label_sets[key] = labels
        return labels

    def _series(self, accepted: AcceptedConnection, tracked: TrackedConnection, flags: str = "-") -> TcpSeries:
        """The counters of a 15001 / 15006 connection's label set, bound once per
        (who, whom, how) like the label sets (a pod event clears them)."""
        meta = tracked.meta
        client_ip, dst_ip = accepted.client.ip, meta.destination_ip or accepted.original_dst.ip
        key = (accepted.listener, client_ip, dst_ip, meta.source_identity, meta.destination_identity, meta.service,
               meta.via, flags)
        series = self._series_sets.get(key)
        if series is None:
            src_name, src_ns = self._pod_at(client_ip)
            dst_name, dst_ns = self._pod_at(dst_ip)
            secure = meta.via in (Route.HBONE.value, Route.WAYPOINT.value) or accepted.listener is ListenerKind.HBONE
            series = self.metrics.series(TcpLabels(
                reporter="source" if accepted.listener is ListenerKind.OUTBOUND else "destination",
                source_workload=src_name, source_workload_namespace=src_ns,
                source_principal=meta.source_identity or "unknown",
                destination_workload=dst_name, destination_workload_namespace=dst_ns,
                destination_principal=meta.destination_identity or "unknown",
                destination_service=meta.service or "unknown",
                response_flags=flags, connection_security_policy="mutual_tls" if secure else "none"))
            if self.mesh is not None:  # without discovery nothing says when a pod changed: no caching
                if len(self._series_sets) >= MAX_LABEL_SETS:
                    self._series_sets.clear()
                self._series_sets[key] = series
        return series

    def _finish(self, accepted: AcceptedConnection, tracked: TrackedConnection, outcome: _Outcome) -> None:
        if outcome.end == "cancelled":  # the task was cancelled mid-relay: count what it moved
            progress = tracked.progress
            outcome = _Outcome("closed_by_policy" if tracked.meta.revoked else "cancelled",
                               progress.bytes_to_upstream, progress.bytes_to_client,
                               flags="UAEX" if tracked.meta.revoked else "-")
        self.connections.discard(tracked.id)
        # Closed with the labels it was opened with (_opened's), unless the close adds a response flag.
        series = tracked.meta.series
        if series is None or outcome.flags != "-":
            series = self._series(accepted, tracked, outcome.flags)
        if outcome.failed:
            series.failed()
        series.closed(outcome.sent, outcome.received)
        meta = tracked.meta
        self.access_log.connection(
            listener=accepted.listener.value, src=str(accepted.client), dst=str(accepted.original_dst),
            src_identity=meta.source_identity or None, dst_identity=meta.destination_identity or None,
            sent=outcome.sent, received=outcome.received,
            duration_ms=round((time.time() - accepted.accepted_at) * 1000, 1), decision=meta.decision,
            reason=meta.reason, end=outcome.end, error=outcome.error, via=meta.via)

    def _opened(self, accepted: AcceptedConnection, tracked: TrackedConnection) -> None:
        """Counted once the route and identities are known, so the opened and
        closed series carry the same labels."""
        series = tracked.meta.series = self._series(accepted, tracked)
        series.opened()

    # -- handlers -------------------------------------------------------------
    async def _relay(self, accepted: AcceptedConnection, sock: socket.socket, tracked: TrackedConnection,
                     destination: SocketAddress | None = None) -> _Outcome:
        """Plain TCP to `destination` (default: the original one), from the client's IP."""
        assert self._upstream is not None
        target = accepted if destination is None else replace(accepted, original_dst=destination)
        outcome = await relay_plain_tcp(sock, target, self._upstream, progress=tracked.progress)
        return _Outcome(outcome.end.value, outcome.bytes_to_upstream, outcome.bytes_to_client, outcome.error,
                        _RESPONSE_FLAGS.get(outcome.end, "-"), outcome.end in _FAILED)

    def _decidable(self) -> bool:
        """The agent's records are loaded and discovery has synced (or there is
        none): the per-connection check, with no coroutine to await."""
        records, mesh = self.records_loaded, self.mesh
        return (records is None or records.is_set()) and (mesh is None or not mesh.pending())

    async def _undecidable(self) -> tuple[str, str] | None:
        """Why no connection can be decided yet (the access-log reason and the
        failed-closed label), after waiting up to SYNC_WAIT_S for the agent's
        records and discovery's sync; None once both are in. Callers check
        `_decidable()` first, so no coroutine is made per connection."""
        mesh = self.mesh
        records = self.records_loaded
        try:
            async with asyncio.timeout(SYNC_WAIT_S):
                if records is not None:
                    await records.wait()
                if mesh is not None and mesh.pending() and mesh.until_synced is not None:
                    await mesh.until_synced()
        except TimeoutError:
            pass
        if records is not None and not records.is_set():
            return _RECORDS_NOT_LOADED, RECORDS_NOT_LOADED
        partial = mesh.pending() if mesh is not None else ""
        return (_not_synced(partial), DISCOVERY_NOT_SYNCED) if partial else None

    async def _refused_undecidable(self, accepted: AcceptedConnection, sock: socket.socket,
                                   tracked: TrackedConnection) -> _Outcome | None:
        """Refuse a captured connection the agent cannot decide yet (see
        _undecidable), after the wait; None when it can be decided after all."""
        undecidable = await self._undecidable()
        if undecidable is None:
            return None
        self._opened(accepted, tracked)
        return self._refuse(sock, tracked, undecidable[0], "NR", undecidable[1])

    def _refuse(self, sock: socket.socket, tracked: TrackedConnection, reason: str, flags: str,
                fail_closed: str = "") -> _Outcome:
        """Reset the client; `fail_closed` (a Decision.fail_closed reason) counts it as the agent failing closed."""
        tracked.meta.decision = "deny"
        tracked.meta.reason = reason
        if fail_closed:
            self.metrics.failed_closed.labels(tracked.accepted.listener.value, fail_closed).inc()
        reset_socket(sock)
        return _Outcome("denied", 0, 0, flags=flags, failed=True)

    async def _outbound(self, accepted: AcceptedConnection, sock: socket.socket) -> None:
        tracked = self.connections.add(accepted, asyncio.current_task(self._loop))
        outcome = _Outcome("cancelled", 0, 0)
        try:
            if self.mesh is None:
                tracked.meta.reason = "no discovery: plain relay"
                self._opened(accepted, tracked)
                outcome = await self._relay(accepted, sock, tracked)
                return
            if not self._decidable():
                refused = await self._refused_undecidable(accepted, sock, tracked)
                if refused is not None:
                    outcome = refused
                    return
            # Who the client is comes from the enrolment record that owns
            # its address (bound to its veth by the datapath), not from
            # discovery's view of the address.
            plan = self.mesh.router.plan_for(accepted.client.ip, accepted.original_dst.ip,
                                             accepted.original_dst.port)
            meta = tracked.meta
            meta.via = plan.via
            meta.reason = plan.reason
            meta.source_identity = plan.source_uri
            meta.destination_identity = plan.destination_uri
            meta.destination_ip = plan.next_hop_ip  # the waypoint instance, for WAYPOINT
            meta.service = plan.service or ""
            self._opened(accepted, tracked)
            if plan.route is Route.REFUSE:
                outcome = self._refuse(sock, tracked, plan.reason, "NR", plan.fail_closed)
            elif plan.route in (Route.HBONE, Route.WAYPOINT):
                outcome = await self._tunnel(accepted, sock, tracked, plan)
            else:
                if plan.route is Route.LOCAL:
                    decision = self.mesh.authorizer.check(source_ip=accepted.client.ip,
                                                          source_identity=plan.source_identity,
                                                          dst_ip=plan.dst_ip, dst_port=plan.dst_port)
                    if not decision.allowed:
                        outcome = self._refuse(sock, tracked, decision.reason, "UAEX", decision.fail_closed)
                        return
                    meta.reason = decision.reason
                    meta.authorized = DestinationCheck(accepted.client.ip, plan.source_identity, plan.dst_ip,
                                                       plan.dst_port)
                outcome = await self._relay(accepted, sock, tracked, SocketAddress(plan.dst_ip, plan.dst_port))
        finally:
            self._finish(accepted, tracked, outcome)

    async def _tunnel(self, accepted: AcceptedConnection, sock: socket.socket, tracked: TrackedConnection,
                      plan: OutboundPlan) -> _Outcome:
        assert self.pool is not None and plan.source_identity and plan.destination_identity
        next_hop = plan.next_hop_ip
        # The pool key, made once per (client, next hop, both identities' URIs): strings hash
        # in C, where a new PoolKey is a dataclass __init__ and two SpiffeId hashes per connection.
        memo = (accepted.client.ip, next_hop, plan.source_uri, plan.destination_uri)
        key = self._pool_keys.get(memo)
        if key is None:
            key = PoolKey(source_identity=plan.source_identity, source_ip=accepted.client.ip, next_hop_ip=next_hop,
                          expected_identities=frozenset({plan.destination_identity}))
            if len(self._pool_keys) >= MAX_POOL_KEYS:
                self._pool_keys.clear()
            self._pool_keys[memo] = key
        headers = [("forwarded", f'for="{accepted.client}"')]
        try:
            tunnel = await self.pool.open_tunnel(key, plan.authority, sock, headers)
        except TunnelRefused as exc:
            flags = "UAEX" if exc.status == 401 else "UF"
            return self._refuse(sock, tracked, f"HBONE CONNECT {plan.authority} refused by {next_hop}: "
                                               f"HTTP {exc.status}", flags)
        except (TunnelError, IdentityError, OSError, TimeoutError) as exc:
            tracked.meta.reason = f"HBONE to {next_hop}:{HBONE_PORT} failed: {type(exc).__name__}: {exc}"
            reset_socket(sock)
            return _Outcome("connect_failed", 0, 0, error=type(exc).__name__, flags="UF", failed=True)
        try:
            done = await tunnel.done
        except asyncio.CancelledError:
            tunnel.abort("proxy shutting down")
            raise
        return _Outcome(done.end.value, done.bytes_to_stream, done.bytes_to_tcp, done.detail or None)

    async def _inbound_plaintext(self, accepted: AcceptedConnection, sock: socket.socket) -> None:
        tracked = self.connections.add(accepted, asyncio.current_task(self._loop))
        outcome = _Outcome("cancelled", 0, 0)
        try:
            decision = None
            if not self._decidable():
                refused = await self._refused_undecidable(accepted, sock, tracked)
                if refused is not None:
                    outcome = refused
                    return
            if self.mesh is not None:
                decision = self.mesh.authorizer.check(source_ip=accepted.client.ip, source_identity=None,
                                                      dst_ip=accepted.original_dst.ip,
                                                      dst_port=accepted.original_dst.port)
                pod = self.mesh.attributor.pod(accepted.original_dst.ip)
                tracked.meta.destination_identity = str(self.mesh.router.identity(pod)) if pod else ""
            self._opened(accepted, tracked)
            if decision is not None and not decision.allowed:
                log.info("plaintext connection denied", src=str(accepted.client), dst=str(accepted.original_dst),
                         reason=decision.reason)
                outcome = self._refuse(sock, tracked, decision.reason, "UAEX", decision.fail_closed)
                return
            tracked.meta.reason = decision.reason if decision is not None else "no discovery: plain relay"
            if decision is not None:
                tracked.meta.authorized = DestinationCheck(accepted.client.ip, None, accepted.original_dst.ip,
                                                           accepted.original_dst.port)
            outcome = await self._relay(accepted, sock, tracked)
        finally:
            self._finish(accepted, tracked, outcome)

    async def _hbone(self, accepted: AcceptedConnection, sock: socket.socket) -> None:
        if self.inbound is None or self.mesh is None:
            # Fail closed: nothing may reach a pod's 15008 in plaintext.
            log.info("HBONE connection refused: no identities without discovery", src=str(accepted.client),
                     dst=str(accepted.original_dst))
            return
        if not self._decidable():
            undecidable = await self._undecidable()
            if undecidable:
                self._refuse_before_tls(accepted, sock, *undecidable)
                return
        if self.mesh.attributor.pod(accepted.original_dst.ip) is None:
            why = self.mesh.attributor.attribute(accepted.original_dst.ip).reason
            self._refuse_before_tls(accepted, sock, f"denied: unknown destination: {why}", UNKNOWN_DESTINATION)
            return
        await self.inbound.handle(accepted, sock)

    def _refuse_before_tls(self, accepted: AcceptedConnection, sock: socket.socket, reason: str,
                           fail_closed: str) -> None:
        """An HBONE connection the agent cannot decide for (no workload at the
        address, no complete view): closed before TLS, as there is no identity
        to present or decide for; logged and counted."""
        log.info("hbone_connection_refused", peer=str(accepted.client), dst=str(accepted.original_dst),
                 reason=reason)
        reset_socket(sock)
        self.metrics.failed_closed.labels(accepted.listener.value, fail_closed).inc()
        labels = TcpLabels(reporter="destination", response_flags="NR", connection_security_policy="mutual_tls")
        self.metrics.failed(labels)
        self.metrics.closed(labels, 0, 0)
        self.access_log.connection(
            listener=accepted.listener.value, src=str(accepted.client), dst=str(accepted.original_dst),
            src_identity=None, dst_identity=None, sent=0, received=0,
            duration_ms=round((time.time() - accepted.accepted_at) * 1000, 1), decision="deny", reason=reason,
            end="refused", via=Route.HBONE.value)

    # -- policy changes -------------------------------------------------------
    def _on_cluster_change(self, kind: str, event: str, old: Any, new: Any) -> None:
        """Policies, or the labels their selectors match, changed: decide
        again, once per burst of events (a file reload or relist is many).
        A pod changed: the metric label sets are made anew; a pod went: its
        metric series go too (pod churn would otherwise grow them for ever)."""
        if kind == KIND_POD:
            self._label_sets.clear()
            self._series_sets.clear()
            if event == EVENT_DELETED and old is not None:
                self.metrics.forget_workload(old.name, old.namespace)
        relabelled = kind == KIND_POD and event == EVENT_MODIFIED and old.labels != new.labels
        if (kind in POLICY_KINDS or relabelled) and self._recheck is None:
            self._recheck = asyncio.get_running_loop().call_soon(self._recheck_soon)

    def _recheck_soon(self) -> None:
        self._recheck = None
        self.recheck_connections()

    def recheck_connections(self) -> int:
        """Decide every live connection this node admitted as its destination
        again, with the policies in force now, and reset the ones no longer
        allowed. Returns how many were closed."""
        if self.mesh is None:
            return 0
        authorizer = self.mesh.authorizer
        closed = 0
        for tracked in self.connections:
            check = tracked.meta.authorized
            if check is None or tracked.meta.revoked:
                continue
            decision = authorizer.check(source_ip=check.source_ip, source_identity=check.source_identity,
                                        dst_ip=check.dst_ip, dst_port=check.dst_port)
            if decision.allowed:
                continue
            tracked.meta.revoked = True
            tracked.meta.decision = "deny"
            tracked.meta.reason = f"closed by policy: {decision.reason}"
            if tracked.cancel(tracked.meta.reason):
                closed += 1
                log.info("connection closed by policy", conn=tracked.id, listener=tracked.accepted.listener.value,
                         src=str(tracked.accepted.client), dst=f"{check.dst_ip}:{check.dst_port}",
                         peer=str(check.source_identity) if check.source_identity else None, reason=decision.reason,
                         policy=decision.policy, generation=authorizer.generation)
        if self.inbound is not None:
            for admitted in self.inbound.admitted_tunnels():
                decision = authorizer.check(source_ip=admitted.client_ip, source_identity=admitted.peer_identity,
                                            dst_ip=admitted.dst_ip, dst_port=admitted.dst_port)
                if not decision.allowed and self.inbound.revoke(admitted, f"closed by policy: {decision.reason}"):
                    closed += 1
                    self._revoked_tunnel(admitted, decision)
        return closed

    # -- the destination side of HBONE (HboneInbound's TunnelObserver) -----------
    def _inbound_labels(self, peer: SpiffeId, client_ip: str, dst_ip: str, flags: str = "-") -> TcpLabels:
        def make() -> TcpLabels:
            src_name, src_ns = self._pod_at(client_ip)
            dst_name, dst_ns = self._pod_at(dst_ip)
            return TcpLabels(
                reporter="destination", source_workload=src_name, source_workload_namespace=src_ns,
                source_principal=str(peer), destination_workload=dst_name, destination_workload_namespace=dst_ns,
                destination_principal=str(self._local_identity(dst_ip) or "unknown"), response_flags=flags,
                connection_security_policy="mutual_tls")
        return self._label_set((ListenerKind.HBONE, peer, client_ip, dst_ip, flags), make)

    def tunnel_opened(self, admitted: InboundTunnel) -> None:
        self.metrics.opened(self._inbound_labels(admitted.peer_identity, admitted.client_ip, admitted.dst_ip))

    def tunnel_closed(self, admitted: InboundTunnel, outcome: TunnelOutcome, client: SocketAddress,
                      seconds: float) -> None:
        flags, end = _TUNNEL_END_FIELDS[outcome.end]
        labels = self._inbound_labels(admitted.peer_identity, admitted.client_ip, admitted.dst_ip, flags)
        if flags != "-":
            self.metrics.failed(labels)
        self.metrics.closed(labels, outcome.bytes_to_tcp, outcome.bytes_to_stream)
        self.access_log.connection(
            listener=_HBONE_LISTENER, src=str(client), dst=f"{admitted.dst_ip}:{admitted.dst_port}",
            src_identity=labels.source_principal,  # str(admitted.peer_identity), made with the labels
            dst_identity=_known(labels.destination_principal),
            sent=outcome.bytes_to_tcp, received=outcome.bytes_to_stream,
            duration_ms=round(seconds * 1000, 1), decision="allow", reason=admitted.reason, end=end,
            error=outcome.detail or None, via=_VIA_HBONE)

    def tunnel_refused(self, peer: SpiffeId, client: SocketAddress, dst_ip: str, dst_port: int, status: int,
                       reason: str) -> None:
        labels = self._inbound_labels(peer, client.ip, dst_ip, _REFUSAL_FLAGS.get(status, "-"))
        self.metrics.failed(labels)
        self.metrics.closed(labels, 0, 0)
        self.access_log.connection(
            listener=_HBONE_LISTENER, src=str(client), dst=f"{dst_ip}:{dst_port}", src_identity=str(peer),
            dst_identity=_known(labels.destination_principal), sent=0, received=0, duration_ms=0.0,
            decision="deny", reason=f"HTTP {status}: {reason}", end="refused", via=_VIA_HBONE)

    def _revoked_tunnel(self, admitted: InboundTunnel, decision: Decision) -> None:
        """Inbound tunnels are not in the registry: log and count the close here."""
        assert self.mesh is not None
        log.info("connection closed by policy", listener=ListenerKind.HBONE.value, src=admitted.client_ip,
                 dst=f"{admitted.dst_ip}:{admitted.dst_port}", peer=str(admitted.peer_identity),
                 reason=decision.reason, policy=decision.policy, generation=self.mesh.authorizer.generation)
        self.metrics.closed(self._inbound_labels(admitted.peer_identity, admitted.client_ip, admitted.dst_ip,
                                                 "UAEX"), 0, 0)
