"""The datapath end to end: pods made by the real CNI chain on one node, a
real ambit-agent, real TCP through the proxy. Every test runs once per
capture backend: eBPF (tc + bpf_sk_assign) and nftables (sets, policy
route, TPROXY); what the pods and the proxy see must not differ.

Pods on the `mesh` conflist go through ambit-cni and are captured; pods on
`plain` share the same bridge and address pool but their chain has no
ambit-cni, so ambit never hears of them.
"""
from __future__ import annotations

import hashlib
import ipaddress
import os
import json
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import pytest

from ambit.lab.cniruntime import CniRuntime, PodSandbox
from ambit.lab.node import (AgentProcess, NodeNamespace, bridge_conflist, cni_plugin_dirs, make_pod_netns,
                                  remove_netns)
from ambit.agent.cli.client import AgentClient
from tests.support.agentapi import workloads
from tests.support import nftstate
from tests.support.kernelstate import node_snapshot
from tests.support.logfile import json_lines
from tests.support.podnet import (TcpServer, connect, echo_until_eof, random_bytes, recv_exactly, recv_until_eof,
                                  udp_socket)
from tests.support.waiting import wait_until

pytestmark = pytest.mark.kernel


@dataclass(frozen=True)
class Backend:
    """A capture backend and the names/addresses its runs use."""

    capture: str
    prefix: str   # of every namespace the test makes
    subnet: str

    @property
    def gateway(self) -> str:  # the node's address on the pod bridge
        return str(next(ipaddress.ip_network(self.subnet).hosts()))


BACKENDS = [Backend("ebpf", "cap", "10.242.0.0/24"), Backend("nftables", "nft-cap", "10.233.0.0/24")]


class MeshNode:
    """One node, an agent with the backend under test, and helpers to add
    pods to either network."""

    def __init__(self, node: NodeNamespace, agent: AgentProcess, backend: Backend) -> None:
        self.node = node
        self.agent = agent
        self.backend = backend
        ipam = node.workdir / "ipam"
        self.mesh = CniRuntime(bridge_conflist("cap", backend.subnet, agent.socket, ipam_dir=ipam),
                               cni_plugin_dirs(), node_netns=node.path)
        self.plain = CniRuntime(bridge_conflist("cap", backend.subnet, agent.socket, ipam_dir=ipam, ambit=False),
                                cni_plugin_dirs(), node_netns=node.path)
        self.pods: list[tuple[CniRuntime, PodSandbox]] = []

    def add_pod(self, name: str, meshed: bool = True) -> tuple[PodSandbox, str]:
        runtime = self.mesh if meshed else self.plain
        sb = PodSandbox(container_id=uuid.uuid4().hex,
                        netns=make_pod_netns(f"{self.backend.prefix}-{uuid.uuid4().hex[:8]}"),
                        namespace="shop", name=name, uid=str(uuid.uuid4()))
        self.pods.append((runtime, sb))
        result = runtime.add(sb).result
        return sb, result["ips"][0]["address"].split("/")[0]

    def delete_pod(self, sb: PodSandbox) -> None:
        for runtime, candidate in list(self.pods):
            if candidate is sb:
                runtime.delete(sb)
                remove_netns(sb.netns.rsplit("/", 1)[1])
                self.pods.remove((runtime, candidate))

    def cleanup(self) -> None:
        for runtime, sb in reversed(self.pods):
            try:
                runtime.delete(sb)
            except Exception:
                pass
            remove_netns(sb.netns.rsplit("/", 1)[1])
        self.pods.clear()

    def proxy_log(self, event: str = "connection") -> list[dict]:
        return json_lines(self.agent.logs(), event)

    def proxied(self, src_ip: str | None = None, dst: str | None = None) -> list[tuple[str, str]]:
        """(source, destination) of every connection the proxy has, live or
        logged, from `src_ip` or to `dst`. The live ones are read first: a
        connection leaves that list only as its access-log line is written, and
        one that carried data was in it before a byte got through. So after an
        exchange has completed, nothing found means the proxy never had it."""
        with AgentClient(self.agent.socket) as client:
            live = [(c.client, c.original_destination) for c in client.connections()]
        logged = [(e["src"], e["dst"]) for e in self.proxy_log()]
        return [(s, d) for s, d in live + logged if s.rsplit(":", 1)[0] == src_ip or d == dst]

    def access_log_for(self, dst: str, count: int = 1, timeout: float = 10.0) -> list[dict]:
        """The access-log lines for connections to `dst`, waiting for them:
        the proxy logs a connection just after both of its sides closed."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.proxy_log() if e["dst"] == dst]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.02)


    def kernel_state(self) -> dict:
        """Both backends' kernel objects of this node (netlink, bpffs, nftables)."""
        state = node_snapshot(self.node.path, self.agent.bpffs_dir)
        state["nft_node"] = nftstate.ambit_objects(self.node.path)
        proxy = f"/var/run/netns/{self.agent.proxy_netns}"
        state["nft_proxy"] = nftstate.ambit_objects(proxy) if os.path.exists(proxy) else None
        return state


# The source binding's elements of one bridged pod with one IPv4 address:
# its port, its (port . address) in port_sources and, mapped to its MAC, in
# port_l3mac, and its address in the bridge table, its link and
# (link . address) in the ip table, its link in the ip6 table.
RESIDENT_BINDING = 7


@pytest.fixture(params=BACKENDS, ids=[b.capture for b in BACKENDS])
def mesh(request):
    backend: Backend = request.param
    with NodeNamespace(f"{backend.prefix}-node-{uuid.uuid4().hex[:6]}") as node:
        agent = AgentProcess(node, "capture", capture=backend.capture)
        try:
            agent.start()
            m = MeshNode(node, agent, backend)
            try:
                yield m
            finally:
                m.cleanup()
        finally:
            agent.stop()
            agent.cleanup()
            print(agent.logs()[-5000:])


def exchange(netns: str, ip: str, port: int, payload: bytes) -> tuple[bytes, tuple]:
    """Send payload, half-close, read the echo to EOF; returns (echo, our peer)."""
    client = connect(netns, ip, port)
    peer = client.getpeername()
    sender = threading.Thread(target=lambda: (client.sendall(payload), client.shutdown(socket.SHUT_WR)))
    sender.start()
    try:
        echoed = recv_until_eof(client)
    finally:
        sender.join()
        client.close()
    return echoed, peer


def test_pod_to_pod_through_the_proxy_keeps_bytes_addresses_and_half_close(mesh):
    a, ip_a = mesh.add_pod("client")
    b, ip_b = mesh.add_pod("server")
    payload = random_bytes(8 << 20)

    with TcpServer(b.netns, 8080, echo_until_eof) as server:
        echoed, peer = exchange(a.netns, ip_b, 8080, payload)

    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    assert peer == (ip_b, 8080)                       # A sees B:port
    assert [p[0] for p in server.peers] == [ip_a]     # B sees A's own address
    closed = mesh.access_log_for(f"{ip_b}:8080")
    assert len(closed) == 1                           # it really went through the proxy ...
    assert closed[0]["src"].startswith(f"{ip_a}:")    # ... which knew the client
    assert closed[0]["listener"] == "outbound"
    assert (closed[0]["sent"], closed[0]["received"], closed[0]["end"]) == (8 << 20, 8 << 20, "closed")


def test_server_half_close_reaches_the_client_while_it_keeps_sending(mesh):
    a, _ = mesh.add_pod("client")
    b, ip_b = mesh.add_pod("server")

    def greet_then_read(conn: socket.socket, peer: tuple) -> None:
        conn.sendall(b"hello")
        conn.shutdown(socket.SHUT_WR)                 # server is done talking
        got = recv_until_eof(conn)
        results.append(got)

    results: list[bytes] = []
    with TcpServer(b.netns, 9000, greet_then_read):
        client = connect(a.netns, ip_b, 9000)
        assert recv_until_eof(client) == b"hello"     # FIN arrived through the proxy
        client.sendall(b"still talking")              # our direction is still open
        client.shutdown(socket.SHUT_WR)
        client.close()
        wait_until(lambda: results, "the server reading what the client sent after the server's FIN", 10)
    assert results == [b"still talking"]


def test_connecting_to_a_closed_port_is_reset_fast(mesh):
    a, _ = mesh.add_pod("client")
    b, ip_b = mesh.add_pod("server")
    started = time.monotonic()
    # The proxy completes the client's handshake itself, so the refusal
    # arrives as a reset right after it (as with ztunnel), not as a hang.
    with pytest.raises((ConnectionRefusedError, ConnectionResetError)):
        client = connect(a.netns, ip_b, 7777)
        client.recv(1)
    assert time.monotonic() - started < 1.0


def test_inbound_plaintext_from_an_unenrolled_pod_goes_through_the_proxy(mesh):
    b, ip_b = mesh.add_pod("server")
    c, ip_c = mesh.add_pod("legacy", meshed=False)
    with TcpServer(b.netns, 8080, echo_until_eof) as server:
        echoed, _ = exchange(c.netns, ip_b, 8080, b"ping")
    assert echoed == b"ping"
    assert [p[0] for p in server.peers] == [ip_c]
    assert [e["listener"] for e in mesh.access_log_for(f"{ip_b}:8080")] == ["inbound_plaintext"]


def test_unenrolled_pods_udp_and_the_node_are_left_alone(mesh):
    a, ip_a = mesh.add_pod("meshed")
    c, ip_c = mesh.add_pod("legacy-c", meshed=False)
    d, ip_d = mesh.add_pod("legacy-d", meshed=False)

    with TcpServer(d.netns, 8080, echo_until_eof) as server:
        assert exchange(c.netns, ip_d, 8080, b"x")[0] == b"x"
        assert [p[0] for p in server.peers] == [ip_c]
    assert mesh.proxied(src_ip=ip_c, dst=f"{ip_d}:8080") == []

    receiver = udp_socket(d.netns)
    receiver.bind(("0.0.0.0", 5353))
    receiver.settimeout(3)
    sender = udp_socket(a.netns)
    sender.sendto(b"dns?", (ip_d, 5353))
    data, source = receiver.recvfrom(100)
    assert (data, source[0]) == (b"dns?", ip_a)       # UDP from an enrolled pod is not captured
    receiver.close()
    sender.close()

    # The node reaches an enrolled pod directly (kubelet probes).
    with TcpServer(a.netns, 8081, echo_until_eof) as server:
        probe = mesh.node.run(["python3", "-c", f"import socket; s=socket.create_connection(('{ip_a}', 8081), 3); "
                                                "s.sendall(b'ok'); s.shutdown(1); print(s.recv(10).decode())"],
                              capture_output=True, text=True, timeout=10)
        assert probe.stdout.strip() == "ok", probe.stderr
        assert server.peers[0][0] == mesh.backend.gateway  # the node's bridge address, not rewritten
    assert mesh.proxied(dst=f"{ip_a}:8081") == []


def test_agent_killed_fails_closed_and_a_restart_serves_again(mesh):
    a, ip_a = mesh.add_pod("client")
    b, ip_b = mesh.add_pod("server")
    with TcpServer(b.netns, 8080, echo_until_eof) as server:
        mesh.agent.kill()
        with pytest.raises(OSError):                  # no listener: the SYN is dropped, never delivered
            connect(a.netns, ip_b, 8080, timeout=1.5)
        assert server.peers == []                     # nothing reached B in plaintext

        # Traffic is served again once the new agent has put its listeners up (how fast is
        # bench/upgrade.py's business; here only that it does, before it even says ready).
        mesh.agent.start(wait=False)
        last: list[str] = []

        def served_again() -> bytes | None:
            try:
                return exchange(a.netns, ip_b, 8080, b"back")[0]
            except OSError as exc:
                last[:] = [repr(exc)]
                return None

        echoed = wait_until(served_again, lambda: f"the restarted agent relaying client -> server:8080 ({last})",
                            60, 0.05)
        assert echoed == b"back"
        mesh.agent.wait_ready()
        assert [p[0] for p in server.peers] == [ip_a]
    assert {w.pod.name for w in workloads(mesh.agent.socket)} == {"client", "server"}
    assert {w.capture for w in workloads(mesh.agent.socket)} == {"captured"}


def test_many_add_del_cycles_leave_nothing_behind(mesh):
    a, ip_a = mesh.add_pod("resident")
    before = mesh.kernel_state()
    for i in range(200):
        sb, _ = mesh.add_pod(f"churn-{i}")
        mesh.delete_pod(sb)
    after = mesh.kernel_state()
    assert after == before
    if mesh.backend.capture == "nftables":             # only the resident's elements, in every set
        steering = [e for e in after["nft_node"]["elements"] if e.startswith(("pod_l3mac ", "pods "))]
        assert steering == [f"pod_l3mac {ip_a}", f"pods {ip_a}"]
        assert len(after["nft_node"]["elements"]) == 2 + RESIDENT_BINDING
        assert after["nft_proxy"]["elements"] == [f"local_pods {ip_a}"]
    assert {w.pod.name for w in workloads(mesh.agent.socket)} == {"resident"}


def test_agent_cleanup_removes_every_kernel_object_it_made(mesh):
    a, _ = mesh.add_pod("client")
    captured = mesh.kernel_state()
    if mesh.backend.capture == "ebpf":
        assert captured["filters"] and captured["pins"] and captured["local_pods"] == 1
    else:
        assert captured["nft_node"]["tables"] == ["bridge", "ip", "ip6"]
        assert len(captured["nft_node"]["elements"]) == 2 + RESIDENT_BINDING
        assert captured["nft_proxy"]["tables"] == ["ip"] and len(captured["nft_proxy"]["elements"]) == 1
        assert (100, 0x100, 100) in captured["rules"]

    mesh.agent.stop()
    mesh.agent.cleanup()

    after = mesh.kernel_state()
    assert after["filters"] == []
    assert after["pins"] == [] and not os.path.exists(mesh.agent.bpffs_dir)
    assert "ambit0" not in {name for _, name in after["links"]}
    assert not os.path.exists(f"/var/run/netns/{mesh.agent.proxy_netns}")
    assert [k for _, k in after["qdiscs"] if k == "clsact"] == []
    assert all(not objects for objects in after["nft_node"].values())   # no table, chain, set, rule
    assert [r for r in after["rules"] if r[2] == 100] == []             # no policy rule to table 100
    assert [r for r in after["routes"] if r[0] == 100] == []


def test_ambitctl_shows_a_live_connection_with_its_original_destination(mesh):
    import subprocess
    import sys
    a, ip_a = mesh.add_pod("client")
    b, ip_b = mesh.add_pod("server")
    ambitctl = os.path.join(os.path.dirname(sys.executable), "ambitctl")

    def hold(conn: socket.socket, peer: tuple) -> None:
        conn.sendall(recv_exactly(conn, 1000))  # echo 1000 bytes, then wait for the client to go
        recv_until_eof(conn)

    with TcpServer(b.netns, 8080, hold):
        client = connect(a.netns, ip_b, 8080)
        client.sendall(random_bytes(1000))
        recv_exactly(client, 1000)
        out = subprocess.run([ambitctl, "--socket", mesh.agent.socket, "-o", "json", "connections"],
                             capture_output=True, text=True, timeout=30)
        status = subprocess.run([ambitctl, "--socket", mesh.agent.socket, "status"], capture_output=True,
                                text=True, timeout=30)
        client.close()
    rows = [c for c in json.loads(out.stdout) if c["original_destination"] == f"{ip_b}:8080"]
    assert len(rows) == 1, out.stdout
    row = rows[0]
    assert row["client"].startswith(f"{ip_a}:") and row["listener"] == "outbound"
    assert int(row["bytes_sent"]) == 1000 and int(row["bytes_received"]) == 1000
    assert f"capture:     {mesh.backend.capture}" in status.stdout and "outbound:15001" in status.stdout
    assert "event loop:  uvloop" in status.stdout  # the agent's default when uvloop is installed
