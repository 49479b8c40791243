"""nftables capture of enrolled pods into the proxy namespace: the Netfilter
counterpart of capture.Datapath, with the same interface, marks, table 100
and listeners (docs/datapath.md, "The nftables backend").

Per node (install): the proxy namespace and ambit0 (proxyns); in the node
namespace the `bridge ambit` and `ip ambit` tables and the policy route
(`fwmark 0x100/0x100 lookup 100`, table 100: default via the proxy); in the
proxy namespace the `ip ambit` table whose tproxy rules hand SYNs to
15001/15006/15008. Per pod (attach_pod): its addresses in the node's `pods`
set and the proxy's `local_pods` set, and, for a bridge port, in the
bridge's `pod_l3mac` and `port_l3mac` maps with its host veth's MAC.

Everything is read back from the kernel (attached): element comments name
the owning veth. Calls are synchronous (worker threads) and serialised.
"""
from __future__ import annotations

import errno
import ipaddress
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import structlog
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ..rtnl_query import RtnlQuery
from . import constants
from . import nft_ruleset as rs
from .capture import PodLinkMissing
from .nft_session import NftError, NftSession
from .programs import ProxyLink
from .proxyns import ProxyNamespace, open_rtnl

log = structlog.get_logger(__name__)

IPv4 = ipaddress.IPv4Address
IPv6 = ipaddress.IPv6Address


@dataclass(frozen=True)
class NftPodCapture:
    """A pod's capture as the kernel holds it, from the element comments."""

    host_ifindex: int
    host_veth: str
    pod_ips: tuple[IPv4, ...]
    steered: bool        # every address in the node's `pods` set (marked, routed to ambit0)
    directed: bool       # every address in the proxy's `local_pods` (its SYNs go to 15001)
    bridge: str | None   # the bridge its veth is a port of, None when routed
    lifted: bool         # every address in both bridge maps (only needed when bridge is set)
    bound: bool = True   # every address bound to the veth (the node's `pod_sources`)

    @property
    def complete(self) -> bool:
        return (bool(self.pod_ips) and self.steered and self.directed and self.bound
                and (self.lifted or not self.bridge))


def ipv4_addresses(pod_ips: Iterable[str | ipaddress.IPv4Address | ipaddress.IPv6Address]) -> tuple[IPv4, ...]:
    """The IPv4 addresses among pod_ips (IPv6 is not captured)."""
    addrs = (ipaddress.ip_address(str(ip)) for ip in pod_ips)
    return tuple(sorted({a for a in addrs if isinstance(a, IPv4)}))


def ipv6_addresses(pod_ips: Iterable[str | ipaddress.IPv4Address | ipaddress.IPv6Address]) -> tuple[IPv6, ...]:
    """The IPv6 addresses among pod_ips (their TCP is dropped)."""
    addrs = (ipaddress.ip_address(str(ip)) for ip in pod_ips)
    return tuple(sorted({a for a in addrs if isinstance(a, IPv6)}))


@dataclass(frozen=True)
class HostVeth:
    ifindex: int
    name: str
    mac: str
    bridge: str | None


def read_host_veth(rtnl: RtnlQuery, ifindex: int) -> HostVeth:
    """The veth and its bridge, read on a plain rtnetlink socket: an IPRoute
    made for these one or two reads cost ~0.9 ms of CPU per pod enrol."""
    try:
        link = rtnl.link(index=ifindex)
    except NetlinkError as exc:
        if exc.code in (errno.ENODEV, errno.EINVAL, errno.ENOENT):
            raise PodLinkMissing(f"no link with index {ifindex}") from None
        raise
    bridge = None
    if link.get(("IFLA_LINKINFO", "IFLA_INFO_SLAVE_KIND")) == "bridge" and link.get("IFLA_MASTER"):
        bridge = rtnl.link(index=link.get("IFLA_MASTER")).get("IFLA_IFNAME")
    return HostVeth(ifindex, link.get("IFLA_IFNAME"), link.get("IFLA_ADDRESS"), bridge)


class NftDatapath:
    """The nftables capture backend of one node."""

    backend = "nftables"

    def __init__(
        self,
        *,
        node_netns: str | None = None,
        proxy_netns: str = constants.PROXY_NETNS,
        node_link: str = constants.NODE_LINK,
    ) -> None:
        """node_netns: the node's namespace (name or path); None is the
        caller's own (a deployed agent). The lab and tests pass it."""
        self.node_netns = node_netns
        self.proxy_ns = ProxyNamespace(proxy_netns, node_link, node_netns=node_netns)
        self._node: NftSession | None = None
        self._proxy: NftSession | None = None
        self._lock = threading.Lock()
        self._log = log.bind(node_netns=node_netns or "<own>", proxy_netns=proxy_netns)

    # sessions -------------------------------------------------------------
    def _node_session(self) -> NftSession:
        if self._node is None:
            self._node = NftSession(self.node_netns, element_types=rs.element_types())
        return self._node

    def _proxy_session(self) -> NftSession:
        if self._proxy is None:
            self._proxy = NftSession(self.proxy_ns.path, element_types=rs.element_types())
        return self._proxy

    def _drop_sessions(self) -> None:
        for session in (self._node, self._proxy):
            if session is not None:
                session.close()
        self._node = self._proxy = None

    # node -------------------------------------------------------------------
    def install(self) -> ProxyLink:
        """Proxy namespace, node route to it, both rule sets. Idempotent; a
        restarted agent replaces the rules in place (one transaction per
        namespace) and keeps the elements, i.e. the enrolled pods."""
        with self._lock:
            link = self.proxy_ns.ensure()
            # A rebuilt namespace is a new namespace: contexts are per namespace.
            self._drop_sessions()
            with open_rtnl(self.node_netns) as node:
                self._ensure_node_route(node, link.node_ifindex)
            with open_rtnl(self.proxy_ns.path) as proxy:
                proxy_eth = proxy.link_lookup(ifname=self.proxy_ns.proxy_link)[0]
            self._node_session().run(rs.node_rules(link.node_ifindex))
            self._proxy_session().run(rs.proxy_rules(proxy_eth))
            adopted = len(self._read_node_set())
        self._log.info("nft_datapath_installed", node_ifindex=link.node_ifindex, adopted_addresses=adopted)
        return link

    def _ensure_node_route(self, node: IPRoute, node_ifindex: int) -> None:
        """Marked packets leave through ambit0 towards the proxy's address."""
        node.route("replace", dst="0.0.0.0/0", gateway=self.proxy_ns.proxy_addr, oif=node_ifindex,
                   table=constants.ROUTE_TABLE)
        if not _has_steering_rule(node):
            node.rule("add", family=socket.AF_INET, table=constants.ROUTE_TABLE,
                      priority=constants.RULE_PRIORITY, fwmark=constants.MARK_CAPTURED,
                      fwmask=constants.MARK_CAPTURED)

    def close(self) -> None:
        """Release this process's handles (agent stop): the rules stay, so
        enrolled pods fail closed until an agent is back."""
        with self._lock:
            self._drop_sessions()

    def uninstall(self) -> None:
        """Remove everything: both node tables (with every element), the node
        rule and route, the proxy namespace and link. Works from kernel state
        alone, also without install() in this process."""
        with self._lock:
            self._drop_sessions()
            with NftSession(self.node_netns) as node:
                node.run(rs.remove_tables(rs.NODE_FAMILIES))
            with open_rtnl(self.node_netns) as ipr:
                _remove_node_route(ipr)
            if self.proxy_ns.exists():
                with NftSession(self.proxy_ns.path) as proxy:
                    proxy.run(rs.remove_tables(("ip",)))
            self.proxy_ns.remove()
        self._log.info("nft_datapath_uninstalled")

    # pods -------------------------------------------------------------------
    def attach_pod(self, host_ifindex: int, pod_ips: Iterable[str | IPv4]) -> NftPodCapture:
        """Capture one pod (idempotent): proxy set first, so the pod's first
        SYN is already seen as outbound when the node starts steering it."""
        pod_ips = list(pod_ips)
        ips, ips6 = ipv4_addresses(pod_ips), ipv6_addresses(pod_ips)
        with self._lock:
            with RtnlQuery(self.node_netns) as rtnl:
                veth = read_host_veth(rtnl, host_ifindex)
            entries = [rs.PodEntry(ip, veth.ifindex, veth.name, veth.mac, veth.bridge) for ip in ips]
            owner = rs.Owner(veth.ifindex, veth.name, veth.bridge)
            # One transaction per namespace, first in the usual case (none of
            # it there yet: one `create` per set), else in the form that
            # replaces what a previous owner (or this pod, again) left.
            _run_expected(self._proxy_session(), rs.set_replace("ip", rs.PROXY_POD_SET, entries, fresh=True),
                          lambda proxy: proxy.run(rs.set_replace("ip", rs.PROXY_POD_SET, entries)), errno.EEXIST)
            # Bound and steered in one transaction: no moment in which the
            # pod's address is steered but not yet bound to its veth.
            fresh = (rs.map_add(entries, fresh=True) + rs.set_replace("ip", rs.NODE_POD_SET, entries, fresh=True)
                     + rs.bind(owner, list(ips), list(ips6), fresh=True))
            _run_expected(self._node_session(), fresh, lambda node: self._steer(node, entries, owner, ips6),
                          errno.EEXIST)
        self._log.info("pod_attached", host_ifindex=host_ifindex, host_veth=veth.name, bridge=veth.bridge,
                       pod_ips=[str(i) for i in ips])
        return NftPodCapture(host_ifindex, veth.name, ips, steered=True, directed=True, bridge=veth.bridge,
                             lifted=bool(veth.bridge), bound=True)

    def detach_pod(self, host_ifindex: int, pod_ips: Iterable[str | IPv4] = (), host_veth: str | None = None) -> None:
        """Stop capturing one pod: its addresses leave every set (node first,
        so nothing is steered to the proxy as inbound-only meanwhile). With
        no addresses given, those whose comments name this veth. host_veth:
        the veth's name, which keys its elements (else read from their
        comments). A veth that is already gone is not an error. One owner
        per address is the enrolment's guarantee (it releases a stale owner
        before capturing a new one), so the addresses given are removed
        whoever holds them."""
        pod_ips = list(pod_ips)
        ips, ips6 = list(ipv4_addresses(pod_ips)), list(ipv6_addresses(pod_ips))
        with self._lock:
            if not ips:
                ips = sorted(ip for ip, owner in self._read_node_set().items()
                             if owner is not None and owner.host_ifindex == host_ifindex)
                ips += sorted(ip for ip, owner in self._read_proxy_set().items()
                              if owner is not None and owner.host_ifindex == host_ifindex and ip not in ips)
            if not pod_ips:
                ips6 = sorted(ip for ip, owner in self._read_ipv6_set().items()
                              if owner is not None and owner.host_ifindex == host_ifindex)
            veth = host_veth or self._veth_name(host_ifindex)
            node = self._node_session()
            unsteer = rs.set_remove("ip", rs.NODE_POD_SET, ips) + rs.unbind(veth, ips, ips6)
            if not ips:
                node.run(unsteer)  # nothing steered: the veth and its IPv6 only
                return
            # The usual case first: a bridged pod with all of it there, one
            # `delete` per set; else the form that cannot fail on absence.
            present = (rs.map_remove(ips, veth) + rs.set_remove("ip", rs.NODE_POD_SET, ips, present=True)
                       + rs.unbind(veth, ips, ips6, present=True))
            _run_expected(node, present, lambda node: self._unsteer(node, ips, veth, unsteer), errno.ENOENT)
            _run_expected(self._proxy_session(), rs.set_remove("ip", rs.PROXY_POD_SET, ips, present=True),
                          lambda proxy: proxy.run(rs.set_remove("ip", rs.PROXY_POD_SET, ips)), errno.ENOENT)
        self._log.info("pod_detached", host_ifindex=host_ifindex, pod_ips=[str(i) for i in ips])

    def attached(self) -> list[NftPodCapture]:
        """Every pod capture in the kernel, grouped by the veth the element
        comments name (either half may be missing after a crash; reconcile
        repairs or removes it)."""
        with self._lock:
            steered = self._read_node_set()
            lifted = self._read_bridge_map()
            directed = self._read_proxy_set()
            bound = self._read_bound()
        owners: dict[int, tuple[str, str | None]] = {}
        addresses: dict[int, set[IPv4]] = {}
        for table in (steered, lifted, directed):
            for ip, owner in table.items():
                if owner is not None:
                    owners.setdefault(owner.host_ifindex, (owner.host_veth, owner.bridge))
                    addresses.setdefault(owner.host_ifindex, set()).add(ip)
        found = []
        for index in sorted(owners):
            ips = tuple(sorted(addresses[index]))
            veth, bridge = owners[index]
            found.append(NftPodCapture(
                host_ifindex=index, host_veth=veth, pod_ips=ips,
                steered=all(_owned(steered, ip, index) for ip in ips),
                directed=all(_owned(directed, ip, index) for ip in ips),
                bridge=bridge, lifted=all(_owned(lifted, ip, index) for ip in ips),
                bound=all((index, ip) in bound for ip in ips)))
        return found

    def _steer(self, node: NftSession, entries: list[rs.PodEntry], owner: rs.Owner, ips6: Iterable[IPv6]) -> None:
        """Steer and bind a pod whatever a previous owner left (see attach_pod)."""
        ips = [e.ip for e in entries]
        lift = rs.map_add(entries)
        steer = rs.set_replace("ip", rs.NODE_POD_SET, entries) + rs.bind(owner, ips, list(ips6))
        try:
            node.run(lift + steer)
        except NftError as exc:
            if exc.errno != errno.EEXIST or not lift:
                raise
            # An address (or this veth's pair) still mapped to a previous owner's MAC.
            self._unmap(node, ips, owner.host_veth)
            node.run(lift + steer)

    def _unsteer(self, node: NftSession, ips: list[IPv4], veth: str | None, unsteer: list[rs.Command]) -> None:
        """Remove a pod's node elements, whichever are still there."""
        try:
            node.run(rs.map_remove(ips, veth) + unsteer)
        except NftError as exc:
            if exc.errno != errno.ENOENT:
                raise
            # Not (all) in the bridge maps: a routed pod, or removed before.
            node.run(unsteer)
            self._unmap(node, ips, veth)

    @staticmethod
    def _unmap(node: NftSession, ips: Iterable[IPv4], veth: str | None) -> None:
        """Remove bridge map elements (by address, and by pair when the veth
        is named) one by one, skipping absent ones."""
        for ip in ips:
            for command in rs.map_remove([ip], veth):
                try:
                    node.run([command])
                except NftError as exc:
                    if exc.errno != errno.ENOENT:
                        raise

    def _read_node_set(self) -> dict[IPv4, rs.Owner | None]:
        return rs.elements(self._node_session().read([rs.list_set("ip", rs.NODE_POD_SET)]))

    def _read_bridge_map(self) -> dict[IPv4, rs.Owner | None]:
        """Addresses lifted both ways: in `pod_l3mac`, and in `port_l3mac`
        paired with the veth that owns them there."""
        node = self._node_session()
        by_address = rs.elements(node.read([rs.list_set("bridge", rs.BRIDGE_POD_MAP, "map")]), "map")
        pairs = {(owner.host_ifindex, ip) for ip, owner in rs.bound_pairs(
            node.read([rs.list_set("bridge", rs.PORT_LIFT_MAP, "map")]), "map") if owner is not None}
        return {ip: owner for ip, owner in by_address.items()
                if owner is None or (owner.host_ifindex, ip) in pairs}

    def _read_proxy_set(self) -> dict[IPv4, rs.Owner | None]:
        return rs.elements(self._proxy_session().read([rs.list_set("ip", rs.PROXY_POD_SET)]))

    def _veth_name(self, host_ifindex: int) -> str | None:
        """The name a veth's elements are keyed by, from their comments
        (every enrolled veth has one in the ip table's `pod_links`)."""
        listing = self._node_session().read([rs.list_set("ip", rs.LINK_SET)])
        return next((owner.host_veth for owner in rs.veth_elements(listing).values()
                     if owner is not None and owner.host_ifindex == host_ifindex), None)

    def _read_ipv6_set(self) -> dict[IPv6, rs.Owner | None]:
        return rs.elements(self._node_session().read([rs.list_set("ip6", rs.POD6_SET)]))

    def _read_bound(self) -> set[tuple[int, IPv4]]:
        """(veth ifindex, address) pairs of the node's `pod_sources`, the
        veth as its element's comment names it."""
        listing = self._node_session().read([rs.list_set("ip", rs.SOURCE_SET)])
        return {(owner.host_ifindex, ip) for ip, owner in rs.bound_pairs(listing) if owner is not None}

    # observability --------------------------------------------------------
    def verdict_counts(self) -> dict[str, int]:
        """Packets per named counter, node and proxy namespace together."""
        with self._lock:
            counts: dict[str, int] = {}
            tables = [(self._node_session(), family) for family in rs.NODE_FAMILIES] + [(self._proxy_session(), "ip")]
            for session, family in tables:
                listing = session.read([{"list": {"counters": {"family": family, "table": rs.TABLE}}}])
                for name, packets in rs.counter_values(listing).items():
                    counts[name] = counts.get(name, 0) + packets  # one verdict taken in two tables
        return counts


def _run_expected(session: NftSession, expected: list[rs.Command], otherwise: Callable[[NftSession], None],
                  fails_with: int) -> None:
    """Apply `expected` (the usual case, as few commands as it takes); if
    the kernel refuses it with `fails_with` (nothing applied: one
    transaction), do `otherwise`."""
    try:
        session.run(expected)
    except NftError as exc:
        if exc.errno != fails_with:
            raise
        otherwise(session)


def _owned(table: dict[IPv4, rs.Owner | None], ip: IPv4, index: int) -> bool:
    owner = table.get(ip)
    return owner is not None and owner.host_ifindex == index


def _steering_rules(ipr: IPRoute) -> list:
    return [r for r in ipr.get_rules(family=socket.AF_INET)
            if r.get("FRA_TABLE") == constants.ROUTE_TABLE
            and r.get("FRA_PRIORITY") == constants.RULE_PRIORITY
            and r.get("FRA_FWMARK") == constants.MARK_CAPTURED
            and r.get("FRA_FWMASK") == constants.MARK_CAPTURED]


def _has_steering_rule(ipr: IPRoute) -> bool:
    return bool(_steering_rules(ipr))


def _remove_node_route(ipr: IPRoute) -> None:
    for _ in _steering_rules(ipr):
        ipr.rule("del", family=socket.AF_INET, table=constants.ROUTE_TABLE, priority=constants.RULE_PRIORITY,
                 fwmark=constants.MARK_CAPTURED, fwmask=constants.MARK_CAPTURED)
    defaults = [r for r in ipr.get_routes(family=socket.AF_INET, table=constants.ROUTE_TABLE)
                if r.get("RTA_TABLE") == constants.ROUTE_TABLE and r["dst_len"] == 0]
    if defaults:  # gone already if ambit0 was removed first
        ipr.route("del", dst="0.0.0.0/0", table=constants.ROUTE_TABLE)
