"""What `ambit lab status` and `ambit lab down` report, as data (report.py prints it)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class TeardownReport:
    pods_deleted: tuple[str, ...] = ()
    del_failures: tuple[str, ...] = ()
    processes_stopped: int = 0
    namespaces_removed: tuple[str, ...] = ()
    links_removed: tuple[str, ...] = ()
    bpffs_removed: tuple[str, ...] = ()
    state_removed: bool = False

    def summary(self) -> str:
        if not (self.pods_deleted or self.processes_stopped or self.namespaces_removed or self.links_removed
                or self.bpffs_removed or self.state_removed):
            return "nothing to remove: no lab was running"
        lines = [f"CNI DEL for {len(self.pods_deleted)} pod(s), stopped {self.processes_stopped} process(es), "
                 f"removed {len(self.namespaces_removed)} namespace(s)"
                 + (f", {len(self.links_removed)} stray link(s)" if self.links_removed else "")
                 + (f", {len(self.bpffs_removed)} bpffs dir(s)" if self.bpffs_removed else "")
                 + (", the state" if self.state_removed else "")]
        lines += [f"warning: {failure}" for failure in self.del_failures]
        return "\n".join(lines)


@dataclass(frozen=True)
class NodeStatus:
    name: str
    netns: str
    netns_present: bool
    underlay_ip: str
    pod_cidr: str
    socket: str
    agent_pid: int | None
    agent_alive: bool
    agent_ready: bool | None   # None: not asked (agent not running)
    agent_detail: str
    agent_records: int | None  # pods the CNI told the agent about
    agent_log: str | None
    agent_enrolled: int | None = None  # of those, pods in the mesh (captured)


@dataclass(frozen=True)
class CaStatus:
    """The lab's CA service: its own process, its key in its own mount namespace."""

    address: str  # host:port on the underlay
    pid: int | None
    alive: bool
    log: str


@dataclass(frozen=True)
class PodStatus:
    key: str
    node: str
    netns: str
    netns_present: bool
    ip: str | None
    service_account: str
    ambient: bool
    workloads: tuple[str, ...]  # "http:8080"
    workload_pid: int | None
    workload_alive: bool


@dataclass(frozen=True)
class ServiceStatus:
    key: str
    cluster_ip: str | None
    ports: tuple[str, ...]      # "http 80->http"
    endpoints: tuple[str, ...]  # pod IPs


@dataclass(frozen=True)
class LabStatus:
    prefix: str
    phase: str
    state_file: str
    cluster_file: str
    underlay_netns: str
    underlay_bridge: str
    underlay_cidr: str
    nodes: tuple[NodeStatus, ...]
    pods: tuple[PodStatus, ...]
    services: tuple[ServiceStatus, ...]
    policies: tuple[str, ...]   # "AuthorizationPolicy shop/web-from-shop-only"
    ca: CaStatus | None = None

    @property
    def healthy(self) -> bool:
        return self.phase == "ready" and (self.ca is None or self.ca.alive) and all(
            n.agent_alive and n.agent_ready for n in self.nodes) and all(
            p.ip and p.netns_present and (p.workload_alive or not p.workloads) for p in self.pods)

    def pod(self, key: str) -> PodStatus:
        return next(p for p in self.pods if p.key == key)

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"healthy": self.healthy}
