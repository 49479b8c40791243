"""What a lab node's agent shows of itself: its Prometheus metrics and its
readiness, read as a scraper or the kubelet would (from inside the node's
namespace), and its log (JSON lines, the access log included), read from a
mark on; and what crosses an interface, frame by frame."""
from __future__ import annotations

import contextlib
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from ambit.agent.identity.spiffe import SpiffeId
from ambit.agent.netns import NetnsThread, netns_path
from ambit.lab.topology import TRUST_DOMAIN, Lab
from tests.support.waiting import wait_until
from tests.support.logfile import read_json_lines
from ambit.lab.tour import UnderlayCapture


def scrape(lab: Lab, node: str, port: int = 15020) -> str:
    """The node agent's /metrics, as Prometheus text."""
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return response.read().decode()

    with NetnsThread(netns_path(lab.state().nodes[node].netns)) as thread:
        return thread.run(get)


def readiness(lab: Lab, node: str, port: int = 15021) -> tuple[int, str]:
    """(HTTP status, body) of the node agent's /healthz/ready."""
    def get() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz/ready", timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    with NetnsThread(netns_path(lab.state().nodes[node].netns)) as thread:
        return thread.run(get)


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called `name` (a counter's `_total` included)
    that carry `labels`, from Prometheus text."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


def log_mark(lab: Lab, node: str) -> int:
    """Where the node agent's log ends now: read events written after it."""
    return lab.agent_log(node).stat().st_size


def events(lab: Lab, node: str, since: int, event: str, **match: Any) -> list[dict[str, Any]]:
    """The node agent's log lines written after `since` for `event` whose
    fields equal `match`."""
    lines = read_json_lines(lab.agent_log(node), event, since)
    return [e for e in lines if e.get("event") == event and all(e.get(k) == v for k, v in match.items())]


def wait_event(lab: Lab, node: str, since: int, event: str, timeout: float = 5.0, **match: Any) -> dict[str, Any]:
    """The first such line, waiting for it (access log lines are written when
    a connection closes)."""
    return wait_until(lambda: events(lab, node, since, event, **match),
                      f"a {event!r} log line with {match} on {node}", timeout)[0]


def access_log(lab: Lab, node: str, since: int, **match: Any) -> dict[str, Any]:
    """The first access-log line written after `since` whose fields equal `match`."""
    return wait_event(lab, node, since, "connection", **match)


@contextlib.contextmanager
def watching(netns: str, interface: str) -> Iterator[UnderlayCapture]:
    """Every frame on an interface of a namespace while the block runs."""
    capture = UnderlayCapture(netns, interface)
    try:
        yield capture
    finally:
        capture.stop()  # takes what the socket still holds too


def spiffe(namespace: str, account: str) -> str:
    """A lab workload's identity as access logs and the CA name it."""
    return str(SpiffeId(TRUST_DOMAIN, namespace, account))
