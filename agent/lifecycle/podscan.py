"""This node's pods as the kernel sees them, without any record or CNI call:
which network namespace holds an address, and through which veth it
reaches the node (docs/lifecycle.md, "Pods already running").

A pod of this node is a network namespace with a veth whose peer is in the
node's namespace (the agent's). The node's veths name their peer's
namespace by id (IFLA_LINK_NETNSID); the namespaces themselves are found as
files: the runtimes' /var/run/netns/* and every process's /proc/<pid>/ns/net
(for runtimes that do not bind-mount them). Only namespaces this node has a
veth into are looked into, so the cost follows this node's pods.

Every match is checked both ways before it is believed: the pod's interface
is a veth whose peer is the host veth found here (podlink.inspect_pod_link),
and the node's route to the address leaves through that veth (directly, or
through the bridge it is a port of).
"""
from __future__ import annotations

import errno
import ipaddress
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import structlog
from pyroute2.netlink.exceptions import NetlinkError

from ..datapath.podlink import PodLink, PodLinkError, inspect_pod_link
from ..netlink import iproute
from ..netns import NETNS_RUN_DIR
from ..rtnl_query import RtnlQuery

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class KernelPod:
    """One pod interface of this node, found and checked in the kernel."""

    netns: str  # a path to the pod's network namespace
    link: PodLink

    @property
    def addresses(self) -> tuple[str, ...]:
        """Bare IPs on the pod's interface, link-local ones left out."""
        return tuple(a.split("/")[0] for a in self.pod_ips())

    def pod_ips(self, only: Iterable[str] | None = None) -> tuple[str, ...]:
        """The interface's addresses in CIDR form that are the pod's: not
        link-local, and among `only` (bare IPs, e.g. discovery's) if given."""
        wanted = None if only is None else {str(ipaddress.ip_address(a)) for a in only}
        out = []
        for cidr in self.link.addresses:
            address = ipaddress.ip_interface(cidr).ip
            if address.is_link_local or (wanted is not None and str(address) not in wanted):
                continue
            out.append(cidr)
        return tuple(out)


class PodScanError(Exception):
    """An address that looks like a pod's but does not check out (the reason says why)."""


def _namespace_files() -> Iterator[str]:
    """Candidate network namespace files: named ones first (stable paths), then processes'."""
    try:
        for name in sorted(os.listdir(NETNS_RUN_DIR)):
            yield os.path.join(NETNS_RUN_DIR, name)
    except FileNotFoundError:
        pass
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            yield f"/proc/{entry}/ns/net"


def _peer_namespaces(host: RtnlQuery) -> dict[int, str]:
    """The namespaces this node has a veth into, by the id the node gives
    them, each as a file path (the first found: a named one if there is)."""
    wanted = {link.get("IFLA_LINK_NETNSID") for link in host.links()
              if link.get(("IFLA_LINKINFO", "IFLA_INFO_KIND")) == "veth"} - {None}
    own = os.stat("/proc/self/ns/net")
    found: dict[int, str] = {}
    seen: set[tuple[int, int]] = {(own.st_dev, own.st_ino)}
    for path in _namespace_files():
        if len(found) == len(wanted):
            break
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue  # a process that exited, a namespace being removed
        try:
            nsid = host.netnsid(fd)
        except NetlinkError:
            continue
        finally:
            os.close(fd)
        if nsid in wanted and nsid not in found:
            found[nsid] = path
    return found


def _pod_interfaces(netns: str) -> dict[str, str]:
    """Address -> interface name inside one namespace (loopback left out)."""
    with RtnlQuery(netns) as pod:
        names = {link["index"]: link.get("IFLA_IFNAME") for link in pod.links()}
        return {a.get("IFA_ADDRESS"): names.get(a["index"], "") for a in pod.all_addresses()
                if a.get("IFA_ADDRESS") and names.get(a["index"]) != "lo"}


def _route_leaves_through(address: str, link: PodLink) -> bool:
    """The node's route to `address` goes out the pod's host veth, or the
    bridge that veth is a port of."""
    with iproute() as ipr:
        try:
            route = ipr.route("get", dst=address)[0]
        except NetlinkError:
            return False
        oif = route.get("RTA_OIF")
        if oif == link.host_ifindex:
            return True
        host = ipr.link("get", index=link.host_ifindex)[0]
        return oif is not None and host.get("IFLA_MASTER") == oif


def find_pods(addresses: Iterable[str]) -> dict[str, KernelPod]:
    """For each of `addresses` held by a pod of this node, that pod's
    namespace and veth, checked. Addresses not found are left out;
    a match that fails its check is logged and left out."""
    wanted = {str(ipaddress.ip_address(a)) for a in addresses}
    if not wanted:
        return {}
    found: dict[str, KernelPod] = {}
    with RtnlQuery() as host:
        namespaces = _peer_namespaces(host)
    for netns in namespaces.values():
        try:
            interfaces = _pod_interfaces(netns)
        except (OSError, NetlinkError):
            continue  # gone meanwhile
        for address in wanted & set(interfaces):
            try:
                found[address] = check_pod(netns, interfaces[address], address)
            except PodScanError as exc:
                log.warning("address found in a namespace that does not check out", address=address,
                            netns=netns, error=str(exc))
        if len(found) == len(wanted):
            break
    return found


def find_by_host_veth(host_ifindexes: Iterable[int]) -> dict[int, KernelPod]:
    """The pod behind each of these host veths (those that still exist)."""
    wanted = set(host_ifindexes)
    found: dict[int, KernelPod] = {}
    if not wanted:
        return found
    with RtnlQuery() as host:
        peers: dict[int, tuple[int | None, int]] = {}
        for index in wanted:
            try:
                link = host.link(index=index)
            except NetlinkError as exc:
                if exc.code == errno.ENODEV:
                    continue
                raise
            peers[index] = (link.get("IFLA_LINK_NETNSID"), link.get("IFLA_LINK") or 0)
        namespaces = _peer_namespaces(host)
    for index, (nsid, peer_index) in peers.items():
        netns = namespaces.get(nsid) if nsid is not None else None
        if netns is None:
            continue
        try:
            with RtnlQuery(netns) as pod:
                ifname = pod.link(index=peer_index).get("IFLA_IFNAME")
            link = inspect_pod_link(netns, ifname)
        except (OSError, NetlinkError, PodLinkError) as exc:
            log.warning("cannot read the pod behind a host veth", host_ifindex=index, netns=netns, error=str(exc))
            continue
        if link.host_ifindex == index:
            found[index] = KernelPod(netns, link)
    return found


def check_pod(netns: str, ifname: str, address: str) -> KernelPod:
    """The pod interface `ifname` in `netns` holding `address`, checked both ways."""
    try:
        link = inspect_pod_link(netns, ifname)
    except PodLinkError as exc:
        raise PodScanError(str(exc)) from None
    if address not in {a.split("/")[0] for a in link.addresses}:
        raise PodScanError(f"{address} is not on {ifname} in {netns}")
    if not _route_leaves_through(address, link):
        raise PodScanError(f"the node's route to {address} does not go out {link.host_ifname}: "
                           "it is not this veth's pod")
    return KernelPod(netns, link)
