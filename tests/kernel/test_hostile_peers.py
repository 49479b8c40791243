"""Hostile peers against real agents in the default lab: each attack a scenario that
asserts the refusal and the counter or log line showing it (issue 16, item 4).

    node1: shop/web-0, shop/client-0         node2: shop/web-1, legacy/probe-0 (outside the mesh)

The attackers are where they would be: a compromised node1 using the certificate its
agent holds for client-0 (a peer with a valid identity) against web-1's node; legacy/probe-0,
a pod of node2 outside the mesh, with TCP reach to web-1:15008 (node2's capture hands that
to its HBONE listener) and to node2's own ports; client-0 and probe-0 dialling the proxy's
own address. The tools (tests/support/hostile_peer.py) are raw frames on non-blocking
sockets, so the attacking side costs the shared machine little.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ambit.agent.datapath import constants
from ambit.agent.datapath.bpfsys import BpfMap
from ambit.agent.datapath.programs import COUNTER, U32_KEY, VERDICTS
from ambit.agent.netns import NetnsThread, netns_path
from ambit.lab import labconfig
from ambit.lab.node import spawn_in_netns
from ambit.lab.topology import Lab

from tests.support import hostile_peer
from tests.support.labobserve import events, log_mark, metric, scrape
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(600)]

TOOL = [sys.executable, str(Path(__file__).resolve().parents[1] / "support" / "hostile_peer.py")]
WORKLOAD = [sys.executable, "-m", "ambit.lab.podapp"]
MiB = 1 << 20


@pytest.fixture(scope="module")
def lab(lab_factory) -> Iterator[Lab]:
    with lab_factory.lab("lhst", labconfig.load_default()) as lab:
        yield lab


@dataclass(frozen=True)
class StolenIdentity:
    """What a compromised node1 holds for client-0: its key, certificate and the mesh's roots."""

    cert: str
    key: str
    bundle: str

    @property
    def args(self) -> list[str]:
        return ["--cert", self.cert, "--key", self.key, "--bundle", self.bundle]

    def context(self) -> Any:
        return hostile_peer.client_context(self.cert, self.key, self.bundle)


@pytest.fixture(scope="module")
def client_identity(lab: Lab) -> StolenIdentity:
    """node1's agent gets shop/client's certificate when client-0 first goes over HBONE."""
    answer = call(lab, "shop/client-0", "shop/web-1")
    assert answer["pod"] == "shop/web-1"
    certs = Path(lab.state().nodes["node1"].workdir) / "state" / "certs"
    identity = StolenIdentity(str(certs / "shop" / "client" / "cert.pem"), str(certs / "shop" / "client" / "key.pem"),
                              str(certs / "trust-bundle.pem"))
    assert all(Path(p).exists() for p in (identity.cert, identity.key, identity.bundle)), list(certs.rglob("*"))
    return identity


# --- helpers ------------------------------------------------------------------------------------------------------


def ip(lab: Lab, pod: str) -> str:
    address = lab.find_pod(pod).ip
    assert address is not None
    return address


def call(lab: Lab, client: str, target: str) -> dict[str, Any]:
    result = lab.exec(client, [*WORKLOAD, "get", f"http://{ip(lab, target)}:8080/", "--timeout", "5"], timeout=30)
    assert result.returncode == 0, f"{client} -> {target}: {result.stderr.decode()}"
    return json.loads(result.stdout)


def agent_pid(lab: Lab, node: str) -> int:
    agent = lab.state().nodes[node].agent
    assert agent is not None
    return agent.pid


def proc_status(pid: int, field: str) -> int:
    """A number from /proc/<pid>/status (VmRSS in kB, Threads)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def observed(attack: str, **facts: Any) -> None:
    """One line per attack with what happened (pytest -s shows it: the closing table's figures)."""
    print(json.dumps({"attack": attack, **facts}, default=str), flush=True)


def in_node(lab: Lab, node: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run fn in a thread inside the node's namespace (what the node itself would do)."""
    with NetnsThread(netns_path(lab.state().nodes[node].netns)) as thread:
        return thread.run(fn, *args, **kwargs)


def verdict_count(lab: Lab, node: str, verdict: str) -> int:
    """A capture verdict's packet count, read from the node's pinned map (the kernel, not the agent)."""
    counts = BpfMap.open_pinned(str(Path(lab.state().nodes[node].bpffs_dir) / "verdict_counts"))
    try:
        values = counts.per_cpu_values(U32_KEY.pack(VERDICTS.index(verdict)))
        return sum(COUNTER.unpack(v)[0] for v in values)
    finally:
        counts.close()


class Background:
    """A tool run in a pod until the test stops it: its `idle` mode holds its connections until
    its stdin closes, then prints its report; `ready` is what it wrote once they were all set up."""

    def __init__(self, lab: Lab, pod: str, argv: list[str], ready_file: Path) -> None:
        self._ready_file = ready_file
        argv = [*argv, "--ready-file", str(ready_file)]
        self._proc = spawn_in_netns(netns_path(lab.find_pod(pod).netns), lambda: subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE))

    def ready(self) -> dict[str, Any]:
        wait_until(lambda: self._ready_file.exists() or self._proc.poll() is not None,
                   "the attacker's connections set up", timeout=120)
        assert self._ready_file.exists(), self._proc.communicate(timeout=10)
        return json.loads(self._ready_file.read_text())

    def stop(self) -> dict[str, Any]:
        out, err = self._proc.communicate(b"", timeout=300)
        lines = out.decode().splitlines()
        return json.loads(lines[-1]) if self._proc.returncode == 0 and lines else {"error": err.decode()}


# --- a peer with a valid certificate that does not read ------------------------------------------------------------


def test_a_peer_pinging_without_reading_is_cut_off_and_the_agent_keeps_its_memory(lab, client_identity):
    web1 = ip(lab, "shop/web-1")
    pid = agent_pid(lab, "node2")
    rss_before = proc_status(pid, "VmRSS")
    mark = log_mark(lab, "node2")
    goaways = metric(scrape(lab, "node2"), "ambit_hbone_server_goaways_sent_total", error_code="ENHANCE_YOUR_CALM")

    report = in_node(lab, "node1", hostile_peer.ping_flood, web1, constants.HBONE_PORT, client_identity.context(),
                     1_000_000)
    rss_after = proc_status(pid, "VmRSS")
    observed("ping flood", report=report, agent_rss_growth_kb=rss_after - rss_before)

    assert report.goaway_error == "ENHANCE_YOUR_CALM", report
    assert "acknowledgements queued" in report.goaway_reason
    assert report.end == "eof", report  # told why, then a clean close: no RST ate the GOAWAY
    assert rss_after - rss_before < 4 * 1024, f"agent RSS grew by {rss_after - rss_before} kB"
    (failed,) = events(lab, "node2", mark, "hbone_connection_failed")
    assert failed["error_code"] == "ENHANCE_YOUR_CALM" and "acknowledgements queued" in failed["reason"]
    wait_until(lambda: metric(scrape(lab, "node2"), "ambit_hbone_server_goaways_sent_total",
                              error_code="ENHANCE_YOUR_CALM") == goaways + 1, "the GOAWAY counted")
    assert call(lab, "shop/client-0", "shop/web-1")["pod"] == "shop/web-1"  # the mesh carries on


# --- unauthenticated clients holding handshakes and connections open ------------------------------------------------


def test_2000_idle_tls_handshakes_do_not_delay_a_good_clients_connect(lab, client_identity, tmp_path):
    web1 = ip(lab, "shop/web-1")
    pid = agent_pid(lab, "node2")
    mark = log_mark(lab, "node2")
    before = scrape(lab, "node2")
    displaced = metric(before, "ambit_hbone_server_connections_refused_total", reason="handshake_displaced")
    rss_before = proc_status(pid, "VmRSS")
    fds_before = len(os.listdir(f"/proc/{pid}/fd"))
    attacker = Background(lab, "legacy/probe-0", [*TOOL, "idle", web1, str(constants.HBONE_PORT), "--count", "2000",
                                                  "--tls-hello"], tmp_path / "ready")
    try:
        setup = attacker.ready()  # 2,000 connections made, each with a ClientHello started
        answer = in_node(lab, "node1", hostile_peer.connect_once, web1, constants.HBONE_PORT,
                         client_identity.context(), f"{web1}:8080")
        rss_growth = proc_status(pid, "VmRSS") - rss_before
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        observed("idle handshakes", attacker=setup, good_connect=answer, agent_rss_growth_kb=rss_growth,
                 agent_fds=(fds_before, fds))
        assert answer["status"] == 200, answer
        assert answer["seconds"] < 1.0, answer  # the one time budget the issue states
        # All but the newest 128 were displaced (and the good client displaced one more).
        wait_until(lambda: metric(scrape(lab, "node2"), "ambit_hbone_server_connections_refused_total",
                                  reason="handshake_displaced") >= displaced + 2000 - 128,
                   "2000 - 128 handshakes displaced")
        assert metric(scrape(lab, "node2"), "ambit_hbone_server_handshakes") <= 128
        assert fds - fds_before <= 128 + 64  # the cap's worth of sockets (and some in flight), not 2,000
    finally:
        report = attacker.stop()
    # Closed by the server: seen while holding, or already while connecting.
    assert report["opened"] + sum(report["failed"].values()) == 2000, report
    assert report["closed_by_server"] + report["failed"].get("ECONNRESET", 0) >= 2000 - 128, report
    (limit,) = events(lab, "node2", mark, "hbone_connection_limit")  # once, not 1,872 times
    assert limit["limit"] == "handshake_displaced"


def test_1000_idle_connections_to_15020_do_not_stop_readiness(lab, tmp_path):
    pid = agent_pid(lab, "node2")
    node2_ip = lab.state().nodes["node2"].underlay_ip
    threads = proc_status(pid, "Threads")
    mark = log_mark(lab, "node2")
    attacker = Background(lab, "legacy/probe-0", [*TOOL, "idle", node2_ip, str(constants.METRICS_PORT),
                                                  "--count", "1000"], tmp_path / "ready")
    try:
        setup = attacker.ready()

        def ready() -> tuple[int, bytes]:
            import urllib.request
            with urllib.request.urlopen(f"http://127.0.0.1:{constants.READINESS_PORT}/healthz/ready",
                                        timeout=5) as response:
                return response.status, response.read()

        readiness = in_node(lab, "node2", ready)
        threads_now = proc_status(pid, "Threads")
        observed("idle 15020", attacker=setup, readiness=readiness, agent_threads=(threads, threads_now))
        assert readiness == (200, b"ready\n")  # the kubelet's probe
        assert threads_now <= threads + 2  # connections are not threads
        # Observed from the metrics port itself: this scrape displaces one more idle connection and is served.
        wait_until(lambda: metric(scrape(lab, "node2"), "ambit_telemetry_connections_closed_total",
                                  port=str(constants.METRICS_PORT), reason="displaced") >= 1000 - 128,
                   "1000 - 128 idle connections displaced")
    finally:
        report = attacker.stop()
    assert report.get("opened") == 1000, report
    assert report["closed_by_server"] >= 1000 - 128, report
    assert events(lab, "node2", mark, "telemetry_connection_limit")


# --- a pod dialling the proxy's own address -------------------------------------------------------------------------


@pytest.mark.parametrize("pod,node", [("shop/client-0", "node1"), ("legacy/probe-0", "node2")])
def test_a_pod_dialling_the_proxys_own_address_is_refused(lab, pod, node):
    """Enrolled (client-0) or not (probe-0): the listeners answer only the capture."""
    dropped = verdict_count(lab, node, "proxy_drop_own_addr")
    for port in (constants.OUTBOUND_PORT, constants.INBOUND_PLAINTEXT_PORT, constants.HBONE_PORT):
        result = lab.exec(pod, [*TOOL, "dial", constants.PROXY_LINK_ADDR, str(port), "--timeout", "1"], timeout=30)
        observed("proxy address", pod=pod, port=port, result=result.stdout.decode().strip())
        assert json.loads(result.stdout) == {"result": "timeout"}, result.stderr.decode()
    assert verdict_count(lab, node, "proxy_drop_own_addr") >= dropped + 3
    if pod == "shop/client-0":  # its own traffic is still captured and served
        assert call(lab, pod, "shop/web-0")["pod"] == "shop/web-0"
