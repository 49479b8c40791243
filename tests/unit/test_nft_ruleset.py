"""The nftables rule set as data: owner comments, element commands and the
parsing of libnftables' JSON answers (the kernel side is in
tests/kernel/test_nft_datapath.py)."""
from __future__ import annotations

import ipaddress

from ambit.agent.datapath import constants
from ambit.agent.datapath import nft_ruleset as rs

IP = ipaddress.IPv4Address("10.233.9.7")
BRIDGED = rs.PodEntry(IP, 12, "veth1234", "02:00:00:00:00:0c", "cni0")
ROUTED = rs.PodEntry(ipaddress.IPv4Address("10.233.9.8"), 13, "cali5678", "ee:ee:ee:ee:ee:ee", None)


def test_comments_name_the_owner_and_parse_back():
    assert BRIDGED.comment == "veth=veth1234 ifindex=12 bridge=cni0"
    assert rs.parse_comment(BRIDGED.comment) == rs.Owner(12, "veth1234", "cni0")
    assert rs.parse_comment(ROUTED.comment) == rs.Owner(13, "cali5678", None)
    assert rs.parse_comment(None) is None
    assert rs.parse_comment("added by hand") is None
    assert rs.parse_comment("veth=x ifindex=notanumber") is None


def test_set_replace_adds_deletes_then_adds_with_the_comment():
    cmds = rs.set_replace("ip", rs.NODE_POD_SET, [BRIDGED])
    assert [next(iter(c)) for c in cmds] == ["add", "delete", "add"]
    assert cmds[0]["add"]["element"]["elem"] == [str(IP)]
    assert cmds[2]["add"]["element"]["elem"] == [{"elem": {"val": str(IP), "comment": BRIDGED.comment}}]
    assert all(c[next(iter(c))]["element"]["name"] == "pods" for c in cmds)


def test_set_remove_cannot_fail_on_absence():
    cmds = rs.set_remove("ip", rs.PROXY_POD_SET, [IP])
    assert cmds == [{"add": {"element": {"family": "ip", "table": "ambit", "name": "local_pods", "elem": ["10.233.9.7"]}}},
                    {"delete": {"element": {"family": "ip", "table": "ambit", "name": "local_pods",
                                            "elem": ["10.233.9.7"]}}}]


def test_only_bridge_ports_get_a_map_element():
    by_address, by_pair = rs.map_add([BRIDGED, ROUTED])
    assert by_address["add"]["element"]["name"] == rs.BRIDGE_POD_MAP
    assert by_address["add"]["element"]["elem"] == [[{"elem": {"val": str(IP), "comment": BRIDGED.comment}},
                                                    "02:00:00:00:00:0c"]]
    assert by_pair["add"]["element"]["name"] == rs.PORT_LIFT_MAP
    assert by_pair["add"]["element"]["elem"] == [[{"elem": {"val": {"concat": ["veth1234", str(IP)]},
                                                            "comment": BRIDGED.comment}}, "02:00:00:00:00:0c"]]
    assert rs.map_add([ROUTED]) == [] and rs.map_remove([]) == []
    # A release deletes the pairs only when it knows the veth's name.
    assert [c["delete"]["element"]["name"] for c in rs.map_remove([IP], "veth1234")] == [rs.BRIDGE_POD_MAP,
                                                                                          rs.PORT_LIFT_MAP]
    assert rs.map_remove([IP], "veth1234")[1]["delete"]["element"]["elem"] == [{"concat": ["veth1234", str(IP)]}]
    assert [c["delete"]["element"]["name"] for c in rs.map_remove([IP])] == [rs.BRIDGE_POD_MAP]


def test_elements_and_counters_are_read_from_listings():
    listing = [{"set": {"name": "pods", "elem": [{"elem": {"val": "10.233.9.7", "comment": BRIDGED.comment}},
                                                  "10.233.9.9"]}}]
    assert rs.elements(listing) == {IP: rs.Owner(12, "veth1234", "cni0"), ipaddress.IPv4Address("10.233.9.9"): None}
    maps = [{"map": {"name": "pod_l3mac", "elem": [[{"elem": {"val": "10.233.9.7", "comment": "x"}}, "02:.."]]}}]
    assert rs.elements(maps, "map") == {IP: None}
    counters = [{"counter": {"name": "out_redirect", "packets": 5, "bytes": 300}}, {"table": {}}]
    assert rs.counter_values(counters) == {"out_redirect": 5}


def test_every_steering_chain_ends_fail_closed_and_uses_the_shared_constants():
    cmds = rs.proxy_rules(7)
    rules = [c["add"]["rule"] for c in cmds if "rule" in c.get("add", {})]
    for chain, port, counter in rs.PROXY_STEERING:
        steer, last = [r["expr"] for r in rules if r["chain"] == chain]
        assert {"tproxy": {"port": port}} in steer and {"counter": counter} in steer
        assert last == [{"counter": "proxy_drop_no_listener"}, {"drop": None}]
    # Anything for the proxy's own address goes to own_addr (one compare
    # for the rest), which lets the node reach 15020/15021 and drops the rest.
    into = next(r for r in rules if r["chain"] == "prerouting" and _verdict_of(r) == {"goto": {"target": "own_addr"}})
    assert into["expr"][0] == {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                                         "right": constants.PROXY_LINK_ADDR}}
    own, last = [r for r in rules if r["chain"] == "own_addr"]
    assert {"counter": "proxy_pass_own_addr"} in own["expr"] and _verdict_of(own) == {"accept": None}
    assert [e["match"]["right"] for e in own["expr"][:2]] == [
        constants.NODE_LINK_ADDR, {"set": [constants.METRICS_PORT, constants.READINESS_PORT]}]
    assert last["expr"] == [{"counter": "proxy_drop_own_addr"}, {"drop": None}]
    # Before any steering: a SYN to the proxy's address never reaches tproxy.
    prerouting = [r for r in rules if r["chain"] == "prerouting"]
    assert prerouting.index(into) < min(i for i, r in enumerate(prerouting) if "goto" in (_verdict_of(r) or {})
                                        and r is not into)
    node = [c["add"]["rule"] for c in rs.node_rules(3) if "rule" in c.get("add", {})]
    bypass = next(r for r in node if {"counter": "in_pass_from_proxy"} in r["expr"])
    assert bypass["expr"][0]["match"] == {"op": "==", "left": {"meta": {"key": "iif"}}, "right": 3}
    # every counter a rule names is declared
    declared = {c["add"]["counter"]["name"] for c in rs.node_rules(3) + cmds if "counter" in c.get("add", {})}
    used = {e["counter"] for r in rules + node for e in r["expr"] if isinstance(e.get("counter"), str)}
    assert used == declared == set(rs.NODE_COUNTERS + rs.BRIDGE_COUNTERS + rs.IP6_COUNTERS + rs.PROXY_COUNTERS)


def _verdict_of(rule: dict) -> dict | None:
    return next((e for e in rule["expr"] if {"goto", "accept", "drop", "return"} & set(e)), None)


def _counted(rules: list[dict]) -> list[str]:
    return [next(e["counter"] for e in r["expr"] if "counter" in e) for r in rules if any("counter" in e for e in r["expr"])]


def _bound_pair(rule: dict, key: str, name: str) -> bool:
    """The rule matches the bound `<key> . address` pair (op ==)."""
    return any(e.get("match", {}).get("op") == "==" and e["match"]["right"] == f"@{name}"
               and e["match"]["left"].get("concat", [{}])[0] == {"meta": {"key": key}} for e in rule["expr"])


def _lifts_by(rule: dict) -> tuple[dict, str] | None:
    """(key, map) of the rule's destination MAC rewrite, None if it has none."""
    return next(((e["mangle"]["value"]["map"]["key"], e["mangle"]["value"]["map"]["data"]) for e in rule["expr"]
                 if e.get("mangle", {}).get("key") == {"payload": {"protocol": "ether", "field": "daddr"}}), None)


def _sets_mark(rule: dict, bit: int) -> bool:
    return {"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"|": [{"meta": {"key": "mark"}}, bit]}}} in rule["expr"]


def test_only_a_bound_source_is_marked_bound():
    """The ip table sends a TCP frame with MARK_BOUND to `outbound` without
    a lookup, so only a bound `iifname . saddr` pair sets it: from_pod's
    lift out (port_l3mac holds bound pairs only), its bound-pair rule, and
    the lift chain's lift out (only a bound pair enters lift). A pod cannot
    set a mark itself: marks are scrubbed when a packet leaves its
    namespace."""
    node = [c["add"]["rule"] for c in rs.node_rules(3) if "rule" in c.get("add", {})]
    marking = [(r["chain"], _lifts_by(r)) for r in node if _sets_mark(r, constants.MARK_BOUND)]
    saddr = {"payload": {"protocol": "ip", "field": "saddr"}}
    assert marking == [("from_pod", ({"concat": [{"meta": {"key": "iifname"}}, saddr]}, f"@{rs.PORT_LIFT_MAP}")),
                       ("from_pod", None), ("lift", (saddr, f"@{rs.BRIDGE_POD_MAP}"))]
    bound_rule = [r for r in node if r["chain"] == "from_pod" and _sets_mark(r, constants.MARK_BOUND)][1]
    assert _bound_pair(bound_rule, "iifname", rs.PORT_SOURCE_SET)
    assert all(r["family"] == "bridge" for r in node if _sets_mark(r, constants.MARK_BOUND))
    assert constants.MARK_BOUND & constants.MARK_MASK == constants.MARK_BOUND
    assert len({constants.MARK_CAPTURED, constants.MARK_PROXY, constants.MARK_POD_PORT, constants.MARK_BOUND}) == 4
    # The map that binds and lifts is keyed like the bound pairs.
    maps = {c["add"]["map"]["name"]: c["add"]["map"] for c in rs.node_rules(3) if "map" in c.get("add", {})}
    assert maps[rs.PORT_LIFT_MAP]["type"] == ["ifname", "ipv4_addr"] and maps[rs.PORT_LIFT_MAP]["map"] == "ether_addr"


def _lookups(rule: dict) -> int:
    """Set or map lookups a rule makes (a match against @set, or a map as a
    mangle's value)."""
    text = repr(rule["expr"])
    return text.count("'right': '@") + text.count("'data': '@")


def test_a_legitimate_packet_pays_few_rules():
    """Rules a captured round trip's packets walk in the node, with a bound
    pod on a bridge (the first rule that matches ends each walk): the pod's
    TCP frame its port in bridge prerouting and from_pod's first rule, then
    the bypass and the mark in ip prerouting and outbound's two; what the
    proxy sends back 1 in ip prerouting and 1 in bridge output."""
    node = [c["add"]["rule"] for c in rs.node_rules(3) if "rule" in c.get("add", {})]
    chain = lambda family, name: [r for r in node if r["family"] == family and r["chain"] == name]  # noqa: E731
    assert _verdict_of(chain("bridge", "prerouting")[0]) == {"goto": {"target": "from_pod"}}
    assert {"counter": "bridge_lift_out"} in chain("bridge", "from_pod")[0]["expr"]
    ip = chain("ip", "prerouting")
    assert {"counter": "in_pass_from_proxy"} in ip[0]["expr"] and _verdict_of(ip[1]) == {"goto": {"target": "outbound"}}
    assert _lookups(ip[1]) == 0
    assert len(chain("ip", "outbound")) == 2
    assert _verdict_of(chain("bridge", "output")[0]) == {"accept": None}


def test_a_frame_between_ports_outside_the_mesh_pays_what_it_paid_before_the_binding():
    """ea4750f's bridge prerouting made two lookups of such a frame (lift
    out by source, lift in by destination) and its ip prerouting two (source
    and destination in `pods`, when br_netfilter hands bridged frames up);
    the binding keeps those counts: its port, then the lift in, then accept;
    in ip, `bridged`'s source and destination. Bridge forward adds one (the
    output port)."""
    node = [c["add"]["rule"] for c in rs.node_rules(3) if "rule" in c.get("add", {})]
    chain = lambda family, name: [r for r in node if r["family"] == family and r["chain"] == name]  # noqa: E731
    bridge = chain("bridge", "prerouting")
    walked = bridge[:[i for i, r in enumerate(bridge) if _verdict_of(r) == {"accept": None}][1] + 1]
    assert [_lookups(r) for r in walked] == [1, 1, 0] and _verdict_of(walked[2]) == {"accept": None}
    ip = chain("ip", "prerouting")
    before_bridged = ip[:next(i for i, r in enumerate(ip) if _verdict_of(r) == {"goto": {"target": "bridged"}}) + 1]
    assert sum(_lookups(r) for r in before_bridged) == 0
    assert sum(_lookups(r) for r in chain("ip", "bridged")) == 2
    assert _lookups(chain("bridge", "forward")[0]) == 1


def test_the_source_binding_drops_before_anything_is_lifted_or_steered():
    node = [c["add"]["rule"] for c in rs.node_rules(3) if "rule" in c.get("add", {})]
    chain = lambda family, name: [r for r in node if r["family"] == family and r["chain"] == name]  # noqa: E731
    bridge = chain("bridge", "prerouting")
    assert _counted(bridge) == ["bridge_lift_in", "out_drop_spoofed_arp", "in_drop_spoofed_arp", "out_drop_not_ip"]
    assert _counted(chain("bridge", "lift")) == ["bridge_lift_out", "bridge_lift_in"]
    # IPv4 from a pod port goes to from_pod first: there the first rule
    # binds and lifts at once (TCP whose `iifname . saddr` pair is in
    # port_l3mac, bound pairs only; a miss does not match it), then only a
    # bound pair enters lift (marked bound), anything else is dropped. So
    # lift's lift out sees bound sources only.
    assert [r["chain"] for r in node if {"goto": {"target": "from_pod"}} in r["expr"]] == ["prerouting"]
    assert bridge[0]["expr"][1] == {"match": {"op": "==", "left": {"meta": {"key": "iifname"}},
                                              "right": f"@{rs.PORT_SET}"}}
    assert _verdict_of(bridge[0]) == {"goto": {"target": "from_pod"}}
    from_pod = chain("bridge", "from_pod")
    assert _lifts_by(from_pod[0]) == ({"concat": [{"meta": {"key": "iifname"}}, {"payload": {"protocol": "ip",
                                                                                           "field": "saddr"}}]},
                                      f"@{rs.PORT_LIFT_MAP}")
    assert _verdict_of(from_pod[0]) == {"accept": None}
    assert [r["chain"] for r in node if {"goto": {"target": "lift"}} in r["expr"]] == ["from_pod"]
    assert _bound_pair(from_pod[1], "iifname", rs.PORT_SOURCE_SET) and _verdict_of(from_pod[1]) == {"goto": {"target": "lift"}}
    assert from_pod[2]["expr"] == [{"counter": "out_drop_spoofed_source"}, {"drop": None}] and len(from_pod) == 3
    # Any other port: only a lift in (unmarked), whose forged sources the
    # ip table's `bridged` drops.
    lift_in = next(i for i, r in enumerate(bridge) if {"counter": "bridge_lift_in"} in r["expr"])
    assert lift_in == 1 and not _sets_mark(bridge[lift_in], constants.MARK_BOUND)
    assert _lifts_by(bridge[lift_in]) == ({"payload": {"protocol": "ip", "field": "daddr"}}, f"@{rs.BRIDGE_POD_MAP}")
    assert bridge[lift_in + 1]["expr"] == [bridge[0]["expr"][0], {"accept": None}]  # IPv4
    # ARP is accepted for a bound pair or past its drops.
    arp = [i for i, r in enumerate(bridge) if r["expr"][0] == {"match": {"op": "==", "left": {"payload": {
        "protocol": "ether", "field": "type"}}, "right": "arp"}}]
    accepts = [i for i in arp if _verdict_of(bridge[i]) == {"accept": None}]
    arp_drops = [i for i, r in enumerate(bridge) if any("arp" in str(e.get("counter", "")) for e in r["expr"])]
    assert _bound_pair(bridge[accepts[0]], "iifname", rs.PORT_SOURCE_SET) and accepts[0] < min(arp_drops)
    assert accepts[1] > max(arp_drops) and len(accepts) == 2
    # Output, and forward's to_pod (IPv4 to a pod port): only a bound
    # `oifname . daddr` pair is accepted before the drop; to_pod first
    # drops an enrolled source not marked bound (from any other port).
    assert chain("bridge", "forward")[0]["expr"][1] == {"match": {"op": "==", "left": {"meta": {"key": "oifname"}},
                                                                  "right": f"@{rs.PORT_SET}"}}
    assert _verdict_of(chain("bridge", "forward")[0]) == {"goto": {"target": "to_pod"}}
    to_pod = chain("bridge", "to_pod")
    assert to_pod[0]["expr"][0]["match"] == {"op": "==", "left": {"&": [{"meta": {"key": "mark"}},
                                                                        constants.MARK_BOUND]}, "right": 0}
    assert to_pod[0]["expr"][1]["match"]["right"] == f"@{rs.ADDRESS_SET}"
    assert _counted(to_pod[:1]) == ["in_drop_spoofed_source"]
    for rules in (to_pod[1:], chain("bridge", "output")):
        assert _bound_pair(rules[0], "oifname", rs.PORT_SOURCE_SET) and _verdict_of(rules[0]) == {"accept": None}
        assert _counted(rules) == ["in_drop_misdelivered"] and len(rules) == 2
    # ip: outbound and inbound are reached from classify and bridged, and
    # outbound also from prerouting for TCP the bridge marked bound (right
    # after the proxy's bypass; the rest of a bound port's frames return);
    # bridged from any other bridge port (its enrolled sources dropped
    # first), classify from a routed veth's bound pair or past the drop.
    ip = chain("ip", "prerouting")
    steering = [r for r in node if _verdict_of(r) in ({"goto": {"target": "outbound"}}, {"goto": {"target": "inbound"}})]
    assert [r["chain"] for r in steering] == ["prerouting", "bridged", "classify", "classify"]
    bound = {"op": "!=", "left": {"&": [{"meta": {"key": "mark"}}, constants.MARK_BOUND]}, "right": 0}
    assert steering[0] is ip[1] and ip[1]["expr"][0]["match"] == bound and ip[2]["expr"][0]["match"] == bound
    assert _verdict_of(ip[2]) == {"return": None} and len(ip[2]["expr"]) == 2
    assert {"counter": "in_pass_from_proxy"} in ip[0]["expr"]
    assert ip[3]["expr"][0]["match"] == {"op": "==", "left": {"meta": {"key": "iifkind"}}, "right": "bridge"}
    assert _verdict_of(ip[3]) == {"goto": {"target": "bridged"}}
    bridged = chain("ip", "bridged")
    assert _counted(bridged[:1]) == ["in_drop_spoofed_source"]
    assert bridged[0]["expr"][0]["match"]["left"] == {"payload": {"protocol": "ip", "field": "saddr"}}
    into = [i for i, r in enumerate(ip) if _verdict_of(r) == {"goto": {"target": "classify"}}]
    assert into[0] > next(i for i, r in enumerate(ip) if {"counter": "in_drop_spoofed_source"} in r["expr"])
    assert len(into) == 1
    routed = chain("ip", "routed_pod")
    assert _bound_pair(routed[0], "iifname", rs.SOURCE_SET) and _verdict_of(routed[0]) == {"goto": {"target": "classify"}}
    assert routed[1]["expr"] == [{"counter": "out_drop_spoofed_source"}, {"drop": None}] and len(routed) == 2
    # every verdict the shared names promise is counted by the nftables backend too
    shared = set(constants.SOURCE_BINDING_DROPS + constants.IPV6_DROPS)
    assert shared <= set(rs.NODE_COUNTERS + rs.BRIDGE_COUNTERS + rs.IP6_COUNTERS)


def test_bind_and_unbind_touch_the_same_elements():
    owner = rs.Owner(12, "veth1234", "cni0")
    six = ipaddress.IPv6Address("fd00::7")
    added = rs.bind(owner, [IP], [six])
    removed = rs.unbind("veth1234", [IP], [six])
    keys = {(c["add"]["element"]["family"], c["add"]["element"]["name"], repr(c["add"]["element"]["elem"][0]))
            for c in added if "add" in c and "comment" not in repr(c)}
    gone = {(c["delete"]["element"]["family"], c["delete"]["element"]["name"], repr(c["delete"]["element"]["elem"][0]))
            for c in removed if "delete" in c}
    assert keys == gone
    assert ("ip", rs.SOURCE_SET, repr({"concat": ["veth1234", str(IP)]})) in gone
    assert ("bridge", rs.PORT_SET, repr("veth1234")) in gone
    assert ("ip6", rs.POD6_SET, repr(str(six))) in gone
    assert all(c["add"]["element"]["elem"][0]["elem"]["comment"] == owner.comment
               for c in added if "add" in c and "comment" in repr(c))


def test_bound_pairs_take_the_veth_from_the_comment():
    listing = [{"set": {"name": rs.SOURCE_SET, "elem": [
        {"elem": {"val": {"concat": ["veth1234", "10.233.9.7"]}, "comment": BRIDGED.comment}},
        {"concat": [99, "10.233.9.9"]}]}}]
    assert rs.bound_pairs(listing) == [(IP, rs.Owner(12, "veth1234", "cni0")),
                                       (ipaddress.IPv4Address("10.233.9.9"), None)]


def test_the_usual_case_is_one_create_or_delete_per_set_of_the_same_elements():
    owner = rs.Owner(12, "veth1234", "cni0")
    six = ipaddress.IPv6Address("fd00::7")
    fresh = rs.map_add([BRIDGED], fresh=True) + rs.set_replace("ip", rs.NODE_POD_SET, [BRIDGED], fresh=True) + rs.bind(
        owner, [IP], [six], fresh=True)
    robust = rs.map_add([BRIDGED]) + rs.set_replace("ip", rs.NODE_POD_SET, [BRIDGED]) + rs.bind(owner, [IP], [six])
    assert all(next(iter(c)) == "create" for c in fresh)
    sets = [(c["create"]["element"]["family"], c["create"]["element"]["name"]) for c in fresh]
    assert len(sets) == len(set(sets)) == 10  # the two maps, pods, 7 of the binding
    # the same elements, with the same comments, as the form that replaces
    assert [c["create"]["element"] for c in fresh] == [c[next(iter(c))]["element"] for c in robust
                                                       if "comment" in repr(c)]
    present = rs.set_remove("ip", rs.NODE_POD_SET, [IP], present=True) + rs.unbind("veth1234", [IP], [six], present=True)
    gone = rs.set_remove("ip", rs.NODE_POD_SET, [IP]) + rs.unbind("veth1234", [IP], [six])
    assert all(next(iter(c)) == "delete" for c in present)
    assert present == [c for c in gone if "delete" in c]
    assert rs.bind(owner, [IP], [], fresh=True)[-1]["create"]["element"]["name"] == rs.LINK_SET  # no empty command


def test_no_per_pod_command_holds_an_interface_index():
    """libnftables lists every link of the caller's namespace to parse or
    print an interface index, on every command that holds one: a per-pod
    command with an index cost O(pods). Veths are keyed by name."""
    node = rs.node_rules(3)
    types = {(c["add"]["set"]["family"], c["add"]["set"]["name"]): c["add"]["set"]["type"]
             for c in node if "set" in c.get("add", {})}
    assert not [k for k, t in types.items() if "iface_index" in repr(t)]
    assert types["bridge", rs.PORT_SOURCE_SET] == types["ip", rs.SOURCE_SET] == ["ifname", "ipv4_addr"]
    matched = [e["match"]["left"] for c in node if "rule" in c.get("add", {}) for e in c["add"]["rule"]["expr"]
               if "match" in e and str(e["match"]["right"]).startswith("@")]
    assert {"meta": {"key": "iif"}} not in matched and {"meta": {"key": "oif"}} not in matched
    owner = rs.Owner(12, "veth1234", "cni0")
    per_pod = (rs.bind(owner, [IP], [], fresh=True) + rs.bind(owner, [IP], [])
               + rs.unbind("veth1234", [IP], [], present=True) + rs.unbind("veth1234", [IP], [])
               + rs.map_add([BRIDGED], fresh=True) + rs.map_remove([IP], "veth1234"))
    elems = [e[0] if isinstance(e, list) else e for c in per_pod for e in c[next(iter(c))]["element"]["elem"]]
    keys = [e["elem"]["val"] if isinstance(e, dict) and "elem" in e else e for e in elems]
    assert {"concat": ["veth1234", str(IP)]} in keys
    assert not [k for k in keys if isinstance(k, int) or (isinstance(k, dict) and any(
        isinstance(p, int) for p in k["concat"]))]
    assert rs.unbind(None, [IP], []) == rs.set_remove("bridge", rs.ADDRESS_SET, [IP])  # no name: addresses only
