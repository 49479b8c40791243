"""ambit-cni as a runtime sees it when something is wrong: the real executable,
started with only the CNI_* variables and PATH, the configuration on stdin.
Every failure must be CNI error JSON on stdout with the right code, a message
a person can act on, a non-zero exit status and no traceback."""
from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest

from ambit.api.v1 import agent_pb2_grpc as pb_grpc
from ambit.lab.cniruntime import CniFailure, CniRuntime, PodSandbox
from ambit.cni import spec
from tests.support.agentapi import workloads
from tests.support.malformed_cni import DUPLICATE_VERSION, MALFORMED_STDIN
from ambit.lab.node import AgentProcess, NodeNamespace, cni_plugin_dirs, make_pod_netns, remove_netns

pytestmark = pytest.mark.kernel

PLUGIN = os.path.join(cni_plugin_dirs()[0], "ambit-cni")
PREV_RESULT = {"cniVersion": "1.0.0",
               "interfaces": [{"name": "eth0", "mac": "02:00:00:00:00:05", "sandbox": "/var/run/netns/x"}],
               "ips": [{"address": "10.248.0.5/24", "gateway": "10.248.0.1", "interface": 0}]}


@dataclass(frozen=True)
class PluginExit:
    status: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def error(self) -> dict[str, Any]:
        return json.loads(self.stdout)


def run_plugin(command: str | None, stdin: bytes | dict[str, Any], *, netns: str | None = "",
               container_id: str | None = "cer-0123456789abcdef", ifname: str | None = "eth0",
               timeout: float = 30.0) -> PluginExit:
    """Start ambit-cni exactly as a runtime does: CNI_* variables and PATH only."""
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
           "CNI_PATH": os.pathsep.join(cni_plugin_dirs()),
           "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-0;K8S_POD_UID=u-1"}
    for name, value in (("CNI_COMMAND", command), ("CNI_CONTAINERID", container_id),
                        ("CNI_NETNS", netns), ("CNI_IFNAME", ifname)):
        if value is not None:
            env[name] = value
    data = stdin if isinstance(stdin, bytes) else json.dumps(stdin).encode()
    started = time.monotonic()
    proc = subprocess.run([PLUGIN], input=data, env=env, capture_output=True, timeout=timeout)
    return PluginExit(proc.returncode, proc.stdout.decode(), proc.stderr.decode(), time.monotonic() - started)


def assert_cni_error(result: PluginExit, code: int, *needles: str, version: str = "1.0.0") -> dict:
    """`version`: the error answers in the configuration's cniVersion once it
    is known, in the latest version before that."""
    assert result.status != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    error = result.error
    assert error["code"] == code, error
    assert error["cniVersion"] == version, error
    assert isinstance(error["msg"], str) and len(error["msg"]) > 10, error
    text = f"{error['msg']} {error.get('details', '')}"
    for needle in needles:
        assert needle in text, (needle, error)
    return error


def config(socket_path: str = "/nonexistent/ambit/agent.sock", version: str = "1.0.0", **extra: Any) -> dict:
    return {"cniVersion": version, "name": "cer-net", "type": "ambit-cni", "agentSocket": socket_path,
            "timeout": "5s", "logLevel": "warn", **extra}


@pytest.fixture
def pod_netns() -> Iterator[str]:
    name = f"cer-pod-{uuid.uuid4().hex[:8]}"
    path = make_pod_netns(name)
    try:
        yield path
    finally:
        remove_netns(name)


@pytest.fixture
def node() -> Iterator[NodeNamespace]:
    with NodeNamespace(f"cer-node-{uuid.uuid4().hex[:8]}") as ns:
        yield ns


@pytest.fixture
def agent(node: NodeNamespace) -> Iterator[AgentProcess]:
    proc = AgentProcess(node, "cer")
    try:
        yield proc.start()
    finally:
        proc.stop()


class HungAgent:
    """A Unix socket that accepts connections and never answers: a wedged agent."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(8)
        self.listener.settimeout(0.05)
        self.held: list[socket.socket] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                self.held.append(self.listener.accept()[0])
            except OSError:
                continue

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        for conn in self.held:
            conn.close()
        self.listener.close()


@pytest.fixture
def hung_agent(tmp_path: Path) -> Iterator[HungAgent]:
    agent = HungAgent(str(tmp_path / "hung.sock"))
    try:
        yield agent
    finally:
        agent.close()


# -- configuration and environment errors (no agent involved) -----------------------

@pytest.mark.parametrize("stdin, needle", [
    *MALFORMED_STDIN.values(),
    (b"", "no network configuration"),
    (b"\n", "no network configuration"),
], ids=[*MALFORMED_STDIN, "empty", "newline"])
def test_undecodable_configuration_is_code_6(stdin: bytes, needle: str, pod_netns: str) -> None:
    error = assert_cni_error(run_plugin("ADD", stdin, netns=pod_netns), spec.DECODE_FAILURE, needle,
                             version=spec.LATEST_VERSION)
    assert needle in error["msg"]  # what and where, in the message itself


def test_duplicate_keys_last_one_wins_as_in_json(pod_netns: str) -> None:
    assert_cni_error(run_plugin("ADD", DUPLICATE_VERSION, netns=pod_netns), spec.INCOMPATIBLE_VERSION,
                     "cniVersion 0.2.0 is not supported", version=spec.LATEST_VERSION)


@pytest.mark.parametrize("stdin", [stdin for stdin, _ in MALFORMED_STDIN.values()], ids=list(MALFORMED_STDIN))
def test_version_ignores_a_malformed_configuration(stdin: bytes) -> None:
    result = run_plugin("VERSION", stdin, netns=None, container_id=None, ifname=None)
    assert result.status == 0 and "Traceback" not in result.stderr, result
    assert json.loads(result.stdout)["cniVersion"] == spec.LATEST_VERSION


@pytest.mark.parametrize("command, needle", [(None, "CNI_COMMAND"), ("", "CNI_COMMAND"),
                                             ("ATTACH", "ATTACH"), ("add", "add")])
def test_missing_or_unknown_command_is_code_4(command: str | None, needle: str, pod_netns: str) -> None:
    assert_cni_error(run_plugin(command, config(prevResult=PREV_RESULT), netns=pod_netns),
                     spec.INVALID_ENVIRONMENT, needle, version=spec.LATEST_VERSION)


@pytest.mark.parametrize("missing", ["container_id", "ifname", "netns"])
def test_add_without_its_variables_is_code_4(missing: str, pod_netns: str) -> None:
    kwargs: dict[str, Any] = {"netns": pod_netns, missing: None}
    variable = {"container_id": "CNI_CONTAINERID", "ifname": "CNI_IFNAME", "netns": "CNI_NETNS"}[missing]
    assert_cni_error(run_plugin("ADD", config(prevResult=PREV_RESULT), **kwargs), spec.INVALID_ENVIRONMENT,
                     variable, version=spec.LATEST_VERSION)


@pytest.mark.parametrize("version", ["0.2.0", "2.0.0"])
def test_unsupported_version_is_code_1(version: str, pod_netns: str) -> None:
    assert_cni_error(run_plugin("ADD", config(version=version, prevResult=PREV_RESULT), netns=pod_netns),
                     spec.INCOMPATIBLE_VERSION, version, "supported", version=spec.LATEST_VERSION)


def test_error_is_reported_in_the_configured_version(pod_netns: str) -> None:
    result = run_plugin("ADD", config(version="0.4.0"), netns=pod_netns)
    assert_cni_error(result, spec.INVALID_CONFIG, "prevResult", version="0.4.0")


@pytest.mark.parametrize("command, version", [("STATUS", "1.0.0"), ("GC", "0.4.0"), ("CHECK", "0.3.1")])
def test_command_newer_than_the_configured_version_is_code_1(command: str, version: str, pod_netns: str) -> None:
    assert_cni_error(run_plugin(command, config(version=version), netns=pod_netns),
                     spec.INCOMPATIBLE_VERSION, command, version, version=version)


@pytest.mark.parametrize("extra, needles", [
    ({}, ("chained", "prevResult")),
    ({"prevResult": {"cniVersion": "1.0.0", "interfaces": []}}, ("no IP addresses",)),
    ({"prevResult": {"cniVersion": "1.0.0", "ips": []}}, ("no IP addresses",)),
    ({"prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.248.0.300/24"}]}}, ("10.248.0.300/24",)),
    ({"prevResult": PREV_RESULT, "timeout": "soon"}, ("timeout",)),
    ({"prevResult": PREV_RESULT, "agentSocket": "agent.sock"}, ("agentSocket",)),
    ({"prevResult": PREV_RESULT, "logLevel": "loud"}, ("logLevel",)),
], ids=["no-prev-result", "no-ips", "empty-ips", "bad-ip", "bad-timeout", "relative-socket", "bad-log-level"])
def test_invalid_configuration_is_code_7(extra: dict[str, Any], needles: tuple[str, ...], pod_netns: str) -> None:
    assert_cni_error(run_plugin("ADD", config(**extra), netns=pod_netns), spec.INVALID_CONFIG, *needles)


def test_agent_socket_too_long_for_a_unix_socket_is_code_7(pod_netns: str) -> None:
    path = "/var/run/" + "a" * 120 + "/agent.sock"
    assert_cni_error(run_plugin("ADD", config(path, prevResult=PREV_RESULT), netns=pod_netns),
                     spec.INVALID_CONFIG, "agentSocket", "107")


def test_add_with_a_netns_that_does_not_exist_is_code_3(tmp_path: Path) -> None:
    missing = str(tmp_path / "gone-netns")
    assert_cni_error(run_plugin("ADD", config(prevResult=PREV_RESULT), netns=missing),
                     spec.UNKNOWN_CONTAINER, missing)


def test_version_with_empty_stdin() -> None:
    result = run_plugin("VERSION", b"", netns=None, container_id=None, ifname=None)
    assert result.status == 0 and "Traceback" not in result.stderr
    assert json.loads(result.stdout) == {"cniVersion": spec.LATEST_VERSION,
                                         "supportedVersions": list(spec.SUPPORTED_VERSIONS)}


def test_version_answers_in_the_asked_version() -> None:
    result = run_plugin("VERSION", {"cniVersion": "0.4.0"}, netns=None, container_id=None, ifname=None)
    assert result.status == 0
    assert json.loads(result.stdout)["cniVersion"] == "0.4.0"
    assert "0.4.0" in json.loads(result.stdout)["supportedVersions"]


# -- the agent is missing, hung or up ------------------------------------------------

def test_add_with_no_agent_socket_is_try_again(tmp_path: Path, pod_netns: str) -> None:
    path = str(tmp_path / "agent.sock")
    assert_cni_error(run_plugin("ADD", config(path, prevResult=PREV_RESULT), netns=pod_netns),
                     spec.TRY_AGAIN_LATER, "try again", path)


def test_add_with_a_hung_agent_is_try_again_within_the_timeout(hung_agent: HungAgent, pod_netns: str) -> None:
    result = run_plugin("ADD", {**config(hung_agent.path, prevResult=PREV_RESULT), "timeout": "1s"},
                        netns=pod_netns)
    assert_cni_error(result, spec.TRY_AGAIN_LATER, "try again")
    assert 1.0 <= result.seconds < 3.0, result.seconds


@pytest.mark.parametrize("down", ["no-socket", "hung"])
def test_status_with_agent_down_is_code_50(down: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    path = request.getfixturevalue("hung_agent").path if down == "hung" else str(tmp_path / "agent.sock")
    result = run_plugin("STATUS", {**config(path, version="1.1.0"), "timeout": "500ms"},
                        netns=None, container_id=None, ifname=None)
    assert_cni_error(result, spec.NOT_AVAILABLE, "not available", version="1.1.0")
    assert result.seconds < 2.5


def test_status_with_agent_up_succeeds(agent: AgentProcess) -> None:
    result = run_plugin("STATUS", config(agent.socket, version="1.1.0"), netns=None, container_id=None,
                        ifname=None)
    assert (result.status, result.stdout) == (0, ""), result
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("netns", ["", "/var/run/netns/cer-never-existed"], ids=["no-netns", "gone-netns"])
def test_del_with_agent_down_succeeds(netns: str, tmp_path: Path) -> None:
    result = run_plugin("DEL", config(str(tmp_path / "agent.sock"), prevResult=PREV_RESULT), netns=netns)
    assert (result.status, result.stdout) == (0, ""), result
    assert "Traceback" not in result.stderr
    assert "agent unreachable" in result.stderr, "the runtime's log should say why nothing was released"


def test_del_with_a_socket_path_that_cannot_exist_succeeds(tmp_path: Path) -> None:
    """A file where the socket's directory should be: still "agent down", not a crash."""
    (tmp_path / "ambit").write_text("not a directory")
    result = run_plugin("DEL", config(str(tmp_path / "ambit" / "agent.sock")))
    assert (result.status, result.stdout) == (0, ""), result
    assert "Traceback" not in result.stderr and "agent unreachable" in result.stderr


def test_del_with_a_hung_agent_succeeds_after_the_timeout(hung_agent: HungAgent) -> None:
    result = run_plugin("DEL", {**config(hung_agent.path), "timeout": "500ms"})
    assert (result.status, result.stdout) == (0, ""), result
    assert result.seconds < 2.5


# -- a real chain whose primary does not make a veth -----------------------------------

def test_container_interface_that_is_not_a_veth_is_code_7(node: NodeNamespace, agent: AgentProcess) -> None:
    """macvlan + host-local give the pod a macvlan, not a veth: ambit-cni must
    refuse with a clear message instead of capturing on some other link.
    The macvlan's master is a bridge: this kernel has no dummy driver."""
    with node.ipr() as ipr:
        ipr.link("add", ifname="cer-master0", kind="bridge")
        ipr.link("set", index=ipr.link_lookup(ifname="cer-master0")[0], state="up")
    conflist = {"cniVersion": "1.0.0", "name": "cer-macvlan", "plugins": [
        {"type": "macvlan", "master": "cer-master0", "mode": "bridge",
         "ipam": {"type": "host-local", "subnet": "10.248.7.0/24", "dataDir": str(node.workdir / "ipam")}},
        {"type": "ambit-cni", "agentSocket": agent.socket, "timeout": "5s", "logLevel": "info"}]}
    runtime = CniRuntime(conflist, cni_plugin_dirs(), node_netns=node.path)
    pod_name = f"cer-pod-{uuid.uuid4().hex[:8]}"
    sandbox = PodSandbox(container_id=uuid.uuid4().hex, netns=make_pod_netns(pod_name), name="mv-0", uid="u-mv")
    try:
        with pytest.raises(CniFailure) as info:
            runtime.add(sandbox)
        failure = info.value
        assert failure.plugin == "ambit-cni" and failure.command == "ADD"
        assert failure.status != 0 and failure.code == spec.INVALID_CONFIG, failure.error
        assert "not a veth" in failure.error["msg"] and "macvlan" in failure.error["msg"], failure.error
        assert "Traceback" not in failure.stderr
        # The agent recorded nothing for the pod.
        assert workloads(agent.socket) == []
    finally:
        try:
            runtime.delete(sandbox)
        finally:
            remove_netns(pod_name)


class _FailingRelease(pb_grpc.CNIServicer):
    """An agent that answers ReleasePod with an error (a bug, a kernel call
    that failed): anything but "unavailable"."""

    def ReleasePod(self, request, context):
        context.abort(grpc.StatusCode.INTERNAL, "detach failed: the kernel said no")


@pytest.fixture
def failing_agent(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "failing.sock")
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_CNIServicer_to_server(_FailingRelease(), server)
    server.add_insecure_port(f"unix:{path}")
    server.start()
    try:
        yield path
    finally:
        server.stop(None)


def test_del_with_an_agent_error_succeeds_and_says_why(failing_agent: str, pod_netns: str) -> None:
    """DEL never fails the pod: the agent's GC and reconcile release what it
    could not (tests/kernel/test_address_spoofing.py shows them do it)."""
    result = run_plugin("DEL", config(failing_agent, prevResult=PREV_RESULT), netns=pod_netns)
    assert (result.status, result.stdout) == (0, ""), result
    assert "Traceback" not in result.stderr
    logged = [json.loads(line) for line in result.stderr.splitlines()]
    assert [(e["level"], e["code"]) for e in logged] == [("warn", spec.AGENT_ERROR)], logged
    assert "GC and reconcile" in logged[0]["event"] and "the kernel said no" in logged[0]["error"], logged
    # Only DEL is forgiving: an ADD the agent cannot serve still fails the pod.
    assert_cni_error(run_plugin("ADD", config(failing_agent, prevResult=PREV_RESULT), netns=pod_netns),
                     spec.AGENT_ERROR)


@pytest.mark.parametrize("stdin", [b"{not json", json.dumps(config(version="9.9.9")).encode(),
                                   json.dumps(config(agentSocket="relative.sock")).encode()],
                         ids=["not JSON", "unsupported version", "relative socket"])
def test_del_with_a_broken_configuration_succeeds_and_says_why(stdin: bytes, pod_netns: str) -> None:
    result = run_plugin("DEL", stdin, netns=pod_netns)
    assert (result.status, result.stdout) == (0, ""), result
    assert "Traceback" not in result.stderr and "DEL could not" in result.stderr, result.stderr
