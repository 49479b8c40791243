"""ambit-cni in real CNI chains, run exactly as a runtime runs them.

Each test builds a throwaway node namespace with a real ambit-agent inside,
creates pods with the reference plugins (bridge/ptp + host-local [+ portmap])
followed by ambit-cni, and checks the agent's record of every pod against
the kernel: the host-side veth must be the container interface's peer, the
addresses those inside the pod's namespace.
"""
from __future__ import annotations

import concurrent.futures
import ipaddress
import uuid

import pytest

from ambit.agent.netlink import iproute
from ambit.lab.cniruntime import CniFailure, CniRuntime, PodSandbox
from tests.support.agentapi import workloads
from ambit.lab.node import (AgentProcess, NodeNamespace, bridge_conflist, cni_plugin_dirs, make_pod_netns,
                                ptp_conflist, remove_netns)

pytestmark = pytest.mark.kernel

CHAINS = {
    "bridge+portmap": lambda sock, ipam, version: bridge_conflist("cch", "10.247.0.0/24", sock, ipam_dir=ipam,
                                                                   version=version, portmap=True),
    "ptp": lambda sock, ipam, version: ptp_conflist("cch", "10.247.0.0/24", sock, ipam_dir=ipam, version=version),
}


@pytest.fixture
def node():
    with NodeNamespace(f"cch-node-{uuid.uuid4().hex[:6]}") as n:
        yield n


@pytest.fixture
def agent(node):
    with AgentProcess(node, "chain") as a:
        yield a
        print(a.logs())  # shown by pytest when the test failed


class Pods:
    """Pod sandboxes for one test, removed at the end whatever happens."""

    def __init__(self, runtime: CniRuntime) -> None:
        self.runtime = runtime
        self.made: list[PodSandbox] = []

    def sandbox(self, name: str) -> PodSandbox:
        ns = f"cch-{uuid.uuid4().hex[:8]}"
        sb = PodSandbox(container_id=uuid.uuid4().hex, netns=make_pod_netns(ns), namespace="shop", name=name,
                        uid=str(uuid.uuid4()))
        self.made.append(sb)
        return sb

    def cleanup(self) -> None:
        for sb in self.made:
            try:
                self.runtime.delete(sb)
            except Exception:
                pass
            remove_netns(sb.netns.rsplit("/", 1)[1])


@pytest.fixture
def make_runtime(node, agent):
    made: list[Pods] = []

    def factory(chain: str, version: str = "1.0.0") -> tuple[CniRuntime, Pods]:
        runtime = CniRuntime(CHAINS[chain](agent.socket, node.workdir / "ipam", version), cni_plugin_dirs(),
                             node_netns=node.path)
        pods = Pods(runtime)
        made.append(pods)
        return runtime, pods

    yield factory
    for pods in made:
        pods.cleanup()


def kernel_view(node: NodeNamespace, sb: PodSandbox) -> dict:
    """What the kernel says about the pod's interface and its host peer."""
    with iproute(sb.netns) as pod:
        idx = pod.link_lookup(ifname=sb.ifname)[0]
        link = pod.get_links(idx)[0]
        addrs = {f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}" for a in pod.get_addr(index=idx)
                 if not ipaddress.ip_address(a.get("IFA_ADDRESS")).is_link_local}
    with node.ipr() as host:
        peer = host.get_links(link.get("IFLA_LINK"))[0]
    return {"container_ifindex": idx, "host_ifindex": peer["index"], "host_veth": peer.get("IFLA_IFNAME"),
            "host_peer_of": peer.get("IFLA_LINK"), "addresses": addrs}


def assert_record_matches_kernel(record, node: NodeNamespace, sb: PodSandbox) -> None:
    k = kernel_view(node, sb)
    assert record.attachment.container_id == sb.container_id
    assert record.attachment.ifname == sb.ifname
    assert record.netns == sb.netns
    assert (record.pod.namespace, record.pod.name, record.pod.uid) == (sb.namespace, sb.name, sb.uid)
    assert record.host_veth_ifindex == k["host_ifindex"]
    assert record.host_veth == k["host_veth"]
    assert record.container_ifindex == k["container_ifindex"] == k["host_peer_of"]
    assert set(record.ips) == k["addresses"]


def records_by_container(socket: str) -> dict:
    return {w.attachment.container_id: w for w in workloads(socket)}


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0"])
@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_chain_add_records_the_pod_from_the_kernel(make_runtime, node, agent, chain, version):
    runtime, pods = make_runtime(chain, version)
    sb = pods.sandbox("web")

    added = runtime.add(sb)

    # The chain's result is the primary's result, passed through in the requested version.
    assert added.result["cniVersion"] == version
    primary = [r for r in added.runs if r.plugin not in ("ambit-cni", "portmap")][0]
    assert added.result["ips"] == _as_version(_json(primary.stdout)["ips"], version)
    record = records_by_container(agent.socket)[sb.container_id]
    assert_record_matches_kernel(record, node, sb)
    assert record.network == "cch"

    runtime.check(sb)
    runtime.delete(sb)
    assert sb.container_id not in records_by_container(agent.socket)


def test_del_is_idempotent_and_needs_no_add(make_runtime, agent):
    runtime, pods = make_runtime("bridge+portmap")
    sb = pods.sandbox("api")
    runtime.add(sb)
    runtime.delete(sb)
    runtime.delete(sb)  # second DEL: nothing left, still success
    never_added = pods.sandbox("ghost")
    runtime.delete(never_added)
    assert records_by_container(agent.socket) == {}


def test_del_after_the_netns_is_gone(make_runtime, agent):
    runtime, pods = make_runtime("ptp")
    sb = pods.sandbox("batch")
    runtime.add(sb)
    assert sb.container_id in records_by_container(agent.socket)

    remove_netns(sb.netns.rsplit("/", 1)[1])  # the runtime tore the sandbox down first
    runtime.delete(sb)

    assert sb.container_id not in records_by_container(agent.socket)


def test_check_fails_when_the_host_veth_disappeared(make_runtime, node, agent):
    runtime, pods = make_runtime("bridge+portmap")
    sb = pods.sandbox("fragile")
    runtime.add(sb)
    record = records_by_container(agent.socket)[sb.container_id]
    with node.ipr() as host:
        host.link("del", index=record.host_veth_ifindex)

    with pytest.raises(CniFailure):
        runtime.check(sb)  # the chain as a whole notices (bridge checks first)
    # ambit's own CHECK notices too, whatever the primary does:
    ambit = runtime.conflist["plugins"][-1]
    with pytest.raises(CniFailure) as failure:
        runtime.exec_plugin("ambit-cni", "CHECK", runtime.plugin_conf(ambit, runtime.cached_result(sb)), sb)
    assert failure.value.code == 7
    assert f"host veth {record.host_veth}" in failure.value.error["msg"] and "gone" in failure.value.error["msg"]


def test_gc_releases_attachments_the_runtime_no_longer_knows(make_runtime, agent):
    runtime, pods = make_runtime("bridge+portmap")
    keep, drop = pods.sandbox("keep"), pods.sandbox("drop")
    runtime.add(keep)
    runtime.add(drop)
    assert set(records_by_container(agent.socket)) == {keep.container_id, drop.container_id}

    # GC is a cniVersion 1.1.0 command; the reference plugins here stop at
    # 1.0.0, so the runtime sends it to ambit-cni alone, as libcni would skip
    # plugins that do not support it.
    gc_runtime = CniRuntime({"cniVersion": "1.1.0", "name": "cch",
                             "plugins": [runtime.conflist["plugins"][-1]]}, runtime.plugin_dirs,
                            node_netns=runtime.node_netns)
    gc_runtime.gc([keep])

    assert set(records_by_container(agent.socket)) == {keep.container_id}


def test_twenty_pods_added_concurrently(make_runtime, node, agent):
    runtime, pods = make_runtime("bridge+portmap")
    sandboxes = [pods.sandbox(f"replica-{i}") for i in range(20)]

    with concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(runtime.add, sandboxes))

    records = records_by_container(agent.socket)
    assert len(records) == 20
    for sb, added in zip(sandboxes, results):
        assert_record_matches_kernel(records[sb.container_id], node, sb)
        assert {ip["address"] for ip in added.result["ips"]} == set(records[sb.container_id].ips)
    assert len({r.host_veth_ifindex for r in records.values()}) == 20


def test_agent_restart_keeps_records_of_live_pods_and_drops_dead_ones(make_runtime, node, agent):
    runtime, pods = make_runtime("ptp")
    alive, dead = pods.sandbox("alive"), pods.sandbox("dead")
    runtime.add(alive)
    runtime.add(dead)

    agent.kill()
    remove_netns(dead.netns.rsplit("/", 1)[1])  # the pod died while the agent was down
    agent.start()

    records = records_by_container(agent.socket)
    assert set(records) == {alive.container_id}
    assert_record_matches_kernel(records[alive.container_id], node, alive)


def _json(text: str) -> dict:
    import json
    return json.loads(text)


def _as_version(ips: list[dict], version: str) -> list[dict]:
    out = []
    for ip in ips:
        ip = dict(ip)
        if version == "1.0.0":
            ip.pop("version", None)
        else:
            ip.setdefault("version", str(ipaddress.ip_interface(ip["address"]).version))
        out.append(ip)
    return out
