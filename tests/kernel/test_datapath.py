"""The capture datapaths in real namespaces, each scenario once per backend:
eBPF (capture.Datapath) and nftables (nft_capture.NftDatapath).

A throwaway "node" namespace gets the proxy namespace, the backend's kernel
objects and pods made by the real CNI bridge plugin (run as a runtime runs
it). Minimal IP_TRANSPARENT listeners stand in for the proxy. The datapath
is told the node's namespace (node_netns=), which is how the lab runs
several nodes. Every scenario checks what the proxy's sockets (and the
pods') see, which must be the same for both backends; the verdict counters
(programs' map, or nftables named counters) say which branch a packet took.
"""
from __future__ import annotations

import errno
import ipaddress
import json
import os
import select
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ambit.agent.datapath import constants
from ambit.agent.datapath.capture import Datapath, PodCapture, PodLinkMissing
from ambit.agent.datapath.nft_capture import NftDatapath
from ambit.agent.netlink import iproute
from ambit.agent.netns import create_netns, netns_path, remove_netns, run_in_netns
from tests.support import nftstate

pytestmark = pytest.mark.kernel

CNI_DIR = Path("/usr/lib/cni")
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
TC_INGRESS, TC_EGRESS = 0xFFFFFFF2, 0xFFFFFFF3
APP_PORT = 8080
SHORT = 1.5  # seconds: long enough for a local handshake, short for a drop


# --- pods made by the real CNI bridge plugin ---------------------------------
@dataclass(frozen=True)
class Pod:
    name: str
    netns: str          # name under /var/run/netns
    ip: str
    host_ifindex: int   # its veth in the node namespace
    container_id: str


class BridgeNetwork:
    """Runs /usr/lib/cni/bridge + host-local inside the node namespace (or
    ptp, routed=True: a /32 route per pod, no bridge)."""

    def __init__(self, node_netns: str, subnet: str, workdir: Path, tag: str, prefix: str = "dpt",
                 routed: bool = False) -> None:
        self.node_netns = node_netns
        self.prefix = prefix
        self.conf = {
            "cniVersion": "1.0.0",
            "name": f"dpt-net-{tag}",
            "type": "bridge",
            "bridge": "dpt-br0",
            "isGateway": True,
            "ipMasq": False,
            "ipam": {"type": "host-local", "subnet": subnet, "dataDir": str(workdir / "ipam")},
        }
        if routed:
            self.conf = {k: v for k, v in self.conf.items() if k not in ("bridge", "isGateway")} | {"type": "ptp"}
        self.pods: list[Pod] = []
        self.netns_made: list[str] = []

    def _run(self, command: str, container_id: str, netns: str) -> dict:
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": container_id, "CNI_NETNS": netns_path(netns),
               "CNI_IFNAME": "eth0", "CNI_PATH": str(CNI_DIR), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        proc = subprocess.run(["ip", "netns", "exec", self.node_netns, str(CNI_DIR / self.conf["type"])],
                              input=json.dumps(self.conf).encode(), env=env, capture_output=True, timeout=30)
        if proc.returncode != 0:
            raise RuntimeError(f"CNI {command} failed: {proc.stdout!r} {proc.stderr!r}")
        return json.loads(proc.stdout) if proc.stdout.strip() else {}

    def add(self, name: str) -> Pod:
        ns = f"{self.prefix}-{name}-{uuid.uuid4().hex[:6]}"
        create_netns(ns)
        self.netns_made.append(ns)
        cid = uuid.uuid4().hex
        result = self._run("ADD", cid, ns)
        ip = str(ipaddress.ip_interface(result["ips"][0]["address"]).ip)
        host_veth = next(i["name"] for i in result["interfaces"]
                         if "sandbox" not in i and i["name"] != self.conf.get("bridge"))
        with iproute(self.node_netns) as ipr:
            index = ipr.link_lookup(ifname=host_veth)[0]
        pod = Pod(name, ns, ip, index, cid)
        self.pods.append(pod)
        return pod

    def delete(self, pod: Pod) -> None:
        if pod in self.pods:
            self.pods.remove(pod)
            self._run("DEL", pod.container_id, pod.netns)

    def cleanup(self) -> None:
        for pod in list(self.pods):
            try:
                self.delete(pod)
            except Exception:
                pass
        for ns in self.netns_made:
            if os.path.exists(netns_path(ns)):
                remove_netns(ns)


@dataclass
class Node:
    netns: str
    datapath: Datapath | NftDatapath
    net: BridgeNetwork

    @property
    def backend(self) -> str:
        return "nftables" if isinstance(self.datapath, NftDatapath) else "ebpf"


@dataclass(frozen=True)
class Backend:
    """Names and addresses of one backend's runs (prefixes keep them apart)."""

    name: str
    prefix: str
    subnets: tuple[str, str]  # the shared node's pods, the restart test's

    def datapath(self, node_ns: str, proxy_ns: str, pin_dir: str) -> Datapath | NftDatapath:
        if self.name == "ebpf":
            return Datapath(node_netns=node_ns, proxy_netns=proxy_ns, pin_dir=pin_dir)
        return NftDatapath(node_netns=node_ns, proxy_netns=proxy_ns)


BACKENDS = [Backend("ebpf", "dpt", ("10.251.0.0/25", "10.251.0.128/25")),
            Backend("nftables", "nft-dpt", ("10.233.1.0/25", "10.233.1.128/25"))]


def make_netns(name: str) -> None:
    create_netns(name)
    with iproute(name) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


@pytest.fixture(scope="module", params=BACKENDS, ids=[b.name for b in BACKENDS])
def node(request, tmp_path_factory) -> Iterator[Node]:
    backend: Backend = request.param
    tag = uuid.uuid4().hex[:6]
    node_ns, proxy_ns = f"{backend.prefix}-node-{tag}", f"{backend.prefix}-proxy-{tag}"
    pin_dir = f"/sys/fs/bpf/dpt-{tag}"
    make_netns(node_ns)
    dp = backend.datapath(node_ns, proxy_ns, pin_dir)
    net = BridgeNetwork(node_ns, backend.subnets[0], tmp_path_factory.mktemp("dpt"), tag, backend.prefix)
    try:
        dp.install()
        yield Node(node_ns, dp, net)
    finally:
        net.cleanup()
        try:
            dp.uninstall()
        finally:
            remove_netns(proxy_ns)
            remove_netns(node_ns)
            if os.path.isdir(pin_dir):
                for f in os.listdir(pin_dir):
                    os.unlink(os.path.join(pin_dir, f))
                os.rmdir(pin_dir)


@dataclass(frozen=True)
class Pods:
    a: Pod  # enrolled client
    b: Pod  # enrolled server
    c: Pod  # not enrolled
    d: Pod  # not enrolled


@pytest.fixture(scope="module")
def pods(node: Node) -> Pods:
    a, b, c, d = (node.net.add(n) for n in "abcd")
    for p in (a, b):
        node.datapath.attach_pod(p.host_ifindex, [p.ip])
    return Pods(a, b, c, d)


# --- sockets in namespaces ---------------------------------------------------
def tcp_listener(netns: str, port: int, *, transparent: bool = False) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if transparent:
            s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        s.bind(("0.0.0.0", port))
        s.listen(16)
        s.settimeout(SHORT)
        return s
    return run_in_netns(netns, make)


def tcp_socket(netns: str, *, transparent: bool = False) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if transparent:
            s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        s.settimeout(SHORT)
        return s
    return run_in_netns(netns, make)


def connect(netns: str, dst: tuple[str, int]) -> socket.socket:
    s = tcp_socket(netns)
    s.connect(dst)
    return s


def nothing_pending(listener: socket.socket) -> bool:
    listener.setblocking(False)
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        return True
    finally:
        listener.settimeout(SHORT)
    conn.close()
    return False


class ProxyListeners:
    """Stand-ins for the proxy's transparent listeners on 15001/15006/15008."""

    def __init__(self, proxy_netns: str) -> None:
        self.by_port = {port: tcp_listener(proxy_netns, port, transparent=True)
                        for port in (constants.OUTBOUND_PORT, constants.INBOUND_PLAINTEXT_PORT,
                                     constants.HBONE_PORT)}

    def accept(self, port: int) -> socket.socket:
        conn, _ = self.by_port[port].accept()
        conn.settimeout(SHORT)
        return conn

    def idle(self) -> bool:
        return all(nothing_pending(s) for s in self.by_port.values() if s.fileno() != -1)

    def close(self, port: int | None = None) -> None:
        for p, s in self.by_port.items():
            if port is None or p == port:
                s.close()


@pytest.fixture
def proxy(node: Node) -> Iterator[ProxyListeners]:
    listeners = ProxyListeners(node.datapath.proxy_ns.path)
    yield listeners
    listeners.close()


@pytest.fixture
def closing() -> Iterator[Callable[[socket.socket], socket.socket]]:
    made: list[socket.socket] = []

    def track(s: socket.socket) -> socket.socket:
        made.append(s)
        return s
    yield track
    for s in made:
        s.close()


def counts_delta(node: Node, before: dict[str, int]) -> dict[str, int]:
    after = node.datapath.verdict_counts()
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


# --- kernel inspection, independent of the code under test ------------------
def tc_state(netns: str, ifindex: int) -> tuple[int, int, bool]:
    """(filters on tc ingress, filters on tc egress, clsact present)."""
    with iproute(netns) as ipr:
        ingress = sum(1 for m in ipr.get_filters(index=ifindex, parent=TC_INGRESS) if m["handle"])
        egress = sum(1 for m in ipr.get_filters(index=ifindex, parent=TC_EGRESS) if m["handle"])
        clsact = any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(ifindex))
    return ingress, egress, clsact


# --- scenarios ---------------------------------------------------------------
def test_outbound_connection_lands_on_15001_and_the_server_sees_the_client(node, pods, proxy, closing):
    """A -> B:8080: the outbound listener learns B:8080 and A's address; a
    transparent upstream from A's address reaches B, which sees A."""
    a, b = pods.a, pods.b
    server = closing(tcp_listener(b.netns, APP_PORT))
    before = node.datapath.verdict_counts()

    client = closing(connect(a.netns, (b.ip, APP_PORT)))
    conn = closing(proxy.accept(constants.OUTBOUND_PORT))
    assert conn.getsockname() == (b.ip, APP_PORT)
    assert conn.getpeername() == client.getsockname()
    assert client.getsockname()[0] == a.ip

    upstream = closing(tcp_socket(node.datapath.proxy_ns.path, transparent=True))
    upstream.bind((a.ip, 0))
    upstream.connect((b.ip, APP_PORT))
    served, peer = server.accept()
    closing(served).settimeout(SHORT)
    assert peer == upstream.getsockname() and peer[0] == a.ip

    client.sendall(b"ping")
    upstream.sendall(conn.recv(16))
    assert served.recv(16) == b"ping"
    served.sendall(b"pong")
    conn.sendall(upstream.recv(16))
    assert client.recv(16) == b"pong"

    delta = counts_delta(node, before)
    assert delta.get("proxy_to_outbound") == 1
    assert delta.get("out_redirect", 0) >= 4     # A's segments and B's replies to the upstream
    assert delta.get("in_pass_from_proxy", 0) >= 2  # the proxy's segments into A and B
    if node.backend == "ebpf":
        assert delta.get("proxy_owned", 0) >= 2  # replies found the proxy's own sockets
    else:
        assert delta.get("proxy_not_syn", 0) >= 2    # marked, the stack found the proxy's sockets
        assert delta.get("bridge_lift_out", 0) >= 4  # bridged frames handed to L3 first


def test_inbound_plaintext_and_hbone_syns_land_on_their_listeners(node, pods, proxy, closing):
    """From a non-enrolled pod C to enrolled B: port 8080 -> 15006, port
    15008 -> 15008. From enrolled A, even B:15008 is outbound (15001)."""
    b, c, a = pods.b, pods.c, pods.a
    before = node.datapath.verdict_counts()

    plain = closing(connect(c.netns, (b.ip, APP_PORT)))
    conn = closing(proxy.accept(constants.INBOUND_PLAINTEXT_PORT))
    assert conn.getsockname() == (b.ip, APP_PORT)
    assert conn.getpeername() == plain.getsockname() and plain.getsockname()[0] == c.ip
    plain.sendall(b"hi")
    assert conn.recv(16) == b"hi"

    tunnel = closing(connect(c.netns, (b.ip, constants.HBONE_PORT)))
    conn = closing(proxy.accept(constants.HBONE_PORT))
    assert conn.getsockname() == (b.ip, constants.HBONE_PORT)
    assert conn.getpeername() == tunnel.getsockname()

    outbound = closing(connect(a.netns, (b.ip, constants.HBONE_PORT)))
    conn = closing(proxy.accept(constants.OUTBOUND_PORT))
    assert conn.getsockname() == (b.ip, constants.HBONE_PORT)
    assert conn.getpeername() == outbound.getsockname()
    assert proxy.idle()

    delta = counts_delta(node, before)
    assert delta.get("proxy_to_inbound_plaintext") == 1
    assert delta.get("proxy_to_hbone") == 1
    assert delta.get("proxy_to_outbound") == 1
    assert delta.get("in_redirect", 0) >= 2


def test_without_listener_the_syn_is_dropped_fail_closed(node, pods, proxy, closing):
    """Agent down (no outbound listener): A's connection to B fails and
    never reaches B, although B is listening."""
    a, b = pods.a, pods.b
    server = closing(tcp_listener(b.netns, APP_PORT))
    proxy.close(constants.OUTBOUND_PORT)
    before = node.datapath.verdict_counts()

    client = closing(tcp_socket(a.netns))
    with pytest.raises(TimeoutError):
        client.connect((b.ip, APP_PORT))
    assert nothing_pending(server)
    assert counts_delta(node, before).get("proxy_drop_no_listener", 0) >= 1


def test_udp_is_not_captured(node, pods, closing):
    a, b = pods.a, pods.b
    rx = closing(run_in_netns(b.netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)))
    rx.bind(("0.0.0.0", 9999))
    rx.settimeout(SHORT)
    tx = closing(run_in_netns(a.netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)))
    before = node.datapath.verdict_counts()

    tx.sendto(b"dns?", (b.ip, 9999))
    data, peer = rx.recvfrom(16)
    assert data == b"dns?" and peer == (a.ip, tx.getsockname()[1])
    delta = counts_delta(node, before)
    if node.backend == "ebpf":
        assert delta.get("out_pass_not_tcp4", 0) >= 1 and delta.get("in_pass_not_tcp4", 0) >= 1
    else:
        assert "bridge_lift_out" not in delta and "bridge_lift_in" not in delta
    assert "out_redirect" not in delta and "in_redirect" not in delta


def test_non_enrolled_pods_talk_directly(node, pods, proxy, closing):
    """C -> D (neither enrolled): no program runs on their veths, the proxy
    never sees the connection."""
    c, d = pods.c, pods.d
    server = closing(tcp_listener(d.netns, APP_PORT))
    before = node.datapath.verdict_counts()

    client = closing(connect(c.netns, (d.ip, APP_PORT)))
    served, peer = server.accept()
    closing(served)
    assert peer == client.getsockname()
    assert proxy.idle()
    # Only the bridge's ARP broadcasts cross the enrolled pods' veths.
    assert set(counts_delta(node, before)) <= {"in_pass_not_tcp4"}


def test_node_and_pod_talk_directly_probe_path(node, pods, proxy, closing):
    """The node's own connection to enrolled B (kubelet probe) and B's to a
    node address are not captured, in either direction."""
    b = pods.b
    server = closing(tcp_listener(b.netns, APP_PORT))
    before = node.datapath.verdict_counts()

    probe = closing(connect(node.netns, (b.ip, APP_PORT)))
    served, peer = server.accept()
    closing(served).settimeout(SHORT)
    assert peer == probe.getsockname()
    probe.sendall(b"GET /healthz")
    assert served.recv(32) == b"GET /healthz"
    served.sendall(b"ok")
    assert probe.recv(8) == b"ok"

    gateway = probe.getsockname()[0]  # the node's address on the pod bridge
    node_server = closing(tcp_listener(node.netns, APP_PORT + 1))
    to_node = closing(connect(b.netns, (gateway, APP_PORT + 1)))
    accepted, peer = node_server.accept()
    closing(accepted)
    assert peer == to_node.getsockname() and peer[0] == b.ip
    assert proxy.idle()

    delta = counts_delta(node, before)
    if node.backend == "ebpf":
        # nftables has no counterpart: what the node sends never reaches prerouting
        assert delta.get("in_pass_from_node", 0) >= 2
    assert delta.get("out_pass_to_node", 0) >= 2
    assert "out_redirect" not in delta and "in_redirect" not in delta


def test_node_reaches_the_proxy_address_without_steering(node, proxy, closing):
    """The node scraping the proxy's metrics port: plain local delivery,
    even though a capture listener would match by port."""
    metrics = closing(tcp_listener(node.datapath.proxy_ns.path, constants.METRICS_PORT))
    before = node.datapath.verdict_counts()
    client = closing(connect(node.netns, (constants.PROXY_LINK_ADDR, constants.METRICS_PORT)))
    served, peer = metrics.accept()
    closing(served)
    assert peer == client.getsockname() and peer[0] == constants.NODE_LINK_ADDR
    assert proxy.idle()
    delta = counts_delta(node, before)
    assert delta.get("proxy_pass_own_addr", 0) >= 2
    assert not any(k.startswith("proxy_to_") for k in delta)


def test_pods_cannot_reach_the_proxy_through_its_own_address(node, pods, proxy, closing):
    """The listeners are bound to any address, so a SYN for 169.254.7.2:15001
    would reach one without the capture. Enrolled (a) or not (c), a pod's
    SYN to the proxy's address is dropped on every port, and counted."""
    proxy_link = f"{ipaddress.ip_interface(constants.PROXY_LINK_ADDR + '/30').network}"
    routed = []
    try:
        for pod in (pods.a, pods.c):  # these pods have no default route: give them one there
            gateway = str(next(ipaddress.ip_network(f"{pod.ip}/25", strict=False).hosts()))
            with iproute(pod.netns) as ipr:
                ipr.route("replace", dst=proxy_link, gateway=gateway)
            routed.append(pod)
        before = node.datapath.verdict_counts()
        ports = (constants.OUTBOUND_PORT, constants.INBOUND_PLAINTEXT_PORT, constants.HBONE_PORT,
                 constants.METRICS_PORT)
        attempts = []
        for pod in (pods.a, pods.c):
            for port in ports:
                client = closing(tcp_socket(pod.netns))
                client.setblocking(False)
                result = client.connect_ex((constants.PROXY_LINK_ADDR, port))
                assert result == errno.EINPROGRESS, (pod.name, port, errno.errorcode.get(result))
                attempts.append(client)
        # Dropped: no SYN-ACK, no RST; each SYN counted (retransmissions too).
        assert select.select([], attempts, attempts, SHORT) == ([], [], [])
        assert proxy.idle()
        delta = counts_delta(node, before)
        assert delta.get("proxy_drop_own_addr", 0) >= len(attempts)
        assert "proxy_pass_own_addr" not in delta
    finally:
        for pod in routed:
            with iproute(pod.netns) as ipr:
                ipr.route("del", dst=proxy_link)


def test_port_reuse_against_a_proxy_time_wait_connects(node, pods, proxy, closing):
    """The proxy closed first (its socket is in TIME_WAIT) and A reuses the
    same source port: the SYN goes to the kernel's TIME_WAIT handling,
    whose ACK makes A reset and resend at once; the second SYN is steered."""
    a, b = pods.a, pods.b

    def client() -> socket.socket:
        s = closing(tcp_socket(a.netns))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((a.ip, 40123))
        return s

    first = client()
    first.connect((b.ip, APP_PORT))
    proxy.accept(constants.OUTBOUND_PORT).close()  # proxy side ends in TIME_WAIT
    assert first.recv(8) == b""
    first.close()
    before = node.datapath.verdict_counts()

    second = client()
    started = time.monotonic()
    second.connect((b.ip, APP_PORT))
    elapsed = time.monotonic() - started
    conn = closing(proxy.accept(constants.OUTBOUND_PORT))
    assert conn.getpeername() == (a.ip, 40123) and conn.getsockname() == (b.ip, APP_PORT)
    assert counts_delta(node, before).get("proxy_to_outbound") == 1
    assert elapsed < 0.9, f"reconnect waited for a SYN retransmit ({elapsed:.2f}s)"


def captured_addresses(node: Node) -> dict[str, set[str]]:
    """Addresses per kernel table that steers them: eBPF's local_pods map;
    nftables' node set, bridge map and proxy set (read with libnftables)."""
    if node.backend == "ebpf":
        return {"local_pods": {str(ip) for ip in node.datapath.programs.local_pods()}}
    found: dict[str, set[str]] = {"pods": set(), "pod_l3mac": set(), "local_pods": set()}
    for entry in nftstate.elements(node.netns) + nftstate.elements(node.datapath.proxy_ns.path):
        table, _, key = entry.partition(" ")
        if table in found:  # the steering tables, not the source binding's
            found[table].add(key)
    return found


def captured_everywhere(node: Node, ips: set[str]) -> dict[str, set[str]]:
    return {table: set(ips) for table in captured_addresses(node)}


def test_detach_removes_exactly_what_attach_made(node, pods):
    e = node.net.add("e")
    dp = node.datapath
    hooks = (1, 1, True) if node.backend == "ebpf" else (0, 0, False)  # nftables never touches tc
    attached = dp.attach_pod(e.host_ifindex, [e.ip, "fd00::1"])  # IPv6 is ignored
    assert (attached.host_ifindex, attached.pod_ips, attached.complete) == \
        (e.host_ifindex, (ipaddress.IPv4Address(e.ip),), True)
    if node.backend == "ebpf":
        assert attached == PodCapture(e.host_ifindex, (ipaddress.IPv4Address(e.ip),), True, True)
    assert dp.attach_pod(e.host_ifindex, [e.ip]) == attached     # idempotent
    assert tc_state(node.netns, e.host_ifindex) == hooks
    assert captured_addresses(node) == captured_everywhere(node, {pods.a.ip, pods.b.ip, e.ip})
    assert attached in dp.attached()

    dp.detach_pod(e.host_ifindex, [e.ip])
    assert tc_state(node.netns, e.host_ifindex) == (0, 0, False)
    assert captured_addresses(node) == captured_everywhere(node, {pods.a.ip, pods.b.ip})
    assert all(p.host_ifindex != e.host_ifindex for p in dp.attached())

    # The pod is gone before DEL reaches us: no error, entries removed.
    dp.attach_pod(e.host_ifindex, [e.ip])
    node.net.delete(e)
    dp.detach_pod(e.host_ifindex, [e.ip])
    assert captured_addresses(node) == captured_everywhere(node, {pods.a.ip, pods.b.ip})
    # Attaching a veth that no longer exists fails and leaves no entry.
    with pytest.raises(PodLinkMissing):
        dp.attach_pod(e.host_ifindex, [e.ip])
    assert captured_addresses(node) == captured_everywhere(node, {pods.a.ip, pods.b.ip})
    # Enrolled A and B are untouched.
    assert {p.host_ifindex for p in dp.attached() if p.complete} == {pods.a.host_ifindex, pods.b.host_ifindex}


def test_fifty_attach_detach_cycles_leave_nothing(node, pods):
    d, dp = pods.d, node.datapath
    started = time.monotonic()
    for _ in range(50):
        dp.attach_pod(d.host_ifindex, [d.ip])
        dp.detach_pod(d.host_ifindex, [d.ip])
    elapsed = time.monotonic() - started
    assert tc_state(node.netns, d.host_ifindex) == (0, 0, False)
    assert captured_addresses(node) == captured_everywhere(node, {pods.a.ip, pods.b.ip})
    assert elapsed < 30, f"50 cycles took {elapsed:.1f}s"


# --- lifecycle: restart re-adopts, uninstall leaves nothing ------------------
def rules_and_routes(netns: str) -> tuple[list, list]:
    with iproute(netns) as ipr:
        rules = sorted((r.get("FRA_PRIORITY") or 0, r.get("FRA_TABLE"), r.get("FRA_FWMARK"))
                       for r in ipr.get_rules(family=socket.AF_INET))
        routes = sorted((r.get("RTA_TABLE"), r.get("RTA_DST"), r["dst_len"], r.get("RTA_OIF"), r["type"])
                        for r in ipr.get_routes(family=socket.AF_INET, table=0))
    return rules, routes


@pytest.mark.parametrize("backend", BACKENDS, ids=[b.name for b in BACKENDS])
def test_restart_readopts_and_uninstall_leaves_nothing(tmp_path, backend):
    tag = uuid.uuid4().hex[:6]
    node_ns, proxy_ns = f"{backend.prefix}-node2-{tag}", f"{backend.prefix}-proxy2-{tag}"
    pin_dir = f"/sys/fs/bpf/dpt-{tag}"
    make_netns(node_ns)
    net = BridgeNetwork(node_ns, backend.subnets[1], tmp_path, tag, backend.prefix)
    made: list[socket.socket] = []
    try:
        p, q = net.add("p"), net.add("q")
        rules_before, routes_before = rules_and_routes(node_ns)

        dp = backend.datapath(node_ns, proxy_ns, pin_dir)
        link = dp.install()
        proxy_state, node_state = rules_and_routes(proxy_ns), rules_and_routes(node_ns)
        assert dp.install() == link                                   # idempotent
        assert rules_and_routes(proxy_ns) == proxy_state and rules_and_routes(node_ns) == node_state
        assert (0, constants.ROUTE_TABLE, constants.MARK_CAPTURED) not in proxy_state[0]
        assert (constants.RULE_PRIORITY, constants.ROUTE_TABLE, constants.MARK_CAPTURED) in proxy_state[0]
        steering_rule = (constants.RULE_PRIORITY, constants.ROUTE_TABLE, constants.MARK_CAPTURED)
        # Only nftables routes marked packets in the node: eBPF redirects at the veth.
        assert (steering_rule in node_state[0]) == (backend.name == "nftables")
        dp.attach_pod(p.host_ifindex, [p.ip])

        # Agent crash: handles gone, capture stays (fail closed: no listener).
        dp.close()
        made.append(server := tcp_listener(q.netns, APP_PORT))
        made.append(client := tcp_socket(p.netns))
        with pytest.raises(TimeoutError):
            client.connect((q.ip, APP_PORT))
        assert nothing_pending(server)

        # A new agent re-adopts what the kernel kept (pins and filters, or
        # set elements).
        dp = backend.datapath(node_ns, proxy_ns, pin_dir)
        assert dp.install() == link
        assert [(c.host_ifindex, c.pod_ips, c.complete) for c in dp.attached()] == \
            [(p.host_ifindex, (ipaddress.IPv4Address(p.ip),), True)]
        made.append(listener := tcp_listener(dp.proxy_ns.path, constants.OUTBOUND_PORT, transparent=True))
        made.append(client := connect(p.netns, (q.ip, APP_PORT)))
        conn, peer = listener.accept()
        made.append(conn)
        assert conn.getsockname() == (q.ip, APP_PORT) and peer == client.getsockname()
        for s in made:
            s.close()

        dp.uninstall()
        assert not os.path.exists(netns_path(proxy_ns))
        assert not os.path.exists(pin_dir)
        with iproute(node_ns) as ipr:
            assert not ipr.link_lookup(ifname=constants.NODE_LINK)
        assert tc_state(node_ns, p.host_ifindex) == (0, 0, False)
        assert rules_and_routes(node_ns) == (rules_before, routes_before)
        assert all(not objects for objects in nftstate.ambit_objects(node_ns).values())
    finally:
        for s in made:
            s.close()
        net.cleanup()
        try:
            backend.datapath(node_ns, proxy_ns, pin_dir).uninstall()
        finally:
            remove_netns(proxy_ns)
            remove_netns(node_ns)
