"""ambit-agent's socket as an operator meets it: created private, its
directory made, a stale file from a crash replaced, a live agent or a foreign
file never clobbered, health answered, removed on a clean stop; and the
ambit-agent / ambitctl command lines around it."""
from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ambit.lab.cniruntime import CniRuntime, PodSandbox
from tests.support.agentapi import agent_status, workloads
from ambit.lab.node import (AgentProcess, NodeNamespace, cni_plugin_dirs, make_pod_netns, ptp_conflist,
                                remove_netns)

pytestmark = pytest.mark.kernel

BIN = Path(sys.executable).parent
AGENT = str(BIN / "ambit-agent")
AMBITCTL = str(BIN / "ambitctl")


@pytest.fixture
def node() -> Iterator[NodeNamespace]:
    with NodeNamespace(f"ask-node-{uuid.uuid4().hex[:8]}") as ns:
        yield ns


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    """Agents a test starts; every one is stopped at the end, and its log printed
    (pytest shows it when the test failed)."""
    started: list[AgentProcess] = []
    try:
        yield started
    finally:
        for agent in started:
            agent.stop()  # SIGTERM, then SIGKILL if it does not exit
            print(f"--- {agent.log_path.name}\n{agent.logs()}")


def start_agent(agents: list[AgentProcess], node: NodeNamespace, tag: str, *, socket_path: str | None = None,
                state_dir: str | None = None, wait: bool = True) -> AgentProcess:
    agent = AgentProcess(node, tag)
    if socket_path is not None:
        agent.socket = socket_path
    if state_dir is not None:
        agent.state_dir = state_dir
    agents.append(agent)
    return agent.start(wait=wait)


def wait_exit(agent: AgentProcess, timeout: float = 20.0) -> int:
    assert agent.proc is not None
    return agent.proc.wait(timeout)


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every log line must be one JSON object; no tracebacks in between."""
    out = []
    for line in text.splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


def health(socket_path: str, service: str = "") -> int:
    with grpc.insecure_channel(f"unix:{socket_path}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return reply.status


def socket_mode(path: str) -> int:
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode), f"{path} is not a socket"
    return stat.S_IMODE(st.st_mode)


# -- creation ---------------------------------------------------------------------------

def test_socket_is_private_and_healthy(node: NodeNamespace, agents: list[AgentProcess]) -> None:
    agent = start_agent(agents, node, "mode")
    assert socket_mode(agent.socket) == 0o600
    for service in ("", "ambit.agent.v1.CNI", "ambit.agent.v1.Debug"):
        assert health(agent.socket, service) == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as info:
        health(agent.socket, "no.such.Service")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_missing_directory_is_created(node: NodeNamespace, agents: list[AgentProcess]) -> None:
    directory = node.workdir / "run" / "ambit"
    agent = start_agent(agents, node, "dir", socket_path=str(directory / "agent.sock"))
    assert directory.is_dir()
    assert stat.S_IMODE(directory.stat().st_mode) & 0o007 == 0, "others must not reach into the socket directory"
    assert socket_mode(agent.socket) == 0o600
    assert agent_status(agent.socket).node == node.name


def test_stale_socket_from_a_crash_is_replaced(node: NodeNamespace, agents: list[AgentProcess]) -> None:
    path = str(node.workdir / "agent.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    agent = start_agent(agents, node, "stale")
    assert agent_status(agent.socket).ready
    assert socket_mode(agent.socket) == 0o600
    assert any(r["event"] == "removed stale agent socket" for r in json_lines(agent.logs()))


def test_socket_left_by_a_killed_agent_is_replaced(node: NodeNamespace, agents: list[AgentProcess]) -> None:
    first = start_agent(agents, node, "killed")
    first.kill()
    assert os.path.exists(first.socket), "SIGKILL leaves the socket file behind"
    second = start_agent(agents, node, "after-kill")
    assert agent_status(second.socket).ready


# -- refusing to clobber ------------------------------------------------------------------

def test_second_agent_refuses_a_served_socket(node: NodeNamespace, agents: list[AgentProcess]) -> None:
    first = start_agent(agents, node, "first")
    inode = os.lstat(first.socket).st_ino
    second = start_agent(agents, node, "second", state_dir=str(node.workdir / "state2"), wait=False)
    assert wait_exit(second) == 2
    records = json_lines(second.logs())
    refusal = [r for r in records if r.get("level") == "error"]
    assert len(refusal) == 1, records
    assert refusal[0]["event"] == "cannot start" and "already serving" in refusal[0]["error"]
    assert first.socket in refusal[0]["error"]
    # The first agent is untouched and still answers on the same socket.
    assert os.lstat(first.socket).st_ino == inode
    assert first.proc is not None and first.proc.poll() is None
    assert agent_status(first.socket).ready
    assert health(first.socket) == health_pb2.HealthCheckResponse.SERVING


def test_second_agent_leaves_the_first_agents_pods_alone(node: NodeNamespace, agents: list[AgentProcess]) -> None:
    """A second agent (here started by hand outside the node's namespace, with
    the default-like shared state directory) must refuse before it reconciles:
    from where it runs the pods' links are invisible, so reconciling would
    release every pod the running agent enrolled."""
    first = start_agent(agents, node, "owner")
    runtime = CniRuntime(ptp_conflist("ask-net", "10.248.9.0/24", first.socket, ipam_dir=node.workdir / "ipam"),
                         cni_plugin_dirs(), node_netns=node.path)
    pod_ns = f"ask-pod-{uuid.uuid4().hex[:8]}"
    sandbox = PodSandbox(container_id=uuid.uuid4().hex, netns=make_pod_netns(pod_ns), namespace="shop",
                         name="cart-0", uid=str(uuid.uuid4()))
    try:
        runtime.add(sandbox)
        records_before = sorted(os.listdir(first.state_dir))
        assert len(records_before) == 1
        second = subprocess.run([AGENT, "--socket", first.socket, "--state-dir", first.state_dir,
                                 "--node-name", "intruder", "--log-level", "debug"],
                                capture_output=True, text=True, timeout=30)
        assert second.returncode == 2, second.stderr
        assert "already serving" in second.stderr and "Traceback" not in second.stderr
        assert sorted(os.listdir(first.state_dir)) == records_before, second.stderr
        assert [w.attachment.container_id for w in workloads(first.socket)] == [sandbox.container_id]
    finally:
        try:
            runtime.delete(sandbox)
        finally:
            remove_netns(pod_ns)


def test_regular_file_at_the_socket_path_is_refused(node: NodeNamespace, agents: list[AgentProcess]) -> None:
    path = node.workdir / "agent.sock"
    path.write_text("not a socket, somebody's data\n")
    os.utime(path, (1_000_000_000, 1_000_000_000))
    before = path.stat()
    agent = start_agent(agents, node, "file", wait=False)
    assert wait_exit(agent) == 2
    refusal = [r for r in json_lines(agent.logs()) if r.get("level") == "error"]
    assert len(refusal) == 1 and "not a socket" in refusal[0]["error"], refusal
    after = path.stat()
    assert path.read_text() == "not a socket, somebody's data\n"
    assert (after.st_ino, after.st_mtime, stat.S_IMODE(after.st_mode)) == \
        (before.st_ino, before.st_mtime, stat.S_IMODE(before.st_mode))


@pytest.mark.parametrize("case", ["too-long", "file-as-directory"])
def test_socket_path_that_cannot_be_a_socket_is_refused(tmp_path: Path, case: str) -> None:
    """A path the agent can never listen on: exit 2 with one JSON error line,
    no traceback, and no state touched (the state directory is not even made)."""
    (tmp_path / "plain-file").write_text("x")
    path = {"too-long": str(tmp_path / ("d" * 110) / "agent.sock"),
            "file-as-directory": str(tmp_path / "plain-file" / "agent.sock")}[case]
    state_dir = tmp_path / "state"
    proc = subprocess.run([AGENT, "--socket", path, "--state-dir", str(state_dir), "--node-name", "ask"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    records = json_lines(proc.stderr)
    assert [r["event"] for r in records] == ["cannot start"], records
    assert path in records[0]["error"] or os.path.dirname(path) in records[0]["error"]
    assert not state_dir.exists()
    assert not (tmp_path / ("d" * 110)).exists()


# -- stopping ---------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly_and_removes_the_socket(node: NodeNamespace, agents: list[AgentProcess],
                                                     sig: signal.Signals) -> None:
    agent = start_agent(agents, node, "stop")
    assert agent.proc is not None
    started = time.monotonic()
    agent.proc.send_signal(sig)
    assert agent.proc.wait(10) == 0
    assert time.monotonic() - started < 5.0
    assert not os.path.exists(agent.socket)
    events = [r["event"] for r in json_lines(agent.logs())]
    assert events.index("agent stopping") < events.index("agent stopped")


# -- command lines --------------------------------------------------------------------------

def test_agent_help() -> None:
    proc = subprocess.run([AGENT, "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "--socket" in proc.stdout and "0600" in proc.stdout


def test_ambitctl_status_prints_the_node(node: NodeNamespace, agents: list[AgentProcess]) -> None:
    agent = start_agent(agents, node, "ctl")
    proc = subprocess.run([AMBITCTL, "--socket", agent.socket, "status"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert f"node:        {node.name}" in proc.stdout and "ready:       yes" in proc.stdout
    as_json = subprocess.run([AMBITCTL, "--socket", agent.socket, "-o", "json", "status"], capture_output=True,
                             text=True, timeout=30)
    assert json.loads(as_json.stdout)["node"] == node.name


@pytest.mark.parametrize("state", ["missing", "stale"])
def test_ambitctl_without_an_agent_exits_3(tmp_path: Path, state: str) -> None:
    path = str(tmp_path / "agent.sock")
    if state == "stale":
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(path)
        stale.close()
    proc = subprocess.run([AMBITCTL, "--socket", path, "status"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 3
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ambitctl: ") and path in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
