"""The capture backends behind enrolment: what CNI ADD/DEL do to a pod's
traffic, and how a restarted agent squares its records with the kernel.

Two datapaths with one interface (attach_pod, detach_pod, attached):
eBPF (capture.Datapath: tc programs on the pod's veth, bpf_sk_assign) and
nftables (nft_capture.NftDatapath: set elements, a policy route, TPROXY).
Both steer to the same listeners with the same mark and table 100.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import structlog

from ..workload import Workload
from . import constants
from .capture import Datapath
from .nft_capture import NftDatapath, NftPodCapture
from .podlink import PodLink, host_link_index_exists

log = structlog.get_logger(__name__)

CAPTURE_BACKENDS = ("ebpf", "nftables")


class PodCaptureState(Protocol):
    host_ifindex: int
    pod_ips: tuple

    @property
    def complete(self) -> bool: ...


class PodDatapath(Protocol):
    def attach_pod(self, host_ifindex: int, pod_ips: Iterable[str]) -> PodCaptureState: ...

    def detach_pod(self, host_ifindex: int, pod_ips: Iterable[str] = ()) -> None: ...

    def attached(self) -> list[PodCaptureState]: ...


class DatapathCapture:
    """Capture backend over a PodDatapath (see docs/datapath.md)."""

    name = "datapath"
    missing = "capture missing on {veth}"
    unmapped = "addresses {ips} are not captured"

    def __init__(self, datapath: PodDatapath) -> None:
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

    def detach_capture(self, capture: PodCaptureState) -> None:
        """A capture no pod of ours owns (e.g. on a veth now another pod's)."""
        self.datapath.detach_pod(capture.host_ifindex, [str(ip) for ip in capture.pod_ips])

    def verify(self, workload: Workload) -> str | None:
        found = {c.host_ifindex: c for c in self.datapath.attached()}.get(workload.host_veth_ifindex)
        if found is None or not found.complete:
            return self.missing.format(veth=workload.host_veth)
        missing = set(workload.addresses) - {str(ip) for ip in found.pod_ips} - _ipv6(workload)
        if missing:
            return self.unmapped.format(ips=sorted(missing))
        return None

    def reconcile(self, workloads: list[Workload]) -> list[PodCaptureState]:
        """After a restart: make sure every live record is fully captured
        (re-adopting what the kernel kept) and remove the captures of pods
        that are gone (deleted while the agent was down). A capture whose
        veth still exists but that no record owns is kept: records are a
        cache, and a live pod is never detached because its record was lost.
        Returns those captures, for the caller to rebuild their records."""
        owned = {w.host_veth_ifindex for w in workloads}
        orphans = []
        for capture in self.datapath.attached():
            if capture.host_ifindex in owned:
                continue
            if host_link_index_exists(capture.host_ifindex):
                orphans.append(capture)
                continue
            log.info("removing the capture of a pod that is gone", backend=self.name,
                     host_ifindex=capture.host_ifindex, pod_ips=[str(ip) for ip in capture.pod_ips])
            self.detach_capture(capture)
        for workload in workloads:
            self.datapath.attach_pod(workload.host_veth_ifindex, workload.addresses)
        return orphans


class EbpfCapture(DatapathCapture):
    """tc programs on the pod's host veth plus its addresses in local_pods."""

    name = "ebpf"
    missing = "capture programs missing on {veth}"
    unmapped = "addresses {ips} are not in the capture map"


class NftablesCapture(DatapathCapture):
    """The pod's addresses in the node's and the proxy's nftables sets (and
    the bridge map for a bridge port)."""

    name = "nftables"
    missing = "nftables capture elements missing for {veth}"
    unmapped = "addresses {ips} are not in the nftables capture sets"

    datapath: NftDatapath

    # The veth's elements are keyed by its name: given here, so that a
    # release need not read it back from the kernel.
    def detach(self, workload: Workload) -> None:
        self.datapath.detach_pod(workload.host_veth_ifindex, workload.addresses, host_veth=workload.host_veth)

    def detach_capture(self, capture: PodCaptureState) -> None:
        host_veth = capture.host_veth if isinstance(capture, NftPodCapture) else None
        self.datapath.detach_pod(capture.host_ifindex, [str(ip) for ip in capture.pod_ips], host_veth=host_veth)


def make_datapath(mode: str, *, proxy_netns: str = constants.PROXY_NETNS, pin_dir: str = constants.BPFFS_ROOT,
                  node_netns: str | None = None) -> Datapath | NftDatapath:
    """The datapath of a --capture mode."""
    if mode == "ebpf":
        return Datapath(node_netns=node_netns, proxy_netns=proxy_netns, pin_dir=pin_dir)
    if mode == "nftables":
        return NftDatapath(node_netns=node_netns, proxy_netns=proxy_netns)
    raise ValueError(f"capture mode {mode!r} has no datapath (one of {', '.join(CAPTURE_BACKENDS)})")


def capture_backend(datapath: Datapath | NftDatapath) -> DatapathCapture:
    """The enrolment backend driving a datapath."""
    return NftablesCapture(datapath) if isinstance(datapath, NftDatapath) else EbpfCapture(datapath)


def uninstall_all(*, proxy_netns: str = constants.PROXY_NETNS, pin_dir: str = constants.BPFFS_ROOT,
                  node_netns: str | None = None) -> None:
    """Remove what either backend left (`ambit-agent --cleanup`): a node may
    have run one backend before the other, and each uninstall works from
    kernel state alone."""
    for mode in CAPTURE_BACKENDS:
        make_datapath(mode, proxy_netns=proxy_netns, pin_dir=pin_dir, node_netns=node_netns).uninstall()


def _ipv6(workload: Workload) -> set[str]:
    return {ip for ip in workload.addresses if ":" in ip}
