"""Scenarios on the default two-node lab, each a few lines that read like
what an operator would try: a pod on node 1 calls a pod on node 2; a pod
calls its neighbour; a Service spreads calls; 200 connections at once with
every byte checked; node 2's agent crashes and comes back; a pod is
replaced and gets a new address; a pod outside the mesh meets the policy.

One lab (real agents, real CNI chain, eBPF capture) is built for the module
and removed at the end, checked down to the last namespace, process, link,
rule and pin (tests/kernel/conftest.py); after every test only the lab
itself may be running. Prefix `lscn-`.

The crash and the replacement change the lab, so they come last.
"""
from __future__ import annotations

import collections
import contextlib
import ipaddress
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ambit.agent.cli.client import AgentClient
from ambit.agent.datapath.constants import HBONE_PORT
from ambit.lab import labconfig
from ambit.lab.processes import lab_namespaces, lab_processes, process_start_time
from ambit.lab.topology import Lab
from ambit.agent.netns import NetnsThread, netns_path

from tests.support.kernelstate import node_snapshot
from tests.support.labobserve import access_log, log_mark, metric, spiffe, watching
from tests.support.waiting import wait_until

pytestmark = pytest.mark.kernel

SERVICE = "10.96.0.10"
WORKLOAD = [sys.executable, "-m", "ambit.lab.podapp"]
CLIENT = [sys.executable, str(Path(__file__).resolve().parents[1] / "support" / "labclient.py")]


# --- the lab ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lab(lab_factory) -> Iterator[Lab]:
    with lab_factory.lab("lscn", labconfig.load_default()) as lab:
        yield lab


@pytest.fixture(autouse=True)
def only_the_lab_remains(lab: Lab) -> Iterator[None]:
    """After each test: the lab's own namespaces and processes, nothing more
    (no client left running, no namespace of a replaced pod)."""
    yield
    state = lab.state()
    expected = {lab.settings.underlay_netns, *(p.netns for p in state.pods.values())}
    for node in state.nodes.values():
        expected |= {node.netns, f"{node.netns}-proxy"}
    assert set(lab_namespaces(lab.settings.prefix)) == expected
    running = {r.pid for r in [*(n.agent for n in state.nodes.values()), *(p.workload for p in state.pods.values()),
                               state.ca, state.ca_holder]
               if r is not None and process_start_time(r.pid) == r.start_time}
    assert set(lab_processes(lab.settings.prefix)) == running
    assert len(running) == 6  # two agents, two web workloads, the CA and the holder of its key


# --- helpers: what a person would type in `ambit lab exec` --------------------------------------------------------

def ip(lab: Lab, pod: str) -> str:
    address = lab.find_pod(pod).ip
    assert address is not None
    return address


def url(lab: Lab, target: str, port: int = 8080) -> str:
    """`ns/pod` (its address and `port`) or `host:port`."""
    return f"http://{ip(lab, target)}:{port}/" if "/" in target else f"http://{target}/"


def attempt(lab: Lab, client: str, target: str, timeout: float = 5.0) -> subprocess.CompletedProcess:
    return lab.exec(client, [*WORKLOAD, "get", url(lab, target), "--timeout", str(timeout)], timeout=timeout + 20)


def call(lab: Lab, client: str, target: str) -> dict[str, Any]:
    """GET / from the client pod; the server's JSON answer (pod, node, peer)."""
    result = attempt(lab, client, target)
    assert result.returncode == 0, f"{client} -> {target}: {result.stderr.decode()}"
    return json.loads(result.stdout)


def echo(lab: Lab, client: str, server: str, data: bytes) -> bytes:
    result = lab.exec(client, [*WORKLOAD, "send", ip(lab, server), "9000"], input=data, timeout=30)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


@contextlib.contextmanager
def metrics_of(lab: Lab, node: str) -> Iterator[Any]:
    """A scraper of the node agent's /metrics, from inside the node's namespace."""
    def scrape() -> str:
        with urllib.request.urlopen("http://127.0.0.1:15020/metrics", timeout=5) as response:
            return response.read().decode()

    with NetnsThread(netns_path(lab.state().nodes[node].netns)) as thread:
        yield lambda: thread.run(scrape)


def ipv4_tcp(frames: list[bytes]) -> list[tuple[str, int, str, int]]:
    """(source, source port, destination, destination port) of IPv4 TCP frames."""
    out = []
    for frame in frames:
        if len(frame) < 38 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
            continue
        tcp = 14 + (frame[14] & 0x0F) * 4
        out.append((socket.inet_ntoa(frame[26:30]), int.from_bytes(frame[tcp:tcp + 2], "big"),
                    socket.inet_ntoa(frame[30:34]), int.from_bytes(frame[tcp + 2:tcp + 4], "big")))
    return out


def underlay_port(lab: Lab, node: str) -> str:
    return f"{lab.settings.prefix}n{list(lab.state().nodes).index(node) + 1}"


@contextlib.contextmanager
def echo_loop(lab: Lab, client: str, server: str, stop_file: Path) -> Iterator[dict[str, Any]]:
    """Echo exchanges from `client` to `server` one after another while the
    block runs; the dict is filled with the loop's report when it ends."""
    report: dict[str, Any] = {}
    progress = stop_file.with_name(stop_file.name + ".progress")
    argv = [*CLIENT, "loop", ip(lab, server), "9000", "--until-file", str(stop_file), "--max-seconds", "60",
            "--progress-file", str(progress)]

    def run() -> None:
        result = lab.exec(client, argv, timeout=90)
        report.update(json.loads(result.stdout) if result.returncode == 0 else {"error": result.stderr.decode()})

    thread = threading.Thread(target=run)
    thread.start()
    try:
        def going() -> bool | None:
            """True after 3 exchanges succeeded, False if the loop ended before, None meanwhile."""
            try:
                done = int(progress.read_text())
            except (OSError, ValueError):
                done = 0
            return True if done >= 3 else (None if thread.is_alive() else False)
        wait_until(lambda: going() is not None, f"3 exchanges {client} -> {server}", timeout=30)
        assert going(), f"the echo loop ended before 3 exchanges: {report}"
        yield report
    finally:
        stop_file.touch()
        thread.join(90)


# --- scenarios ----------------------------------------------------------------------------------------------------

def test_a_pod_on_node1_calls_a_pod_on_node2_over_hbone(lab):
    mark = log_mark(lab, "node1")
    with watching(lab.settings.underlay_netns, underlay_port(lab, "node1")) as underlay:
        answer = call(lab, "shop/client-0", "shop/web-1")
    assert (answer["pod"], answer["node"], answer["peer"]) == ("shop/web-1", "node2", ip(lab, "shop/client-0"))
    entry = access_log(lab, "node1", mark, listener="outbound", dst=f"{ip(lab, 'shop/web-1')}:8080")
    assert entry["via"] == "hbone" and entry["decision"] == "allow"
    assert (entry["src_identity"], entry["dst_identity"]) == (spiffe("shop", "client"), spiffe("shop", "web"))
    payloads = underlay.tcp_payloads()
    assert any(HBONE_PORT in (sport, dport) and data for sport, dport, data in payloads)
    assert not any(b"GET /" in data or b'"peer"' in data for _, _, data in payloads)  # only TLS crossed


def test_a_pod_calls_a_pod_on_its_own_node_without_touching_the_underlay(lab):
    mark = log_mark(lab, "node1")
    with watching(lab.settings.underlay_netns, underlay_port(lab, "node1")) as underlay:
        answer = call(lab, "shop/client-0", "shop/web-0")
    assert (answer["pod"], answer["node"], answer["peer"]) == ("shop/web-0", "node1", ip(lab, "shop/client-0"))
    assert access_log(lab, "node1", mark, dst=f"{ip(lab, 'shop/web-0')}:8080")["via"] == "local"
    seen = ipv4_tcp(underlay.frames)
    assert [f for f in seen if HBONE_PORT in (f[1], f[3])] == []
    assert [f for f in seen if ip(lab, "shop/web-0") in (f[0], f[2])] == []


def test_a_pod_calls_the_service_vip_and_both_web_pods_answer(lab):
    answers = [call(lab, "shop/client-0", f"{SERVICE}:80") for _ in range(4)]
    assert collections.Counter(a["pod"] for a in answers) == {"shop/web-0": 2, "shop/web-1": 2}
    assert {a["peer"] for a in answers} == {ip(lab, "shop/client-0")}
    assert {a["local_port"] for a in answers} == {8080}  # port 80 -> targetPort http


def test_200_concurrent_connections_across_nodes_share_a_few_hbone_connections(lab):
    argv = [*CLIENT, "fanout", ip(lab, "shop/web-1"), "9000", "--connections", "200", "--size", str(64 * 1024)]
    peaks = {"connections": 0.0, "streams": 0.0}
    done = threading.Event()
    with metrics_of(lab, "node1") as scrape:
        opened_before = metric(scrape(), "istio_tcp_connections_opened_total", reporter="source",
                               destination_workload="web-1", connection_security_policy="mutual_tls")

        def sample() -> None:
            while not done.is_set():
                text = scrape()
                peaks["connections"] = max(peaks["connections"], metric(text, "ambit_hbone_pool_connections"))
                peaks["streams"] = max(peaks["streams"], metric(text, "ambit_hbone_pool_streams"))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            result = lab.exec("shop/client-0", argv, timeout=120)
        finally:
            done.set()
            sampler.join()
        opened = metric(scrape(), "istio_tcp_connections_opened_total", reporter="source",
                        destination_workload="web-1", connection_security_policy="mutual_tls") - opened_before
    assert result.returncode == 0, result.stderr.decode()
    report = json.loads(result.stdout)
    assert report["failures"] == {} and report["verified"] == 200
    assert report["bytes_each_way"] == 200 * 64 * 1024
    assert opened == 200  # every one went through node1's proxy over mTLS
    assert 1 <= peaks["connections"] <= 3 < peaks["streams"], peaks  # multiplexed, not one TLS connection each


def test_a_pod_outside_the_mesh_is_denied_on_8080_but_echo_on_9000_works(lab):
    mark = log_mark(lab, "node1")
    denied = attempt(lab, "legacy/probe-0", "shop/web-0")
    assert denied.returncode == 2 and b"reset" in denied.stderr
    entry = access_log(lab, "node1", mark, decision="deny")  # decided at the destination's node
    assert entry["listener"] == "inbound_plaintext" and entry["src"].startswith(ip(lab, "legacy/probe-0") + ":")
    assert entry["src_identity"] is None
    assert echo(lab, "legacy/probe-0", "shop/web-0", b"still open") == b"still open"


def test_node1_agent_restarted_gracefully_keeps_its_pods_and_serves_at_once(lab):
    before = lab.state().nodes["node1"].agent
    after = lab.restart_agent("node1")
    assert before is not None and after.pid != before.pid
    # SIGTERM: the old agent let go of the node first, then drained what it had (nothing here) and exited
    wait_until(lambda: process_start_time(before.pid) is None, "the old agent to exit")
    node1 = lab.status().nodes[0]
    assert (node1.name, node1.agent_pid, node1.agent_ready, node1.agent_records, node1.agent_enrolled) == (
        "node1", after.pid, True, 2, 2)  # its records came back from its state, not from a new CNI ADD
    assert call(lab, "shop/client-0", "shop/web-1")["peer"] == ip(lab, "shop/client-0")
    assert call(lab, "shop/client-0", "shop/web-0")["peer"] == ip(lab, "shop/client-0")


def test_node2_agent_crash_fails_closed_and_a_restart_serves_again(lab, tmp_path):
    web1 = lab.find_pod("shop/web-1")
    before = lab.state().nodes["node2"].agent
    with echo_loop(lab, "shop/client-0", "shop/web-0", tmp_path / "stop") as local:
        lab.stop_agent("node2", kill=True)
        with watching(web1.netns, "eth0") as at_web1:
            during = attempt(lab, "shop/client-0", "shop/web-1", timeout=3)
        assert during.returncode != 0, "a new connection to web-1 succeeded while node2 had no agent"
        assert [f for f in ipv4_tcp(at_web1.frames) if f[2] == web1.ip] == []  # never reached web-1 at all
        lab.start_agent("node2")
        restarted = time.monotonic()
        while (again := attempt(lab, "shop/client-0", "shop/web-1", timeout=2)).returncode != 0:
            assert time.monotonic() - restarted < 5, f"web-1 still unreachable: {again.stderr.decode()}"
    assert json.loads(again.stdout)["peer"] == ip(lab, "shop/client-0")
    after = lab.state().nodes["node2"].agent
    assert after is not None and before is not None and after.pid != before.pid
    assert local.get("failures") == [] and local["attempts"] >= 10, local  # node1's own traffic never stopped


def test_web1_replaced_gets_a_new_ip_and_is_reached_there_over_hbone(lab):
    old = ip(lab, "shop/web-1")
    new = lab.recreate_pod("shop/web-1")
    assert new != old and ipaddress.ip_address(new) in ipaddress.ip_network(lab.state().nodes["node2"].pod_cidr)
    mark = log_mark(lab, "node1")
    answer = call(lab, "shop/client-0", "shop/web-1")
    assert (answer["pod"], answer["local"], answer["peer"]) == ("shop/web-1", new, ip(lab, "shop/client-0"))
    assert access_log(lab, "node1", mark, dst=f"{new}:8080")["via"] == "hbone"
    assert attempt(lab, "shop/client-0", f"{old}:8080", timeout=2).returncode != 0
    node2 = lab.state().nodes["node2"]
    with AgentClient(node2.socket) as agent:
        records = [[a.split("/")[0] for a in w.ips] for w in agent.workloads() if w.pod.name == "web-1"]
    assert records == [[new]]
    assert node_snapshot(node2.netns, node2.bpffs_dir)["local_pods"] == 1  # no stale entry for the old address
    answers = {call(lab, "shop/client-0", f"{SERVICE}:80")["local"] for _ in range(2)}
    assert answers == {ip(lab, "shop/web-0"), new}  # the Service follows the new address
