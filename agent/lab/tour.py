"""`ambit lab tour`: what `make lab` shows a newcomer.

This stage of the tour runs one node: a real ambit-agent in a node
namespace, one pod created by the real CNI chain (bridge + host-local +
portmap + ambit-cni) as a runtime would, the agent's record of it next to
what the kernel says, CHECK and DEL, and a clean teardown. Every object is
created under the `ambitlab-` prefix and removed on exit, Ctrl-C included.
"""
from __future__ import annotations

import json
import os
import sys
import time
import uuid
from contextlib import ExitStack
from typing import Callable, TextIO

from ..cli.client import AgentClient
from .cniruntime import CniRuntime, PodSandbox
from .node import AgentProcess, NodeNamespace, bridge_conflist, cni_plugin_dirs, make_pod_netns, remove_netns
from .topology import PREFIX, LabSettings, LeftoversFound, find_leftovers, lab_namespaces

POD_SUBNET = "10.244.1.0/24"


class Narrator:
    """Readable steps, with the time each took when it took more than a second."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.count = 0

    def step(self, title: str, action: Callable[[], object]) -> object:
        self.count += 1
        self.out.write(f"\n[{self.count}] {title} ...")
        self.out.flush()
        started = time.monotonic()
        result = action()
        elapsed = time.monotonic() - started
        self.out.write(f" done{f' ({elapsed:.1f}s)' if elapsed >= 1 else ''}\n")
        return result

    def say(self, text: str = "") -> None:
        for line in text.splitlines() or [""]:
            self.out.write(f"    {line}\n")
        self.out.flush()


def run_tour(out: TextIO = sys.stdout) -> None:
    if os.geteuid() != 0:
        raise PermissionError("the lab creates network namespaces and veths: run it as root")
    leftovers = find_leftovers(LabSettings())  # the tour uses the lab's names: never run both
    if leftovers:
        raise LeftoversFound(f"a lab is running or a previous run left {leftovers.describe()}; "
                             "remove it with `ambit lab down`")
    n = Narrator(out)
    out.write("ambit lab tour: one node, one pod, the real CNI chain\n")
    with ExitStack() as stack:
        node = stack.enter_context(NodeNamespace(f"{PREFIX}node1"))
        agent = AgentProcess(node, "node1")
        n.step(f"start ambit-agent in node namespace {node.name}", agent.start)
        stack.callback(agent.stop)
        n.say(f"API socket {agent.socket} (mode {oct(os.stat(agent.socket).st_mode & 0o777)})")

        conflist = bridge_conflist("ambitlab", POD_SUBNET, agent.socket, ipam_dir=node.workdir / "ipam")
        runtime = CniRuntime(conflist, cni_plugin_dirs(), node_netns=node.path)
        n.say("conflist plugins: " + " -> ".join(p["type"] for p in conflist["plugins"]))
        pod_ns = f"{PREFIX}pod-web"
        sandbox = PodSandbox(container_id=uuid.uuid4().hex, netns=make_pod_netns(pod_ns), namespace="shop",
                             name="web-0", uid=str(uuid.uuid4()))
        stack.callback(remove_netns, pod_ns)
        added = n.step("CNI ADD pod shop/web-0 through the chain, as a runtime would", lambda: runtime.add(sandbox))
        stack.callback(lambda: runtime.delete(sandbox))
        for run in added.runs:
            n.say(f"{run.plugin:<10} {run.seconds * 1000:6.1f} ms")
        n.say("result passed through: " + json.dumps({"ips": added.result["ips"]}))

        with AgentClient(agent.socket) as client:
            record = client.workloads()[0]
        n.step("read the agent's record (ambitctl workloads)", lambda: None)
        n.say(f"pod {record.pod.namespace}/{record.pod.name} uid {record.pod.uid[:8]}...  ips {list(record.ips)}")
        n.say(f"container {record.attachment.container_id[:12]} {record.attachment.ifname} "
              f"(ifindex {record.container_ifindex} in {record.netns})")
        n.say(f"host veth {record.host_veth} (ifindex {record.host_veth_ifindex}), found as the peer of eth0")
        with node.ipr() as ipr:
            link = ipr.get_links(record.host_veth_ifindex)[0]
        n.say(f"kernel says: {link.get('IFLA_IFNAME')} is a {link.get(('IFLA_LINKINFO', 'IFLA_INFO_KIND'))} "
              f"whose peer is ifindex {link.get('IFLA_LINK')} in the pod")

        n.step("CNI CHECK", lambda: runtime.check(sandbox))
        n.step("CNI DEL (reverse order), then DEL again: idempotent",
               lambda: (runtime.delete(sandbox), runtime.delete(sandbox)))
        with AgentClient(agent.socket) as client:
            n.say(f"agent records left: {len(client.workloads())}")
        n.step("stop the agent (SIGTERM), remove the pod and the node", stack.close)
    out.write(f"\nclean: lab namespaces left: {len(lab_namespaces(PREFIX))}\n")
