"""What the agent has taken in from discovery, as AgentStatus reports it.

Whoever changes the cluster (the lab writing its cluster file, a test, a
bench) waits on this instead of on time: until every agent holds the
revision it wrote, has the objects it expects and sees each waypoint with
an instance ready to take traffic, the very state the proxy decides from.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .state import ClusterState
from .waypoints import WaypointResolver


@dataclass(frozen=True)
class DiscoveryReport:
    source: str                                # "none" | "files" | "kube"
    synced: bool = False
    revision: str = ""                         # files: content_revision() of what is held; kube: ""
    pods_with_addresses: int = 0
    objects: tuple[tuple[str, int], ...] = ()  # (kind, how many held), by kind
    ready_waypoints: tuple[str, ...] = ()      # "namespace/name" with an instance ready now
    errors: tuple[tuple[str, str], ...] = ()   # (file or object, why it is rejected)
    pending: tuple[tuple[str, str], ...] = ()  # until synced: (kind or file, why it is not in yet)


NO_DISCOVERY = DiscoveryReport(source="none")


def discovery_report(source_name: str, source: Any, synced: bool, state: ClusterState) -> DiscoveryReport:
    """The report for one source (FileSource or KubeSource) feeding `state`."""
    resolver = WaypointResolver(state)
    ready = []
    for gateway in state.gateways():
        waypoint, _ = resolver.waypoint(gateway.namespace, gateway.name)
        if waypoint is not None and resolver.instances(waypoint):
            ready.append(waypoint.key)
    revision = getattr(source, "revision", None)
    source_errors = getattr(source, "errors", None)
    pending = {} if synced else source.pending()
    errors = {**(source_errors() if callable(source_errors) else {}), **state.errors()}
    return DiscoveryReport(source=source_name, synced=synced, revision=revision() if callable(revision) else "",
                           pods_with_addresses=sum(1 for pod in state.pods() if pod.ips),
                           objects=tuple(sorted(state.counts().items())), ready_waypoints=tuple(ready),
                           errors=tuple(sorted(errors.items())), pending=tuple(sorted(pending.items())))
