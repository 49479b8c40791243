"""The nftables capture rule set as libnftables JSON commands: pure data,
no I/O (agent/datapath/nft_capture.py sends it, docs/datapath.md explains it).

Node namespace (the agent's own):

    table bridge ambit              every bridge: bind addresses to ports, lift TCP to L3
      map pod_l3mac  { pod IPv4 : MAC of the pod's host veth }   (bridged pods)
      map port_l3mac { host veth name . pod IPv4 : that veth's MAC } (bridged pods)
      set pod_ports  { host veth name }     set pod_addrs { pod IPv4 }
      set port_sources { host veth name . pod IPv4 }             (every enrolled pod)
      chain prerouting  (filter, bridge prerouting, priority -200)
        IPv4 from a pod port         -> goto from_pod
        IPv4 TCP, daddr in pod_l3mac -> ether daddr := that MAC, pkttype host [bridge_lift_in]
        IPv4                         -> accept (any other port: two lookups at most)
        ARP, iifname . sender bound  -> accept
        ARP from a pod port, sender not 0.0.0.0 -> drop                  [out_drop_spoofed_arp]
        ARP announcing an enrolled address      -> drop                  [in_drop_spoofed_arp]
        ARP                          -> accept
        from a pod port: not IPv6 (a VLAN tag, another protocol) -> drop [out_drop_not_ip]
        from a pod port: IPv6 TCP    -> mark 0x400 (ip6 forward drops it)
      chain from_pod
        TCP, iifname . saddr in port_l3mac -> ether daddr := that MAC,
                                 pkttype host, mark |= 0x800, accept      [bridge_lift_out]
                                 (bound and lifted: the one lookup of the common frame after the port's)
        iifname . saddr bound        -> mark |= 0x800 (bound), goto lift: a pod's own address
                                     -> drop: a source not its own      [out_drop_spoofed_source]
      chain lift                    (a bound pair only)
        ip saddr in pod_l3mac  -> the same as from_pod's first rule       [bridge_lift_out]
                                  (a pod enrolled before port_l3mac existed)
        ip daddr in pod_l3mac  -> ether daddr := that MAC, pkttype host   [bridge_lift_in]
      chain output  (filter, priority 0: frames the node sends to a port)
        IPv4, oifname . daddr bound  -> accept: to the address's own port (one lookup)
        IPv4 to a pod port for another pod's address -> drop           [in_drop_misdelivered]
      chain forward  (filter, priority 0: frames switched to a port)
        IPv4 to a pod port           -> goto to_pod: not marked bound, an enrolled
                                        source -> drop                 [in_drop_spoofed_source]
                                        then the same two checks as output
        IPv6 TCP from / to a pod port -> drop                          [out/in_drop_ipv6_tcp]
    table ip ambit                  every pod: mark its TCP for the route to the proxy
      set pods  { pod IPv4 }   set pod_links { host veth name }
      set pod_sources { host veth name . pod IPv4 }
      chain prerouting  (filter, ip prerouting, priority mangle)
        iif ambit0                  -> return: the proxy's own traffic     [in_pass_from_proxy]
        mark & 0x800, TCP           -> goto outbound: from a bound port (lifted)
        mark & 0x800                -> return: from a bound port, not TCP
        iifkind bridge              -> goto bridged
        iifname @pod_links          -> goto routed_pod
        ip saddr @pods              -> drop: an enrolled source from anywhere
                                       else (another node, the underlay)  [in_drop_spoofed_source]
                                    -> goto classify
      chain bridged                 (any other bridge port, lifted in or routed by the node)
        ip saddr @pods              -> drop: not bound to its port        [in_drop_spoofed_source]
        not TCP                     -> return
        ip daddr @pods              -> goto inbound
      chain routed_pod
        iifname . saddr bound       -> goto classify
                                    -> drop: a source not its own         [out_drop_spoofed_source]
      chain classify
        not TCP                     -> return
        ip saddr @pods              -> goto outbound
        ip daddr @pods              -> goto inbound
      chain outbound
        fib daddr type local        -> return: the pod talks to the node   [out_pass_to_node]
        mark |= 0x100                                                      [out_redirect]
      chain inbound
        mark |= 0x100                                                      [in_redirect]
    table ip6 ambit                 IPv6 is not captured: an enrolled pod's forwarded TCP is dropped
      set pods6 { pod IPv6 }   set pod_links { host veth name }
      chain forward  (filter, priority 0)
        TCP from a routed pod's veth, marked 0x400, or from pods6  -> drop [out_drop_ipv6_tcp]
        TCP to a routed pod's veth or to pods6                     -> drop [in_drop_ipv6_tcp]
    + `ip rule fwmark 0x100/0x100 lookup 100`, table 100: default via the proxy's address

Proxy namespace:

    table ip ambit
      set local_pods  { pod IPv4 }  (an enrolled pod's SYN is outbound)
      chain prerouting  (filter, ip prerouting, priority mangle)
        iif != eth0 or not TCP      -> accept untouched
        ip daddr 169.254.7.2        -> goto own_addr
        not a pure SYN              -> mark 0x100, accept: the stack finds
                                       the owner or answers RST            [proxy_not_syn]
        ip saddr @local_pods        -> goto to_outbound
        tcp dport 15008             -> goto to_hbone
                                    -> goto to_inbound
      chain own_addr
        from the node (169.254.7.1) to 15020/15021 -> accept              [proxy_pass_own_addr]
                                    -> drop                               [proxy_drop_own_addr]
      chain to_outbound / to_hbone / to_inbound
        tproxy to :15001 / :15008 / :15006, mark 0x100, accept  [proxy_to_outbound/_hbone/_inbound_plaintext]
        drop: no listener (agent down), fail closed              [proxy_drop_no_listener]
    (the existing `fwmark 0x100/0x100 lookup 100` + `local 0.0.0.0/0 dev lo
    table 100` deliver what tproxy assigned)

A bridge delivers pod-to-pod frames at L2, below every ip hook; only the
bridge family sees them, and only it still knows the port a frame came in
on. So addresses are bound to ports there, for every bridge of the node
(the ip hooks see the bridge as the input and trust its check); a routed
pod's veth is the input the ip hooks see, so they bind it there. Rewriting
the destination MAC to the pod's own host veth (a local address of the
bridge: every port's MAC is) makes the bridge hand a TCP frame to its IP
stack instead, where the ip table marks it.

The checks cost a packet little. An enrolled bridged pod's TCP frame pays
two lookups in bridge prerouting (its port, then `port_l3mac`, which binds
and lifts at once), and in ip prerouting two compares before `outbound`
(the bridge's mark says it is bound: no lookup); what the proxy sends to a
pod pays the `iif ambit0` compare, then in bridge output one lookup of its
bound `oifname . daddr` pair. A frame between two ports outside the mesh
pays what it paid before the binding (its port and, for TCP, the lift in;
`bridged`'s source and destination in ip prerouting when br_netfilter
hands bridged frames to it) plus bridge forward's lookup of its output
port. Its enrolled-source check is not made at its input port but where a
forged source would count: on entering an enrolled pod's port (`to_pod`)
or the node's IP stack (`bridged`, lifted frames included). Between two
ports outside the mesh it is not made, as with the eBPF backend, which has
no hook there. The output check stays: a pod that sends frames with
another pod's MAC as their source (with its own IP address, which the
binding accepts) teaches the bridge to forward that pod's frames to its
own port, and the ARP rules cannot see that.

Per-pod state is set elements only, each with a comment naming its veth
("veth=<name> ifindex=<n>[ bridge=<name>]"): enrol adds them, release
deletes them, and the kernel can be read back to rebuild who owns what.
A veth is keyed by its name (`iifname`, `oifname`), not its index: to
parse or print an interface index, libnftables lists every link of the
calling thread's namespace (the node's, one veth per pod) on every
command that holds one, which made each enrol and release O(pods). A name
is a plain string to it (same per-packet lookup, a 20-byte key instead of 8).
One enrol (or release) is one transaction per namespace: first the
expected case alone (`create` every element, or `delete` every one: one
command per set), and only when that fails (an element a previous owner
left, or one already gone) the forms that cannot fail on it.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

from . import constants

Command = dict[str, Any]
Expr = dict[str, Any]

TABLE = "ambit"
NODE_POD_SET = "pods"
BRIDGE_POD_MAP = "pod_l3mac"
# bridge: host veth name . address -> that veth's MAC (bridged pods): a bound
# pair and its lift in one lookup, the common frame's only one.
PORT_LIFT_MAP = "port_l3mac"
PROXY_POD_SET = "local_pods"
# Source binding: the same three sets in the bridge and the ip table (sets
# belong to one table), the IPv6 ones in the ip6 table.
PORT_SET = "pod_ports"            # bridge: every enrolled host veth's name (as a bridge port)
ADDRESS_SET = "pod_addrs"         # bridge: every enrolled IPv4 address
PORT_SOURCE_SET = "port_sources"  # bridge: host veth name . address, the bound pairs
LINK_SET = "pod_links"            # ip, ip6: every enrolled host veth's name (as a routed link)
SOURCE_SET = "pod_sources"        # ip: host veth name . address, the bound pairs
POD6_SET = "pods6"                # ip6: enrolled pods' IPv6 addresses
BRIDGE_PRIORITY = -200  # before br_netfilter (0), which would hand the frame to the ip hooks unchanged
MANGLE_PRIORITY = -150
FILTER_PRIORITY = 0

# Named counters per table, the nftables counterpart of verdict_counts; the
# same name in two tables counts one verdict taken at two places.
NODE_COUNTERS = ("in_pass_from_proxy", "out_pass_to_node", "out_redirect", "in_redirect",
                 "out_drop_spoofed_source", "in_drop_spoofed_source")
BRIDGE_COUNTERS = ("bridge_lift_out", "bridge_lift_in", "out_drop_not_ip", "out_drop_spoofed_arp",
                   "in_drop_spoofed_arp", "out_drop_spoofed_source", "in_drop_spoofed_source",
                   "in_drop_misdelivered", "out_drop_ipv6_tcp", "in_drop_ipv6_tcp")
IP6_COUNTERS = ("out_drop_ipv6_tcp", "in_drop_ipv6_tcp")
PROXY_COUNTERS = ("proxy_pass_own_addr", "proxy_drop_own_addr", "proxy_not_syn", "proxy_to_outbound",
                  "proxy_to_hbone", "proxy_to_inbound_plaintext", "proxy_drop_no_listener")
NODE_FAMILIES = ("bridge", "ip", "ip6")

# Which listener a pure SYN goes to, by chain (see proxy_rules).
PROXY_STEERING = (
    ("to_outbound", constants.OUTBOUND_PORT, "proxy_to_outbound"),
    ("to_hbone", constants.HBONE_PORT, "proxy_to_hbone"),
    ("to_inbound", constants.INBOUND_PLAINTEXT_PORT, "proxy_to_inbound_plaintext"),
)


@dataclass(frozen=True)
class PodEntry:
    """One enrolled address and the host veth that owns it."""

    ip: ipaddress.IPv4Address
    host_ifindex: int
    host_veth: str
    host_mac: str
    bridge: str | None  # the bridge the veth is a port of; None for a routed veth

    @property
    def comment(self) -> str:
        return Owner(self.host_ifindex, self.host_veth, self.bridge).comment


@dataclass(frozen=True)
class Owner:
    """What an element's comment says about the pod it belongs to."""

    host_ifindex: int
    host_veth: str
    bridge: str | None

    @property
    def comment(self) -> str:
        text = f"veth={self.host_veth} ifindex={self.host_ifindex}"
        return f"{text} bridge={self.bridge}" if self.bridge else text


def parse_comment(comment: str | None) -> Owner | None:
    """The owner in an element comment written by PodEntry.comment; None for
    an element without one (not ours, or damaged)."""
    if not comment:
        return None
    fields = dict(part.split("=", 1) for part in comment.split() if "=" in part)
    try:
        return Owner(int(fields["ifindex"]), fields["veth"], fields.get("bridge"))
    except (KeyError, ValueError):
        return None


# --- expression helpers --------------------------------------------------
def _match(left: Expr, right: Any, op: str = "==") -> Expr:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> Expr:
    return {"meta": {"key": key}}


def _payload(protocol: str, field: str) -> Expr:
    return {"payload": {"protocol": protocol, "field": field}}


def _counter(name: str) -> Expr:
    return {"counter": name}


def _set_mark(value: Any) -> Expr:
    return {"mangle": {"key": _meta("mark"), "value": value}}


def _concat(*exprs: Expr) -> Expr:
    return {"concat": list(exprs)}


def _drop(counter: str) -> list[Expr]:
    return [_counter(counter), {"drop": None}]


_OR_CAPTURED = {"|": [_meta("mark"), constants.MARK_CAPTURED]}
_OR_POD_PORT = {"|": [_meta("mark"), constants.MARK_POD_PORT]}
_OR_BOUND = {"|": [_meta("mark"), constants.MARK_BOUND]}
_IS_TCP = _match(_meta("l4proto"), "tcp")
_ETHER_TYPE = _payload("ether", "type")
_ARP_SENDER = _payload("arp", "saddr ip")


def _rule(family: str, chain: str, *expr: Expr) -> Command:
    return {"add": {"rule": {"family": family, "table": TABLE, "chain": chain, "expr": list(expr)}}}


def _base_chain(family: str, name: str, hook: str, prio: int) -> list[Command]:
    """Create-if-missing then flush: re-installing replaces the rules in the
    same transaction, so capture never lapses and sets keep their elements."""
    chain = {"family": family, "table": TABLE, "name": name, "type": "filter", "hook": hook, "prio": prio,
             "policy": "accept"}
    ref = {"family": family, "table": TABLE, "name": name}
    return [{"add": {"chain": chain}}, {"flush": {"chain": ref}}]


def _chain(family: str, name: str) -> list[Command]:
    ref = {"family": family, "table": TABLE, "name": name}
    return [{"add": {"chain": ref}}, {"flush": {"chain": ref}}]


def _set(family: str, name: str, key_type: str | list[str]) -> Command:
    return {"add": {"set": {"family": family, "table": TABLE, "name": name, "type": key_type}}}


def _counters(family: str, names: tuple[str, ...]) -> list[Command]:
    return [{"add": {"counter": {"family": family, "table": TABLE, "name": n}}} for n in names]


# --- the rule sets -------------------------------------------------------
def node_rules(node_link_ifindex: int) -> list[Command]:
    """Tables, sets, counters, chains and rules of the node namespace (one
    transaction; idempotent). node_link_ifindex: ambit0 as the node sees it."""
    cmds: list[Command] = [
        {"add": {"table": {"family": "bridge", "name": TABLE}}},
        {"add": {"map": {"family": "bridge", "table": TABLE, "name": BRIDGE_POD_MAP, "type": "ipv4_addr",
                         "map": "ether_addr"}}},
        {"add": {"map": {"family": "bridge", "table": TABLE, "name": PORT_LIFT_MAP, "type": ["ifname", "ipv4_addr"],
                         "map": "ether_addr"}}},
        _set("bridge", PORT_SET, "ifname"),
        _set("bridge", ADDRESS_SET, "ipv4_addr"),
        _set("bridge", PORT_SOURCE_SET, ["ifname", "ipv4_addr"]),
        *_counters("bridge", BRIDGE_COUNTERS),
        *_base_chain("bridge", "prerouting", "prerouting", BRIDGE_PRIORITY),
        *_base_chain("bridge", "forward", "forward", FILTER_PRIORITY),
        *_base_chain("bridge", "output", "output", FILTER_PRIORITY),
        *_chain("bridge", "lift"),
        *_chain("bridge", "from_pod"),
        *_chain("bridge", "to_pod"),
        {"add": {"table": {"family": "ip", "name": TABLE}}},
        _set("ip", NODE_POD_SET, "ipv4_addr"),
        _set("ip", LINK_SET, "ifname"),
        _set("ip", SOURCE_SET, ["ifname", "ipv4_addr"]),
        *_counters("ip", NODE_COUNTERS),
        *_base_chain("ip", "prerouting", "prerouting", MANGLE_PRIORITY),
        *_chain("ip", "bridged"),
        *_chain("ip", "routed_pod"),
        *_chain("ip", "classify"),
        *_chain("ip", "outbound"),
        *_chain("ip", "inbound"),
        {"add": {"table": {"family": "ip6", "name": TABLE}}},
        _set("ip6", POD6_SET, "ipv6_addr"),
        _set("ip6", LINK_SET, "ifname"),
        *_counters("ip6", IP6_COUNTERS),
        *_base_chain("ip6", "forward", "forward", FILTER_PRIORITY),
    ]
    cmds += _bridge_binding_rules()
    # The frames of a bound pair that the first rule did not lift (not TCP,
    # or a pod enrolled before `port_l3mac` existed).
    cmds += [_lift("lift", "out", _payload("ip", "saddr"), f"@{BRIDGE_POD_MAP}"),
             _lift("lift", "in", _payload("ip", "daddr"), f"@{BRIDGE_POD_MAP}")]
    source = _payload("ip", "saddr")
    bound = _match({"&": [_meta("mark"), constants.MARK_BOUND]}, 0, "!=")
    cmds += [
        # Bypass: the proxy sends with the pod's address after it authorized
        # the connection; marking it again would loop it back to the proxy.
        _rule("ip", "prerouting", _match(_meta("iif"), node_link_ifindex), _counter("in_pass_from_proxy"),
              {"return": None}),
        # From a bound pod port (the bridge table's mark): its TCP is
        # outbound, nothing is left to classify (no lookup); the rest is
        # not captured.
        _rule("ip", "prerouting", bound, _IS_TCP, {"goto": {"target": "outbound"}}),
        _rule("ip", "prerouting", bound, {"return": None}),
        # Any other bridge port's frame (not bound there: see
        # _bridge_binding_rules).
        _rule("ip", "prerouting", _match(_meta("iifkind"), "bridge"), {"goto": {"target": "bridged"}}),
        # A routed pod's veth is the input here: its sources are bound here.
        _rule("ip", "prerouting", _match(_meta("iifname"), f"@{LINK_SET}"), {"goto": {"target": "routed_pod"}}),
        # An enrolled address arriving anywhere but a bridge or its own veth
        # (another node, the underlay).
        _rule("ip", "prerouting", _match(source, f"@{NODE_POD_SET}"), *_drop("in_drop_spoofed_source")),
        _rule("ip", "prerouting", {"goto": {"target": "classify"}}),
        # An enrolled source that the bridge did not bind to its own port:
        # forged (a pod outside the mesh, another node, the underlay).
        _rule("ip", "bridged", _match(source, f"@{NODE_POD_SET}"), *_drop("in_drop_spoofed_source")),
        _rule("ip", "bridged", _match(_meta("l4proto"), "tcp", "!="), {"return": None}),
        _rule("ip", "bridged", _match(_payload("ip", "daddr"), f"@{NODE_POD_SET}"), {"goto": {"target": "inbound"}}),
        _rule("ip", "routed_pod", _match(_concat(_meta("iifname"), source), f"@{SOURCE_SET}"),
              {"goto": {"target": "classify"}}),
        _rule("ip", "routed_pod", *_drop("out_drop_spoofed_source")),
        _rule("ip", "classify", _match(_meta("l4proto"), "tcp", "!="), {"return": None}),
        _rule("ip", "classify", _match(source, f"@{NODE_POD_SET}"), {"goto": {"target": "outbound"}}),
        _rule("ip", "classify", _match(_payload("ip", "daddr"), f"@{NODE_POD_SET}"),
              {"goto": {"target": "inbound"}}),
        # The node itself (its addresses, kubelet's peers) is not meshed: the
        # proxy could not stand in the middle (docs/datapath.md).
        _rule("ip", "outbound", _match({"fib": {"result": "type", "flags": ["daddr"]}}, "local"),
              _counter("out_pass_to_node"), {"return": None}),
        _rule("ip", "outbound", _set_mark(_OR_CAPTURED), _counter("out_redirect")),
        _rule("ip", "inbound", _set_mark(_OR_CAPTURED), _counter("in_redirect")),
    ]
    # IPv6 is not captured: what an enrolled pod sends or receives over TCP
    # through the node's routing is dropped. The node's own (probes) never
    # crosses forward; bridged frames are dropped in the bridge's forward.
    tcp6 = _match(_meta("l4proto"), "tcp")
    cmds += [
        _rule("ip6", "forward", tcp6, _match(_meta("iifname"), f"@{LINK_SET}"), *_drop("out_drop_ipv6_tcp")),
        _rule("ip6", "forward", tcp6, _match({"&": [_meta("mark"), constants.MARK_POD_PORT]}, 0, "!="),
              *_drop("out_drop_ipv6_tcp")),
        _rule("ip6", "forward", tcp6, _match(_payload("ip6", "saddr"), f"@{POD6_SET}"), *_drop("out_drop_ipv6_tcp")),
        _rule("ip6", "forward", tcp6, _match(_meta("oifname"), f"@{LINK_SET}"), *_drop("in_drop_ipv6_tcp")),
        _rule("ip6", "forward", tcp6, _match(_payload("ip6", "daddr"), f"@{POD6_SET}"), *_drop("in_drop_ipv6_tcp")),
    ]
    return cmds


def _lift(chain: str, direction: str, key: Expr, mac_map: str, *first: Expr) -> Command:
    """Lift a TCP frame to the bridge's IP stack: its destination MAC
    becomes the pod's host veth MAC (looked up by key in mac_map), a local
    address of the bridge. A key missing from the map makes the lookup fail:
    the rule does not match and the frame goes on to the next rule. A frame
    lifted out of a pod port is marked bound for the ip table (MARK_BOUND):
    only a bound source reaches a lift out (port_l3mac holds bound pairs
    only, and the lift chain is entered by a bound pair only)."""
    mangle = {"mangle": {"key": _payload("ether", "daddr"), "value": {"map": {"key": key, "data": mac_map}}}}
    marked = [_set_mark(_OR_BOUND)] if direction == "out" else []
    return _rule("bridge", chain, *first, _match(_payload("ip", "protocol"), "tcp"), mangle,
                 {"mangle": {"key": _meta("pkttype"), "value": "host"}}, *marked,
                 _counter(f"bridge_lift_{direction}"), {"accept": None})


def _bridge_binding_rules() -> list[Command]:
    """The bridge table's source binding: frames from an enrolled pod's
    port carry its own addresses only, frames from any other port none of
    an enrolled pod's, and no frame for one pod's address goes out another
    pod's port. A bound pair ends the checks with one lookup; only what
    fails it reaches the drops."""
    from_pod = _match(_meta("iifname"), f"@{PORT_SET}")
    ipv4, arp, ipv6 = _match(_ETHER_TYPE, "ip"), _match(_ETHER_TYPE, "arp"), _match(_ETHER_TYPE, "ip6")
    source = _payload("ip", "saddr")
    tcp = _match(_meta("l4proto"), "tcp")
    cmds = [
        # IPv4 from a pod port to from_pod; any other port's frame leaves at
        # the next rule (TCP to an enrolled pod: lifted in) or the one after:
        # two lookups, as before the binding. A spoofed enrolled source from
        # such a port is dropped where it would count, on reaching an
        # enrolled pod (to_pod) or the node's IP stack (the ip table's
        # `bridged`, lifted frames included).
        _rule("bridge", "prerouting", ipv4, from_pod, {"goto": {"target": "from_pod"}}),
        _lift("prerouting", "in", _payload("ip", "daddr"), f"@{BRIDGE_POD_MAP}", ipv4),
        _rule("bridge", "prerouting", ipv4, {"accept": None}),
        # The common frame, an enrolled pod's TCP from its own address on its
        # own port: bound and lifted by one lookup (a pair missing from the
        # map makes the rule not match, so the rules below see it).
        _lift("from_pod", "out", _concat(_meta("iifname"), source), f"@{PORT_LIFT_MAP}"),
        # Any other bound pair (not TCP, or missing from port_l3mac) goes on
        # to lift, marked bound; anything else is dropped.
        _rule("bridge", "from_pod", _match(_concat(_meta("iifname"), source), f"@{PORT_SOURCE_SET}"),
              _set_mark(_OR_BOUND), {"goto": {"target": "lift"}}),
        _rule("bridge", "from_pod", *_drop("out_drop_spoofed_source")),
        # ARP: a pod asks and answers for its own addresses (0.0.0.0: a probe).
        _rule("bridge", "prerouting", arp, _match(_concat(_meta("iifname"), _ARP_SENDER), f"@{PORT_SOURCE_SET}"),
              {"accept": None}),
        _rule("bridge", "prerouting", arp, from_pod, _match(_ARP_SENDER, "0.0.0.0", "!="),
              *_drop("out_drop_spoofed_arp")),
        _rule("bridge", "prerouting", arp, _match(_ARP_SENDER, f"@{ADDRESS_SET}"), *_drop("in_drop_spoofed_arp")),
        _rule("bridge", "prerouting", arp, {"accept": None}),
        # What is left is neither IPv4 nor ARP. A VLAN tag (or another
        # protocol) could carry a packet past the checks above.
        _rule("bridge", "prerouting", _match(_ETHER_TYPE, "ip6", "!="), from_pod, *_drop("out_drop_not_ip")),
        # IPv6 TCP that the bridge hands up to the node: the ip6 table
        # drops it if it is forwarded (the input port is lost by then).
        _rule("bridge", "prerouting", ipv6, tcp, from_pod, _set_mark(_OR_POD_PORT)),
    ]
    destination = _payload("ip", "daddr")
    to_own_port = _match(_concat(_meta("oifname"), destination), f"@{PORT_SOURCE_SET}")
    to_pod = _match(_meta("oifname"), f"@{PORT_SET}")
    cmds += [
        # What the node sends a pod (the proxy's traffic to its destination):
        # the bound pair first, the one lookup of the common frame.
        _rule("bridge", "output", ipv4, to_own_port, {"accept": None}),
        _rule("bridge", "output", ipv4, to_pod, _match(destination, f"@{ADDRESS_SET}"), *_drop("in_drop_misdelivered")),
        # Switched frames (not lifted: outside the mesh, or not TCP): the
        # port first, one lookup for a frame to a port outside the mesh.
        _rule("bridge", "forward", ipv4, to_pod, {"goto": {"target": "to_pod"}}),
        # From any port but its own bound one (no mark), an enrolled source
        # is forged: a pod outside the mesh, another node, the underlay.
        _rule("bridge", "to_pod", _match({"&": [_meta("mark"), constants.MARK_BOUND]}, 0),
              _match(source, f"@{ADDRESS_SET}"), *_drop("in_drop_spoofed_source")),
        _rule("bridge", "to_pod", to_own_port, {"accept": None}),
        _rule("bridge", "to_pod", _match(destination, f"@{ADDRESS_SET}"), *_drop("in_drop_misdelivered")),
    ]
    return cmds + [
        _rule("bridge", "forward", ipv6, tcp, from_pod, *_drop("out_drop_ipv6_tcp")),
        _rule("bridge", "forward", ipv6, tcp, _match(_meta("oifname"), f"@{PORT_SET}"), *_drop("in_drop_ipv6_tcp")),
    ]


def proxy_rules(proxy_link_ifindex: int) -> list[Command]:
    """Table, set, counters, chains and rules of the proxy namespace (one
    transaction; idempotent). proxy_link_ifindex: eth0 there."""
    cmds: list[Command] = [
        {"add": {"table": {"family": "ip", "name": TABLE}}},
        _set("ip", PROXY_POD_SET, "ipv4_addr"),
        *_counters("ip", PROXY_COUNTERS),
        *_base_chain("ip", "prerouting", "prerouting", MANGLE_PRIORITY),
    ]
    for chain, _, _ in PROXY_STEERING:
        cmds += _chain("ip", chain)
    cmds += _chain("ip", "own_addr")
    pure_syn = _match({"&": [_payload("tcp", "flags"), ["syn", "ack"]]}, "syn", "!=")
    cmds += [
        _rule("ip", "prerouting", _match(_meta("iif"), proxy_link_ifindex, "!="), {"accept": None}),
        _rule("ip", "prerouting", _match(_meta("l4proto"), "tcp", "!="), {"accept": None}),
        # The proxy's own address is no way in around the capture (the
        # listeners are bound to any address): only the node, to the
        # metrics and readiness ports (docs/datapath.md). One compare for
        # every other packet.
        _rule("ip", "prerouting", _match(_payload("ip", "daddr"), constants.PROXY_LINK_ADDR),
              {"goto": {"target": "own_addr"}}),
        _rule("ip", "own_addr", _match(_payload("ip", "saddr"), constants.NODE_LINK_ADDR),
              _match(_payload("tcp", "dport"), {"set": [constants.METRICS_PORT, constants.READINESS_PORT]}),
              _counter("proxy_pass_own_addr"), {"accept": None}),
        _rule("ip", "own_addr", _counter("proxy_drop_own_addr"), {"drop": None}),
        # Replies to the proxy's upstream sockets, segments of accepted
        # connections, TIME_WAIT, strays: the mark makes them local; the
        # stack's own socket lookup finds the owner or resets.
        _rule("ip", "prerouting", pure_syn, _set_mark(constants.MARK_CAPTURED), _counter("proxy_not_syn"),
              {"accept": None}),
        _rule("ip", "prerouting", _match(_payload("ip", "saddr"), f"@{PROXY_POD_SET}"),
              {"goto": {"target": "to_outbound"}}),
        _rule("ip", "prerouting", _match(_payload("tcp", "dport"), constants.HBONE_PORT),
              {"goto": {"target": "to_hbone"}}),
        _rule("ip", "prerouting", {"goto": {"target": "to_inbound"}}),
    ]
    for chain, port, counter in PROXY_STEERING:
        # tproxy assigns the SYN to the transparent listener on `port` (after
        # checking for an established socket or a TIME_WAIT to recycle); the
        # destination is not rewritten, so getsockname() is the original one.
        # No listener: the statement breaks the rule and the next one drops.
        cmds += [
            _rule("ip", chain, _IS_TCP, {"tproxy": {"port": port}}, _set_mark(constants.MARK_CAPTURED),
                  _counter(counter), {"accept": None}),
            _rule("ip", chain, _counter("proxy_drop_no_listener"), {"drop": None}),
        ]
    return cmds


@cache
def element_types() -> dict[tuple[str, str], tuple[str | tuple[str, ...], str | None]]:
    """(family, set or map name) -> (key type, data type or None for a set),
    for every set and map of both rule sets: what an element batch needs to
    spell keys and data in bytes (nft_netlink). Read off the definitions, so
    it cannot disagree with them."""
    found: dict[tuple[str, str], tuple[str | tuple[str, ...], str | None]] = {}
    for command in node_rules(0) + proxy_rules(0):
        for kind in ("set", "map"):
            body = command.get("add", {}).get(kind)
            if body is not None:
                key = body["type"]
                found[(body["family"], body["name"])] = (tuple(key) if isinstance(key, list) else key, body.get("map"))
    return found


def remove_tables(families: tuple[str, ...]) -> list[Command]:
    """Delete our tables whether or not they exist (add first, so the
    delete always finds one and the transaction cannot fail on absence)."""
    cmds: list[Command] = []
    for family in families:
        table = {"family": family, "name": TABLE}
        cmds += [{"add": {"table": table}}, {"delete": {"table": table}}]
    return cmds


# --- per-pod elements ----------------------------------------------------
Key = Any  # an element's key as libnftables JSON: "10.0.0.5", "veth1234", {"concat": ["veth1234", "10.0.0.5"]}


def _elem(key: Key, comment: str | None = None) -> Any:
    return {"elem": {"val": key, "comment": comment}} if comment else key


def _set_ref(family: str, name: str) -> dict[str, str]:
    return {"family": family, "table": TABLE, "name": name}


def _replace(family: str, name: str, keys: list[tuple[Key, str]]) -> list[Command]:
    """Add each key with its owner comment, replacing an element a previous
    owner left (add, delete, add: the delete always finds it)."""
    ref = _set_ref(family, name)
    cmds: list[Command] = []
    for key, comment in keys:
        cmds += [{"add": {"element": {**ref, "elem": [_elem(key)]}}},
                 {"delete": {"element": {**ref, "elem": [_elem(key)]}}},
                 {"add": {"element": {**ref, "elem": [_elem(key, comment)]}}}]
    return cmds


def _create(family: str, name: str, keys: list[tuple[Key, str]]) -> list[Command]:
    """Add every key with its owner comment in one command, which fails
    (EEXIST) if one is there already: the usual case of _replace."""
    if not keys:
        return []
    return [{"create": {"element": {**_set_ref(family, name), "elem": [_elem(k, c) for k, c in keys]}}}]


def _remove(family: str, name: str, keys: list[Key]) -> list[Command]:
    """Delete keys whether or not they are present (add, then delete)."""
    ref = _set_ref(family, name)
    cmds: list[Command] = []
    for key in keys:
        cmds += [{"add": {"element": {**ref, "elem": [_elem(key)]}}},
                 {"delete": {"element": {**ref, "elem": [_elem(key)]}}}]
    return cmds


def _delete(family: str, name: str, keys: list[Key]) -> list[Command]:
    """Delete every key in one command, which fails (ENOENT) if one is
    absent: the usual case of _remove."""
    if not keys:
        return []
    return [{"delete": {"element": {**_set_ref(family, name), "elem": [_elem(k) for k in keys]}}}]


def set_replace(family: str, name: str, entries: list[PodEntry], *, fresh: bool = False) -> list[Command]:
    """Each entry's address, with its owner comment (see _replace). fresh:
    none of them is there yet (one command; EEXIST if one is)."""
    put = _create if fresh else _replace
    return put(family, name, [(str(e.ip), e.comment) for e in entries])


def set_remove(family: str, name: str, ips: list[ipaddress.IPv4Address], *, present: bool = False) -> list[Command]:
    """Delete addresses whether or not they are present (add, then delete).
    present: all of them are there (one command; ENOENT if one is not)."""
    cut = _delete if present else _remove
    return cut(family, name, [str(ip) for ip in ips])


def _pair(veth: str, ip: ipaddress.IPv4Address) -> Key:
    return {"concat": [veth, str(ip)]}


def bind(owner: Owner, ips: list[ipaddress.IPv4Address], ipv6: list[ipaddress.IPv6Address], *,
         fresh: bool = False) -> list[Command]:
    """The source binding of one pod (node namespace): its veth (by name) as
    a bridge port and as a routed link, each address bound to it, its
    addresses among the enrolled ones, its IPv6 addresses (dropped, not
    captured). fresh: none of it is there yet (one command per set; EEXIST
    if it is)."""
    put = _create if fresh else _replace
    veth, comment = owner.host_veth, owner.comment
    pairs = [(_pair(veth, ip), comment) for ip in ips]
    return [*put("bridge", PORT_SET, [(veth, comment)]),
            *put("bridge", PORT_SOURCE_SET, pairs),
            *put("bridge", ADDRESS_SET, [(str(ip), comment) for ip in ips]),
            *put("ip", LINK_SET, [(veth, comment)]),
            *put("ip", SOURCE_SET, pairs),
            *put("ip6", LINK_SET, [(veth, comment)]),
            *put("ip6", POD6_SET, [(str(ip), comment) for ip in ipv6])]


def unbind(host_veth: str | None, ips: list[ipaddress.IPv4Address], ipv6: list[ipaddress.IPv6Address], *,
           present: bool = False) -> list[Command]:
    """Undo bind for a veth (by name) and its addresses, whatever is still
    there; host_veth None (no element names it): the addresses only.
    present: all of it is there (one command per set; ENOENT if not)."""
    cut = _delete if present else _remove
    veths = [host_veth] if host_veth is not None else []
    pairs = [_pair(veth, ip) for veth in veths for ip in ips]
    return [*cut("bridge", PORT_SET, veths),
            *cut("bridge", PORT_SOURCE_SET, pairs),
            *cut("bridge", ADDRESS_SET, [str(ip) for ip in ips]),
            *cut("ip", LINK_SET, veths),
            *cut("ip", SOURCE_SET, pairs),
            *cut("ip6", LINK_SET, veths),
            *cut("ip6", POD6_SET, [str(ip) for ip in ipv6])]


def map_add(entries: list[PodEntry], *, fresh: bool = False) -> list[Command]:
    """The bridge maps' elements of bridged pods: address -> MAC
    (`pod_l3mac`) and veth . address -> MAC (`port_l3mac`). Fails with EEXIST
    when a key is mapped to another MAC (a previous owner's): the caller then
    deletes that element first (map_remove). fresh: also when it is mapped
    to the same MAC (create)."""
    bridged = [e for e in entries if e.bridge]
    if not bridged:
        return []
    verb = "create" if fresh else "add"
    by_address = [[_elem(str(e.ip), e.comment), e.host_mac] for e in bridged]
    by_pair = [[_elem(_pair(e.host_veth, e.ip), e.comment), e.host_mac] for e in bridged]
    return [{verb: {"element": {**_set_ref("bridge", BRIDGE_POD_MAP), "elem": by_address}}},
            {verb: {"element": {**_set_ref("bridge", PORT_LIFT_MAP), "elem": by_pair}}}]


def map_remove(ips: list[ipaddress.IPv4Address], host_veth: str | None = None) -> list[Command]:
    """Delete map elements by key, the pairs only when the veth's name is
    known (fails with ENOENT if one is absent: maps have data, so the
    add-then-delete trick needs a value we may not know)."""
    if not ips:
        return []
    cmds = [{"delete": {"element": {**_set_ref("bridge", BRIDGE_POD_MAP), "elem": [str(ip) for ip in ips]}}}]
    if host_veth is not None:
        cmds.append({"delete": {"element": {**_set_ref("bridge", PORT_LIFT_MAP),
                                            "elem": [_pair(host_veth, ip) for ip in ips]}}})
    return cmds


def list_set(family: str, name: str, kind: str = "set") -> Command:
    return {"list": {kind: _set_ref(family, name)}}


def _listed(listing: list[dict[str, Any]], kind: str) -> Iterator[tuple[Any, Owner | None]]:
    """(key as listed, owner) of each element of a `list set`/`list map`."""
    for obj in listing:
        body = obj.get(kind)
        if not body:
            continue
        for item in body.get("elem", []):
            key = item[0] if kind == "map" else item
            if isinstance(key, dict) and "elem" in key:
                yield key["elem"]["val"], parse_comment(key["elem"].get("comment"))
            else:
                yield key, None


def elements(listing: list[dict[str, Any]], kind: str = "set") -> dict[Any, Owner | None]:
    """Elements of an address set or map: address -> owner."""
    return {ipaddress.ip_address(key): owner for key, owner in _listed(listing, kind)}


def veth_elements(listing: list[dict[str, Any]]) -> dict[str, Owner | None]:
    """Elements of a veth set (`pod_ports`, `pod_links`): name -> owner."""
    return {str(key): owner for key, owner in _listed(listing, "set")}


def bound_pairs(listing: list[dict[str, Any]], kind: str = "set") -> list[tuple[ipaddress.IPv4Address, Owner | None]]:
    """Elements of a `veth . address` set (or map): (address, owner), the
    owner (with the veth's index) from the element's comment."""
    return [(ipaddress.IPv4Address(key["concat"][-1]), owner) for key, owner in _listed(listing, kind)]


def counter_values(listing: list[dict[str, Any]]) -> dict[str, int]:
    """Packets per named counter of a `list counters` answer."""
    return {obj["counter"]["name"]: int(obj["counter"]["packets"]) for obj in listing if "counter" in obj}
