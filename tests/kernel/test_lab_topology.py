"""`ambit lab` topology, for real: node namespaces on an underlay bridge, one
ambit-agent per node, pods from the real CNI chain, workloads inside them.

Scenarios read like the lab's use: a client pod on node 1 calls a server on
node 2 and the server sees the client's own address; a megabyte of random
bytes goes through the echo server and back; `status`, `exec` and `down` work
from another process; a bad pod, Ctrl-C or a crashed run leave nothing
behind. Every lab here has the prefix `labt-` and address ranges of its own
from tests/kernel/conftest.py, never the user's `ambitlab-` lab; that harness
checks each one clean before and after, this file checks the lab's own
reports of what it removed.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ambit.agent.cli.client import AgentClient
from ambit.agent.discovery.model import ContainerPort
from ambit.lab import labconfig
from ambit.lab.errors import LabError, LeftoversFound
from ambit.lab.node import AgentProcess, NodeNamespace
from ambit.lab.plan import LabSettings
from ambit.lab.processes import MARKER_ENV, create_netns, lab_namespaces, lab_processes, process_start_time
from ambit.lab.topology import Lab
from ambit.agent.netlink import iproute
from ambit.agent.netns import NetnsThread
from tests.support.labcheck import root_debris

pytestmark = pytest.mark.kernel

TAG = "labt"
PREFIX = f"{TAG}-"
WORKLOAD = [sys.executable, "-m", "ambit.lab.podapp"]
AMBIT = str(Path(sys.executable).parent / "ambit")


def node_ip(settings: LabSettings, n: int) -> str:
    """Node N is host N of the underlay."""
    return str(ipaddress.ip_network(settings.underlay_cidr).network_address + n)


def node_pods(settings: LabSettings, n: int) -> ipaddress.IPv4Network:
    """Node N's pods are the Nth /24 of the pod range."""
    return list(ipaddress.ip_network(settings.pod_supernet).subnets(new_prefix=24))[n]


def ranges(settings: LabSettings) -> tuple[str, ...]:
    """The lab's address ranges as the prefixes labcheck matches ("10.N.")."""
    return tuple(".".join(cidr.split(".")[:2]) + "." for cidr in (settings.underlay_cidr, settings.pod_supernet))


def assert_clean(settings: LabSettings) -> None:
    """Nothing of the lab left at this point of a test (the harness checks again at its end)."""
    assert lab_namespaces(PREFIX) == ()
    assert lab_processes(PREFIX) == ()
    assert root_debris(PREFIX, ranges(settings)) == []
    assert not settings.state_file.exists()
    assert not settings.nodes_dir.exists()
    assert list(settings.bpffs_root.glob(f"{PREFIX}node*")) == []


@pytest.fixture
def clean_lab(lab_factory):
    """A lab for one test, not yet up; torn down and checked clean however the test ends."""
    with lab_factory.lab(TAG) as lab:
        yield lab


def get_json(lab: Lab, pod: str, url: str) -> dict:
    result = lab.exec(pod, [*WORKLOAD, "get", url], timeout=20)
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


class TestRunningLab:
    """The default two-node lab, built once for the scenarios below."""

    @pytest.fixture(scope="class")
    @classmethod
    def lab(cls, lab_factory):
        with lab_factory.lab(TAG, labconfig.load_default()) as lab:  # every pod deleted by CNI DEL, then clean
            yield lab

    @pytest.fixture(scope="class")
    @classmethod
    def ips(cls, lab):
        return {p.key: p.ip for p in lab.status(ask_agents=False).pods}

    def test_status_reports_nodes_agents_pods_services(self, lab):
        status = lab.status()
        assert status.healthy and status.phase == "ready"
        settings = lab.settings
        assert [(n.name, n.netns, n.underlay_ip, n.pod_cidr) for n in status.nodes] == [
            ("node1", "labt-node1", node_ip(settings, 1), str(node_pods(settings, 1))),
            ("node2", "labt-node2", node_ip(settings, 2), str(node_pods(settings, 2)))]
        for node in status.nodes:
            assert node.agent_alive and node.agent_ready and node.agent_records == 2
            assert Path(node.socket).is_socket()
        pods = {p.key: p for p in status.pods}
        assert {k: (p.node, p.service_account, p.ambient) for k, p in pods.items()} == {
            "shop/web-0": ("node1", "web", True), "shop/web-1": ("node2", "web", True),
            "shop/client-0": ("node1", "client", True), "legacy/probe-0": ("node2", "probe", False)}
        assert pods["shop/web-0"].workloads == ("http:8080", "echo:9000") and pods["shop/web-0"].workload_alive
        assert pods["shop/client-0"].workloads == () and pods["shop/client-0"].workload_pid is None
        for pod in pods.values():
            node = next(n for n in status.nodes if n.name == pod.node)
            assert pod.ip.startswith(node.pod_cidr.rsplit(".", 2)[0] + ".") and pod.netns_present
        (web,) = status.services
        assert web.cluster_ip == "10.96.0.10"
        assert sorted(web.endpoints) == sorted([pods["shop/web-0"].ip, pods["shop/web-1"].ip])
        assert status.policies == ("AuthorizationPolicy shop/web-from-shop-only",)

    def test_each_agent_enrolled_its_own_pods_through_the_chain(self, lab, ips):
        state = lab.state()
        for node in state.nodes.values():
            with AgentClient(node.socket) as client:
                enrolled = {f"{w.pod.namespace}/{w.pod.name}": [ip.split("/")[0] for ip in w.ips]
                            for w in client.workloads()}
            expected = {p.key: [p.ip] for p in state.pods.values() if p.node == node.name}
            assert enrolled == expected

    def test_nodes_are_joined_by_the_underlay_only_inside_lab_namespaces(self, lab):
        assert root_debris(PREFIX, ranges(lab.settings)) == []
        with iproute("labt-underlay") as ipr:
            bridge = ipr.link_lookup(ifname="labt-ul0")[0]
            ports = sorted(link.get("ifname") for link in ipr.get_links() if link.get("IFLA_MASTER") == bridge)
        assert ports == ["labt-n1", "labt-n2"]
        with iproute("labt-node1") as ipr:
            routes = {(r.get("RTA_DST"), r.get("RTA_GATEWAY")) for r in ipr.get_routes() if r.get("RTA_GATEWAY")}
        assert (str(node_pods(lab.settings, 2).network_address), node_ip(lab.settings, 2)) in routes
        with NetnsThread("labt-node2") as node2:  # /proc/sys/net is per namespace
            assert node2.run(Path("/proc/sys/net/ipv4/ip_forward").read_text).strip() == "1"

    def test_http_across_nodes_server_sees_the_client_ip(self, lab, ips):
        answer = get_json(lab, "shop/client-0", f"http://{ips['shop/web-1']}:8080/")
        assert (answer["pod"], answer["node"], answer["peer"]) == ("shop/web-1", "node2", ips["shop/client-0"])

    def test_policy_denies_the_non_mesh_pod_on_8080_only(self, lab, ips):
        denied = lab.exec("legacy/probe-0", [*WORKLOAD, "get", f"http://{ips['shop/web-0']}:8080/"], timeout=20)
        assert denied.returncode == 2 and b"reset" in denied.stderr
        echoed = lab.exec("legacy/probe-0", [*WORKLOAD, "send", ips["shop/web-0"], "9000"], input=b"hi", timeout=20)
        assert echoed.returncode == 0 and echoed.stdout == b"hi"

    def test_http_on_the_same_node(self, lab, ips):
        answer = get_json(lab, "shop/client-0", f"http://{ips['shop/web-0']}:8080/")
        assert (answer["pod"], answer["node"], answer["peer"]) == ("shop/web-0", "node1", ips["shop/client-0"])

    def test_http_bytes_across_nodes(self, lab, ips):
        result = lab.exec("shop/client-0", [*WORKLOAD, "get", f"http://{ips['shop/web-1']}:8080/bytes/300000"],
                          timeout=20)
        assert result.returncode == 0
        assert len(result.stdout) == 300000 and result.stdout[:512] == bytes(range(256)) * 2

    @pytest.mark.parametrize("client,server", [("shop/client-0", "shop/web-1"), ("legacy/probe-0", "shop/web-0")])
    def test_echo_one_mib_of_random_bytes_across_nodes(self, lab, ips, client, server):
        data = os.urandom(1 << 20)
        result = lab.exec(client, [*WORKLOAD, "send", ips[server], "9000"], input=data, timeout=30)
        assert result.returncode == 0, result.stderr.decode()
        assert len(result.stdout) == len(data) and result.stdout == data

    def test_exec_runs_in_the_pod_namespace_and_returns_the_exit_code(self, lab, ips):
        probe = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                 f"s.connect(('{node_pods(lab.settings, 2)[1]}', 9)); print(s.getsockname()[0])")
        result = lab.exec("client-0", ["python", "-c", probe])  # bare name; `python` is the lab's
        assert result.returncode == 0 and result.stdout.decode().strip() == ips["shop/client-0"]
        assert lab.exec("shop/web-1", ["python", "-c", "raise SystemExit(3)"]).returncode == 3
        unreachable = lab.exec("shop/client-0", [*WORKLOAD, "get", f"http://{ips['shop/web-1']}:1/", "--timeout", "3"])
        # Through the mesh a refused upstream arrives as a reset (the proxy answered the SYN).
        assert unreachable.returncode == 2 and (b"refused" in unreachable.stderr or b"reset" in unreachable.stderr)
        with pytest.raises(LabError, match="no pod 'ghost'"):
            lab.exec("ghost", ["true"])

    def test_cli_status_and_exec_from_another_process(self, lab, ips):
        options = ["--prefix", PREFIX, "--state-dir", str(lab.settings.state_dir)]
        status = subprocess.run([AMBIT, "lab", "status", *options, "--json"], capture_output=True, timeout=30)
        assert status.returncode == 0, status.stderr.decode()
        data = json.loads(status.stdout)
        assert data["running"] and data["healthy"] and len(data["pods"]) == 4
        text = subprocess.run([AMBIT, "lab", "status", *options], capture_output=True, timeout=30)
        assert b"shop/web-1" in text.stdout and node_ip(lab.settings, 2).encode() in text.stdout
        result = subprocess.run([AMBIT, "lab", "exec", *options, "shop/client-0", "--", "python", "-m",
                                 "ambit.lab.podapp", "get", f"http://{ips['shop/web-1']}:8080/"],
                                capture_output=True, timeout=30)
        assert result.returncode == 0, result.stderr.decode()
        assert json.loads(result.stdout)["peer"] == ips["shop/client-0"]

    def test_up_refuses_while_a_lab_is_running(self, lab):
        with pytest.raises(LeftoversFound, match="ambit lab down"):
            Lab(lab.settings).up(labconfig.load_default())
        assert lab.status().healthy  # the refusal touched nothing

    def test_cluster_file_has_the_addresses(self, lab, ips):
        objects = list(yaml.safe_load_all(lab.settings.cluster_file.read_text()))
        pods = {f"{o['metadata']['namespace']}/{o['metadata']['name']}": o for o in objects if o["kind"] == "Pod"}
        assert {k: p["status"]["podIP"] for k, p in pods.items()} == ips
        assert pods["shop/web-1"]["status"]["hostIP"] == node_ip(lab.settings, 2)
        (service,) = [o for o in objects if o["kind"] == "Service"]
        assert service["spec"]["clusterIP"] == "10.96.0.10"
        assert [o["metadata"]["name"] for o in objects if o["kind"] == "Node"] == ["node1", "node2"]


# --- failures and leftovers ------------------------------------------------------------------------------------

def test_a_bad_pod_in_the_middle_of_up_leaves_nothing(clean_lab):
    config = labconfig.load_default()
    # A pod spec the parser would refuse, injected past it: its workload cannot listen.
    web = config.pod("shop/web-1")
    bad = dataclasses.replace(web, info=dataclasses.replace(web.info, container_ports=(ContainerPort("http", 70000),)))
    config = dataclasses.replace(config, pods=tuple(bad if p.key == bad.key else p for p in config.pods))
    with pytest.raises(LabError, match="workload of pod shop/web-1 did not start"):
        clean_lab.up(config)
    assert_clean(clean_lab.settings)


def test_ctrl_c_during_up_leaves_nothing(clean_lab):
    settings = clean_lab.settings
    argv = [AMBIT, "lab", "up", "--prefix", PREFIX, "--state-dir", str(settings.state_dir), "--underlay-cidr",
            settings.underlay_cidr, "--pod-cidr", settings.pod_supernet, "--bpffs-root", str(settings.bpffs_root),
            "--nodes", "2", "--pods-per-node", "8"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        pods_with_ip = 0
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                state = json.loads(settings.state_file.read_text())
                pods_with_ip = sum(1 for p in state["pods"] if p["ip"])
            except (OSError, ValueError, KeyError):
                pass
            if pods_with_ip >= 2:
                break
            time.sleep(0.01)
        assert pods_with_ip >= 2 and proc.poll() is None, "up finished or failed before it could be interrupted"
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, (out + err).decode()
    assert b"interrupted; everything the lab created was removed" in err
    assert_clean(settings)


def test_up_refuses_over_leftovers_and_down_removes_them_without_state(clean_lab):
    settings = clean_lab.settings
    create_netns(f"{PREFIX}stray")
    pin_dir = settings.bpffs_root / f"{PREFIX}node1"
    pin_dir.mkdir()
    stray = subprocess.Popen(["sleep", "60"], env={**os.environ, MARKER_ENV: PREFIX}, start_new_session=True)
    try:
        with pytest.raises(LeftoversFound) as refused:
            clean_lab.up(labconfig.load_default())
        message = str(refused.value)
        assert "labt-stray" in message and str(stray.pid) in message and str(pin_dir) in message
        assert "ambit lab down" in message
        assert lab_namespaces(PREFIX) == ("labt-stray",)  # the refusal created nothing
        report = Lab(settings).down()  # a fresh object: nothing but the scan to go on
        assert report.namespaces_removed == ("labt-stray",) and report.processes_stopped == 1
        assert report.bpffs_removed == (str(pin_dir),)
        assert process_start_time(stray.pid) is None  # stopped (and reaped by `down`)
    finally:
        if stray.poll() is None:
            stray.kill()
            stray.wait()
    assert_clean(settings)


def test_down_after_a_crash_that_lost_the_state_file(clean_lab):
    clean_lab.up(labconfig.generated_config(1, 1))
    settings = clean_lab.settings
    settings.state_file.unlink()
    # the agent, the workload, the CA and the holder of its key, found by their marker
    assert len(lab_processes(PREFIX)) == 4
    report = Lab(settings).down()
    assert report.processes_stopped == 4
    assert set(report.namespaces_removed) == {"labt-underlay", "labt-node1", "labt-node1-proxy", "labt-lab-node1-pod0"}
    assert_clean(settings)


def test_ebpf_capture_gives_each_node_its_own_proxy_namespace_and_pins(clean_lab):
    """With the agents' datapath on, every node has a prefixed proxy namespace
    and pin directory (so `down` finds them), and pods still talk across nodes."""
    lab = Lab(dataclasses.replace(clean_lab.settings, capture="ebpf"))
    try:
        lab.up(labconfig.generated_config(2, 1))
        assert {"labt-node1-proxy", "labt-node2-proxy"} <= set(lab_namespaces(PREFIX))
        assert sorted(p.name for p in lab.settings.bpffs_root.glob(f"{PREFIX}node*")) == ["labt-node1",
                                                                                          "labt-node2"]
        ips = {p.key: p.ip for p in lab.status().pods}
        answer = get_json(lab, "lab/node1-pod0", f"http://{ips['lab/node2-pod0']}:8080/")
        assert (answer["pod"], answer["peer"]) == ("lab/node2-pod0", ips["lab/node1-pod0"])
    finally:
        report = lab.down()
    assert {"labt-node1-proxy", "labt-node2-proxy"} <= set(report.namespaces_removed)
    assert len(report.bpffs_removed) == 2


def test_the_lab_starts_processes_in_a_namespace_without_forking_itself(tmp_path):
    """A full kernel run under CPU load hung for good in Lab.exec: subprocess
    with preexec_fn forks the whole lab process, running gRPC's pthread_atfork
    handler, which deadlocked against gRPC's own threads (issue 14). The lab
    now spawns from a thread inside the namespace (vfork, no handlers): not
    one fork, even with gRPC in use, and the child is in the namespace."""
    forks: list[str] = []
    watching = True
    os.register_at_fork(before=lambda: forks.append("fork") if watching else None)  # preexec_fn runs these
    try:
        with NodeNamespace(f"{PREFIX}nofork") as node, AgentProcess(node, "nofork") as agent:
            with AgentClient(agent.socket) as client:
                assert client.status().ready  # gRPC initialised in this process, threads and all
            inside = node.run(["readlink", "/proc/self/ns/net"], capture_output=True, text=True, check=True)
            assert inside.stdout.strip() == f"net:[{os.stat(node.path).st_ino}]"
    finally:
        watching = False
    assert forks == []
