"""Find a pod's host-side veth from the kernel.

The host end of the pod's interface is the container interface's veth peer,
read from netlink on both sides. prevResult's `interfaces` list is not used:
primaries order it differently (bridge lists the bridge too, ptp only the
two ends), and a wrong guess would put capture programs on someone else's
link.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from pyroute2.netlink.exceptions import NetlinkError

from ..rtnl_query import RtnlQuery


class PodLinkError(Exception):
    """The pod's interface cannot be captured; `reason` is machine-readable."""

    NETNS_MISSING = "netns-missing"
    NO_INTERFACE = "no-interface"
    NOT_VETH = "not-veth"
    PEER_MISSING = "peer-missing"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class PodLink:
    container_ifname: str
    container_ifindex: int
    container_mac: str
    host_ifname: str
    host_ifindex: int
    host_mac: str
    # Addresses configured on the container interface, CIDR form.
    addresses: tuple[str, ...]


def _kind(link) -> str | None:
    return link.get(("IFLA_LINKINFO", "IFLA_INFO_KIND"))


def inspect_pod_link(netns: str, ifname: str) -> PodLink:
    """Read the pod interface and its host-side peer; the caller's network
    namespace is "the host" (the agent runs in the node's namespace)."""
    if not netns or not os.path.exists(netns):
        raise PodLinkError(PodLinkError.NETNS_MISSING, f"network namespace {netns or '(empty)'} does not exist")
    try:
        with RtnlQuery(netns) as pod:
            try:
                link = pod.link(ifname=ifname)
            except NetlinkError as exc:
                if exc.code != errno.ENODEV:
                    raise
                raise PodLinkError(PodLinkError.NO_INTERFACE, f"no interface {ifname} in {netns}") from None
            addresses = tuple(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}"
                              for a in pod.addresses(link["index"]))
    except FileNotFoundError:
        raise PodLinkError(PodLinkError.NETNS_MISSING, f"network namespace {netns} disappeared") from None
    kind = _kind(link)
    if kind != "veth":
        raise PodLinkError(PodLinkError.NOT_VETH,
                           f"{ifname} in {netns} is a {kind or 'device of unknown kind'}, not a veth: "
                           "ambit captures traffic on the host side of a veth pair")
    peer_index = link.get("IFLA_LINK")
    if not peer_index:
        raise PodLinkError(PodLinkError.PEER_MISSING, f"{ifname} in {netns} reports no veth peer")

    with RtnlQuery() as host:
        try:
            peer = host.link(index=peer_index)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                raise PodLinkError(PodLinkError.PEER_MISSING,
                                   f"the veth peer of {ifname} (index {peer_index}) is not in this "
                                   "namespace: is the agent running in the node's network namespace?") from None
            raise
        # Indexes are per namespace: make sure this link really is the other
        # end (same kind, pointing back at the container interface, and in
        # the pod's namespace as this namespace numbers it).
        if _kind(peer) != "veth" or peer.get("IFLA_LINK") != link["index"]:
            raise PodLinkError(PodLinkError.PEER_MISSING,
                               f"link {peer_index} here is not the veth peer of {ifname} in {netns}")
        peer_nsid = peer.get("IFLA_LINK_NETNSID")
        if peer_nsid is not None:
            fd = os.open(netns, os.O_RDONLY)
            try:
                pod_nsid = host.netnsid(fd)
            finally:
                os.close(fd)
            if pod_nsid is not None and pod_nsid != peer_nsid:
                raise PodLinkError(PodLinkError.PEER_MISSING,
                                   f"link {peer_index} here is a veth into another namespace, not {netns}")
    return PodLink(
        container_ifname=ifname, container_ifindex=link["index"], container_mac=link.get("IFLA_ADDRESS", ""),
        host_ifname=peer.get("IFLA_IFNAME"), host_ifindex=peer["index"], host_mac=peer.get("IFLA_ADDRESS", ""),
        addresses=addresses)


def host_link_exists(ifindex: int, ifname: str) -> bool:
    """True when the host veth recorded at enrolment still exists (same
    index and name: indexes are reused after a pod is deleted)."""
    with RtnlQuery() as host:
        try:
            link = host.link(index=ifindex)
        except NetlinkError:
            return False
        return link.get("IFLA_IFNAME") == ifname


def host_link_index_exists(ifindex: int) -> bool:
    """A link with this index exists in the caller's namespace (a capture
    read back from the kernel knows its veth by index only)."""
    with RtnlQuery() as host:
        try:
            host.link(index=ifindex)
        except NetlinkError:
            return False
        return True
