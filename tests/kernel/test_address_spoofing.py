"""The edges between a pod and its node (issue 16), attacked in the default
two-node lab with real pods on each capture backend:

- a pod taking another pod's identity by its address (a second address and
  a gratuitous ARP, IP_TRANSPARENT and raw sockets, a pod outside the mesh):
  refused, because the datapath lets an address out of the veth it was
  enrolled for only and the proxy takes a client's identity from that
  veth's enrolment record;
- a CNI ADD claiming an address the pod does not have, or one a live pod
  owns: refused, the owner stays captured;
- a dual-stack pod's IPv6 TCP: dropped both ways, never around the mesh;
- a DEL with a broken configuration: succeeds, and GC or the agent's
  reconcile removes the record and the kernel state it left;
- host-network traffic (kubelet probes): reaches pods without the mesh,
  a stated limit that `ambitctl trace` names.

Each attack asserts the refusal and the counter or log line that shows it
(`ambitctl status`, the ambit_capture_packets_total metric, CNI errors).

Before the defence, at ea4750f: shop/client-0 (account `client`) with
shop/web-0's address on its interface and a gratuitous ARP connected to
shop/web-1 on node2, and node2 logged the connection as
spiffe://cluster.local/ns/shop/sa/web, allowed; raw SYNs with web-0's
address reached node1's outbound listener as web-0.

The lab adds legacy/probe-1 on node1 (outside the mesh) to the default one;
tests that need more pods make them with the node's own CNI plugins and
remove them. Prefix `spf-`, underlay 10.108.0.0/24, pods 10.236.0.0/16
(IPv6 fd16:1::/64): no other test's. The attacker's extra addresses are
removed after each test, also when it fails; the agent restart comes last.
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from ambit.agent.cli.ambitctl import cmd_status
from ambit.agent.cli.client import AgentClient
from ambit.agent.netns import netns_path
from ambit.cni import spec
from ambit.lab import labconfig
from ambit.lab.cniruntime import CniFailure, CniRuntime, PodSandbox
from ambit.lab.node import cni_plugin_dirs, make_pod_netns, remove_netns
from ambit.lab.processes import lab_namespaces
from ambit.lab.topology import Lab, LabSettings, PodRecord

from tests.support import nftstate
from tests.support.bpffs import lab_bpffs_root
from tests.support.kernelstate import pinned_map_has
from tests.support.labcheck import lab_debris
from tests.support.labobserve import access_log, events, log_mark, metric, scrape, spiffe, watching

pytestmark = pytest.mark.kernel

PREFIX = "spf-"
UNDERLAY = "10.108.0.0/24"
PODS = "10.236.0.0/16"
RANGES = ("10.108.", "10.236.")
BACKENDS = ["ebpf", "nftables"]
WORKLOAD = [sys.executable, "-m", "ambit.lab.podapp"]
SPOOF = [sys.executable, str(Path(__file__).resolve().parents[1] / "support" / "spoof.py")]
IPV6_PODS = "fd16:1::/64"
PROBE_1 = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "probe-1", "namespace": "legacy", "labels": {"app": "probe"}},
           "spec": {"nodeName": "node1", "serviceAccountName": "probe",
                    "containers": [{"name": "probe", "image": "ambit.lab.podapp"}]}}


@pytest.fixture(scope="module", params=BACKENDS)
def lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with lab_bpffs_root(PREFIX) as bpffs_root:
        settings = LabSettings(prefix=PREFIX, state_dir=tmp_path_factory.mktemp("lab") / "state",
                               underlay_cidr=UNDERLAY, pod_supernet=PODS, bpffs_root=bpffs_root,
                               capture=request.param)
        assert lab_debris(settings, RANGES) == [], "a previous run left spf- objects: `ambit lab down --prefix spf-`"
        documents = [*yaml.safe_load_all(labconfig.default_lab_text()), PROBE_1]
        lab = Lab(settings)
        try:
            lab.up(labconfig.parse_documents(documents))
            yield lab
        finally:
            report = lab.down()
        assert report.del_failures == ()
        assert lab_debris(settings, RANGES) == [] and lab_namespaces(PREFIX) == ()


# --- what the attacker does, and what the test reads -------------------------------------------------------

def pod(lab: Lab, key: str) -> PodRecord:
    record = lab.find_pod(key)
    assert record.ip is not None
    return record


def spoof(lab: Lab, attacker: str, *argv: str, timeout: float = 30) -> dict[str, Any]:
    result = lab.exec(attacker, [*SPOOF, *argv], timeout=timeout)
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


@contextlib.contextmanager
def extra_address(where: PodRecord | PodSandbox, cidr: str, *, family: str = "-4") -> Iterator[None]:
    """What an attacker with NET_ADMIN (or a user-space stack) does: another
    address on its own interface, removed afterwards whatever happens."""
    netns = os.path.basename(where.netns)
    add = ["ip", family, "-n", netns, "addr", "add", cidr, "dev", "eth0"]
    subprocess.run([*add, "nodad"] if family == "-6" else add, check=True)
    try:
        yield
    finally:
        subprocess.run(["ip", family, "-n", netns, "addr", "del", cidr, "dev", "eth0"], check=False)


def status(lab: Lab, node: str):
    with AgentClient(lab.state().nodes[node].socket, timeout=5.0) as client:
        return client.status()


def verdicts(lab: Lab, node: str) -> dict[str, int]:
    return dict(status(lab, node).capture_verdicts)


def moved(lab: Lab, node: str, before: dict[str, int]) -> dict[str, int]:
    after = verdicts(lab, node)
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


def drop_metric(lab: Lab, node: str, verdict: str) -> float:
    return metric(scrape(lab, node), "ambit_capture_packets_total", verdict=verdict)


def connections_logged(lab: Lab, node: str, since: int) -> list[dict[str, Any]]:
    return events(lab, node, since, "connection")


def get(lab: Lab, client: str, target: PodRecord, port: int = 8080) -> dict[str, Any]:
    result = lab.exec(client, [*WORKLOAD, "get", f"http://{target.ip}:{port}/", "--timeout", "5"], timeout=30)
    assert result.returncode == 0, f"{client} -> {target.key}: {result.stderr.decode()}"
    return json.loads(result.stdout)


def still_itself(lab: Lab, key: str, account: str) -> None:
    """`key` calls web-1 on node2 and is seen there with its own address
    and its own identity."""
    me, web1 = pod(lab, key), pod(lab, "shop/web-1")
    mark = log_mark(lab, "node2")
    assert get(lab, key, web1)["peer"] == me.ip
    entry = access_log(lab, "node2", mark, listener="hbone")
    assert entry["src"].split(":")[0] == me.ip and entry["src_identity"] == spiffe("shop", account)


def tcp_from(frames: list[bytes], source: str, port: int) -> list[bytes]:
    """IPv4 TCP frames from source:port."""
    packed = bytes(int(x) for x in source.split("."))
    out = []
    for frame in frames:
        if len(frame) >= 38 and frame[12:14] == b"\x08\x00" and frame[23] == 6 and frame[26:30] == packed:
            tcp = 14 + (frame[14] & 0x0F) * 4
            if int.from_bytes(frame[tcp:tcp + 2], "big") == port:
                out.append(frame)
    return out


# --- the attacks ---------------------------------------------------------------------------------------------

def test_a_pod_that_takes_a_neighbours_address_reaches_nobody_as_the_neighbour(lab):
    """The issue's scenario: shop/client-0 puts shop/web-0's address on its
    interface, announces it with a gratuitous ARP and connects from it to
    shop/web-1 on node2. Nothing leaves client-0's veth with web-0's
    address; node2 never sees web's identity from client-0."""
    client, web0, web1 = pod(lab, "shop/client-0"), pod(lab, "shop/web-0"), pod(lab, "shop/web-1")
    # A first honest call: client-0 then knows its gateway's MAC and sends
    # the forged SYN at once (else its ARP for the gateway, from web-0's
    # address, is what gets dropped and the SYN never leaves the pod).
    still_itself(lab, "shop/client-0", "client")
    before, metric_before = verdicts(lab, "node1"), drop_metric(lab, "node1", "out_drop_spoofed_source")
    marks = {node: log_mark(lab, node) for node in ("node1", "node2")}
    with extra_address(client, f"{web0.ip}/32"):
        assert spoof(lab, client.key, "garp", "eth0", web0.ip)["sent"] == 6
        stolen = spoof(lab, client.key, "get", web0.ip, web1.ip, "8080", "--timeout", "3")
    assert not stolen["ok"] and "timed out" in stolen["error"], stolen

    delta = moved(lab, "node1", before)
    assert delta.get("out_drop_spoofed_arp", 0) >= 6, delta     # the announcements never left the veth
    assert delta.get("out_drop_spoofed_source", 0) >= 2, delta  # the SYN and its retransmission
    assert "proxy_to_outbound" not in delta, delta              # nothing reached node1's proxy
    assert drop_metric(lab, "node1", "out_drop_spoofed_source") - metric_before >= 2
    node1 = status(lab, "node1")
    assert node1.spoofed_packets_dropped >= delta["out_drop_spoofed_arp"] + delta["out_drop_spoofed_source"]
    with AgentClient(lab.state().nodes["node1"].socket, timeout=5.0) as agent:
        assert "spoofed packet(s)" in cmd_status(agent, "table")

    for node, mark in marks.items():  # no proxy accepted anything from web-0's address
        assert [e for e in connections_logged(lab, node, mark) if e["src"].split(":")[0] == web0.ip] == [], node

    # The victim was never displaced and the attacker is still only itself.
    still_itself(lab, "shop/web-0", "web")
    still_itself(lab, "shop/client-0", "client")


def test_syns_from_an_address_the_pod_never_had_reach_no_listener(lab):
    """IP_TRANSPARENT (NET_RAW suffices) and raw IP_HDRINCL sockets send
    from web-0's address, or from one nobody has, without configuring it:
    every SYN is dropped on client-0's veth, and web-0 never receives a
    SYN-ACK meant for the forger. IP_FREEBIND (no capability at all) binds
    to web-0's address, but the pod's own kernel will not route from it."""
    client, web0, web1 = pod(lab, "shop/client-0"), pod(lab, "shop/web-0"), pod(lab, "shop/web-1")
    unassigned = web0.ip.rsplit(".", 1)[0] + ".250"
    before = verdicts(lab, "node1")
    marks = {node: log_mark(lab, node) for node in ("node1", "node2")}
    with watching(web0.netns, "eth0") as at_web0:
        freebind = spoof(lab, client.key, "get", web0.ip, web1.ip, "8080", "--freebind", "--timeout", "2")
        forged = spoof(lab, client.key, "get", web0.ip, web1.ip, "8080", "--transparent", "--timeout", "2")
        for source, target in ((web0.ip, web1.ip), (web0.ip, web0.ip), (unassigned, web1.ip)):
            assert spoof(lab, client.key, "syn", source, target, "8080", "--count", "3")["sent"] == 3
    assert not forged["ok"], forged
    assert not freebind["ok"] and "Network is unreachable" in freebind["error"], freebind
    delta = moved(lab, "node1", before)
    assert delta.get("out_drop_spoofed_source", 0) >= 1 + 9, delta
    assert not any(k.startswith("proxy_to_") for k in delta), delta
    assert tcp_from(at_web0.frames, web1.ip, 8080) == [] and tcp_from(at_web0.frames, web0.ip, 8080) == []
    for node, mark in marks.items():  # no proxy accepted anything from web-0's address
        assert [e for e in connections_logged(lab, node, mark) if e["src"].split(":")[0] == web0.ip] == [], node


def test_a_pod_outside_the_mesh_cannot_borrow_an_enrolled_address(lab):
    """legacy/probe-1 (node1, outside the mesh) uses shop/client-0's address
    towards shop/web-0: captured on web-0's side, it would reach node1's
    outbound listener as client-0 (with client's identity and policy); it
    is dropped before the proxy instead."""
    probe, client, web0 = pod(lab, "legacy/probe-1"), pod(lab, "shop/client-0"), pod(lab, "shop/web-0")
    # An honest exchange first (echo on 9000 is open to all): probe-1 then
    # knows web-0's MAC and sends the forged SYNs at once (else its ARP,
    # from client-0's address, is what the nftables bridge chain drops).
    echoed = lab.exec(probe.key, [*WORKLOAD, "send", web0.ip, "9000"], input=b"hello", timeout=30)
    assert echoed.returncode == 0 and echoed.stdout == b"hello", echoed.stderr
    before = verdicts(lab, "node1")
    mark = log_mark(lab, "node1")
    with extra_address(probe, f"{client.ip}/32"):
        borrowed = spoof(lab, probe.key, "get", client.ip, web0.ip, "8080", "--timeout", "2")
        assert spoof(lab, probe.key, "syn", client.ip, web0.ip, "9000", "--count", "3")["sent"] == 3
    assert not borrowed["ok"], borrowed
    delta = moved(lab, "node1", before)
    assert delta.get("in_drop_spoofed_source", 0) >= 1 + 3, delta
    assert not any(k.startswith("proxy_to_") for k in delta), delta
    assert [e for e in connections_logged(lab, "node1", mark) if e["src"].split(":")[0] == client.ip] == []
    still_itself(lab, "shop/client-0", "client")


UDP_PEERS = r"""
import signal, socket, sys
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("0.0.0.0", 9998))
print("listening", flush=True)
while True:
    data, peer = udp.recvfrom(2048)
    print(peer[0], flush=True)
    udp.sendto(data, peer)
"""


@contextlib.contextmanager
def bridge_nf_call_iptables(node_netns: str, value: int) -> Iterator[None]:
    """br_netfilter's hand-over of bridged IPv4 to the ip hooks in the node
    namespace set to value, as it was afterwards whatever happens."""
    key = "net.bridge.bridge-nf-call-iptables"
    was = subprocess.run(in_netns(node_netns, "sysctl", "-n", key), capture_output=True, text=True, check=True)
    subprocess.run(in_netns(node_netns, "sysctl", "-qw", f"{key}={value}"), check=True)
    try:
        yield
    finally:
        subprocess.run(in_netns(node_netns, "sysctl", "-qw", f"{key}={was.stdout.strip()}"), check=True)


@pytest.mark.parametrize("br_netfilter", [1, 0], ids=["br_netfilter", "no_br_netfilter"])
def test_nftables_drops_a_borrowed_address_where_it_enters_an_enrolled_pod(lab, br_netfilter):
    """nftables: a frame from a port outside the mesh is not checked where
    it comes in (a frame between two such ports pays no more lookups than
    before the binding, docs/datapath.md) but where it reaches an enrolled
    pod: legacy/probe-1's UDP to shop/web-0 with shop/client-0's address
    never reaches web-0 and is counted, its own address still gets the
    echo; the same whether or not br_netfilter hands bridged frames to the
    ip hooks (the ip table's `bridged`, else bridge forward's `to_pod`).
    (The eBPF backend checks an enrolled pod's incoming TCP only.)"""
    if lab.settings.capture != "nftables":
        pytest.skip("nftables: the eBPF backend passes non-TCP into an enrolled pod")
    probe, client, web0 = pod(lab, "legacy/probe-1"), pod(lab, "shop/client-0"), pod(lab, "shop/web-0")
    sink = subprocess.Popen(in_netns(web0.netns, sys.executable, "-c", UDP_PEERS), stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout is not None and sink.stdout.readline().strip() == "listening"
        with bridge_nf_call_iptables(lab.state().nodes["node1"].netns, br_netfilter):
            # Its own address first: UDP passes, and probe-1 then knows
            # web-0's MAC (its ARP from client-0's address would be dropped).
            assert spoof(lab, probe.key, "udp", probe.ip, web0.ip, "9998")["ok"]
            before = verdicts(lab, "node1")
            with extra_address(probe, f"{client.ip}/32"):
                borrowed = spoof(lab, probe.key, "udp", client.ip, web0.ip, "9998", "--timeout", "1")
            delta = moved(lab, "node1", before)
    finally:
        sink.terminate()
        peers = sink.communicate(timeout=30)[0].split()
    assert not borrowed["ok"], borrowed
    assert peers == [probe.ip], peers
    assert delta.get("in_drop_spoofed_source", 0) >= 1, delta


# --- pods the tests add with the node's own plugins ----------------------------------------------------------

@contextlib.contextmanager
def sandbox(lab: Lab, name: str, node: str = "node1") -> Iterator[tuple[CniRuntime, PodSandbox]]:
    """A pod sandbox (namespace `spf-x-<name>`) for shop/<name> on `node`,
    and a runtime that runs the node's plugins; the namespace goes
    afterwards whatever happened."""
    record = lab.state().nodes[node]
    runtime = CniRuntime(record.conflist, cni_plugin_dirs(), node_netns=netns_path(record.netns))
    netns = f"{PREFIX}x-{name}"
    box = PodSandbox(container_id=uuid.uuid4().hex, netns=make_pod_netns(netns), namespace="shop", name=name,
                     uid=str(uuid.uuid4()))
    try:
        yield runtime, box
    finally:
        remove_netns(netns)
        runtime.close()


def plugin(runtime: CniRuntime, kind: str) -> dict[str, Any]:
    return next(p for p in runtime.conflist["plugins"] if p["type"] == kind)


@contextlib.contextmanager
def primary_only(runtime: CniRuntime, box: PodSandbox) -> Iterator[dict[str, Any]]:
    """ADD through the chain's primary plugin alone (bridge + host-local):
    the result ambit-cni would get as prevResult; DEL afterwards."""
    primary = runtime.conflist["plugins"][0]
    result = json.loads(runtime.exec_plugin(primary["type"], "ADD", runtime.plugin_conf(primary, None), box).stdout)
    try:
        yield result
    finally:
        runtime.exec_plugin(primary["type"], "DEL", runtime.plugin_conf(primary, result), box)


def ambit_add(runtime: CniRuntime, box: PodSandbox, prev: dict[str, Any]) -> dict[str, Any]:
    return json.loads(runtime.exec_plugin("ambit-cni", "ADD", runtime.plugin_conf(plugin(runtime, "ambit-cni"), prev),
                                          box).stdout)


def workloads(lab: Lab, node: str = "node1") -> dict[str, Any]:
    """The agent's records by container id."""
    with AgentClient(lab.state().nodes[node].socket, timeout=5.0) as client:
        return {w.attachment.container_id: w for w in client.workloads()}


def captured(lab: Lab, ip: str, node: str = "node1") -> bool:
    """Whether the node's kernel still steers `ip` (eBPF: local_pods; nftables:
    the node's `pods` set), read from the kernel, not from the agent."""
    record = lab.state().nodes[node]
    if lab.settings.capture == "ebpf":
        return pinned_map_has(f"{record.bpffs_dir}/local_pods", ipaddress.IPv4Address(ip).packed)
    return f"pods {ip}" in nftstate.elements(record.netns)


def first_ip(result: dict[str, Any], version: int = 4) -> str:
    return next(i["address"].split("/")[0] for i in result["ips"]
                if ipaddress.ip_interface(i["address"]).version == version)


def test_enrol_with_a_foreign_address_is_refused_and_the_owner_stays_captured(lab):
    """An ADD whose prevResult names shop/web-0's address (not on the new
    pod's interface), then one for a pod that really put it on its
    interface: both refused with CNI error 7, nothing recorded, nothing
    released; web-0 stays captured and itself. The honest ADD is taken."""
    web0 = pod(lab, "shop/web-0")
    with sandbox(lab, "intruder-0") as (runtime, box), primary_only(runtime, box) as result:
        own = first_ip(result)
        forged = {**result, "ips": [{**result["ips"][0], "address": f"{web0.ip}/24"}]}
        with pytest.raises(CniFailure) as foreign:
            ambit_add(runtime, box, forged)
        assert foreign.value.code == spec.INVALID_CONFIG, foreign.value.error
        assert f"{web0.ip} are not on the pod's interface" in foreign.value.error["msg"], foreign.value.error

        claimed = {**result, "ips": [*result["ips"], {**result["ips"][0], "address": f"{web0.ip}/24"}]}
        with extra_address(box, f"{web0.ip}/32"):
            with pytest.raises(CniFailure) as live:
                ambit_add(runtime, box, claimed)
        assert live.value.code == spec.INVALID_CONFIG, live.value.error
        assert f"address {web0.ip} belongs to live pod shop/web-0" in live.value.error["msg"], live.value.error

        records = workloads(lab)
        assert box.container_id not in records
        assert [w.pod.name for w in records.values() if web0.ip in [a.split("/")[0] for a in w.ips]] == ["web-0"]
        assert captured(lab, web0.ip)
        still_itself(lab, "shop/web-0", "web")
        assert get(lab, "shop/client-0", web0)["peer"] == pod(lab, "shop/client-0").ip

        ambit_add(runtime, box, result)  # the pod's own address: enrolled
        assert [a.split("/")[0] for a in workloads(lab)[box.container_id].ips] == [own] and captured(lab, own)
        runtime.exec_plugin("ambit-cni", "DEL", runtime.plugin_conf(plugin(runtime, "ambit-cni"), result), box)
        assert box.container_id not in workloads(lab) and not captured(lab, own)


@contextlib.contextmanager
def dual_stack_pod(lab: Lab, name: str, index: int) -> Iterator[tuple[PodSandbox, str, str]]:
    """shop/<name> on node1 from the chain's own plugins with host-local
    handing out an IPv4 and an IPv6 address (a range of its own, away from
    the lab's pods): (sandbox, IPv4, IPv6); DEL and gone afterwards."""
    with sandbox(lab, name) as (runtime, box):
        primary = dict(runtime.conflist["plugins"][0])
        subnet = primary["ipam"]["subnet"]
        v4 = str(ipaddress.ip_network(subnet)[200 + index])
        primary["ipam"] = {"type": "host-local", "dataDir": primary["ipam"]["dataDir"] + "-dual", "ranges": [
            [{"subnet": subnet, "rangeStart": v4, "rangeEnd": v4}], [{"subnet": IPV6_PODS}]]}
        runtime.conflist["plugins"] = [primary, plugin(runtime, "ambit-cni")]
        result = runtime.add(box).result
        try:
            yield box, first_ip(result), first_ip(result, 6)
        finally:
            runtime.delete(box)


LISTENER = r"""
import signal, socket, sys, threading
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
udp.bind(("::", 9999))
def echo():
    while True:
        data, peer = udp.recvfrom(2048); udp.sendto(data, peer)
threading.Thread(target=echo, daemon=True).start()
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", 9999)); s.listen(16)
print("listening", flush=True)
while True:
    c, peer = s.accept(); print(peer[0], flush=True)
    c.recv(4096); c.sendall(b"HTTP/1.0 200 OK\r\n\r\n{}"); c.close()
"""


def in_netns(netns: str, *argv: str) -> list[str]:
    """argv run inside a namespace (a name or a /var/run/netns path)."""
    return ["ip", "netns", "exec", os.path.basename(netns), *argv]


@contextlib.contextmanager
def listener(netns: str) -> Iterator[subprocess.Popen]:
    """A dual-stack TCP listener (and a UDP echo) on :9999 in netns until
    accepted() or the block ends; it prints each TCP peer it accepts."""
    proc = subprocess.Popen(in_netns(netns, sys.executable, "-c", LISTENER), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "listening"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def accepted(proc: subprocess.Popen) -> list[str]:
    """Stop the listener; the peers it accepted."""
    proc.terminate()
    out, _ = proc.communicate(timeout=30)
    return out.split()


def test_ipv6_tcp_of_a_dual_stack_pod_is_dropped_both_ways(lab):
    """Two dual-stack pods enrolled through the real chain (host-local gives
    each an IPv4 and an IPv6 address): their IPv6 TCP to each other, and a
    pod outside the mesh's IPv6 TCP to them, is dropped and counted; IPv4
    TCP to them goes to the proxy as usual; IPv6 UDP still works; the node's
    own IPv6 connection (a probe) still gets through; trace says why."""
    probe, client = pod(lab, "legacy/probe-1"), pod(lab, "shop/client-0")
    before = verdicts(lab, "node1")
    with dual_stack_pod(lab, "dual-0", 0) as (a, a4, a6), dual_stack_pod(lab, "dual-1", 1) as (b, b4, b6), \
            extra_address(probe, "fd16:1::b0/64", family="-6"):
        records = workloads(lab)
        assert sorted(a.split("/")[0] for a in records[a.container_id].ips) == sorted([a4, a6])
        with listener(b.netns) as server:
            mark = log_mark(lab, "node1")
            out = subprocess.run(in_netns(a.netns, *SPOOF, "get6", a6, b6, "9999", "--timeout", "2"),
                                 capture_output=True, text=True)
            into = spoof(lab, probe.key, "get6", "fd16:1::b0", b6, "9999", "--timeout", "2")
            meshed = spoof(lab, client.key, "get", client.ip, b4, "9999")
            node = lab.state().nodes["node1"].netns
            probed = subprocess.run(in_netns(node, *SPOOF, "get6", "::", b6, "9999"), capture_output=True, text=True)
            udp = subprocess.run(in_netns(a.netns, *SPOOF, "udp6", a6, b6, "9999"), capture_output=True, text=True)
            peers = accepted(server)
        with AgentClient(lab.state().nodes["node1"].socket, timeout=5.0) as agent:
            trace = agent.trace(a6, b6, 9999)
    assert not json.loads(out.stdout)["ok"] and not into["ok"], (out.stdout, into)
    assert json.loads(probed.stdout)["ok"], probed.stdout
    assert json.loads(udp.stdout)["ok"], udp.stdout  # IPv6 that is not TCP passes
    assert a6 not in peers and "fd16:1::b0" not in peers and len(peers) == 1, peers  # the node's probe only
    # IPv4 TCP to the dual-stack pod is captured and decided by node1's proxy
    # (which denies it: discovery does not know the test's pods).
    assert not meshed["ok"]
    decided = access_log(lab, "node1", mark, dst=f"{b4}:9999")
    assert decided["listener"] == "outbound" and "unknown destination" in decided["reason"], decided
    delta = moved(lab, "node1", before)
    assert delta.get("out_drop_ipv6_tcp", 0) >= 2 and delta.get("in_drop_ipv6_tcp", 0) >= 2, delta
    assert status(lab, "node1").ipv6_tcp_dropped >= 4
    assert (trace.route, trace.decision) == ("drop", "deny") and "IPv6" in trace.reason, trace


def test_host_network_traffic_reaches_a_pod_without_the_mesh_a_stated_limit(lab):
    """The node's own connection to shop/web-0:8080, which the policy admits
    for shop workloads only: it gets through (kubelet probes must), no proxy
    sees it, and `ambitctl trace` says it is a stated limit."""
    web0 = pod(lab, "shop/web-0")
    node = lab.state().nodes["node1"]
    before, mark = verdicts(lab, "node1"), log_mark(lab, "node1")
    probe = subprocess.run(in_netns(node.netns, *WORKLOAD, "get", f"http://{web0.ip}:8080/", "--timeout", "5"),
                           capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    gateway = json.loads(probe.stdout)["peer"]
    assert connections_logged(lab, "node1", mark) == []
    delta = moved(lab, "node1", before)
    assert not any(k.startswith("proxy_to_") for k in delta), delta  # no proxy took a connection
    if lab.settings.capture == "ebpf":
        assert delta.get("in_pass_from_node", 0) >= 2, delta
    with AgentClient(node.socket, timeout=5.0) as agent:
        trace = agent.trace(gateway, web0.ip, 8080)
    assert (trace.listener, trace.route) == ("none", "direct"), trace
    assert "stated limit" in trace.reason and any("kubelet probes" in s.detail for s in trace.steps), trace


def broken_del(runtime: CniRuntime, box: PodSandbox, stdin: bytes) -> subprocess.CompletedProcess:
    """DEL exactly as a runtime runs it, with `stdin` as the configuration."""
    env = {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": box.container_id, "CNI_NETNS": box.netns,
           "CNI_IFNAME": box.ifname, "CNI_ARGS": box.cni_args(), "CNI_PATH": ":".join(cni_plugin_dirs()),
           "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    return subprocess.run([runtime._find("ambit-cni")], input=stdin, env=env, capture_output=True, timeout=30)


BROKEN = {"not JSON": b"{this is not json",
          "an unsupported version": json.dumps({"cniVersion": "9.9.9", "name": "x", "type": "ambit-cni"}).encode(),
          "a relative socket path": json.dumps({"cniVersion": "1.0.0", "name": "x", "type": "ambit-cni",
                                                "agentSocket": "agent.sock"}).encode()}


def enrolled_then_broken_del(lab: Lab, name: str, broken: bytes) -> tuple[str, str]:
    """A pod enrolled through the whole chain, then deleted by a runtime
    whose DEL configuration ambit-cni cannot read: (container id, address)."""
    with sandbox(lab, name) as (runtime, box):
        result = runtime.add(box).result
        ip = first_ip(result)
        assert box.container_id in workloads(lab) and captured(lab, ip)
        deleted = broken_del(runtime, box, broken)
        assert (deleted.returncode, deleted.stdout) == (0, b""), deleted
        assert b"DEL could not" in deleted.stderr and b"Traceback" not in deleted.stderr, deleted.stderr
        primary = runtime.conflist["plugins"][0]  # the rest of the chain tears the pod down
        runtime.exec_plugin(primary["type"], "DEL", runtime.plugin_conf(primary, result), box)
    assert box.container_id in workloads(lab) and captured(lab, ip)  # nobody told the agent yet
    return box.container_id, ip


def wait_released(lab: Lab, container_id: str, ip: str) -> None:
    deadline = time.monotonic() + 10
    while container_id in workloads(lab) or captured(lab, ip):
        assert time.monotonic() < deadline, f"{container_id[:12]} ({ip}) still recorded or captured"
        time.sleep(0.1)


@pytest.mark.parametrize("broken", list(BROKEN), ids=list(BROKEN))
def test_del_with_a_broken_config_succeeds_and_gc_cleans_up(lab, broken):
    container_id, ip = enrolled_then_broken_del(lab, "gone-0", BROKEN[broken])
    runtime = CniRuntime(lab.state().nodes["node1"].conflist, cni_plugin_dirs())
    try:  # the runtime's GC (CNI 1.1), listing the pods that still exist
        conf = {**runtime.plugin_conf(plugin(runtime, "ambit-cni"), None), "cniVersion": "1.1.0",
                "cni.dev/valid-attachments": [{"containerID": p.container_id, "ifname": "eth0"}
                                              for p in lab.state().pods.values()]}
        runtime.exec_plugin("ambit-cni", "GC", conf, None)
    finally:
        runtime.close()
    wait_released(lab, container_id, ip)
    still_itself(lab, "shop/client-0", "client")  # GC kept the pods that exist


def test_zz_del_with_a_broken_config_then_the_agents_restart_cleans_up(lab):
    """Last: it restarts node1's agent, whose reconcile finds the pod gone."""
    container_id, ip = enrolled_then_broken_del(lab, "gone-1", BROKEN["not JSON"])
    lab.restart_agent("node1")
    wait_released(lab, container_id, ip)
    still_itself(lab, "shop/client-0", "client")
