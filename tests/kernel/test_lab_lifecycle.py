"""Day-2 events on the default two-node lab (eBPF, file discovery, the lab
CA): an upgrade hand-over with HBONE tunnels open both ways, a pod that was
running before ambit was chained joining the mesh, the records lost before
a restart, and a pod that left the mesh while its agent was down.

    node1: shop/web-0 (http 8080, echo 9000), shop/client-0
    node2: shop/web-1 (http 8080, echo 9000), legacy/probe-0 (outside the mesh)

Each test leaves the lab as it found it: every old agent gone, each pod in
the mesh captured.
"""
from __future__ import annotations

import copy
import ipaddress
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ambit.agent.cli.client import AgentClient
from ambit.agent.netns import netns_path
from ambit.lab import labconfig
from ambit.lab.processes import process_start_time
from ambit.lab.topology import Lab

from tests.support.kernelstate import node_snapshot
from tests.support.labobserve import access_log, events, log_mark, metric, scrape, spiffe, wait_event
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(300)]

WORKLOAD = [sys.executable, "-m", "ambit.lab.podapp"]
LOAD = Path(__file__).resolve().parents[2] / "bench" / "steady_load.py"
AMBITCTL = str(Path(sys.executable).parent / "ambitctl")


@pytest.fixture(scope="module")
def lab(lab_factory) -> Iterator[Lab]:
    with lab_factory.lab("llcy", labconfig.load_default()) as lab:
        yield lab


def ip(lab: Lab, pod: str) -> str:
    address = lab.find_pod(pod).ip
    assert address is not None
    return address


def status(lab: Lab, node: str):
    with AgentClient(lab.state().nodes[node].socket, timeout=2.0) as client:
        return client.status()


def workloads(lab: Lab, node: str):
    with AgentClient(lab.state().nodes[node].socket, timeout=2.0) as client:
        return client.workloads()


def call(lab: Lab, client: str, target_ip: str, port: int = 8080) -> dict[str, Any]:
    result = lab.exec(client, [*WORKLOAD, "get", f"http://{target_ip}:{port}/", "--timeout", "5"], timeout=30)
    assert result.returncode == 0, f"{client} -> {target_ip}: {result.stderr.decode()}"
    return json.loads(result.stdout)


def gone(pid: int) -> bool:
    return process_start_time(pid) is None


def captured(lab: Lab, node: str) -> int:
    record = lab.state().nodes[node]
    return node_snapshot(netns_path(record.netns), record.bpffs_dir)["local_pods"]


# --- the upgrade hand-over, with the tunnels of both nodes open ----------------------------------------------

def test_upgrading_either_node_under_load_fails_no_connection_and_resets_no_stream(lab: Lab, tmp_path: Path) -> None:
    """Steady new connections (cross-node over HBONE, same node) and echo
    streams through both agents, while node1's agent and then node2's are
    replaced by a hand-over. Node2's old agent sends GOAWAY to node1's pool;
    node1's old agent keeps its client tunnels to node2 until they end."""
    stop_file, out = tmp_path / "stop", tmp_path / "load.json"
    argv = [sys.executable, str(LOAD), "--rate", "30", "--streams", "2", "--timeout", "5",
            "--short", f"cross={ip(lab, 'shop/web-1')}:8080", "--short", f"same={ip(lab, 'shop/web-0')}:8080",
            "--stream", f"cross={ip(lab, 'shop/web-1')}:9000", "--stream", f"same={ip(lab, 'shop/web-0')}:9000",
            "--until-file", str(stop_file), "--out", str(out)]
    load = lab.spawn("shop/client-0", argv)
    old = {}
    try:
        wait_until(lambda: status(lab, "node1").live_connections >= 3, "the streams open through node1")
        for node in ("node1", "node2"):
            old[node] = lab.state().nodes[node].agent.pid
            mark = log_mark(lab, node)
            new = lab.upgrade_agent(node)
            st = status(lab, node)
            assert (st.pid, st.phase, st.ready) == (new.pid, "serving", True)
            wait_event(lab, node, mark, "handed over", successor_pid=new.pid)
        # node1's old agent still carries the streams it accepted
        assert not gone(old["node1"])
    finally:
        stop_file.touch()
        _, err = load.communicate(timeout=60)
    assert load.returncode == 0, err.decode()
    result = json.loads(out.read_text())
    failed = [s for s in result["short"] if not s["ok"]]
    assert failed == [], failed[:5]
    assert [s["error"] for s in result["streams"]] == [""] * 4
    assert all(s["sent"] == s["echoed"] > 0 for s in result["streams"])
    for node, pid in old.items():
        wait_until(lambda: gone(pid), f"{node}'s old agent (pid {pid}) to exit after its last connection", 20)
    assert (status(lab, "node1").enrolled, status(lab, "node2").enrolled) == (2, 1)  # legacy/probe-0 is out
    # node2's old agent drained its HBONE server side with a GOAWAY, and node1 followed it to the new one
    assert call(lab, "shop/client-0", ip(lab, "shop/web-1"))["peer"] == ip(lab, "shop/client-0")


# --- pods already running join the mesh --------------------------------------------------------------------------

LATE_POD = {
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {"name": "late-0", "namespace": "shop", "labels": {"app": "late"},
                 "annotations": {"lab.ambit.dev/workload": "http,echo"}},
    "spec": {"nodeName": "node2", "serviceAccountName": "web",
             "containers": [{"name": "web", "image": "ambit-lab-workload",
                             "ports": [{"name": "http", "containerPort": 8080},
                                       {"name": "echo", "containerPort": 9000}]}]},
}


def test_a_pod_started_before_ambit_was_chained_joins_the_mesh_and_talks_mtls(lab: Lab) -> None:
    mark = log_mark(lab, "node2")
    address = lab.add_pod(LATE_POD, chained=False)  # no CNI ADD reached the agent
    late = wait_until(lambda: next((w for w in workloads(lab, "node2") if w.pod.name == "late-0"
                                    and w.capture != "none"), None), "node2's agent to adopt shop/late-0")
    assert late.origin == "adopted" and [a.split("/")[0] for a in late.ips] == [address]
    assert late.netns.endswith(lab.find_pod("shop/late-0").netns)
    assert events(lab, "node2", mark, "pod adopted")
    assert status(lab, "node2").not_captured == []
    assert metric(scrape(lab, "node2"), "ambit_pods_adopted_total", origin="adopted") >= 1
    assert metric(scrape(lab, "node2"), "ambit_pods_not_captured") == 0
    # Its traffic is now mutually authenticated end to end.
    mark1, mark2 = log_mark(lab, "node1"), log_mark(lab, "node2")
    answer = call(lab, "shop/client-0", address)
    assert (answer["pod"], answer["peer"]) == ("shop/late-0", ip(lab, "shop/client-0"))
    assert access_log(lab, "node1", mark1, dst=f"{address}:8080")["via"] == "hbone"
    inbound = access_log(lab, "node2", mark2, listener="hbone", dst=f"{address}:8080")
    assert inbound["src_identity"] == spiffe("shop", "client")
    assert inbound["dst_identity"] == spiffe("shop", "web")


# --- records are a cache -----------------------------------------------------------------------------------------

def test_records_lost_then_a_restart_keep_every_pod_captured(lab: Lab) -> None:
    node = lab.state().nodes["node1"]
    before = {w.pod.name: w.host_veth_ifindex for w in workloads(lab, "node1")}
    assert captured(lab, "node1") == 2
    lab.stop_agent("node1")
    state_dir = Path(node.workdir) / "state"
    records = [p for p in state_dir.glob("*.json")]
    assert len(records) == len(before)
    for record in records:
        record.unlink()
    (state_dir / "corrupt.json").write_text("{not json")  # and one that cannot be read
    assert captured(lab, "node1") == 2  # the kernel kept the capture while no agent ran
    mark = log_mark(lab, "node1")
    lab.start_agent("node1")
    rebuilt = {w.pod.name: w for w in workloads(lab, "node1")}
    assert {name: w.host_veth_ifindex for name, w in rebuilt.items()} == before
    assert {w.origin for w in rebuilt.values()} == {"rebuilt"} and all(w.capture != "none" for w in rebuilt.values())
    assert captured(lab, "node1") == 2
    assert events(lab, "node1", mark, "removing the capture of a pod that is gone") == []
    assert call(lab, "shop/client-0", ip(lab, "shop/web-1"))["peer"] == ip(lab, "shop/client-0")
    assert call(lab, "shop/client-0", ip(lab, "shop/web-0"))["peer"] == ip(lab, "shop/client-0")


def test_a_pod_that_left_the_mesh_while_its_agent_was_down_is_released_on_start(lab: Lab) -> None:
    web1 = ip(lab, "shop/web-1")
    lab.stop_agent("node2")
    lab.set_pod_labels("shop/web-1", {"app": "web", "istio.io/dataplane-mode": "none"})
    mark = log_mark(lab, "node2")
    try:
        lab.start_agent("node2")
        record = next(w for w in workloads(lab, "node2") if w.pod.name == "web-1")
        assert record.capture == "none"
        assert events(lab, "node2", mark, "pod left the mesh")
        assert status(lab, "node2").not_captured == []
        # Plaintext now: the server sees the client, with no tunnel on node2's side.
        mark2 = log_mark(lab, "node2")
        assert call(lab, "shop/client-0", web1)["peer"] == ip(lab, "shop/client-0")
        assert [e for e in events(lab, "node2", mark2, "connection") if e.get("listener") == "hbone"] == []
    finally:
        lab.set_pod_labels("shop/web-1", {"app": "web"})
        wait_until(lambda: next(w for w in workloads(lab, "node2") if w.pod.name == "web-1").capture != "none",
                   "web-1 back in the mesh")


# --- drift that cannot be repaired is shown and counted -------------------------------------------------------

def replace_file(path: Path, data: bytes) -> None:
    """Atomically, as the lab does: an agent polling the file never reads half of it."""
    tmp = path.with_suffix(".test-tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def test_a_pod_in_the_mesh_with_no_interface_on_its_node_is_shown_as_drift_and_counted(lab: Lab) -> None:
    """Discovery puts shop/ghost-0 on node2, in the mesh, at an address no
    interface of node2 holds (as for a pod whose sandbox is gone): node2's
    agent cannot capture it, so `ambitctl status` names it with the reason
    and ambit_pods_not_captured counts it, until discovery drops it."""
    cluster_file = lab.settings.cluster_file
    original = cluster_file.read_bytes()
    documents = list(yaml.safe_load_all(original))
    web1 = next(d for d in documents if d.get("kind") == "Pod" and d["metadata"]["name"] == "web-1")
    node2 = next(d for d in documents if d.get("kind") == "Node" and d["metadata"]["name"] == "node2")
    held = {p.ip for p in lab.state().pods.values()}
    address = next(str(a) for a in reversed(list(ipaddress.ip_network(node2["spec"]["podCIDR"]).hosts()))
                   if str(a) not in held)
    ghost = copy.deepcopy(web1)
    ghost["metadata"].update(name="ghost-0", uid="00000000-0000-4000-8000-00000000a018")
    ghost["status"].update(podIP=address, podIPs=[{"ip": address}])
    expected = sum(1 for w in workloads(lab, "node2") if w.capture != "none")  # node2's pods in the mesh
    try:
        replace_file(cluster_file, yaml.safe_dump_all([*documents, ghost], sort_keys=False).encode())
        lab.wait_applied()
        why = f"shop/ghost-0: no pod interface of this node holds {address}"
        st = wait_until(lambda: (s := status(lab, "node2")).not_captured and s, "node2 to report shop/ghost-0")
        assert list(st.not_captured) == [why] and st.pods_expected == expected + 1
        assert metric(scrape(lab, "node2"), "ambit_pods_not_captured") == 1
        shown = subprocess.run([AMBITCTL, "--socket", lab.state().nodes["node2"].socket, "status"],
                               capture_output=True, text=True, timeout=30)
        assert shown.returncode == 0, shown.stderr
        assert f"1 of {expected + 1} pod(s) expected in the mesh not captured" in shown.stdout
        assert why in shown.stdout
        assert status(lab, "node1").not_captured == []  # not node1's pod
    finally:
        replace_file(cluster_file, original)
        lab.wait_applied()
    wait_until(lambda: not status(lab, "node2").not_captured, "node2's drift to clear once discovery drops ghost-0")
    assert metric(scrape(lab, "node2"), "ambit_pods_not_captured") == 0
