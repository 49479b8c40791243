"""Prometheus metrics with Istio's names and labels, so the dashboards and
alerts platform teams already have for ztunnel work unchanged, plus ambit's
own (enrolment, CNI RPC latency, eBPF attach failures, HBONE pool).

A connection's labels are fixed when it is opened (who talks to whom, how
it is secured); bytes are added when it closes, so the data path never
touches a metric. The counters' children are kept per label set (a bounded
cache: clearing it only costs lookups again), so a connection costs a dict
lookup per counter, not prometheus_client's label validation each time.
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


class _Series:
    """Where the TCP counters' children for one label set keep their count, found on first use.

    That is what Counter.inc adds to once it has checked that the metric is a
    labelled child and the amount is not negative (prometheus_client's
    `child._value`; tests/unit/test_tcp_metrics.py pins Counter.inc's source).
    A connection's counts are never negative, so the holder's own inc is all
    there is to do: one Python call per count instead of four (Counter.inc,
    _raise_if_not_observable, _is_observable, the holder's inc), four counts per
    connection and side."""

    __slots__ = ("values", "holders")

    def __init__(self, values: tuple[str, ...]) -> None:
        self.values = values
        self.holders: dict[Counter, Any] = {}

    def holder(self, counter: Counter) -> Any:
        """The count of `counter`'s child for these labels: `.inc(amount)`, amount >= 0."""
        found = self.holders.get(counter)
        if found is None:
            found = self.holders[counter] = counter.labels(*self.values)._value
        return found


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
        self._series: dict[tuple[str, ...], _Series] = {}
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

    def _series_of(self, labels: TcpLabels) -> _Series:
        values = labels.values()
        series = self._series.get(values)
        if series is None:
            if len(self._series) >= MAX_CACHED_LABEL_SETS:
                self._series.clear()
            series = self._series[values] = _Series(values)
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
        return removed

    def watch_capture(self, verdicts: Callable[[], dict[str, int]]) -> None:
        """Export the capture backend's per-verdict packet counters (read
        from the kernel at each scrape) as ambit_capture_packets_total."""
        self.registry.register(_CaptureVerdicts(verdicts))

    def opened(self, labels: TcpLabels) -> None:
        self._series_of(labels).holder(self.tcp_opened).inc(1)

    def closed(self, labels: TcpLabels, sent: int, received: int) -> None:
        """`sent`, `received`: byte counts (never negative)."""
        series = self._series_of(labels)
        series.holder(self.tcp_closed).inc(1)
        if sent:
            series.holder(self.tcp_sent).inc(sent)
        if received:
            series.holder(self.tcp_received).inc(received)

    def failed(self, labels: TcpLabels) -> None:
        self._series_of(labels).holder(self.tcp_failed).inc(1)

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
