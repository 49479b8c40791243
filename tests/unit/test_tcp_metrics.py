"""Istio's TCP counters through the per-label-set cache: what is exported is
what was counted, also across the cache being emptied; a deleted pod's series go."""
from __future__ import annotations

from types import SimpleNamespace

from ambit.agent.discovery.model import KIND_POD
from ambit.agent.discovery.state import EVENT_DELETED
from ambit.agent.proxy.node_proxy import NodeProxy
from ambit.agent.telemetry import metrics
from ambit.agent.telemetry.metrics import TCP_LABELS, Metrics, TcpLabels
from tests.support.pinned_source import source_digest


def sample(m: Metrics, name: str, labels: TcpLabels) -> float | None:
    return m.registry.get_sample_value(name, dict(zip(TCP_LABELS, labels.values())))


def test_counts_accumulate_per_label_set_and_survive_a_cache_clear(monkeypatch) -> None:
    m = Metrics()
    a = TcpLabels(reporter="source", source_workload="client", destination_workload="server")
    b = TcpLabels(reporter="source", source_workload="client", destination_workload="server", response_flags="UF")
    assert a.values() == tuple(getattr(a, name) for name in TCP_LABELS)
    m.opened(a)
    m.closed(a, 100, 0)
    m.opened(a)
    m.closed(a, 50, 7)
    m.failed(b)
    m.closed(b, 0, 0)
    monkeypatch.setattr(metrics, "MAX_CACHED_LABEL_SETS", 1)  # the next new set empties the cache
    m.opened(TcpLabels(source_workload="other"))
    m.closed(a, 1, 1)
    assert sample(m, "istio_tcp_connections_opened_total", a) == 2
    assert sample(m, "istio_tcp_connections_closed_total", a) == 3
    assert sample(m, "istio_tcp_sent_bytes_total", a) == 151
    assert sample(m, "istio_tcp_received_bytes_total", a) == 8
    assert sample(m, "istio_tcp_connections_failed_total", b) == 1
    assert sample(m, "istio_tcp_sent_bytes_total", b) is None  # nothing sent: no series made
    assert sample(m, "istio_tcp_connections_failed_total", a) is None


def test_a_deleted_pods_series_are_removed_and_the_others_kept() -> None:
    m = Metrics()
    gone_src = TcpLabels(source_workload="web-1", source_workload_namespace="shop", destination_workload="db",
                         destination_workload_namespace="shop")
    gone_dst = TcpLabels(reporter="source", source_workload="db", source_workload_namespace="shop",
                         destination_workload="web-1", destination_workload_namespace="shop", response_flags="UF")
    same_name_elsewhere = TcpLabels(source_workload="web-1", source_workload_namespace="other")
    kept = TcpLabels(source_workload="web-2", source_workload_namespace="shop", destination_workload="db",
                     destination_workload_namespace="shop")
    for labels in (gone_src, gone_dst, same_name_elsewhere, kept):
        m.opened(labels)
        m.closed(labels, 10, 20)
    m.failed(gone_dst)

    assert m.forget_workload("web-1", "shop") == 9  # 4 counters of gone_src, 5 of gone_dst
    for name in ("istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total",
                 "istio_tcp_sent_bytes_total", "istio_tcp_received_bytes_total"):
        assert sample(m, name, gone_src) is None and sample(m, name, gone_dst) is None
        assert sample(m, name, kept) is not None and sample(m, name, same_name_elsewhere) is not None
    assert sample(m, "istio_tcp_connections_failed_total", gone_dst) is None
    assert m.forget_workload("web-1", "shop") == 0
    assert m.forget_workload("unknown", "unknown") == 0  # unattributed traffic is no pod's to remove
    m.opened(gone_src)  # a late connection of the pod counts again from zero (the cache was emptied of it too)
    assert sample(m, "istio_tcp_connections_opened_total", gone_src) == 1


def test_a_kept_series_counts_on_after_its_pod_was_forgotten() -> None:
    """A caller keeps a TcpSeries per label set (the node proxy does): once
    forget_workload removed its children, a connection still open that closes
    makes them again, and counts nothing from before."""
    m = Metrics()
    labels = TcpLabels(source_workload="web-1", source_workload_namespace="shop")
    kept = m.series(labels)
    assert m.series(labels) is kept
    kept.opened()
    kept.closed(5, 0)
    assert m.forget_workload("web-1", "shop") == 3
    assert sample(m, "istio_tcp_connections_opened_total", labels) is None
    kept.closed(0, 7)
    assert sample(m, "istio_tcp_connections_closed_total", labels) == 1
    assert sample(m, "istio_tcp_received_bytes_total", labels) == 7
    assert sample(m, "istio_tcp_sent_bytes_total", labels) is None
    assert sample(m, "istio_tcp_connections_opened_total", labels) is None
    kept.failed()
    assert sample(m, "istio_tcp_connections_failed_total", labels) == 1


def test_pod_churn_leaves_a_bounded_number_of_series() -> None:
    m = Metrics()
    for generation in range(200):
        pod = TcpLabels(source_workload=f"client-{generation}", source_workload_namespace="load",
                        destination_workload="server", destination_workload_namespace="load")
        m.opened(pod)
        m.closed(pod, 1, 1)
        if generation >= 3:  # three pods live at a time
            m.forget_workload(f"client-{generation - 3}", "load")
    series = [s for f in m.tcp_opened.collect() for s in f.samples if s.name.endswith("_total")]
    assert len(series) == 3 and len(m._series) == 3


def test_the_node_proxy_removes_a_pods_series_when_discovery_deletes_it() -> None:
    m = Metrics()
    proxy = NodeProxy("unused", m, lambda ip: None)
    gone = TcpLabels(source_workload="web-1", source_workload_namespace="shop")
    kept = TcpLabels(source_workload="web-0", source_workload_namespace="shop")
    m.opened(gone)
    m.opened(kept)
    proxy._on_cluster_change(KIND_POD, EVENT_DELETED, SimpleNamespace(name="web-1", namespace="shop"), None)
    assert sample(m, "istio_tcp_connections_opened_total", gone) is None
    assert sample(m, "istio_tcp_connections_opened_total", kept) == 1


# sha256 of inspect.getsource() of prometheus_client 0.26.0's Counter.inc.
COUNTER_INC_SOURCE = "a974907585d081bbaf61af58d0d3d50df47836834f0a81477299e609570df5ed"


def test_counter_inc_is_the_checks_metrics_skips_then_its_holders_inc() -> None:
    """Metrics adds a connection's counts to each child's holder (`_value`)
    directly; that is all Counter.inc does for a non-negative amount without an
    exemplar. A changed prometheus_client fails here: re-check TcpSeries."""
    assert source_digest("prometheus_client.Counter.inc") == COUNTER_INC_SOURCE, (
        "prometheus_client's Counter.inc changed: re-check agent/telemetry/metrics.py's TcpSeries")
    m = Metrics()
    labels = TcpLabels(reporter="source", source_workload="client", destination_workload="server")
    m.opened(labels)
    m.closed(labels, 3, 0)
    m.tcp_opened.labels(*labels.values()).inc()  # prometheus_client's own path adds to the same count
    assert sample(m, "istio_tcp_connections_opened_total", labels) == 2
    assert sample(m, "istio_tcp_sent_bytes_total", labels) == 3
    assert sample(m, "istio_tcp_received_bytes_total", labels) is None
