"""The frozen ambit-cni (scripts/freeze-cni.sh) on a host without Python.

It is installed the way install-cni installs it (a one-directory bundle
behind <bin dir>/ambit-cni) into a directory outside the venv and the repo,
run with nothing but the CNI_* variables and from /, in a real chain with
the reference plugins and a real ambit-agent in a node namespace; and once
more in a mount namespace where every Python on this machine is hidden.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from ambit.agent.install_cni.installer import PluginSource, install_plugin
from ambit.lab import cniruntime
from ambit.lab.cniruntime import REFERENCE_PLUGINS, CniRuntime, PodSandbox
from ambit.lab.node import (AgentProcess, NodeNamespace, bridge_conflist, make_pod_netns, ptp_conflist,
                                  remove_netns)
from tests.support.agentapi import workloads
from tests.support.malformed_cni import DUPLICATE_VERSION, MALFORMED_STDIN

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
FROZEN_BUNDLE = REPO / "build" / "cni-frozen" / "ambit-cni"
SUBNET = "10.239.0.0/24"


@pytest.fixture(scope="module")
def frozen_bundle() -> Path:
    if importlib.util.find_spec("PyInstaller") is None:
        pytest.skip("PyInstaller is not installed in the venv (requirements.txt pins it): cannot freeze ambit-cni")
    build = subprocess.run(["bash", str(REPO / "scripts" / "freeze-cni.sh"), "--if-stale"], capture_output=True,
                           text=True, timeout=900)
    assert build.returncode == 0, f"freeze-cni.sh failed:\n{build.stdout}\n{build.stderr}"
    return FROZEN_BUNDLE


@pytest.fixture
def host_bin(tmp_path, frozen_bundle) -> Path:
    """A host's /opt/cni/bin, outside the venv and the repo, with the plugin installed as install-cni does."""
    bin_dir = tmp_path / "opt-cni-bin"
    bin_dir.mkdir()
    install_plugin(PluginSource.locate(frozen_bundle), bin_dir)
    assert not str(bin_dir).startswith(str(REPO))
    return bin_dir


def run_plugin(exe: Path, env: dict[str, str], stdin: bytes = b"") -> subprocess.CompletedProcess:
    # no `env -i` binary needed: subprocess with an explicit env gives the child exactly these variables
    return subprocess.run([str(exe)], input=stdin, env=env, cwd="/", capture_output=True, timeout=30)


def test_the_installed_plugin_is_a_native_executable(host_bin):
    exe = (host_bin / "ambit-cni").resolve()
    assert exe.read_bytes()[:4] == b"\x7fELF"  # not a script naming an interpreter


def test_version_with_an_empty_environment(host_bin):
    exe = host_bin / "ambit-cni"
    plain = run_plugin(exe, {"CNI_COMMAND": "VERSION"})
    assert plain.returncode == 0, plain.stderr
    assert json.loads(plain.stdout) == {"cniVersion": "1.1.0",
                                        "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}
    asked = run_plugin(exe, {"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "0.4.0"}')
    assert json.loads(asked.stdout)["cniVersion"] == "0.4.0"


def test_python_variables_cannot_steer_it(host_bin):
    poisoned = run_plugin(host_bin / "ambit-cni", {"CNI_COMMAND": "VERSION", "PYTHONHOME": "/nonexistent",
                                                   "PYTHONPATH": "/nonexistent", "PYTHONSAFEPATH": "1"})
    assert poisoned.returncode == 0, poisoned.stderr
    assert "supportedVersions" in json.loads(poisoned.stdout)


def test_runs_where_no_python_exists(host_bin):
    """A private mount namespace (gone when the command exits) with every
    Python interpreter, library directory, the venv and the repo hidden."""
    hidden_dirs = [d for d in ("/usr/lib/python3", "/usr/lib/python3.11", "/usr/local/lib/python3.11",
                               "/root/.pyenv", str(REPO)) if os.path.isdir(d)]
    hidden_files = [f for f in ("/usr/bin/python3.11", "/usr/local/bin/python3.11") if os.path.isfile(f)]
    hide = " && ".join([f"mount -t tmpfs frz-hidden {d}" for d in hidden_dirs]
                       + [f"mount --bind /dev/null {f}" for f in hidden_files])
    exe = host_bin / "ambit-cni"
    script = (f"{hide} && if /usr/bin/python3 -c pass 2>/dev/null; then echo PYTHON-STILL-THERE; exit 3; fi; "
              f"exec env -i CNI_COMMAND=VERSION {exe} </dev/null")
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], cwd="/",
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["cniVersion"] == "1.1.0"


@pytest.mark.parametrize("stdin, needle", MALFORMED_STDIN.values(), ids=list(MALFORMED_STDIN))
def test_malformed_configuration_is_code_6_saying_what_and_where(host_bin, stdin, needle):
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c", "CNI_NETNS": "/proc/self/ns/net", "CNI_IFNAME": "eth0"}
    done = run_plugin(host_bin / "ambit-cni", env, stdin)
    assert done.returncode == 1 and b"Traceback" not in done.stderr, done
    error = json.loads(done.stdout)
    assert error["code"] == 6 and needle in error["msg"], error


def test_duplicate_keys_last_one_wins(host_bin):
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c", "CNI_NETNS": "/proc/self/ns/net", "CNI_IFNAME": "eth0"}
    error = json.loads(run_plugin(host_bin / "ambit-cni", env, DUPLICATE_VERSION).stdout)
    assert error["code"] == 1 and "cniVersion 0.2.0 is not supported" in error["msg"], error


class OnlyCniVariables:
    """`subprocess` as the CNI runtime sees it, except that ambit-cni is
    started exactly like `env -i CNI_...=... ambit-cni`, from /. Records what
    the plugin got."""

    def __init__(self, plugin: Path) -> None:
        self.plugin = str(plugin)
        self.envs: list[dict[str, str]] = []

    def run(self, argv, **kwargs):
        if argv[0] == self.plugin:
            kwargs["env"] = {k: v for k, v in kwargs["env"].items() if k.startswith("CNI_")}
            kwargs["cwd"] = "/"
            self.envs.append(kwargs["env"])
        return subprocess.run(argv, **kwargs)

    def __getattr__(self, name: str):
        return getattr(subprocess, name)


@pytest.fixture
def node():
    with NodeNamespace(f"frz-node-{uuid.uuid4().hex[:6]}") as n:
        yield n


@pytest.fixture
def agent(node):
    with AgentProcess(node, "frozen") as a:
        yield a
        print(a.logs())  # shown by pytest when the test failed


@pytest.fixture
def sandboxes():
    made: list[tuple[CniRuntime, PodSandbox]] = []
    yield made
    for runtime, sb in made:
        try:
            runtime.delete(sb)
        except Exception:
            pass
        remove_netns(sb.netns.rsplit("/", 1)[1])
        runtime.close()


CHAINS = {
    "bridge+portmap": lambda sock, ipam: bridge_conflist("frz", SUBNET, sock, ipam_dir=ipam, portmap=True),
    "ptp": lambda sock, ipam: ptp_conflist("frz", SUBNET, sock, ipam_dir=ipam),
}


@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_frozen_plugin_in_a_real_chain(monkeypatch, host_bin, node, agent, sandboxes, chain):
    only_cni = OnlyCniVariables(host_bin / "ambit-cni")
    monkeypatch.setattr(cniruntime, "subprocess", only_cni)
    runtime = CniRuntime(CHAINS[chain](agent.socket, node.workdir / "ipam"), [host_bin, REFERENCE_PLUGINS],
                         node_netns=node.path)
    sb = PodSandbox(container_id=uuid.uuid4().hex, netns=make_pod_netns(f"frz-{uuid.uuid4().hex[:8]}"),
                    namespace="shop", name="cart", uid=str(uuid.uuid4()))
    sandboxes.append((runtime, sb))

    added = runtime.add(sb)

    ours = [r for r in added.runs if r.plugin == "ambit-cni"]
    assert len(ours) == 1 and '"event": "enrolled"' in ours[0].stderr
    records = {w.attachment.container_id: w for w in workloads(agent.socket)}
    record = records[sb.container_id]
    assert (record.pod.namespace, record.pod.name, record.pod.uid) == ("shop", "cart", sb.uid)
    assert set(record.ips) == {ip["address"] for ip in added.result["ips"]}
    assert record.ips[0].startswith("10.239.0.")

    runtime.delete(sb)

    assert sb.container_id not in {w.attachment.container_id for w in workloads(agent.socket)}
    assert [env["CNI_COMMAND"] for env in only_cni.envs] == ["ADD", "DEL"]
    for env in only_cni.envs:
        assert set(env) <= {"CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH"}
