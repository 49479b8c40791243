"""The nftables capture rule set as libnftables JSON commands: pure data,
no I/O (agent/datapath/nft_capture.py sends it, docs/datapath.md explains it).

Node namespace (the agent's own):

    table bridge ambit              bridged pods: lift their TCP frames to L3
      map pod_l3mac  { pod IPv4 : MAC of the pod's host veth }
      chain prerouting  (filter, bridge prerouting, priority -200)
        ip saddr in pod_l3mac  -> ether daddr := that MAC, pkttype host   [bridge_lift_out]
        ip daddr in pod_l3mac  -> ether daddr := that MAC, pkttype host   [bridge_lift_in]
    table ip ambit                  every pod: mark its TCP for the route to the proxy
      set pods  { pod IPv4 }
      chain prerouting  (filter, ip prerouting, priority mangle)
        iif ambit0                  -> return: the proxy's own traffic     [in_pass_from_proxy]
        not TCP                     -> return
        ip saddr @pods              -> goto outbound
        ip daddr @pods              -> goto inbound
      chain outbound
        fib daddr type local        -> return: the pod talks to the node   [out_pass_to_node]
        mark |= 0x100                                                      [out_redirect]
      chain inbound
        mark |= 0x100                                                      [in_redirect]
    + `ip rule fwmark 0x100/0x100 lookup 100`, table 100: default via the proxy's address

Proxy namespace:

    table ip ambit
      set local_pods  { pod IPv4 }  (an enrolled pod's SYN is outbound)
      chain prerouting  (filter, ip prerouting, priority mangle)
        iif != eth0 or not TCP      -> accept untouched
        ip daddr 169.254.7.2        -> from the node (169.254.7.1) to 15020/15021: accept
                                       [proxy_pass_own_addr]; else drop    [proxy_drop_own_addr]
        not a pure SYN              -> mark 0x100, accept: the stack finds
                                       the owner or answers RST            [proxy_not_syn]
        ip saddr @local_pods        -> goto to_outbound
        tcp dport 15008             -> goto to_hbone
                                    -> goto to_inbound
      chain to_outbound / to_hbone / to_inbound
        tproxy to :15001 / :15008 / :15006, mark 0x100, accept  [proxy_to_outbound/_hbone/_inbound_plaintext]
        drop: no listener (agent down), fail closed              [proxy_drop_no_listener]
    (the existing `fwmark 0x100/0x100 lookup 100` + `local 0.0.0.0/0 dev lo
    table 100` deliver what tproxy assigned)

A bridge delivers pod-to-pod frames at L2, below every ip hook; only the
bridge family sees them. Rewriting the destination MAC to the pod's own host
veth (a local address of the bridge: every port's MAC is) makes the bridge
hand the frame to its IP stack instead, where the ip table marks it.

Per-pod state is set elements only, each with a comment naming its veth
("veth=<name> ifindex=<n>[ bridge=<name>]"): enrol adds them, release
deletes them, and the kernel can be read back to rebuild who owns what.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from . import constants

Command = dict[str, Any]
Expr = dict[str, Any]

TABLE = "ambit"
NODE_POD_SET = "pods"
BRIDGE_POD_MAP = "pod_l3mac"
PROXY_POD_SET = "local_pods"
BRIDGE_PRIORITY = -200  # before br_netfilter (0), which would hand the frame to the ip hooks unchanged
MANGLE_PRIORITY = -150

# Named counters per namespace, the nftables counterpart of verdict_counts.
NODE_COUNTERS = ("in_pass_from_proxy", "out_pass_to_node", "out_redirect", "in_redirect")
BRIDGE_COUNTERS = ("bridge_lift_out", "bridge_lift_in")
PROXY_COUNTERS = ("proxy_pass_own_addr", "proxy_drop_own_addr", "proxy_not_syn", "proxy_to_outbound",
                  "proxy_to_hbone", "proxy_to_inbound_plaintext", "proxy_drop_no_listener")

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
        text = f"veth={self.host_veth} ifindex={self.host_ifindex}"
        return f"{text} bridge={self.bridge}" if self.bridge else text


@dataclass(frozen=True)
class Owner:
    """What an element's comment says about the pod it belongs to."""

    host_ifindex: int
    host_veth: str
    bridge: str | None


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


_OR_CAPTURED = {"|": [_meta("mark"), constants.MARK_CAPTURED]}
_IS_TCP = _match(_meta("l4proto"), "tcp")


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
        *_counters("bridge", BRIDGE_COUNTERS),
        *_base_chain("bridge", "prerouting", "prerouting", BRIDGE_PRIORITY),
        {"add": {"table": {"family": "ip", "name": TABLE}}},
        {"add": {"set": {"family": "ip", "table": TABLE, "name": NODE_POD_SET, "type": "ipv4_addr"}}},
        *_counters("ip", NODE_COUNTERS),
        *_base_chain("ip", "prerouting", "prerouting", MANGLE_PRIORITY),
        *_chain("ip", "outbound"),
        *_chain("ip", "inbound"),
    ]
    for direction, field in (("out", "saddr"), ("in", "daddr")):
        lift = {"mangle": {"key": _payload("ether", "daddr"),
                           "value": {"map": {"key": _payload("ip", field), "data": f"@{BRIDGE_POD_MAP}"}}}}
        # A key missing from the map makes the lookup fail: the rule does
        # not match and the frame is bridged as usual.
        cmds.append(_rule("bridge", "prerouting", _match(_payload("ip", "protocol"), "tcp"), lift,
                          {"mangle": {"key": _meta("pkttype"), "value": "host"}},
                          _counter(f"bridge_lift_{direction}"), {"accept": None}))
    cmds += [
        # Bypass: the proxy sends with the pod's address after it authorized
        # the connection; marking it again would loop it back to the proxy.
        _rule("ip", "prerouting", _match(_meta("iif"), node_link_ifindex), _counter("in_pass_from_proxy"),
              {"return": None}),
        _rule("ip", "prerouting", _match(_meta("l4proto"), "tcp", "!="), {"return": None}),
        _rule("ip", "prerouting", _match(_payload("ip", "saddr"), f"@{NODE_POD_SET}"),
              {"goto": {"target": "outbound"}}),
        _rule("ip", "prerouting", _match(_payload("ip", "daddr"), f"@{NODE_POD_SET}"),
              {"goto": {"target": "inbound"}}),
        # The node itself (its addresses, kubelet's peers) is not meshed: the
        # proxy could not stand in the middle (docs/datapath.md).
        _rule("ip", "outbound", _match({"fib": {"result": "type", "flags": ["daddr"]}}, "local"),
              _counter("out_pass_to_node"), {"return": None}),
        _rule("ip", "outbound", _set_mark(_OR_CAPTURED), _counter("out_redirect")),
        _rule("ip", "inbound", _set_mark(_OR_CAPTURED), _counter("in_redirect")),
    ]
    return cmds


def proxy_rules(proxy_link_ifindex: int) -> list[Command]:
    """Table, set, counters, chains and rules of the proxy namespace (one
    transaction; idempotent). proxy_link_ifindex: eth0 there."""
    cmds: list[Command] = [
        {"add": {"table": {"family": "ip", "name": TABLE}}},
        {"add": {"set": {"family": "ip", "table": TABLE, "name": PROXY_POD_SET, "type": "ipv4_addr"}}},
        *_counters("ip", PROXY_COUNTERS),
        *_base_chain("ip", "prerouting", "prerouting", MANGLE_PRIORITY),
    ]
    for chain, _, _ in PROXY_STEERING:
        cmds += _chain("ip", chain)
    pure_syn = _match({"&": [_payload("tcp", "flags"), ["syn", "ack"]]}, "syn", "!=")
    cmds += [
        _rule("ip", "prerouting", _match(_meta("iif"), proxy_link_ifindex, "!="), {"accept": None}),
        _rule("ip", "prerouting", _match(_meta("l4proto"), "tcp", "!="), {"accept": None}),
        # The proxy's own address is no way in around the capture (the
        # listeners are bound to any address): only the node, to the
        # metrics and readiness ports (docs/datapath.md).
        _rule("ip", "prerouting", _match(_payload("ip", "daddr"), constants.PROXY_LINK_ADDR),
              _match(_payload("ip", "saddr"), constants.NODE_LINK_ADDR),
              _match(_payload("tcp", "dport"), {"set": [constants.METRICS_PORT, constants.READINESS_PORT]}),
              _counter("proxy_pass_own_addr"), {"accept": None}),
        _rule("ip", "prerouting", _match(_payload("ip", "daddr"), constants.PROXY_LINK_ADDR),
              _counter("proxy_drop_own_addr"), {"drop": None}),
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


def remove_tables(families: tuple[str, ...]) -> list[Command]:
    """Delete our tables whether or not they exist (add first, so the
    delete always finds one and the transaction cannot fail on absence)."""
    cmds: list[Command] = []
    for family in families:
        table = {"family": family, "name": TABLE}
        cmds += [{"add": {"table": table}}, {"delete": {"table": table}}]
    return cmds


# --- per-pod elements ----------------------------------------------------
def _elem(ip: ipaddress.IPv4Address, comment: str | None = None) -> Any:
    return {"elem": {"val": str(ip), "comment": comment}} if comment else str(ip)


def _set_ref(family: str, name: str) -> dict[str, str]:
    return {"family": family, "table": TABLE, "name": name}


def set_replace(family: str, name: str, entries: list[PodEntry]) -> list[Command]:
    """Add each address with its owner comment, replacing an element a
    previous owner left (add, delete, add: the delete always finds it)."""
    ref = _set_ref(family, name)
    cmds: list[Command] = []
    for e in entries:
        cmds += [{"add": {"element": {**ref, "elem": [_elem(e.ip)]}}},
                 {"delete": {"element": {**ref, "elem": [_elem(e.ip)]}}},
                 {"add": {"element": {**ref, "elem": [_elem(e.ip, e.comment)]}}}]
    return cmds


def set_remove(family: str, name: str, ips: list[ipaddress.IPv4Address]) -> list[Command]:
    """Delete addresses whether or not they are present (add, then delete)."""
    ref = _set_ref(family, name)
    cmds: list[Command] = []
    for ip in ips:
        cmds += [{"add": {"element": {**ref, "elem": [_elem(ip)]}}},
                 {"delete": {"element": {**ref, "elem": [_elem(ip)]}}}]
    return cmds


def map_add(entries: list[PodEntry]) -> list[Command]:
    """The bridge map's elements of bridged pods. Fails with EEXIST when an
    address is mapped to another MAC (a previous owner's): the caller then
    deletes that element first (map_remove)."""
    elems = [[_elem(e.ip, e.comment), e.host_mac] for e in entries if e.bridge]
    if not elems:
        return []
    return [{"add": {"element": {**_set_ref("bridge", BRIDGE_POD_MAP), "elem": elems}}}]


def map_remove(ips: list[ipaddress.IPv4Address]) -> list[Command]:
    """Delete map elements by key (fails with ENOENT if one is absent: maps
    have data, so the add-then-delete trick needs a value we may not know)."""
    if not ips:
        return []
    return [{"delete": {"element": {**_set_ref("bridge", BRIDGE_POD_MAP), "elem": [str(ip) for ip in ips]}}}]


def list_set(family: str, name: str, kind: str = "set") -> Command:
    return {"list": {kind: _set_ref(family, name)}}


def elements(listing: list[dict[str, Any]], kind: str = "set") -> dict[ipaddress.IPv4Address, Owner | None]:
    """Elements of a `list set`/`list map` answer: address -> owner."""
    found: dict[ipaddress.IPv4Address, Owner | None] = {}
    for obj in listing:
        body = obj.get(kind)
        if not body:
            continue
        for item in body.get("elem", []):
            key = item[0] if kind == "map" else item
            if isinstance(key, dict):
                inner = key["elem"]
                found[ipaddress.IPv4Address(inner["val"])] = parse_comment(inner.get("comment"))
            else:
                found[ipaddress.IPv4Address(key)] = None
    return found


def counter_values(listing: list[dict[str, Any]]) -> dict[str, int]:
    """Packets per named counter of a `list counters` answer."""
    return {obj["counter"]["name"]: int(obj["counter"]["packets"]) for obj in listing if "counter" in obj}
