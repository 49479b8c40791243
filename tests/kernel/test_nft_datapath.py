"""What only the nftables backend has: its rule set, per-pod set elements
named after their veth, routed (ptp) pods next to bridged ones, and
removal of exactly what it added. Checked in the kernel with libnftables'
JSON `list ruleset` (tests/support/nftstate.py) and netlink, never with the
backend's own reading code. The scenarios both backends share are in
test_datapath.py and test_capture_e2e.py.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from ambit.agent.datapath import constants
from ambit.agent.datapath import nft_ruleset as rs
from ambit.agent.datapath.nft_capture import NftDatapath
from ambit.agent.datapath.nft_session import NftError, NftSession
from ambit.agent.netlink import iproute
from ambit.agent.netns import netns_path, run_in_netns
from tests.kernel.test_datapath import (SHORT, BridgeNetwork, Pod, ProxyListeners, connect, make_netns,
                                        remove_netns, tcp_listener)
from tests.support import nftstate

pytestmark = pytest.mark.kernel

APP_PORT = 8080


@dataclass
class NftNode:
    netns: str
    datapath: NftDatapath
    bridged: BridgeNetwork
    routed: BridgeNetwork

    @property
    def proxy_netns(self) -> str:
        return self.datapath.proxy_ns.path

    def bound(self) -> list[str]:
        """The source binding's elements of the node (sets of the bridge,
        ip and ip6 tables), as nftstate renders them."""
        steering = ("pods ", "pod_l3mac ", "local_pods ")  # port_l3mac binds and lifts: listed here
        return [e for e in nftstate.elements(self.netns) if not e.startswith(steering)]

    def host_mac(self, pod: Pod) -> str:
        with iproute(self.netns) as ipr:
            return ipr.get_links(pod.host_ifindex)[0].get("IFLA_ADDRESS")

    def elements(self) -> dict[str, set[str]]:
        """"<table>" -> addresses, across the node and proxy namespaces."""
        found: dict[str, set[str]] = {"pods": set(), "pod_l3mac": set(), "local_pods": set()}
        for entry in nftstate.elements(self.netns) + nftstate.elements(self.proxy_netns):
            table, _, key = entry.partition(" ")
            if table in found:  # the steering tables (bound() has the source binding's)
                found[table].add(key)
        return found


def node_namespace_objects(tag: str, tmp_path) -> tuple[str, str, BridgeNetwork, BridgeNetwork]:
    node_ns, proxy_ns = f"nft-node-{tag}", f"nft-proxy-{tag}"
    make_netns(node_ns)
    bridged = BridgeNetwork(node_ns, "10.233.2.0/25", tmp_path / "br", tag, "nft")
    routed = BridgeNetwork(node_ns, "10.233.2.128/25", tmp_path / "ptp", f"{tag}r", "nft", routed=True)
    return node_ns, proxy_ns, bridged, routed


@pytest.fixture(scope="module")
def nft_node(tmp_path_factory) -> Iterator[NftNode]:
    tag = uuid.uuid4().hex[:6]
    node_ns, proxy_ns, bridged, routed = node_namespace_objects(tag, tmp_path_factory.mktemp("nft"))
    dp = NftDatapath(node_netns=node_ns, proxy_netns=proxy_ns)
    try:
        dp.install()
        yield NftNode(node_ns, dp, bridged, routed)
    finally:
        bridged.cleanup()
        routed.cleanup()
        try:
            dp.uninstall()
        finally:
            remove_netns(proxy_ns)
            remove_netns(node_ns)


def rules_of(objects: list[dict], family: str, chain: str) -> list[list[dict]]:
    return [o["rule"]["expr"] for o in objects
            if "rule" in o and o["rule"]["family"] == family and o["rule"]["table"] == "ambit"
            and o["rule"]["chain"] == chain]


def test_installed_rule_set(nft_node):
    node = nftstate.ambit_objects(nft_node.netns)
    assert node["tables"] == ["bridge", "ip", "ip6"]
    assert node["sets"] == ["bridge pod_addrs", "bridge pod_l3mac", "bridge pod_ports", "bridge port_l3mac",
                            "bridge port_sources", "ip pod_links", "ip pod_sources", "ip pods", "ip6 pod_links",
                            "ip6 pods6"]
    assert node["chains"] == ["bridge forward", "bridge from_pod", "bridge lift", "bridge output", "bridge prerouting",
                              "bridge to_pod", "ip bridged", "ip classify", "ip inbound", "ip outbound", "ip prerouting",
                              "ip routed_pod", "ip6 forward"]
    proxy = nftstate.ambit_objects(nft_node.proxy_netns)
    assert proxy["tables"] == ["ip"] and proxy["sets"] == ["ip local_pods"]
    assert proxy["chains"] == ["ip own_addr", "ip prerouting", "ip to_hbone", "ip to_inbound", "ip to_outbound"]

    objects = nftstate.ruleset(nft_node.netns)
    hooks = {(o["chain"]["family"], o["chain"]["name"]): (o["chain"].get("hook"), o["chain"].get("prio"))
             for o in objects if "chain" in o and o["chain"]["table"] == "ambit"}
    assert hooks[("bridge", "prerouting")] == ("prerouting", -200)  # before br_netfilter
    assert hooks[("ip", "prerouting")] == ("prerouting", -150)
    mark_or_captured = {"mangle": {"key": {"meta": {"key": "mark"}},
                                   "value": {"|": [{"meta": {"key": "mark"}}, constants.MARK_CAPTURED]}}}
    assert mark_or_captured in rules_of(objects, "ip", "outbound")[-1]
    assert mark_or_captured in rules_of(objects, "ip", "inbound")[-1]
    bypass = rules_of(objects, "ip", "prerouting")[0][0]["match"]
    assert bypass["left"] == {"meta": {"key": "iif"}} and bypass["right"] == constants.NODE_LINK

    proxy_objects = nftstate.ruleset(nft_node.proxy_netns)
    for chain, port in (("to_outbound", constants.OUTBOUND_PORT), ("to_hbone", constants.HBONE_PORT),
                        ("to_inbound", constants.INBOUND_PLAINTEXT_PORT)):
        steer, fallback = rules_of(proxy_objects, "ip", chain)
        assert {"tproxy": {"port": port}} in steer
        assert {"mangle": {"key": {"meta": {"key": "mark"}}, "value": constants.MARK_CAPTURED}} in steer
        assert {"drop": None} in fallback  # no listener: fail closed

    # Marked packets leave the node through ambit0 to the proxy's address.
    with iproute(nft_node.netns) as ipr:
        rules = [(r.get("FRA_PRIORITY"), r.get("FRA_FWMARK"), r.get("FRA_FWMASK"))
                 for r in ipr.get_rules(family=socket.AF_INET) if r.get("FRA_TABLE") == constants.ROUTE_TABLE]
        routes = [(r.get("RTA_GATEWAY"), r.get("RTA_OIF"), r["dst_len"])
                  for r in ipr.get_routes(family=socket.AF_INET, table=constants.ROUTE_TABLE)
                  if r.get("RTA_TABLE") == constants.ROUTE_TABLE]
        ambit0 = ipr.link_lookup(ifname=constants.NODE_LINK)[0]
    assert rules == [(constants.RULE_PRIORITY, constants.MARK_CAPTURED, constants.MARK_CAPTURED)]
    assert routes == [(constants.PROXY_LINK_ADDR, ambit0, 0)]


def test_elements_name_their_veth_bridged_and_routed(nft_node):
    dp = nft_node.datapath
    b, r = nft_node.bridged.add("eb"), nft_node.routed.add("er")
    try:
        on_bridge = dp.attach_pod(b.host_ifindex, [b.ip])
        routed = dp.attach_pod(r.host_ifindex, [r.ip])
        assert on_bridge.bridge == "dpt-br0" and on_bridge.complete
        assert routed.bridge is None and routed.complete

        ruleset = nftstate.ruleset(nft_node.netns)
        pods_set = next(o["set"] for o in ruleset if o.get("set", {}).get("name") == "pods")
        comments = {e["elem"]["val"]: e["elem"]["comment"] for e in pods_set["elem"]}
        assert comments[b.ip].split() == [f"veth={on_bridge.host_veth}", f"ifindex={b.host_ifindex}",
                                          "bridge=dpt-br0"]
        assert comments[r.ip].split() == [f"veth={routed.host_veth}", f"ifindex={r.host_ifindex}"]
        l3mac = next(o["map"] for o in ruleset if o.get("map", {}).get("name") == "pod_l3mac")
        assert [(k["elem"]["val"], mac) for k, mac in l3mac["elem"]] == [(b.ip, nft_node.host_mac(b))]
        assert nft_node.elements() == {"pods": {b.ip, r.ip}, "pod_l3mac": {b.ip}, "local_pods": {b.ip, r.ip}}
        # each address bound to its veth, in the bridge table (ports) and the ip table (routed links)
        veths = {on_bridge.host_veth: b.ip, routed.host_veth: r.ip}
        assert sorted(nft_node.bound()) == sorted(
            [f"{table} {veth}" for table in ("pod_ports", "pod_links", "pod_links") for veth in veths]
            + [f"{table} {veth} . {ip}" for table in ("port_sources", "pod_sources") for veth, ip in veths.items()]
            + [f"pod_addrs {ip}" for ip in veths.values()] + [f"port_l3mac {on_bridge.host_veth} . {b.ip}"])
        port_l3mac = next(o["map"] for o in ruleset if o.get("map", {}).get("name") == "port_l3mac")
        assert [mac for _, mac in port_l3mac["elem"]] == [nft_node.host_mac(b)]
    finally:
        for pod in (b, r):
            dp.detach_pod(pod.host_ifindex, [pod.ip])
    assert nft_node.elements() == {"pods": set(), "pod_l3mac": set(), "local_pods": set()}
    assert nft_node.bound() == []


def test_routed_pods_are_captured_in_both_directions(nft_node):
    """ptp pods reach the node's IP stack on their own veth, no bridge
    involved: the ip table alone marks them."""
    dp = nft_node.datapath
    meshed, plain = nft_node.routed.add("rm"), nft_node.routed.add("rp")
    dp.attach_pod(meshed.host_ifindex, [meshed.ip])
    proxy = ProxyListeners(nft_node.proxy_netns)
    made: list[socket.socket] = []
    try:
        before = dp.verdict_counts()
        made.append(out := connect(meshed.netns, (plain.ip, APP_PORT)))
        made.append(conn := proxy.accept(constants.OUTBOUND_PORT))
        assert conn.getsockname() == (plain.ip, APP_PORT) and conn.getpeername() == out.getsockname()
        made.append(inb := connect(plain.netns, (meshed.ip, APP_PORT)))
        made.append(conn := proxy.accept(constants.INBOUND_PLAINTEXT_PORT))
        assert conn.getsockname() == (meshed.ip, APP_PORT) and conn.getpeername() == inb.getsockname()
        after = dp.verdict_counts()
        delta = {k: after[k] - before[k] for k in after if after[k] != before[k]}
        assert delta["out_redirect"] >= 1 and delta["in_redirect"] >= 1
        assert "bridge_lift_out" not in delta and "bridge_lift_in" not in delta
    finally:
        for s in made:
            s.close()
        proxy.close()
        dp.detach_pod(meshed.host_ifindex, [meshed.ip])


def test_a_bridged_pods_tcp_is_bound_and_lifted_by_one_lookup_and_without_it_still_captured(nft_node):
    """A bridged pod's TCP is lifted by its `veth . address` pair in
    port_l3mac (and marked for the ip table). A pod enrolled by an agent
    from before that map has no pair there: its TCP is still lifted by its
    address past the bound pair (the lift chain), never bridged around the
    proxy, and attached() reports it incomplete so that reconcile repairs it."""
    dp = nft_node.datapath
    meshed, plain = nft_node.bridged.add("lm"), nft_node.bridged.add("lp")
    captured = dp.attach_pod(meshed.host_ifindex, [meshed.ip])
    proxy = ProxyListeners(nft_node.proxy_netns)
    made: list[socket.socket] = []

    def captured_once() -> dict[str, int]:
        before = dp.verdict_counts()
        made.append(out := connect(meshed.netns, (plain.ip, APP_PORT)))
        made.append(conn := proxy.accept(constants.OUTBOUND_PORT))
        assert conn.getsockname() == (plain.ip, APP_PORT) and conn.getpeername() == out.getsockname()
        after = dp.verdict_counts()
        return {k: after[k] - before[k] for k in after if after[k] != before[k]}

    try:
        delta = captured_once()
        assert delta["bridge_lift_out"] >= 1 and delta["out_redirect"] >= 1
        pair = f"{captured.host_veth} . {meshed.ip}"
        run_in_netns(nft_node.netns, lambda: _nft_cmd(f"delete element bridge ambit port_l3mac {{ {pair} }}"))
        assert f"port_l3mac {pair}" not in nft_node.bound()
        (state,) = [c for c in dp.attached() if c.host_ifindex == meshed.host_ifindex]
        assert not state.lifted and not state.complete
        delta = captured_once()
        assert delta["bridge_lift_out"] >= 1 and delta["out_redirect"] >= 1
        assert dp.attach_pod(meshed.host_ifindex, [meshed.ip]).complete  # reconcile's repair
        assert f"port_l3mac {pair}" in nft_node.bound()
    finally:
        for s in made:
            s.close()
        proxy.close()
        dp.detach_pod(meshed.host_ifindex, [meshed.ip])
    assert nft_node.bound() == []


def _nft_cmd(text: str) -> None:
    import nftables
    rc, _, err = nftables.Nftables().cmd(text)
    assert rc == 0, err


def _ipv4_udp_frame(src_mac: str, src_ip: str, dst_ip: str, port: int) -> bytes:
    """A broadcast Ethernet frame with an IPv4 UDP datagram, as a pod with
    NET_RAW can send one, with any source MAC."""
    payload = b"who am i"
    udp = struct.pack("!HHHH", port, port, 8 + len(payload), 0) + payload
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, socket.IPPROTO_UDP, 0,
                         socket.inet_aton(src_ip), socket.inet_aton(dst_ip))
    total = sum(struct.unpack("!10H", header))
    total = (total & 0xFFFF) + (total >> 16)
    header = header[:10] + struct.pack("!H", ~((total & 0xFFFF) + (total >> 16)) & 0xFFFF) + header[12:]
    return b"\xff" * 6 + bytes.fromhex(src_mac.replace(":", "")) + b"\x08\x00" + header + udp


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _pod_mac(pod: Pod) -> str:
    with iproute(pod.netns) as ipr:
        return ipr.get_links(ifname="eth0")[0].get("IFLA_ADDRESS")


def _fdb_port(node_netns: str, mac: str) -> int | None:
    """The bridge port the node's bridge forwards `mac` to (learned entry)."""
    with iproute(node_netns) as ipr:
        return next((e["ifindex"] for e in ipr.get_neighbours(family=socket.AF_BRIDGE)
                     if str(e.get("NDA_LLADDR", "")).lower() == mac.lower()), None)


def test_a_pod_that_poisons_the_bridges_forwarding_table_gets_no_other_pods_traffic(nft_node):
    """Attack on what the node sends to a pod (the proxy's plaintext to its
    destination pod goes out this way): the attacker sends a frame with the
    victim's MAC as its source, from its own bound address (so the source
    binding and the ARP rules let it through), and the bridge learns the
    victim's MAC on the attacker's port. What the node then sends to the
    victim is dropped by the bridge output chain (`in_drop_misdelivered`)
    and never reaches the attacker's veth."""
    dp = nft_node.datapath
    victim, attacker = nft_node.bridged.add("mv"), nft_node.bridged.add("ma")
    dp.attach_pod(victim.host_ifindex, [victim.ip])
    dp.attach_pod(attacker.host_ifindex, [attacker.ip])
    port = 9999
    victim_mac = _pod_mac(victim)
    inbox = run_in_netns(victim.netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    sniffer = run_in_netns(attacker.netns, lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW,
                                                                 socket.htons(0x0800)))
    sender = run_in_netns(nft_node.netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    try:
        # Nothing of the victim's own re-teaches the bridge meanwhile (IPv6
        # router solicitations and DAD after its link came up).
        run_in_netns(victim.netns, lambda: _write("/proc/sys/net/ipv6/conf/eth0/disable_ipv6", "1"))
        inbox.bind(("0.0.0.0", port))
        inbox.settimeout(SHORT)
        sniffer.bind(("eth0", 0x0800))
        # The node resolves the victim (ARP) and reaches it.
        sender.sendto(b"first", (victim.ip, port))
        assert inbox.recv(64) == b"first"
        assert _fdb_port(nft_node.netns, victim_mac) == victim.host_ifindex
        # The attacker's frame: its own address (bound), the victim's MAC.
        sniffer.send(_ipv4_udp_frame(victim_mac, attacker.ip, "255.255.255.255", port - 1))
        deadline = time.monotonic() + 5
        while _fdb_port(nft_node.netns, victim_mac) != attacker.host_ifindex:
            assert time.monotonic() < deadline, "the bridge never learned the victim's MAC on the attacker's port"
            time.sleep(0.05)
        before = dp.verdict_counts().get("in_drop_misdelivered", 0)
        sender.sendto(b"second", (victim.ip, port))
        deadline = time.monotonic() + 5
        while dp.verdict_counts().get("in_drop_misdelivered", 0) == before:
            assert time.monotonic() < deadline, "in_drop_misdelivered never counted the node's datagram"
            time.sleep(0.05)
        # Dropped before the attacker's veth: nothing for the victim's
        # address reached it (only its own broadcast went out there).
        sniffer.setblocking(False)
        seen = []
        while True:
            try:
                seen.append(sniffer.recv(2048))
            except BlockingIOError:
                break
        assert not [f for f in seen if f[30:34] == socket.inet_aton(victim.ip)]  # IPv4 destination
    finally:
        for s in (inbox, sniffer, sender):
            s.close()
        for pod in (victim, attacker):
            dp.detach_pod(pod.host_ifindex, [pod.ip])


def test_a_bridged_pods_enrol_and_release_are_one_batch_per_namespace_and_touch_only_its_elements(nft_node):
    """The usual enrol and release go to the kernel as element batches
    (nft_netlink), not through libnftables; what a release removes is
    exactly what libnftables' listing showed for the pod."""
    dp = nft_node.datapath
    gone, kept = nft_node.bridged.add("eg"), nft_node.bridged.add("ek")
    try:
        node, proxy = dp._node_session(), dp._proxy_session()
        batched = node.batched, proxy.batched
        gone_veth = dp.attach_pod(gone.host_ifindex, [gone.ip]).host_veth
        assert (node.batched, proxy.batched) == (batched[0] + 1, batched[1] + 1)
        dp.attach_pod(kept.host_ifindex, [kept.ip])
        before = set(nft_node.bound())
        batched = node.batched, proxy.batched
        dp.detach_pod(gone.host_ifindex, [gone.ip])
        assert (node.batched, proxy.batched) == (batched[0] + 1, batched[1] + 1)
        assert nft_node.elements() == {"pods": {kept.ip}, "pod_l3mac": {kept.ip}, "local_pods": {kept.ip}}
        assert set(nft_node.bound()) == {e for e in before if not {gone.ip, gone_veth} & set(e.split())}
        assert any(kept.ip in e.split() for e in nft_node.bound())
    finally:
        for pod in (gone, kept):
            dp.detach_pod(pod.host_ifindex, [pod.ip])
    assert nft_node.bound() == []


def test_elements_created_by_a_batch_are_listed_as_libnftables_own(nft_node):
    """Keys, map data and owner comments written by nft_netlink read back
    through libnftables exactly as the elements libnftables writes."""
    entry = rs.PodEntry(ipaddress.IPv4Address("10.99.0.5"), 4242, "vethbatch0001", "02:00:00:00:42:05", "dpt-br0")
    owner = rs.Owner(entry.host_ifindex, entry.host_veth, entry.bridge)
    ip6 = [ipaddress.IPv6Address("fd00:99::5")]
    enrol = (rs.map_add([entry], fresh=True) + rs.set_replace("ip", rs.NODE_POD_SET, [entry], fresh=True)
             + rs.bind(owner, [entry.ip], ip6, fresh=True))
    release = (rs.map_remove([entry.ip], entry.host_veth)
               + rs.set_remove("ip", rs.NODE_POD_SET, [entry.ip], present=True)
               + rs.unbind(entry.host_veth, [entry.ip], ip6, present=True))
    plain, fast = NftSession(nft_node.netns), NftSession(nft_node.netns, element_types=rs.element_types())

    def sets() -> list:
        return [o for o in nftstate.ruleset(nft_node.netns) if "set" in o or "map" in o]
    try:
        plain.run(enrol)
        by_libnftables = sets()
        plain.run(release)
        fast.run(enrol)
        assert fast.batched == 1
        assert sets() == by_libnftables
        with pytest.raises(NftError) as again:
            fast.run(enrol)  # a create finds them there: EEXIST, as libnftables' create
        assert again.value.errno == errno.EEXIST
        fast.run(release)
        assert fast.batched == 2
        assert not any(entry.host_veth in str(o) or str(entry.ip) in str(o) for o in sets())
    finally:
        plain.close()
        fast.close()


def test_an_element_batch_with_one_absent_key_deletes_nothing(nft_node):
    """All or nothing, as a libnftables transaction: callers rely on ENOENT
    meaning "nothing applied" to fall back to the forms that cannot fail."""
    dp = nft_node.datapath
    pod = nft_node.bridged.add("ea")
    session = NftSession(nft_node.netns, element_types=rs.element_types())
    try:
        dp.attach_pod(pod.host_ifindex, [pod.ip])
        before = (nft_node.elements(), sorted(nft_node.bound()))
        ip = ipaddress.IPv4Address(pod.ip)
        absent = [{"delete": {"element": {"family": "bridge", "table": rs.TABLE, "name": rs.PORT_SET,
                                          "elem": ["vethnosuch0"]}}}]
        with pytest.raises(NftError) as refused:
            session.run(rs.set_remove("ip", rs.NODE_POD_SET, [ip], present=True) + absent)
        assert refused.value.errno == errno.ENOENT and session.batched == 0
        assert (nft_node.elements(), sorted(nft_node.bound())) == before
    finally:
        session.close()
        dp.detach_pod(pod.host_ifindex, [pod.ip])


def test_detach_without_addresses_finds_them_by_their_comment(nft_node):
    dp = nft_node.datapath
    pod = nft_node.bridged.add("ec")
    dp.attach_pod(pod.host_ifindex, [pod.ip])
    assert pod.ip in nft_node.elements()["pods"]
    dp.detach_pod(pod.host_ifindex)
    assert all(pod.ip not in ips for ips in nft_node.elements().values())


def test_an_address_taken_over_by_another_veth_is_replaced(nft_node):
    """A pod vanished without DEL and its address went to a new pod: the
    new attach replaces every element (the map's MAC too), so nothing of the
    old veth is left to steer."""
    dp = nft_node.datapath
    old, new = nft_node.bridged.add("old"), nft_node.bridged.add("new")
    try:
        dp.attach_pod(old.host_ifindex, [old.ip])
        taken = dp.attach_pod(new.host_ifindex, [old.ip])
        assert [(c.host_ifindex, c.pod_ips, c.complete) for c in dp.attached()] == \
            [(new.host_ifindex, (ipaddress.IPv4Address(old.ip),), True)]
        l3mac = next(o["map"] for o in nftstate.ruleset(nft_node.netns) if o.get("map", {}).get("name") == "pod_l3mac")
        assert [(k["elem"]["val"], mac) for k, mac in l3mac["elem"]] == [(old.ip, nft_node.host_mac(new))]
        assert taken.host_veth != dp.attach_pod(old.host_ifindex, [old.ip]).host_veth  # and back again
        assert [c.host_ifindex for c in dp.attached()] == [old.host_ifindex]
    finally:
        dp.detach_pod(old.host_ifindex, [old.ip])
    assert nft_node.elements() == {"pods": set(), "pod_l3mac": set(), "local_pods": set()}


def test_reinstall_replaces_rules_and_keeps_pods(nft_node):
    dp = nft_node.datapath
    pod = nft_node.bridged.add("ri")
    dp.attach_pod(pod.host_ifindex, [pod.ip])
    try:
        before = (nftstate.ambit_objects(nft_node.netns), nftstate.ambit_objects(nft_node.proxy_netns))
        dp.install()
        assert (nftstate.ambit_objects(nft_node.netns), nftstate.ambit_objects(nft_node.proxy_netns)) == before
        assert pod.ip in nft_node.elements()["local_pods"]
    finally:
        dp.detach_pod(pod.host_ifindex, [pod.ip])


def test_uninstall_from_kernel_state_alone_leaves_other_tables(tmp_path):
    tag = uuid.uuid4().hex[:6]
    node_ns, proxy_ns, bridged, routed = node_namespace_objects(tag, tmp_path)

    def foreign_table() -> None:  # someone else's rules in the node (kube-proxy, a firewall)
        import nftables
        nft = nftables.Nftables()
        rc, _, err = nft.cmd("add table inet other; add chain inet other input "
                             "{ type filter hook input priority 0; }; add rule inet other input tcp dport 22 accept")
        assert rc == 0, err

    try:
        run_in_netns(netns_path(node_ns), foreign_table)
        dp = NftDatapath(node_netns=node_ns, proxy_netns=proxy_ns)
        dp.install()
        pods = [bridged.add("u1"), routed.add("u2")]
        for pod in pods:
            dp.attach_pod(pod.host_ifindex, [pod.ip])
        dp.close()  # the agent is gone; a fresh process cleans up (ambit-agent --cleanup)

        NftDatapath(node_netns=node_ns, proxy_netns=proxy_ns).uninstall()
        assert all(not objects for objects in nftstate.ambit_objects(node_ns).values())
        tables = [(o["table"]["family"], o["table"]["name"]) for o in nftstate.ruleset(node_ns) if "table" in o]
        assert tables == [("inet", "other")]
        assert not os.path.exists(netns_path(proxy_ns))
        with iproute(node_ns) as ipr:
            assert not [r for r in ipr.get_rules(family=socket.AF_INET)
                        if r.get("FRA_TABLE") == constants.ROUTE_TABLE]
            assert not [r for r in ipr.get_routes(family=socket.AF_INET, table=constants.ROUTE_TABLE)
                        if r.get("RTA_TABLE") == constants.ROUTE_TABLE]
        # A second uninstall (nothing left) is not an error.
        NftDatapath(node_netns=node_ns, proxy_netns=proxy_ns).uninstall()
    finally:
        bridged.cleanup()
        routed.cleanup()
        try:
            NftDatapath(node_netns=node_ns, proxy_netns=proxy_ns).uninstall()
        finally:
            remove_netns(proxy_ns)
            remove_netns(node_ns)


def test_fail_closed_without_listener_and_with_agent_handles_closed(nft_node):
    """The rules belong to the kernel, not to the agent process: with its
    handles closed and no listener, an enrolled pod's SYN is dropped."""
    dp = nft_node.datapath
    a, b = nft_node.bridged.add("fa"), nft_node.bridged.add("fb")
    dp.attach_pod(a.host_ifindex, [a.ip])
    server = tcp_listener(b.netns, APP_PORT)
    dp.close()
    try:
        before = nftstate.ruleset(nft_node.proxy_netns)
        client = run_in_netns(netns_path(a.netns), lambda: socket.socket())
        client.settimeout(1.0)
        with pytest.raises(TimeoutError):
            client.connect((b.ip, APP_PORT))
        client.close()
        drops = lambda objs: next(o["counter"]["packets"] for o in objs  # noqa: E731
                                  if o.get("counter", {}).get("name") == "proxy_drop_no_listener")
        assert drops(nftstate.ruleset(nft_node.proxy_netns)) > drops(before)
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()
        dp.detach_pod(a.host_ifindex, [a.ip])
