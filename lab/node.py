"""Lab building blocks: a "node" network namespace with a real ambit-agent
running inside it, and pods made by the real CNI chain.

The lab, the tests and the benchmarks all build on these. Nothing here
touches the machine's own namespace: every link, bridge and route the chain
creates lives in the node namespace, which is removed (with everything in
it) when the context exits, also on failure.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, TypeVar

from contextlib import AbstractContextManager

from pyroute2 import IPRoute

from ambit.agent.datapath.constants import BPFFS_ROOT
from ambit.agent.netlink import iproute
from ambit.agent.netns import create_netns, netns_path, run_in_netns
from ambit.agent.netns import remove_netns as _remove_netns
from .cniruntime import REFERENCE_PLUGINS

if TYPE_CHECKING:  # the plan uses bridge_conflist from here: a type only
    from .plan import NodePlan

REPO = Path(__file__).resolve().parents[1]  # the checkout (editable install)
_T = TypeVar("_T")


def spawn_in_netns(path: str, start: Callable[[], _T], cpus: Collection[int] | None = None) -> _T:
    """Call `start` (which starts processes with subprocess) on a thread inside
    the network namespace `path`, pinned to `cpus` if given: a child begins
    in its creator thread's namespace and CPU set.

    Never subprocess with preexec_fn=setns: that makes it fork() this whole
    process, which runs every pthread_atfork handler first, and gRPC's (the
    lab talks to its agents with it) deadlocked against gRPC's own threads
    under CPU load (a full kernel run hung in Lab.exec, issue 14); the copy
    would also run Python, signal handlers included, until exec. Without
    preexec_fn subprocess uses vfork: no handlers, no copy."""
    def inside() -> _T:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)  # this thread (it ends with `start`), and what it starts
        return start()
    return run_in_netns(path, inside)


def cni_plugin_dirs() -> list[str]:
    """Where ambit-cni is found first, then the reference plugins: the staged
    plugin (`python3 -IS`, scripts/stage-cni.sh) when `make` produced it,
    else the venv's console script."""
    staged = REPO / "build" / "cni-bin"
    ours = staged if (staged / "ambit-cni").exists() else Path(sys.executable).parent
    return [str(ours), REFERENCE_PLUGINS]


def make_pod_netns(name: str) -> str:
    """A pod sandbox (or a node): a named netns with loopback up, as a
    runtime makes it; a stale one of the same name is replaced."""
    _remove_netns(name)
    path = create_netns(name)
    with iproute(path) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
    return path


def remove_netns(name: str) -> None:
    _remove_netns(name)


class NodeNamespace:
    """A network namespace standing in for a Kubernetes node."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.path = netns_path(name)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{name}-"))

    def __enter__(self) -> "NodeNamespace":
        make_pod_netns(self.name)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        remove_netns(self.name)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def remove_netns_path(self, path: str) -> None:
        remove_netns(os.path.basename(path))

    def ipr(self) -> AbstractContextManager[IPRoute]:
        """A netlink handle in the node namespace (a context manager)."""
        return iproute(self.path)

    def run(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
        """Run a command inside the node namespace."""
        return spawn_in_netns(self.path, lambda: subprocess.run(argv, **kwargs))


class AgentProcess:
    """A real ambit-agent process inside a node namespace."""

    def __init__(self, node: NodeNamespace, tag: str, capture: str = "none",
                 extra_args: tuple[str, ...] = ()) -> None:
        """capture: "none" records pods only (fast start, for CNI tests);
        "ebpf" runs the datapath with this node's own proxy namespace and
        pin directory, removed again by cleanup()."""
        self.node = node
        self.socket = str(node.workdir / "agent.sock")
        self.state_dir = str(node.workdir / "state")
        self.log_path = node.workdir / f"agent-{tag}.log"
        self.capture = capture
        self.proxy_netns = f"{node.name}-proxy"
        self.bpffs_dir = f"{BPFFS_ROOT}/{node.name}"
        self.extra_args = extra_args
        self.proc: subprocess.Popen | None = None

    def _common_args(self) -> list[str]:
        return ["--socket", self.socket, "--state-dir", self.state_dir, "--node-name", self.node.name,
                "--capture", self.capture, "--proxy-netns", self.proxy_netns, "--bpffs-dir", self.bpffs_dir]

    def argv(self) -> list[str]:
        return [str(Path(sys.executable).parent / "ambit-agent"), *self._common_args(), "--log-level", "debug",
                *self.extra_args]

    def cleanup(self) -> None:
        """`ambit-agent --cleanup` for this node: capture, proxy namespace, pins."""
        result = self.node.run([str(Path(sys.executable).parent / "ambit-agent"), *self._common_args(),
                                "--log-level", "warn", "--cleanup"], capture_output=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"agent cleanup failed: {result.stderr.decode()[-2000:]}")
        # The per-node pin directories share a parent the first agent created.
        parent = Path(self.bpffs_dir).parent
        if parent != Path("/sys/fs/bpf"):
            with contextlib.suppress(OSError):
                parent.rmdir()  # only when empty: other nodes may still use it

    def start(self, wait: bool = True) -> "AgentProcess":
        with open(self.log_path, "ab") as log:
            self.proc = spawn_in_netns(self.node.path, lambda: subprocess.Popen(
                self.argv(), stdout=log, stderr=subprocess.STDOUT))
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        from ambit.agent.cli.client import AgentClient
        deadline = time.monotonic() + timeout
        said = f"no socket at {self.socket}"
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{self.logs()}")
            if os.path.exists(self.socket):
                try:
                    with AgentClient(self.socket, timeout=2.0) as client:
                        status = client.status()
                    if status.pid and self.proc is not None and status.pid != self.proc.pid:
                        said = f"the socket is still served by pid {status.pid} (a hand-over under way)"
                    elif status.ready:
                        return
                    else:
                        said = f"not ready: {status.reason}"
                except Exception as exc:
                    said = f"not answering: {exc}"
            time.sleep(0.05)
        raise TimeoutError(f"agent not ready after {timeout}s ({said}):\n{self.logs()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def logs(self) -> str:
        try:
            return self.log_path.read_text()
        except FileNotFoundError:
            return ""

    def __enter__(self) -> "AgentProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
        if self.capture != "none":
            self.cleanup()


class LabNode(NodeNamespace):
    """A planned node as node.py's helpers see it: its workdir is the lab's,
    not a temporary one."""

    def __init__(self, plan: NodePlan) -> None:  # no super(): the namespace and dir are made by the lab
        self.name = plan.netns
        self.path = netns_path(plan.netns)
        self.workdir = plan.workdir
        self.plan = plan


class NodeAgent(AgentProcess):
    """The node's ambit-agent, started in its own session so it outlives
    `ambit lab up` and a Ctrl-C typed in that terminal later."""

    def __init__(self, node: LabNode, marker: Mapping[str, str]) -> None:
        super().__init__(node, node.plan.name)
        self.plan = node.plan
        self.marker = dict(marker)

    def argv(self) -> list[str]:
        """The plan's options; the node is named as pods' spec.nodeName names it."""
        return [str(Path(sys.executable).parent / "ambit-agent"), "--socket", self.socket,
                "--state-dir", self.state_dir, "--node-name", self.plan.name, "--log-level", "debug",
                *self.plan.agent_args]

    def start(self, wait: bool = True) -> "NodeAgent":
        with open(self.log_path, "ab") as log_file:
            self.proc = spawn_in_netns(self.node.path, lambda: subprocess.Popen(
                self.argv(), stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True, env={**os.environ, **self.marker}))
        if wait:
            self.wait_ready()
        return self


def ambit_plugin(socket: str, **extra: Any) -> dict[str, Any]:
    return {"type": "ambit-cni", "agentSocket": socket, "timeout": 5, "logLevel": "info", **extra}


def bridge_conflist(name: str, subnet: str, socket: str, *, ipam_dir: str | os.PathLike, version: str = "1.0.0",
                    portmap: bool = True, ambit: bool = True) -> dict[str, Any]:
    """bridge + host-local [+ portmap] [+ ambit-cni], the kubenet-style chain."""
    plugins: list[dict[str, Any]] = [{
        "type": "bridge", "bridge": f"{name[:8]}br0", "isGateway": True, "ipMasq": False, "hairpinMode": True,
        "ipam": {"type": "host-local", "subnet": subnet,
                 "dataDir": str(ipam_dir)}}]
    if portmap:
        plugins.append({"type": "portmap", "capabilities": {"portMappings": True}, "snat": False})
    if ambit:
        plugins.append(ambit_plugin(socket))
    return {"cniVersion": version, "name": name, "plugins": plugins}


def ptp_conflist(name: str, subnet: str, socket: str, *, ipam_dir: str | os.PathLike,
                 version: str = "1.0.0") -> dict[str, Any]:
    """ptp + host-local + ambit-cni: no bridge, a /32 route per pod."""
    return {"cniVersion": version, "name": name, "plugins": [
        {"type": "ptp", "ipMasq": False,
         "ipam": {"type": "host-local", "subnet": subnet, "dataDir": str(ipam_dir)}},
        ambit_plugin(socket)]}
