"""Prometheus metrics with Istio's names and labels, so the dashboards and
alerts platform teams already have for ztunnel work unchanged, plus ambit's
own (enrolment, CNI RPC latency, eBPF attach failures, HBONE pool).

A connection's labels are fixed when it is opened (who talks to whom, how
it is secured); bytes are added when it closes, so the data path never
touches a metric. The counters' children are bound per label set (TcpSeries,
kept by the caller per pod pair; Metrics keeps a bounded cache of them too,
clearing it only costs lookups again), so a connection costs an attribute read
per counter, not prometheus_client's label validation each time.
Workload labels name pods, so pod churn would add series for ever: a
deleted pod's series are removed (`forget_workload`); a counter that
restarts from zero if a pod of the same name comes back is what
Prometheus's rate() already expects.
"""
from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Istio's TCP label set (istio.io/latest/docs/reference/config/metrics).
TCP_LABELS = (
    "reporter", "source_workload", "source_workload_namespace", "source_principal", "source_app",
    "source_version", "source_cluster", "destination_service", "destination_service_namespace",
    "destination_service_name", "destination_workload", "destination_workload_namespace",
    "destination_principal", "destination_app", "destination_version", "destination_cluster",
    "request_protocol", "response_flags", "connection_security_policy",
)
UNKNOWN = "unknown"
MAX_CACHED_LABEL_SETS = 4096
_label_values = operator.attrgetter(*TCP_LABELS)
_SRC_WORKLOAD, _SRC_NAMESPACE, _DST_WORKLOAD, _DST_NAMESPACE = (
    TCP_LABELS.index(name) for name in ("source_workload", "source_workload_namespace",
                                        "destination_workload", "destination_workload_namespace"))


def _label_value_sets(counter: Counter) -> set[tuple[str, ...]]:
    """The label values of every child `counter` has (read through collect(): no private state)."""
    return {tuple(sample.labels[name] for name in TCP_LABELS)
            for family in counter.collect() for sample in family.samples if sample.name.endswith("_total")}


@dataclass(frozen=True)
class TcpLabels:
    """One connection's identity in metrics; "unknown" where nothing is known."""

    reporter: str = "destination"
    source_workload: str = UNKNOWN
    source_workload_namespace: str = UNKNOWN
    source_principal: str = UNKNOWN
    source_app: str = UNKNOWN
    source_version: str = UNKNOWN
    source_cluster: str = UNKNOWN
    destination_service: str = UNKNOWN
    destination_service_namespace: str = UNKNOWN
    destination_service_name: str = UNKNOWN
    destination_workload: str = UNKNOWN
    destination_workload_namespace: str = UNKNOWN
    destination_principal: str = UNKNOWN
    destination_app: str = UNKNOWN
    destination_version: str = UNKNOWN
    destination_cluster: str = UNKNOWN
    request_protocol: str = "tcp"
    response_flags: str = "-"
    connection_security_policy: str = "unknown"

    def values(self) -> tuple[str, ...]:
        return _label_values(self)


class TcpSeries:
    """The TCP counters' children for one label set, bound once (Metrics.series).

    A connection's caller keeps it (the node proxy, per pod pair and route), so
    counting is an attribute read and the child's holder's own inc: what
    Counter.inc adds to once it has checked that the metric is a labelled child
    and the amount is not negative (prometheus_client's `child._value`;
    tests/unit/test_tcp_metrics.py pins Counter.inc's source). A connection's
    counts are never negative. Each child is found on first use, so a series
    appears only once something is counted in it; after Metrics.forget_workload
    removed children (its epoch moved) they are found, or made, again."""

    __slots__ = ("values", "_metrics", "_epoch", "_opened", "_closed", "_sent", "_received", "_failed")

    def __init__(self, metrics: Metrics, values: tuple[str, ...]) -> None:
        self.values = values
        self._metrics = metrics
        self._unbind()

    def _unbind(self) -> None:
        self._epoch = self._metrics.epoch
        self._opened = self._closed = self._sent = self._received = self._failed = None

    def _holder(self, counter: Counter) -> Any:
        return counter.labels(*self.values)._value

    def opened(self) -> None:
        if self._epoch != self._metrics.epoch:
            self._unbind()
        holder = self._opened
        if holder is None:
            holder = self._opened = self._holder(self._metrics.tcp_opened)
        holder.inc(1)

    def closed(self, sent: int, received: int) -> None:
        """`sent`, `received`: byte counts (never negative)."""
        if self._epoch != self._metrics.epoch:
            self._unbind()
        holder = self._closed
        if holder is None:
            holder = self._closed = self._holder(self._metrics.tcp_closed)
        holder.inc(1)
        if sent:
            holder = self._sent
            if holder is None:
                holder = self._sent = self._holder(self._metrics.tcp_sent)
            holder.inc(sent)
        if received:
            holder = self._received
            if holder is None:
                holder = self._received = self._holder(self._metrics.tcp_received)
            holder.inc(received)

    def failed(self) -> None:
        if self._epoch != self._metrics.epoch:
            self._unbind()
        holder = self._failed
        if holder is None:
            holder = self._failed = self._holder(self._metrics.tcp_failed)
        holder.inc(1)


@dataclass(frozen=True)
class HboneServerCounters:
    """What the HBONE server (15008) counts, taken at scrape time (agent/proxy/inbound.py)."""

    connections: int  # authenticated, open now
    handshakes: int  # TLS handshakes in progress now
    refused: Mapping[str, int]  # by reason, since start
    goaway_sent: Mapping[str, int]  # by error code, since start
    read_pauses: int  # since start


class _HboneServerCollector:
    """Renders the HBONE server's counters when scraped: nothing on the data path."""

    def __init__(self) -> None:
        self.source: Callable[[], HboneServerCounters | None] = lambda: None

    def collect(self) -> Iterator[Metric]:
        server = self.source()
        if server is None:
            return
        yield GaugeMetricFamily("ambit_hbone_server_connections", "Authenticated HBONE connections open on 15008",
                                value=server.connections)
        yield GaugeMetricFamily("ambit_hbone_server_handshakes", "TLS handshakes in progress on 15008 "
                                "(capped: --hbone-max-pending-handshakes)", value=server.handshakes)
        refused = CounterMetricFamily("ambit_hbone_server_connections_refused",
                                      "Connections to 15008 refused or dropped before carrying a tunnel, by reason "
                                      "(the caps: max_connections, max_connections_per_peer, handshake_displaced)",
                                      labels=("reason",))
        for reason, count in server.refused.items():
            refused.add_metric((reason,), count)
        yield refused
        goaways = CounterMetricFamily("ambit_hbone_server_goaways_sent",
                                      "Connections we closed with GOAWAY because the peer broke a rule, by error code "
                                      "(ENHANCE_YOUR_CALM: control-frame flood, rapid reset)", labels=("error_code",))
        for code, count in server.goaway_sent.items():
            goaways.add_metric((code,), count)
        yield goaways
        yield CounterMetricFamily("ambit_hbone_server_reading_paused",
                                  "Times a connection stopped reading a peer that left our replies unread",
                                  value=server.read_pauses)


class Metrics:
    """Every metric the agent exports, in one registry (tests get their own)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.tcp_opened = Counter("istio_tcp_connections_opened", "TCP connections opened", TCP_LABELS, registry=r)
        self.tcp_closed = Counter("istio_tcp_connections_closed", "TCP connections closed", TCP_LABELS, registry=r)
        self.tcp_sent = Counter("istio_tcp_sent_bytes", "Bytes sent towards the destination", TCP_LABELS,
                                registry=r)
        self.tcp_received = Counter("istio_tcp_received_bytes", "Bytes received from the destination",
                                    TCP_LABELS, registry=r)
        self.tcp_failed = Counter("istio_tcp_connections_failed", "TCP connections that failed or were denied",
                                  TCP_LABELS, registry=r)
        self._tcp_counters = (self.tcp_opened, self.tcp_closed, self.tcp_sent, self.tcp_received, self.tcp_failed)
        self.enrolled_pods = Gauge("ambit_enrolled_pods", "Pods enrolled in the mesh on this node", registry=r)
        self.cni_rpc_seconds = Histogram("ambit_cni_rpc_duration_seconds", "Agent time per CNI plugin call",
                                         ("method",), registry=r,
                                         buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.ebpf_attach_failures = Counter("ambit_ebpf_attach_failures", "Pods whose capture could not be attached",
                                            registry=r)
        self.pool_connections = Gauge("ambit_hbone_pool_connections", "Open HBONE client connections", registry=r)
        self.pool_streams = Gauge("ambit_hbone_pool_streams", "Open HBONE tunnels on pooled connections",
                                  registry=r)
        self.pods_not_captured = Gauge(
            "ambit_pods_not_captured", "Pods of this node discovery puts in the mesh that the agent does not "
            "capture (drift; `ambitctl status` says why)", registry=r)
        self.pods_adopted = Counter("ambit_pods_adopted", "Pods enrolled by the agent without a CNI ADD, by how it "
                                    "found them (adopted: running before ambit was chained; rebuilt: capture "
                                    "kept, record lost)", ["origin"], registry=r)
        self._series: dict[tuple[str, ...], TcpSeries] = {}
        self.epoch = 0  # moved when forget_workload removes children: a kept TcpSeries finds its own again
        self.failed_closed = Counter("ambit_connections_failed_closed",
                                     "Connections refused because the agent could not decide for them "
                                     "(reason: unknown_destination, discovery_not_synced, ...)",
                                     ("listener", "reason"), registry=r)
        self.policies_rejected = Gauge("ambit_policies_rejected",
                                       "Policies that failed to parse; each denies every connection to the "
                                       "workloads it would select", ("kind",), registry=r)
        self._hbone_server = _HboneServerCollector()
        r.register(self._hbone_server)  # type: ignore[arg-type]

    def watch_hbone_server(self, source: Callable[[], HboneServerCounters | None]) -> None:
        """Export the HBONE server's counters (read from `source` at each scrape)."""
        self._hbone_server.source = source

    def series(self, labels: TcpLabels) -> TcpSeries:
        """The counters of `labels`, bound: keep it to count connections with these labels."""
        values = labels.values()
        series = self._series.get(values)
        if series is None:
            if len(self._series) >= MAX_CACHED_LABEL_SETS:
                self._series.clear()
            series = self._series[values] = TcpSeries(self, values)
        return series

    def forget_workload(self, name: str, namespace: str) -> int:
        """Remove the TCP series of every label set naming the pod `namespace/name`
        as source or destination (it was deleted); returns how many went.
        A connection of it still open re-creates its series when it closes."""
        pod = (name, namespace)
        if pod == (UNKNOWN, UNKNOWN):
            return 0
        removed = 0
        for counter in self._tcp_counters:
            doomed = {values for values in _label_value_sets(counter)
                      if (values[_SRC_WORKLOAD], values[_SRC_NAMESPACE]) == pod
                      or (values[_DST_WORKLOAD], values[_DST_NAMESPACE]) == pod}
            for values in doomed:
                counter.remove(*values)
                self._series.pop(values, None)
            removed += len(doomed)
        if removed:
            self.epoch += 1
        return removed

    def watch_capture(self, verdicts: Callable[[], dict[str, int]]) -> None:
        """Export the capture backend's per-verdict packet counters (read
        from the kernel at each scrape) as ambit_capture_packets_total."""
        self.registry.register(_CaptureVerdicts(verdicts))

    def opened(self, labels: TcpLabels) -> None:
        self.series(labels).opened()

    def closed(self, labels: TcpLabels, sent: int, received: int) -> None:
        """`sent`, `received`: byte counts (never negative)."""
        self.series(labels).closed(sent, received)

    def failed(self, labels: TcpLabels) -> None:
        self.series(labels).failed()

    def failed_closed_by_reason(self) -> dict[str, int]:
        """ambit_connections_failed_closed_total summed over listeners (for AgentStatus)."""
        counts: dict[str, int] = {}
        for family in self.failed_closed.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    reason = sample.labels["reason"]
                    counts[reason] = counts.get(reason, 0) + int(sample.value)
        return counts

class _CaptureVerdicts(Collector):
    """The kernel's counters, not the agent's: they count what the datapath
    did (spoofed sources dropped included) even while no agent runs."""

    def __init__(self, verdicts: Callable[[], dict[str, int]]) -> None:
        self._verdicts = verdicts

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("ambit_capture_packets", "Packets per capture verdict (docs/datapath.md); "
                                     "the *_drop_* verdicts are refusals", labels=["verdict"])
        try:
            counts = self._verdicts()
        except Exception:  # the datapath is being installed or closed: no sample this scrape
            counts = {}
        for verdict, packets in sorted(counts.items()):
            family.add_metric([verdict], packets)
        yield family
