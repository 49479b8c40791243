"""Policy end to end: two lab nodes with real agents, pods from the real CNI
chain, and policies changed while traffic flows.

Scenarios, as an operator would check them:
- traffic policy allows flows, on one node and across nodes;
- a denied cross-node connection never delivers a byte to the server;
- STRICT PeerAuthentication blocks a client outside the mesh while mesh
  clients still get through (and a port-level PERMISSIVE exception works);
- a label flip moves a running pod out of the mesh and back, live;
- a policy added while connections are open closes the ones it denies,
  at the destination side, and leaves the others alone.

Servers are sockets this test opens inside the pod namespaces, so it knows
exactly which connections reached them and how many bytes arrived. Policy
changes are written to the lab's cluster file, as `kubectl apply` would
change what an agent watches. Prefix `lpol-` (tests/kernel/conftest.py).
"""
from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from ambit.lab.labconfig import parse_documents
from ambit.lab.clusterfile import render_cluster
from ambit.lab.topology import Lab
from ambit.agent.netns import NetnsThread, netns_path
from tests.support.podnet import RecordingEcho, TcpServer, connect, recv_exactly, refused

pytestmark = pytest.mark.kernel

AMBITCTL = str(Path(sys.executable).parent / "ambitctl")
PORT = 7000        # every server pod listens here ...
OTHER_PORT = 7001  # ... and here
CLOSE_WITHIN = 5.0


def _namespace(name: str, ambient: bool) -> dict[str, Any]:
    labels = {"istio.io/dataplane-mode": "ambient"} if ambient else {}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def _account(namespace: str, name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace}}


def _pod(namespace: str, name: str, node: str, account: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"nodeName": node, "serviceAccountName": account,
                     "containers": [{"name": "main", "image": "test"}]}}


def cluster(*policies: dict[str, Any], mover_labels: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The test cluster plus `policies`.

    alpha (in the mesh): client and mover on node1, server on node2, local
    (a second server) on node1; beta (in the mesh): client on node1;
    legacy (not in the mesh): client on node1.
    """
    return [
        _namespace("alpha", True), _namespace("beta", True), _namespace("legacy", False),
        _account("alpha", "client"), _account("alpha", "server"), _account("alpha", "mover"),
        _account("beta", "client"), _account("legacy", "client"),
        _pod("alpha", "client", "node1", "client", {"app": "client"}),
        _pod("alpha", "mover", "node1", "mover", {"app": "mover", **(mover_labels or {})}),
        _pod("alpha", "server", "node2", "server", {"app": "server"}),
        _pod("alpha", "local", "node1", "server", {"app": "server"}),
        _pod("beta", "client", "node1", "client", {"app": "client"}),
        _pod("legacy", "client", "node1", "client", {"app": "client"}),
        *policies,
    ]


def authorization(name: str, action: str, rules: list[dict[str, Any]], namespace: str = "alpha",
                  selector: dict[str, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"action": action, "rules": rules}
    if selector is not None:
        spec["selector"] = {"matchLabels": selector}
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def peer_authentication(name: str, spec: dict[str, Any], namespace: str = "alpha") -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


ALLOW_ALPHA_TO_SERVERS = authorization("servers-from-alpha", "ALLOW", [{"from": [{"source": {"namespaces": ["alpha"]}}]}],
                                       selector={"app": "server"})


class PolicyLab:
    """The running lab, its servers, and how to change what the agents see."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.ips = {p.key: p.ip for p in lab.status(ask_agents=False).pods}
        self.servers: dict[tuple[str, int], TcpServer] = {}
        self.echoes: dict[tuple[str, int], RecordingEcho] = {}
        for pod in ("alpha/server", "alpha/local"):
            for port in (PORT, OTHER_PORT):
                echo = RecordingEcho()
                self.echoes[(pod, port)] = echo
                self.servers[(pod, port)] = TcpServer(self.netns(pod), port, echo)

    def close(self) -> None:
        for server in self.servers.values():
            server.close()

    def netns(self, pod: str) -> str:
        namespace, name = pod.split("/")
        return self.lab.settings.pod_netns(namespace, name)

    def agent_log(self, node: str) -> list[dict[str, Any]]:
        path = self.lab.state().nodes[node].agent.log
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.startswith("{")]

    def events(self, node: str, event: str) -> list[dict[str, Any]]:
        return [e for e in self.agent_log(node) if e.get("event") == event]

    def apply(self, documents: list[dict[str, Any]]) -> None:
        """Rewrite the cluster file the agents watch (as the lab renders it:
        addresses and node names filled in) and wait until both reloaded it."""
        plan = self.lab.plan(parse_documents(copy.deepcopy(documents), self.lab.settings.service_cidr))
        text = yaml.safe_dump_all(render_cluster(plan, self.lab.state()), sort_keys=False)
        path = self.lab.settings.cluster_file
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:6]}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        self.lab.wait_applied()  # each agent reports it holds this content

    def open(self, client: str, server: str, port: int = PORT) -> socket.socket:
        return connect(self.netns(client), self.ips[server], port)

    def exchange(self, client: str, server: str, port: int = PORT) -> bytes:
        """One echo round trip on a new connection (raises if it fails)."""
        with self.open(client, server, port) as sock:
            payload = f"hello from {client}".encode()
            sock.sendall(payload)
            return recv_exactly(sock, len(payload))

    def refused(self, client: str, server: str, port: int = PORT) -> bool:
        """True when a new connection is closed without an answer: reset or EOF."""
        return refused(self.netns(client), self.ips[server], port)

    def workload_capture(self, node: str, pod: str) -> str:
        socket_path = self.lab.state().nodes[node].socket
        out = subprocess.run([AMBITCTL, "--socket", socket_path, "-o", "json", "workloads"], check=True,
                             capture_output=True, timeout=20).stdout
        namespace, name = pod.split("/")
        (found,) = [w for w in json.loads(out) if w["pod"]["namespace"] == namespace and w["pod"]["name"] == name]
        return found["capture"]

    def metrics(self, node: str) -> str:
        def scrape() -> str:
            with urllib.request.urlopen("http://127.0.0.1:15020/metrics", timeout=5) as response:
                return response.read().decode()

        with NetnsThread(netns_path(self.lab.state().nodes[node].netns)) as thread:
            return thread.run(scrape)


def wait_for(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def closed_within(sock: socket.socket, timeout: float) -> float | None:
    """Seconds until the peer reset or ended the connection, None if it stayed open."""
    started = time.monotonic()
    sock.settimeout(timeout)
    try:
        data = sock.recv(1)
    except (ConnectionResetError, ConnectionAbortedError):
        return time.monotonic() - started
    except socket.timeout:
        return None
    return time.monotonic() - started if data == b"" else None


@pytest.fixture(scope="module")
def env(lab_factory):
    with lab_factory.lab("lpol", parse_documents(cluster())) as lab:
        env = PolicyLab(lab)
        try:
            yield env
        finally:
            env.close()


def test_allowed_traffic_flows_on_one_node_and_across_nodes(env):
    env.apply(cluster(ALLOW_ALPHA_TO_SERVERS))

    assert env.exchange("alpha/client", "alpha/server") == b"hello from alpha/client"  # node1 -> node2, HBONE
    assert env.exchange("alpha/client", "alpha/local") == b"hello from alpha/client"   # node1 -> node1

    client_ip = env.ips["alpha/client"]
    assert client_ip in [p[0] for p in env.servers[("alpha/server", PORT)].peers]  # the client's own address
    assert client_ip in [p[0] for p in env.servers[("alpha/local", PORT)].peers]

    def outbound() -> list[dict]:
        return [e for e in env.events("node1", "connection") if e["src"].startswith(f"{client_ip}:")]

    # Logged once both sides have closed.
    wait_for(lambda: {e["via"] for e in outbound()} >= {"hbone", "local"}, "node1's access log of both")
    assert all(e["decision"] == "allow" for e in outbound())


def test_denied_cross_node_connection_never_delivers_a_byte(env):
    env.apply(cluster(ALLOW_ALPHA_TO_SERVERS))
    denied_ip = env.ips["beta/client"]

    assert env.refused("beta/client", "alpha/server")

    assert env.echoes[("alpha/server", PORT)].received.get(denied_ip, 0) == 0
    assert denied_ip not in [p[0] for p in env.servers[("alpha/server", PORT)].peers]  # not even accepted
    # The destination decided, with the verified identity, and said why.
    wait_for(lambda: any(e.get("status") == 401 for e in env.events("node2", "hbone_tunnel_refused")),
             "node2 to log the refusal")
    refusal = [e for e in env.events("node2", "hbone_tunnel_refused") if e.get("status") == 401][-1]
    assert refusal["peer_identity"] == "spiffe://cluster.local/ns/beta/sa/client"
    assert "no ALLOW policy matched" in refusal["reason"]
    # The source saw the 401 and reset its client.
    wait_for(lambda: any(e["src"].startswith(f"{denied_ip}:") and e["decision"] == "deny"
                         for e in env.events("node1", "connection")), "node1's access log of the denial")
    # Allowed traffic still flows.
    assert env.exchange("alpha/client", "alpha/server") == b"hello from alpha/client"


def test_strict_peer_authentication_blocks_a_client_outside_the_mesh(env):
    env.apply(cluster())
    legacy_ip = env.ips["legacy/client"]
    assert env.exchange("legacy/client", "alpha/server") == b"hello from legacy/client"  # PERMISSIVE by default

    strict = peer_authentication("strict", {"mtls": {"mode": "STRICT"}})
    exception = peer_authentication("server-7001-plaintext", {"selector": {"matchLabels": {"app": "server"}},
                                                             "portLevelMtls": {str(OTHER_PORT): {"mode": "PERMISSIVE"}}})
    env.apply(cluster(strict, exception))
    received_before = env.echoes[("alpha/server", PORT)].received.get(legacy_ip, 0)

    assert env.refused("legacy/client", "alpha/server")          # plaintext to 15006: reset
    assert env.refused("legacy/client", "alpha/local")           # same on the client's own node
    assert env.exchange("alpha/client", "alpha/server") == b"hello from alpha/client"  # mTLS: fine
    assert env.exchange("legacy/client", "alpha/server", OTHER_PORT) == b"hello from legacy/client"  # port exception

    assert env.echoes[("alpha/server", PORT)].received.get(legacy_ip, 0) == received_before
    denials = [e for e in env.events("node2", "connection")
               if e["listener"] == "inbound_plaintext" and e["src"].startswith(f"{legacy_ip}:") and e["decision"] == "deny"]
    assert denials and "plaintext refused" in denials[-1]["reason"] and "alpha/strict" in denials[-1]["reason"]

    # Mesh-wide STRICT (root namespace) applies everywhere, until a namespace says otherwise.
    mesh_strict = peer_authentication("mesh-strict", {"mtls": {"mode": "STRICT"}}, namespace="istio-system")
    env.apply(cluster(mesh_strict))
    assert env.refused("legacy/client", "alpha/server")
    env.apply(cluster(mesh_strict, peer_authentication("permissive", {"mtls": {"mode": "PERMISSIVE"}})))
    assert env.exchange("legacy/client", "alpha/server") == b"hello from legacy/client"


def test_label_flip_moves_a_pod_out_of_the_mesh_and_back(env):
    mover_ip = env.ips["alpha/mover"]
    env.apply(cluster(ALLOW_ALPHA_TO_SERVERS))
    assert env.workload_capture("node1", "alpha/mover") == "captured"
    assert env.exchange("alpha/mover", "alpha/server") == b"hello from alpha/mover"

    env.apply(cluster(ALLOW_ALPHA_TO_SERVERS, mover_labels={"istio.io/dataplane-mode": "none"}))
    wait_for(lambda: env.workload_capture("node1", "alpha/mover") == "none", "node1 to release the mover")
    outbound_before = len([e for e in env.events("node1", "connection") if e["src"].startswith(f"{mover_ip}:")])
    # Out of the mesh the pod has no identity: it arrives in plaintext and the
    # namespace-only ALLOW policy at node2 refuses it.
    assert env.refused("alpha/mover", "alpha/server")
    wait_for(lambda: any(e["listener"] == "inbound_plaintext" and e["src"].startswith(f"{mover_ip}:")
                         for e in env.events("node2", "connection")), "node2 to see the mover in plaintext")
    assert len([e for e in env.events("node1", "connection") if e["src"].startswith(f"{mover_ip}:")]) == outbound_before

    env.apply(cluster(ALLOW_ALPHA_TO_SERVERS))
    wait_for(lambda: env.workload_capture("node1", "alpha/mover") == "captured", "node1 to capture the mover again")
    assert env.exchange("alpha/mover", "alpha/server") == b"hello from alpha/mover"
    wait_for(lambda: any(e["src"].startswith(f"{mover_ip}:") and e.get("via") == "hbone"
                         for e in env.events("node1", "connection")[outbound_before:]),
             "node1's outbound access log for the mover")


def test_policy_added_while_connections_are_open_closes_the_ones_it_denies(env):
    env.apply(cluster())
    across = env.open("alpha/client", "alpha/server")                # HBONE, decided at node2
    same_node = env.open("alpha/client", "alpha/local")              # local relay, decided at node1
    plaintext = env.open("legacy/client", "alpha/local")             # 15006 on node1
    untouched = env.open("alpha/client", "alpha/server", OTHER_PORT)  # a port the policy does not name
    connections = (across, same_node, plaintext, untouched)
    try:
        for sock in connections:
            sock.sendall(b"ping")
            assert recv_exactly(sock, 4) == b"ping"

        deny = authorization("no-7000", "DENY", [{"to": [{"operation": {"ports": [str(PORT)]}}]}],
                             selector={"app": "server"})
        env.apply(cluster(deny))

        for sock in (across, same_node, plaintext):
            assert closed_within(sock, CLOSE_WITHIN) is not None
        untouched.sendall(b"still here")
        assert recv_exactly(untouched, 10) == b"still here"
    finally:
        for sock in connections:
            sock.close()

    closed_node1 = [e for e in env.events("node1", "connection closed by policy")]
    assert {e["listener"] for e in closed_node1} >= {"outbound", "inbound_plaintext"}
    assert all(e["policy"] == "alpha/no-7000" for e in closed_node1)
    closed_node2 = env.events("node2", "connection closed by policy")
    assert [(e["listener"], e["policy"], e["peer"]) for e in closed_node2] == [
        ("hbone", "alpha/no-7000", "spiffe://cluster.local/ns/alpha/sa/client")]
    wait_for(lambda: any(e["end"] == "closed_by_policy" and e["decision"] == "deny"
                         for e in env.events("node1", "connection")), "node1's access log of the closes")
    uaex = [line for line in env.metrics("node1").splitlines()
            if line.startswith("istio_tcp_connections_closed_total") and 'response_flags="UAEX"' in line]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in uaex) >= 2
    # New connections are refused too; the policy's removal lets them through again.
    assert env.refused("alpha/client", "alpha/server")
    env.apply(cluster())
    assert env.exchange("alpha/client", "alpha/server") == b"hello from alpha/client"
