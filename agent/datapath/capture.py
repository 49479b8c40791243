"""eBPF capture of enrolled pods into the proxy namespace: the facade the
agent's enrolment uses.

Per node (install): the proxy namespace and ambit0 (proxyns), the programs
and pinned maps (programs), proxy_ingress on the proxy's eth0.
Per pod (attach_pod): capture_outbound on its host veth's tc ingress,
capture_inbound on its tc egress, its addresses in local_pods.

Everything is read back from the kernel (attached) so a restarted agent can
reconcile: filters are recognised by name, pods by the local_pods map.
Every call is synchronous and meant for a worker thread; calls are
serialised by a lock because they read-modify-write tc state.
"""
from __future__ import annotations

import errno
import ipaddress
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ..rtnl_query import RtnlQuery
from . import constants
from .programs import BPF_SOURCE_DIR, Programs, ProxyLink, TcProgram, remove_pins
from .proxyns import ProxyNamespace, open_rtnl

log = structlog.get_logger(__name__)

TC_INGRESS = 0xFFFFFFF2  # clsact "ffff:fff2"
TC_EGRESS = 0xFFFFFFF3   # clsact "ffff:fff3"
# One fixed slot per hook, so a re-attach replaces our filter in place and
# never stacks a second one; chosen away from tc's auto-assigned 0xc000.
FILTER_PRIORITY = 0x0A0B
FILTER_HANDLE = 1
FILTER_OUTBOUND = "ambit_capture_out"   # pod veth, tc ingress: what the pod sends
FILTER_INBOUND = "ambit_capture_in"     # pod veth, tc egress: what enters the pod
FILTER_PROXY = "ambit_proxy_ingress"    # proxy eth0, tc ingress
POD_FILTERS = {FILTER_OUTBOUND: TC_INGRESS, FILTER_INBOUND: TC_EGRESS}

IPv4 = ipaddress.IPv4Address


class PodLinkMissing(LookupError):
    """The pod's host veth does not exist (the pod is already gone)."""


@dataclass(frozen=True)
class TcFilter:
    """One of our filters as the kernel lists it (what deleting it needs)."""

    name: str
    parent: int
    handle: int
    info: int


@dataclass(frozen=True)
class PodCapture:
    """A pod's capture as the kernel holds it."""

    host_ifindex: int
    pod_ips: tuple[IPv4, ...]
    outbound_filter: bool  # capture_outbound on the veth's tc ingress
    inbound_filter: bool   # capture_inbound on the veth's tc egress

    @property
    def complete(self) -> bool:
        return self.outbound_filter and self.inbound_filter and bool(self.pod_ips)


def ipv4_addresses(pod_ips: Iterable[str | ipaddress.IPv4Address | ipaddress.IPv6Address]) -> tuple[IPv4, ...]:
    """The IPv4 addresses among pod_ips (IPv6 is not captured)."""
    addrs = (ipaddress.ip_address(str(ip)) for ip in pod_ips)
    return tuple(sorted({a for a in addrs if isinstance(a, IPv4)}))


# tc helpers ----------------------------------------------------------------
def our_filters(ipr: IPRoute, ifindex: int, parent: int) -> list[TcFilter]:
    """ambit's filters on one hook, recognised by their name."""
    return _ours(ipr.get_filters(index=ifindex, parent=parent), parent)


def _ours(dump, parent: int) -> list[TcFilter]:
    found = []
    for msg in dump:
        options = msg.get_attr("TCA_OPTIONS")
        name = options.get_attr("TCA_BPF_NAME") if options is not None else None
        if msg.get_attr("TCA_KIND") == "bpf" and name and name.startswith("ambit_"):
            found.append(TcFilter(name=name, parent=parent, handle=msg["handle"], info=msg["info"]))
    return found


def _ensure_clsact(ipr: IPRoute, ifindex: int) -> None:
    # Add and tolerate EEXIST rather than look first: a qdisc dump lists
    # every device's qdiscs (the kernel does not filter by ifindex), which
    # made each enrol O(pods on the node): 40 ms at 10 pods, 370 at 500.
    try:
        ipr.tc("add", "clsact", ifindex)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise


def _remove_clsact(ipr: IPRoute, ifindex: int) -> None:
    try:
        ipr.tc("del", "clsact", ifindex)
    except NetlinkError as exc:
        if exc.code not in (errno.ENOENT, errno.EINVAL):  # none there
            raise


def ensure_filter(ipr: IPRoute, query: RtnlQuery, ifindex: int, parent: int, name: str, program: TcProgram,
                  *, clsact: bool = True) -> None:
    """Put program on the hook under name; replaces our previous one (a
    changed program set), never someone else's. `clsact=False`: the
    caller has just made sure the qdisc is there. One dump of the hook
    answers both questions (ours, and who holds our slot): each netlink
    round trip through pyroute2 costs ~0.4 ms of the agent's CPU per enrol,
    hence the dump on `query` (a plain socket in the same namespace)."""
    if clsact:
        _ensure_clsact(ipr, ifindex)
    dump = query.filters(ifindex, parent)
    ours = _ours(dump, parent)
    for existing in ours:
        if existing.name == name and existing.info >> 16 == FILTER_PRIORITY:
            continue
        ipr.tc("del-filter", "bpf", ifindex, existing.handle, parent=parent, info=existing.info)
    ours_at_slot = any(f.info >> 16 == FILTER_PRIORITY and f.handle == FILTER_HANDLE for f in ours)
    if not ours_at_slot and any(m["handle"] == FILTER_HANDLE and m["info"] >> 16 == FILTER_PRIORITY
                                for m in dump):
        raise RuntimeError(f"tc priority {FILTER_PRIORITY:#x} handle {FILTER_HANDLE} on link "
                           f"{ifindex} holds a filter that is not ambit's")
    ipr.tc(
        "replace-filter", "bpf", ifindex, FILTER_HANDLE,
        fd=program.fd, name=name, parent=parent, classid=1,
        direct_action=True, prio=FILTER_PRIORITY,
    )


def remove_filters(ipr: IPRoute, query: RtnlQuery, ifindex: int) -> int:
    """Remove our filters from both hooks, and clsact with them if nobody
    else's filter is on it (deleting the qdisc takes its filters along: one
    call instead of one per filter). Returns how many filters were ours.
    The hooks are read on `query`, a plain socket in the same namespace."""
    ours: list[TcFilter] = []
    others = 0
    for parent in (TC_INGRESS, TC_EGRESS):
        dump = query.filters(ifindex, parent)
        mine = _ours(dump, parent)
        ours += mine
        # A dump lists a header entry (handle 0) per priority besides the filters.
        others += sum(1 for msg in dump if msg["handle"]) - len(mine)
    if others:
        for f in ours:
            ipr.tc("del-filter", "bpf", ifindex, f.handle, parent=f.parent, info=f.info)
    else:
        _remove_clsact(ipr, ifindex)
    return len(ours)


class Datapath:
    """The eBPF capture backend of one node."""

    def __init__(
        self,
        *,
        node_netns: str | None = None,
        proxy_netns: str = constants.PROXY_NETNS,
        pin_dir: str = constants.BPFFS_ROOT,
        node_link: str = constants.NODE_LINK,
        source_dir: Path = BPF_SOURCE_DIR,
    ) -> None:
        """node_netns: the node's namespace (name or path); None means the
        caller's own, which is what a deployed agent uses. The lab and the
        tests pass it to run several nodes from one host."""
        self.node_netns = node_netns
        self.pin_dir = pin_dir
        self.proxy_ns = ProxyNamespace(proxy_netns, node_link, node_netns=node_netns)
        self._source_dir = source_dir
        self._programs: Programs | None = None
        self._lock = threading.Lock()
        self._log = log.bind(node_netns=node_netns or "<own>", pin_dir=pin_dir)

    @property
    def programs(self) -> Programs:
        if self._programs is None:
            raise RuntimeError("datapath not installed")
        return self._programs

    # node ---------------------------------------------------------------
    def install(self) -> ProxyLink:
        """Proxy namespace, programs (pinned, or loaded by the loader child),
        proxy_link map, proxy_ingress filter; then points every pod filter a
        previous agent left at this agent's program set. Idempotent."""
        with self._lock:
            link = self.proxy_ns.ensure()
            if self._programs is None:
                self._programs = Programs.open(self.pin_dir, self._source_dir)
            self._programs.set_proxy_link(link)
            with open_rtnl(self.proxy_ns.path) as proxy, RtnlQuery(self.proxy_ns.path) as query:
                eth = proxy.link_lookup(ifname=self.proxy_ns.proxy_link)[0]
                ensure_filter(proxy, query, eth, TC_INGRESS, FILTER_PROXY, self._programs.proxy_ingress)
            adopted = self._refresh_pod_filters()
            # No filter uses an older set now: unpin it (the kernel frees it).
            replaced = self._programs.remove_other_sets()
        self._log.info("datapath_installed", node_ifindex=link.node_ifindex, proxy_mac=link.proxy_mac,
                       adopted_pods=adopted, program_set=self._programs.program_set.set_id,
                       compiled=self._programs.compiled, replaced_sets=replaced)
        return link

    def _refresh_pod_filters(self) -> int:
        with open_rtnl(self.node_netns) as ipr, RtnlQuery(self.node_netns) as query:
            veths = [index for index, names in self._filters_by_link(ipr).items() if names]
            for index in veths:
                self._ensure_pod_filters(ipr, query, index)
        return len(veths)

    def close(self) -> None:
        """Release this process's handles (agent stop): capture stays in
        force, so enrolled pods fail closed until an agent is back."""
        with self._lock:
            if self._programs is not None:
                self._programs.close()
                self._programs = None

    def uninstall(self) -> None:
        """Remove everything: pod filters (and clsact where we leave it
        empty), the proxy namespace and link, the pinned maps. Works from
        kernel state alone, also without install() in this process."""
        with self._lock:
            with open_rtnl(self.node_netns) as ipr, RtnlQuery(self.node_netns) as query:
                for index, names in self._filters_by_link(ipr).items():
                    if names:
                        remove_filters(ipr, query, index)
            self.proxy_ns.remove()
            if self._programs is not None:
                self._programs.close()
                self._programs = None
            remove_pins(self.pin_dir)
        self._log.info("datapath_uninstalled")

    # pods ---------------------------------------------------------------
    def attach_pod(self, host_ifindex: int, pod_ips: Iterable[str | IPv4]) -> PodCapture:
        """Capture one pod (idempotent). The addresses go into local_pods
        before the filters exist, so the pod's first SYN is already seen as
        outbound."""
        ips = ipv4_addresses(pod_ips)
        programs = self.programs
        with self._lock:
            for ip in ips:
                programs.add_local_pod(ip, host_ifindex)
            try:
                with open_rtnl(self.node_netns) as ipr, RtnlQuery(self.node_netns) as query:
                    self._ensure_pod_filters(ipr, query, host_ifindex)
            except (NetlinkError, PodLinkMissing) as exc:
                for ip in ips:
                    programs.remove_local_pod(ip)
                if isinstance(exc, NetlinkError) and exc.code in (errno.ENODEV, errno.EINVAL):
                    raise PodLinkMissing(f"no link with index {host_ifindex}") from exc
                raise
        self._log.info("pod_attached", host_ifindex=host_ifindex, pod_ips=[str(i) for i in ips])
        return PodCapture(host_ifindex, ips, outbound_filter=True, inbound_filter=True)

    def _ensure_pod_filters(self, ipr: IPRoute, query: RtnlQuery, ifindex: int) -> None:
        # A missing link fails the clsact add with ENODEV (attach_pod's caller
        # turns that into PodLinkMissing): no separate lookup first.
        programs = self.programs
        _ensure_clsact(ipr, ifindex)
        ensure_filter(ipr, query, ifindex, TC_INGRESS, FILTER_OUTBOUND, programs.capture_outbound, clsact=False)
        ensure_filter(ipr, query, ifindex, TC_EGRESS, FILTER_INBOUND, programs.capture_inbound, clsact=False)

    def detach_pod(self, host_ifindex: int, pod_ips: Iterable[str | IPv4] = ()) -> None:
        """Stop capturing one pod: our filters, clsact if it is left empty,
        and every local_pods entry that points at this veth. An address
        that meanwhile belongs to another veth is left alone. A veth that
        is already gone is not an error (its filters went with it)."""
        ips = set(ipv4_addresses(pod_ips))
        with self._lock:
            try:
                with open_rtnl(self.node_netns) as ipr, RtnlQuery(self.node_netns) as query:
                    remove_filters(ipr, query, host_ifindex)
            except NetlinkError as exc:
                if exc.code not in (errno.ENODEV, errno.ENOENT, errno.EINVAL):
                    raise
            if self._programs is not None:
                # With the addresses given, look up just those: walking the
                # whole map made release O(pods on the node).
                owned = ({ip: self._programs.local_pod(ip) for ip in ips} if ips
                         else self._programs.local_pods())
                for ip, index in owned.items():
                    if index == host_ifindex:
                        self._programs.remove_local_pod(ip)
                        ips.discard(ip)
                    elif index is None:
                        ips.discard(ip)  # already gone
                for ip in ips:
                    self._log.info("pod_address_kept", ip=str(ip), reason="points at another veth")
        self._log.info("pod_detached", host_ifindex=host_ifindex)

    def attached(self) -> list[PodCapture]:
        """Every pod capture found in the kernel: veths that carry our
        filters and local_pods entries, joined by ifindex (either half may
        be missing after a crash; reconcile repairs or removes it)."""
        with self._lock:
            with open_rtnl(self.node_netns) as ipr:
                filters = {i: n for i, n in self._filters_by_link(ipr).items() if n}
            pods = self._programs.local_pods() if self._programs is not None else {}
        by_index: dict[int, list[IPv4]] = {}
        for ip, index in pods.items():
            by_index.setdefault(index, []).append(ip)
        return [
            PodCapture(
                host_ifindex=index,
                pod_ips=tuple(sorted(by_index.get(index, ()))),
                outbound_filter=FILTER_OUTBOUND in filters.get(index, set()),
                inbound_filter=FILTER_INBOUND in filters.get(index, set()),
            )
            for index in sorted(set(filters) | set(by_index))
        ]

    def _filters_by_link(self, ipr: IPRoute) -> dict[int, set[str]]:
        """Our pod filter names per node link (the proxy link excluded)."""
        result: dict[int, set[str]] = {}
        for link in ipr.get_links():
            index = link["index"]
            names = {f.name for p in (TC_INGRESS, TC_EGRESS) for f in our_filters(ipr, index, p)}
            result[index] = names & set(POD_FILTERS)
        return result

    # observability -----------------------------------------------------
    def verdict_counts(self) -> dict[str, int]:
        return self.programs.verdict_counts()
