"""The proxy's network namespace and its link to the node.

The node proxy lives in its own namespace so that a mark and one routing
table can make it accept packets that are not addressed to it, without
touching the node's routing:

    node namespace                      proxy namespace
    ambit0 169.254.7.1/30  ══ veth ══  eth0 169.254.7.2/30, default via .1
                                        ip rule fwmark 0x100/0x100 lookup 100
                                        table 100: local 0.0.0.0/0 dev lo

"Node" is the namespace named by node_netns, or the caller's own namespace
when it is None: the agent may itself run inside a non-root namespace (the
lab runs every node as one), so the initial namespace is never assumed.
"""
from __future__ import annotations

import errno
import os
import socket

import structlog
from pyroute2 import IPRoute, netns as pyroute2_netns
from pyroute2.netlink.exceptions import NetlinkError

from ..netlink import iproute
from . import constants
from ..netns import create_netns, netns_path, read_sysctl, write_sysctl
from .programs import ProxyLink

log = structlog.get_logger(__name__)

RT_SCOPE_HOST = 254
RP_FILTER_LOOSE = 2


# rtnetlink handle in a namespace (None: the caller's), made without forking
# (see agent/netlink.py for why the agent must never fork).
open_rtnl = iproute


def _ignore_exists(exc: NetlinkError) -> None:
    if exc.code != errno.EEXIST:
        raise exc


class ProxyNamespace:
    """Creates (idempotently) and removes the proxy namespace and its link."""

    def __init__(
        self,
        name: str = constants.PROXY_NETNS,
        node_link: str = constants.NODE_LINK,
        *,
        proxy_link: str = constants.PROXY_LINK,
        node_netns: str | None = None,
        node_addr: str = constants.NODE_LINK_ADDR,
        proxy_addr: str = constants.PROXY_LINK_ADDR,
        prefixlen: int = constants.LINK_PREFIXLEN,
    ) -> None:
        self.name = name
        self.node_link = node_link
        self.proxy_link = proxy_link
        self.node_netns = node_netns
        self.node_addr = node_addr
        self.proxy_addr = proxy_addr
        self.prefixlen = prefixlen
        self._log = log.bind(proxy_netns=name, node_netns=node_netns or "<own>")

    @property
    def path(self) -> str:
        """Where sockets of the proxy are made (setns target)."""
        return netns_path(self.name)

    def exists(self) -> bool:
        return os.path.exists(self.path)

    # ------------------------------------------------------------------
    def ensure(self) -> ProxyLink:
        """Create whatever is missing; a second call changes nothing."""
        if not self.exists():
            create_netns(self.name)  # on a thread: pyroute2's netns.create forks the agent
            self._log.info("proxy_netns_created")
        with open_rtnl(self.node_netns) as node, open_rtnl(self.path) as proxy:
            node_index = self._ensure_veth(node, proxy)
            self._ensure_node_side(node, node_index)
            proxy_index = self._ensure_proxy_side(proxy)
            mac = proxy.get_links(proxy_index)[0].get("IFLA_ADDRESS")
        self._ensure_sysctls()
        return ProxyLink(node_ifindex=node_index, proxy_mac=mac)

    def _ensure_veth(self, node: IPRoute, proxy: IPRoute) -> int:
        found = node.link_lookup(ifname=self.node_link)
        if found and proxy.link_lookup(ifname=self.proxy_link):
            return found[0]
        if found:
            # Half a pair (the peer was lost with an older namespace):
            # rebuild it rather than guess.
            node.link("del", index=found[0])
            self._log.warning("proxy_link_rebuilt", link=self.node_link)
        node.link(
            "add",
            ifname=self.node_link,
            kind="veth",
            peer={"ifname": self.proxy_link, "net_ns_fd": self.path},
        )
        self._log.info("proxy_link_created", link=self.node_link, peer=self.proxy_link)
        return node.link_lookup(ifname=self.node_link)[0]

    def _ensure_node_side(self, node: IPRoute, index: int) -> None:
        try:
            node.addr("add", index=index, address=self.node_addr, prefixlen=self.prefixlen)
        except NetlinkError as exc:
            _ignore_exists(exc)
        node.link("set", index=index, state="up")

    def _ensure_proxy_side(self, proxy: IPRoute) -> int:
        lo = proxy.link_lookup(ifname="lo")[0]
        eth = proxy.link_lookup(ifname=self.proxy_link)[0]
        proxy.link("set", index=lo, state="up")
        try:
            proxy.addr("add", index=eth, address=self.proxy_addr, prefixlen=self.prefixlen)
        except NetlinkError as exc:
            _ignore_exists(exc)
        proxy.link("set", index=eth, state="up")
        # The proxy's own traffic (replies, upstream connections spoofing a
        # pod's address) leaves through the node, which routes it.
        proxy.route("replace", dst="0.0.0.0/0", gateway=self.node_addr, oif=eth)
        # Captured packets (marked by proxy_ingress) are delivered locally
        # whatever their destination (docs/datapath.md, "Marks, rules, tables").
        proxy.route(
            "replace",
            dst="0.0.0.0/0",
            type="local",
            table=constants.ROUTE_TABLE,
            oif=lo,
            scope=RT_SCOPE_HOST,
        )
        if not self._has_capture_rule(proxy):
            proxy.rule(
                "add",
                family=socket.AF_INET,
                table=constants.ROUTE_TABLE,
                priority=constants.RULE_PRIORITY,
                fwmark=constants.MARK_CAPTURED,
                fwmask=constants.MARK_CAPTURED,
            )
        return eth

    @staticmethod
    def _has_capture_rule(proxy: IPRoute) -> bool:
        return any(
            rule.get("FRA_TABLE") == constants.ROUTE_TABLE
            and rule.get("FRA_PRIORITY") == constants.RULE_PRIORITY
            and rule.get("FRA_FWMARK") == constants.MARK_CAPTURED
            and rule.get("FRA_FWMASK") == constants.MARK_CAPTURED
            for rule in proxy.get_rules(family=socket.AF_INET)
        )

    def _ensure_sysctls(self) -> None:
        """The address checks that would drop proxied packets.

        Node side: forward what the proxy sends; rp_filter off on ambit0,
        because the proxy sends with the pod's address as source (the kernel
        applies the larger of `all` and the device value, so a strict `all`
        is lowered to loose); accept_local on ambit0 for sources that are
        node addresses. Proxy side: no reverse-path check at all (captured
        packets come from anywhere through eth0)."""
        node, proxy = self.node_netns, self.path
        write_sysctl(node, "net/ipv4/ip_forward", 1)
        write_sysctl(node, f"net/ipv4/conf/{self.node_link}/rp_filter", 0)
        write_sysctl(node, f"net/ipv4/conf/{self.node_link}/accept_local", 1)
        if int(read_sysctl(node, "net/ipv4/conf/all/rp_filter")) == 1:
            write_sysctl(node, "net/ipv4/conf/all/rp_filter", RP_FILTER_LOOSE)
            self._log.info("node_rp_filter_loosened", value=RP_FILTER_LOOSE)
        for dev in ("all", "default", self.proxy_link):
            write_sysctl(proxy, f"net/ipv4/conf/{dev}/rp_filter", 0)

    # ------------------------------------------------------------------
    def link(self) -> ProxyLink | None:
        """The link as the kernel has it now, or None if incomplete."""
        if not self.exists():
            return None
        with open_rtnl(self.node_netns) as node, open_rtnl(self.path) as proxy:
            node_index = node.link_lookup(ifname=self.node_link)
            proxy_index = proxy.link_lookup(ifname=self.proxy_link)
            if not node_index or not proxy_index:
                return None
            mac = proxy.get_links(proxy_index[0])[0].get("IFLA_ADDRESS")
        return ProxyLink(node_ifindex=node_index[0], proxy_mac=mac)

    @property
    def node_ifindex(self) -> int:
        """ambit0's index as the node sees it (what the bypass check needs)."""
        link = self.link()
        if link is None:
            raise LookupError(f"proxy link {self.node_link} is missing")
        return link.node_ifindex

    @property
    def proxy_mac(self) -> str:
        link = self.link()
        if link is None:
            raise LookupError(f"proxy link {self.proxy_link} in {self.name} is missing")
        return link.proxy_mac

    def remove(self) -> None:
        """Remove the link and the namespace (with its rules, routes and
        sysctls). Node-wide sysctls (ip_forward, all.rp_filter) stay: other
        networking on the node relies on them too and their earlier values
        are unknown after a restart."""
        with open_rtnl(self.node_netns) as node:
            for index in node.link_lookup(ifname=self.node_link):
                node.link("del", index=index)
                self._log.info("proxy_link_removed", link=self.node_link)
        if self.exists():
            pyroute2_netns.remove(self.name)
            self._log.info("proxy_netns_removed")
