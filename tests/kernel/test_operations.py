"""What an operator sees, checked against what really happens, on a live
two-node lab (prefix `lops-`, made by tests/kernel/conftest.py):

- `ambitctl trace` predicts the listener, route and policy decision that the
  agent's access log then records for the same connection;
- `ambitctl policies`, `certs` and `connections` show the running state;
- the Istio byte counters on :15020 match the bytes a test really sent.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ambit.lab import labconfig
from ambit.agent.netns import NetnsThread, netns_path

pytestmark = pytest.mark.kernel

WORKLOAD = [sys.executable, "-m", "ambit.lab.podapp"]
AMBITCTL = str(Path(sys.executable).parent / "ambitctl")


@pytest.fixture(scope="module")
def lab(lab_factory):
    with lab_factory.lab("lops", labconfig.load_default()) as lab:
        yield lab


@pytest.fixture(scope="module")
def ips(lab):
    return {p.key: p.ip for p in lab.status(ask_agents=False).pods}


def ambitctl(lab, node: str, *args: str) -> str:
    socket = lab.state().nodes[node].socket
    result = subprocess.run([AMBITCTL, "--socket", socket, *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


def access_log(lab, node: str, since: int) -> list[dict]:
    """Access-log lines a node's agent wrote after byte offset `since`."""
    path = lab.state().nodes[node].agent.log
    with open(path, encoding="utf-8") as f:
        f.seek(since)
        return [json.loads(line) for line in f if '"event": "connection"' in line]


def log_size(lab, node: str) -> int:
    return os.path.getsize(lab.state().nodes[node].agent.log)


def wait_for(fetch, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


@pytest.mark.parametrize("client,server_ip,port,expect", [
    ("shop/client-0", "shop/web-1", 8080, ("outbound", "hbone", "allow")),          # across nodes
    ("shop/client-0", "shop/web-0", 8080, ("outbound", "local", "allow")),          # same node
    ("shop/client-0", "service", 80, ("outbound", None, "allow")),                  # Service VIP
    ("legacy/probe-0", "shop/web-0", 8080, ("inbound_plaintext", "direct", "deny")),  # not in the mesh
])
def test_trace_predicts_what_the_proxy_then_does(lab, ips, client, server_ip, port, expect):
    dst_ip = "10.96.0.10" if server_ip == "service" else ips[server_ip]
    src_ip = ips[client]
    # The node whose proxy handles it: the client's for mesh clients, the server's otherwise.
    node = next(p.node for p in lab.status(ask_agents=False).pods
                if p.key == (client if client.startswith("shop/") else server_ip))
    trace = json.loads(ambitctl(lab, node, "-o", "json", "trace", src_ip, f"{dst_ip}:{port}"))
    assert (trace["listener"], trace["decision"]) == (expect[0], expect[2])
    if expect[1]:
        assert trace["route"] == expect[1]
    stages = [s["stage"] for s in trace["steps"]]
    assert stages[:3] == ["capture", "proxy namespace", "listener"]

    offset = log_size(lab, node)
    result = lab.exec(client, [*WORKLOAD, "get", f"http://{dst_ip}:{port}/", "--timeout", "5"], timeout=30)
    assert (result.returncode == 0) == (expect[2] == "allow"), result.stderr.decode()
    entries = wait_for(lambda: [e for e in access_log(lab, node, offset) if e["src"].startswith(src_ip + ":")])
    assert len(entries) == 1, entries
    entry = entries[0]
    assert entry["listener"] == trace["listener"]
    assert entry["decision"] == trace["decision"]
    assert entry["via"] == trace["route"]
    if trace["decision"] == "deny":
        assert entry["reason"] == trace["reason"]


def test_policies_certs_and_connections(lab, ips):
    policies = json.loads(ambitctl(lab, "node1", "-o", "json", "policies", "shop/web-0"))
    assert [(p["namespace"], p["name"], p["action"], p["enforced"]) for p in policies["policies"]] == [
        ("shop", "web-from-shop-only", "ALLOW", True)]
    assert policies["mtls"].startswith("PERMISSIVE")

    # a tunnel issues the client's certificate on node1 and the server's on node2
    assert lab.exec("shop/client-0", [*WORKLOAD, "get", f"http://{ips['shop/web-1']}:8080/"]).returncode == 0
    certs = {c["identity"] for c in json.loads(ambitctl(lab, "node1", "-o", "json", "certs"))["certificates"]}
    assert "spiffe://cluster.local/ns/shop/sa/client" in certs
    certs2 = {c["identity"] for c in json.loads(ambitctl(lab, "node2", "-o", "json", "certs"))["certificates"]}
    assert "spiffe://cluster.local/ns/shop/sa/web" in certs2

    # a live connection (the echo server holds it until we close stdin)
    proc = subprocess.Popen([str(Path(sys.executable).parent / "ambit"), "lab", "exec", "--prefix", lab.settings.prefix, "--state-dir", str(lab.settings.state_dir),
                             "shop/client-0", "--", *WORKLOAD, "send", ips["shop/web-1"], "9000"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdin is not None
        proc.stdin.write(b"hold")
        proc.stdin.flush()
        rows = wait_for(lambda: [c for c in json.loads(ambitctl(lab, "node1", "-o", "json", "connections"))
                                 if c["original_destination"] == f"{ips['shop/web-1']}:9000"])
        assert len(rows) == 1
        row = rows[0]
        assert row["client"].startswith(ips["shop/client-0"] + ":") and row["via"] == "hbone"
        assert row["source_identity"] == "spiffe://cluster.local/ns/shop/sa/client"
        assert row["destination_identity"] == "spiffe://cluster.local/ns/shop/sa/web"
    finally:
        proc.communicate(timeout=30)


def test_byte_counters_match_the_bytes_sent(lab, ips):
    def sent_bytes() -> float:
        def scrape() -> str:
            with urllib.request.urlopen("http://127.0.0.1:15020/metrics", timeout=5) as response:
                return response.read().decode()
        with NetnsThread(netns_path(lab.state().nodes["node2"].netns)) as thread:
            text = thread.run(scrape)
        total = 0.0
        for line in text.splitlines():
            if line.startswith("istio_tcp_sent_bytes_total{") and 'source_workload="probe-0"' in line \
                    and 'destination_workload="web-1"' in line:
                total += float(line.rsplit(" ", 1)[1])
        return total

    before = sent_bytes()
    payload = os.urandom(123_457)
    result = lab.exec("legacy/probe-0", [*WORKLOAD, "send", ips["shop/web-1"], "9000"], input=payload, timeout=30)
    assert result.returncode == 0 and result.stdout == payload
    # node2 reports it as the destination (plaintext from a non-mesh pod on its own node)
    assert wait_for(lambda: sent_bytes() - before == len(payload) or None) is True, sent_bytes() - before


def test_the_destination_node_reports_each_hbone_tunnel(lab, ips):
    """node2 counts and logs the tunnel it terminated for client-0 -> web-1,
    as Istio's destination reporter does: mutual TLS, the client's SPIFFE
    identity, and the bytes it moved each way."""
    def destination_bytes() -> tuple[float, float]:
        def scrape() -> str:
            with urllib.request.urlopen("http://127.0.0.1:15020/metrics", timeout=5) as response:
                return response.read().decode()
        with NetnsThread(netns_path(lab.state().nodes["node2"].netns)) as thread:
            text = thread.run(scrape)
        sums = {"istio_tcp_sent_bytes_total": 0.0, "istio_tcp_received_bytes_total": 0.0}
        for line in text.splitlines():
            name = line.split("{", 1)[0]
            if name in sums and 'reporter="destination"' in line and 'source_workload="client-0"' in line \
                    and 'destination_workload="web-1"' in line and 'connection_security_policy="mutual_tls"' in line \
                    and 'source_principal="spiffe://cluster.local/ns/shop/sa/client"' in line:
                sums[name] += float(line.rsplit(" ", 1)[1])
        return sums["istio_tcp_sent_bytes_total"], sums["istio_tcp_received_bytes_total"]

    before, since = destination_bytes(), log_size(lab, "node2")
    payload = os.urandom(54_321)
    result = lab.exec("shop/client-0", [*WORKLOAD, "send", ips["shop/web-1"], "9000"], input=payload, timeout=30)
    assert result.returncode == 0 and result.stdout == payload
    moved = (len(payload), len(payload))  # to the pod, and its echo back
    assert wait_for(lambda: tuple(a - b for a, b in zip(destination_bytes(), before)) == moved or None) is True
    entries = wait_for(lambda: [e for e in access_log(lab, "node2", since)
                                if e["listener"] == "hbone" and e["dst"] == f"{ips['shop/web-1']}:9000"])
    assert len(entries) == 1, entries
    entry = entries[0]
    assert entry["src"].startswith(ips["shop/client-0"] + ":") and entry["via"] == "hbone"
    assert entry["src_identity"] == "spiffe://cluster.local/ns/shop/sa/client"
    assert entry["dst_identity"] == "spiffe://cluster.local/ns/shop/sa/web"
    assert (entry["sent"], entry["received"], entry["decision"], entry["end"]) == (*moved, "allow", "closed")


def test_readiness_and_grpc_health_of_a_running_agent(lab):
    def ready() -> tuple[int, str]:
        with urllib.request.urlopen("http://127.0.0.1:15021/healthz/ready", timeout=5) as response:
            return response.status, response.read().decode()
    with NetnsThread(netns_path(lab.state().nodes["node1"].netns)) as thread:
        assert thread.run(ready) == (200, "ready\n")
    status = json.loads(ambitctl(lab, "node1", "-o", "json", "status"))
    assert status["ready"] and status["capture"] == "ebpf" and status["discovery_synced"]
    assert sorted(status["listeners"]) == ["hbone:15008", "inbound_plaintext:15006", "outbound:15001"]
