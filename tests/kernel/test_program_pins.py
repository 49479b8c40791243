"""The eBPF programs are compiled and loaded by a short-lived child process
and pinned; the agent holds only file descriptors.

- a real agent maps no compiler (no libLLVM, no libclang: bcc's compiler
  heap stayed dirty for the agent's life) and a restart with the same
  sources reuses the pinned set without compiling;
- a changed set replaces the programs of pods that are already captured,
  the older set is unpinned, and captured traffic keeps reaching the proxy;
- a set the compiler refuses fails with the compiler's message and leaves
  the running set, its filters and the pins as they were.

Pods come from the real bridge + host-local chain; tc's own listing
(iproute2, for inspection only) says which program a filter runs.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from ambit.agent.datapath import bpfsys, constants
from ambit.agent.datapath.capture import Datapath
from ambit.agent.datapath.programs import BPF_SOURCE_DIR, SCRATCH_PREFIX, SET_DIR_PREFIX, ProgramLoadFailed
from ambit.lab.cniruntime import CniRuntime, PodSandbox
from ambit.lab.node import (AgentProcess, NodeNamespace, bridge_conflist, cni_plugin_dirs, make_pod_netns,
                                  remove_netns)
from ambit.agent.netns import socket_in_netns
from tests.support.podnet import TcpServer, connect, echo_until_eof

pytestmark = pytest.mark.kernel

IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
SUBNET = "10.243.7.0/24"


class Pods:
    """Pods made by bridge + host-local (no ambit-cni: the test attaches them)."""

    def __init__(self, node: NodeNamespace, socket_path: str, ambit: bool) -> None:
        conflist = bridge_conflist("ppin", SUBNET, socket_path, ipam_dir=node.workdir / "ipam", ambit=ambit)
        self.runtime = CniRuntime(conflist, cni_plugin_dirs(), node_netns=node.path)
        self.made: list[PodSandbox] = []

    def add(self, name: str) -> tuple[PodSandbox, str, int]:
        """The sandbox, its address and its host veth's ifindex."""
        sb = PodSandbox(container_id=uuid.uuid4().hex, netns=make_pod_netns(f"ppin-{uuid.uuid4().hex[:8]}"),
                        namespace="pins", name=name, uid=str(uuid.uuid4()))
        self.made.append(sb)
        result = self.runtime.add(sb).result
        host_veth = next(i for i in result["interfaces"] if "sandbox" not in i and i["name"] != "ppinbr0")
        return sb, result["ips"][0]["address"].split("/")[0], host_veth

    def cleanup(self) -> None:
        for sb in reversed(self.made):
            try:
                self.runtime.delete(sb)
            finally:
                remove_netns(sb.netns.rsplit("/", 1)[1])


def set_dirs(pin_dir: str) -> list[str]:
    return sorted(n for n in os.listdir(pin_dir) if n.startswith((SET_DIR_PREFIX, SCRATCH_PREFIX)))


def filter_program_ids(netns_path: str, ifname: str) -> dict[str, int]:
    """hook -> id of the program tc runs there (tc's listing, inspection only)."""
    found = {}
    for hook in ("ingress", "egress"):
        out = subprocess.run(["nsenter", f"--net={netns_path}", "tc", "filter", "show", "dev", ifname, hook],
                             capture_output=True, text=True, check=True).stdout
        match = re.search(r"ambit_\w+ .*?\bid (\d+)", out)
        if match:
            found[hook] = int(match.group(1))
    return found


def program_id(fd: int) -> int:
    return bpfsys.prog_info(fd).id


def transparent_listener(netns_path: str, port: int) -> socket.socket:
    sock = socket_in_netns(netns_path, socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    sock.bind(("0.0.0.0", port))
    sock.listen(16)
    sock.settimeout(5)
    return sock


def lands_on_outbound(datapath: Datapath, client_netns: str, server_ip: str) -> bool:
    """A captured pod's connection is accepted by the proxy's 15001 with the
    original destination (what proxy_ingress's sk_assign does)."""
    listener = transparent_listener(datapath.proxy_ns.path, constants.OUTBOUND_PORT)
    client = None
    try:
        client = connect(client_netns, server_ip, 8080)
        conn, _ = listener.accept()
        with conn:
            return conn.getsockname() == (server_ip, 8080)
    finally:
        if client is not None:
            client.close()
        listener.close()


def test_a_changed_set_replaces_attached_programs_and_a_refused_one_changes_nothing(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:6]
    sources = tmp_path / "bpf"
    shutil.copytree(BPF_SOURCE_DIR, sources)
    pin_dir = f"/sys/fs/bpf/ppin-{tag}"
    proxy_netns = f"ppin-proxy-{tag}"
    with NodeNamespace(f"ppin-node-{tag}") as node:
        pods = Pods(node, str(node.workdir / "unused.sock"), ambit=False)

        def datapath() -> Datapath:
            return Datapath(node_netns=node.path, proxy_netns=proxy_netns, pin_dir=pin_dir, source_dir=sources)

        dp = datapath()
        try:
            p, p_ip, p_veth = pods.add("p")
            _, q_ip, _ = pods.add("q")
            dp.install()
            first = dp.programs.program_set.set_id
            assert dp.programs.compiled and set_dirs(pin_dir) == [SET_DIR_PREFIX + first]
            dp.attach_pod(node_ifindex(node, p_veth["name"]), [p_ip])
            old_ids = {"ingress": program_id(dp.programs.capture_outbound.fd),
                       "egress": program_id(dp.programs.capture_inbound.fd)}
            assert filter_program_ids(node.path, p_veth["name"]) == old_ids
            assert lands_on_outbound(dp, p.netns, q_ip)
            dp.close()

            # A new agent with other sources: a new set, pinned, and p's hooks run it.
            with open(sources / "capture_outbound.c", "a") as f:
                f.write("\n/* a changed program set */\n")
            dp = datapath()
            dp.install()
            second = dp.programs.program_set.set_id
            assert second != first and dp.programs.compiled
            assert set_dirs(pin_dir) == [SET_DIR_PREFIX + second]   # the older set unpinned
            new_ids = {"ingress": program_id(dp.programs.capture_outbound.fd),
                       "egress": program_id(dp.programs.capture_inbound.fd)}
            assert not set(new_ids.values()) & set(old_ids.values())
            assert filter_program_ids(node.path, p_veth["name"]) == new_ids
            assert filter_program_ids(dp.proxy_ns.path, constants.PROXY_LINK)["ingress"] == \
                program_id(dp.programs.proxy_ingress.fd)
            assert lands_on_outbound(dp, p.netns, q_ip)
            dp.close()

            # The same sources again: reused, nothing compiled, same programs.
            dp = datapath()
            dp.install()
            assert not dp.programs.compiled and dp.programs.program_set.set_id == second
            assert filter_program_ids(node.path, p_veth["name"]) == new_ids
            dp.close()

            # Sources the compiler refuses: the loader's message, and the
            # running set, its filters and the pins stay as they were.
            with open(sources / "capture_inbound.c", "a") as f:
                f.write("\nthis is not C;\n")
            dp = datapath()
            with pytest.raises(ProgramLoadFailed, match="error: unknown type name 'this'"):
                dp.install()
            assert set_dirs(pin_dir) == [SET_DIR_PREFIX + second]    # no scratch directory left
            assert filter_program_ids(node.path, p_veth["name"]) == new_ids
            dp.close()
        finally:
            try:
                pods.cleanup()
            finally:
                datapath().uninstall()
                remove_netns(proxy_netns)
        assert not os.path.exists(pin_dir)


def node_ifindex(node: NodeNamespace, ifname: str) -> int:
    with node.ipr() as ipr:
        return ipr.link_lookup(ifname=ifname)[0]


def mapped_files(pid: int) -> set[str]:
    with open(f"/proc/{pid}/maps") as maps:
        return {os.path.basename(line.split()[-1]) for line in maps if len(line.split()) >= 6}


def events(agent: AgentProcess, name: str) -> int:
    return agent.logs().count(f'"event": "{name}"')


def test_the_agent_maps_no_compiler_and_a_restart_reuses_the_pinned_set() -> None:
    with NodeNamespace(f"ppin-agent-{uuid.uuid4().hex[:6]}") as node:
        agent = AgentProcess(node, "pins", capture="ebpf")
        pods = Pods(node, agent.socket, ambit=True)
        try:
            agent.start()
            assert agent.proc is not None
            libraries = mapped_files(agent.proc.pid)
            assert not {lib for lib in libraries if lib.startswith(("libLLVM", "libclang", "libbcc."))}, libraries
            assert "libbpf.so.1.1.2" in libraries or any(lib.startswith("libbpf.so") for lib in libraries)
            assert events(agent, "bpf_programs_loaded") == 1
            pinned = set_dirs(agent.bpffs_dir)
            assert len(pinned) == 1

            a, _, _ = pods.add("a")
            b, b_ip, _ = pods.add("b")
            agent.stop()
            agent.start()  # the same sources: the pinned set, no loader
            assert events(agent, "bpf_programs_loaded") == 1 and events(agent, "bpf_programs_reused") == 1
            assert set_dirs(agent.bpffs_dir) == pinned
            with TcpServer(b.netns, 8080, echo_until_eof) as server:
                client = connect(a.netns, b_ip, 8080)
                client.sendall(b"ping")
                client.shutdown(socket.SHUT_WR)
                assert client.recv(16) == b"ping"
                client.close()
            assert len(server.peers) == 1
            # It went through the proxy, which logs it once both sides closed.
            deadline = time.monotonic() + 5
            while f'"dst": "{b_ip}:8080"' not in agent.logs():
                assert time.monotonic() < deadline, "no access-log line for the connection"
                time.sleep(0.02)
        finally:
            try:
                pods.cleanup()
            finally:
                agent.stop()
                agent.cleanup()
