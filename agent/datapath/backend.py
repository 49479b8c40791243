"""The eBPF capture backend behind enrolment: what CNI ADD/DEL do to a pod's
traffic, and how a restarted agent squares its records with the kernel."""
from __future__ import annotations

import structlog

from ..workload import Workload
from .capture import Datapath
from .podlink import PodLink

log = structlog.get_logger(__name__)


class EbpfCapture:
    """Capture backend: tc programs on the pod's host veth plus its
    addresses in the local_pods map (see docs/datapath.md)."""

    name = "ebpf"

    def __init__(self, datapath: Datapath) -> None:
        self.datapath = datapath

    def attach(self, workload: Workload, link: PodLink) -> str:
        capture = self.datapath.attach_pod(link.host_ifindex, workload.addresses)
        if not capture.pod_ips:
            # An IPv6-only pod: nothing to steer (IPv6 is not captured yet,
            # docs/datapath.md); refusing beats pretending it is meshed.
            self.datapath.detach_pod(link.host_ifindex)
            raise ValueError("the pod has no IPv4 address; ambit captures IPv4 TCP only")
        return "captured"

    def detach(self, workload: Workload) -> None:
        self.datapath.detach_pod(workload.host_veth_ifindex, workload.addresses)

    def verify(self, workload: Workload) -> str | None:
        found = {c.host_ifindex: c for c in self.datapath.attached()}.get(workload.host_veth_ifindex)
        if found is None or not found.complete:
            return f"capture programs missing on {workload.host_veth}"
        missing = set(workload.addresses) - {str(ip) for ip in found.pod_ips} - _ipv6(workload)
        if missing:
            return f"addresses {sorted(missing)} are not in the capture map"
        return None

    def reconcile(self, workloads: list[Workload]) -> None:
        """After a restart: make sure every live record is fully captured
        (re-adopting what the pins and filters kept) and remove captures no
        record owns (pods deleted while the agent was down)."""
        owned = {w.host_veth_ifindex for w in workloads}
        for capture in self.datapath.attached():
            if capture.host_ifindex not in owned:
                log.info("removing capture no pod owns", host_ifindex=capture.host_ifindex,
                         pod_ips=[str(ip) for ip in capture.pod_ips])
                self.datapath.detach_pod(capture.host_ifindex, capture.pod_ips)
        for workload in workloads:
            self.datapath.attach_pod(workload.host_veth_ifindex, workload.addresses)


def _ipv6(workload: Workload) -> set[str]:
    return {ip for ip in workload.addresses if ":" in ip}
