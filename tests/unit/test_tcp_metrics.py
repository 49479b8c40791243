"""Istio's TCP counters through the per-label-set cache: what is exported is
what was counted, also across the cache being emptied."""
from __future__ import annotations

from ambit.agent.telemetry import metrics
from ambit.agent.telemetry.metrics import TCP_LABELS, Metrics, TcpLabels


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
