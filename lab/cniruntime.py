"""A minimal container runtime's CNI side, as libcni does it.

It runs a conflist exactly as containerd/CRI-O would: each plugin executed
with the CNI_* environment and its network configuration on stdin, ADD in
order with the previous plugin's real result as `prevResult`, DEL in reverse
order with the cached ADD result, CHECK, STATUS and GC. The lab, the tests and
the benchmarks use it so ambit-cni is always proven in a real chain.
"""
from __future__ import annotations

import concurrent.futures
import copy
import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ambit.agent.netns import enter_netns

REFERENCE_PLUGINS = "/usr/lib/cni"


class CniFailure(Exception):
    """A plugin in the chain failed; carries its error JSON and exit status."""

    def __init__(self, plugin: str, command: str, status: int, error: dict[str, Any] | None, stderr: str) -> None:
        msg = error.get("msg") if error else stderr.strip() or f"exit status {status}"
        super().__init__(f"{plugin} {command} failed: {msg}")
        self.plugin = plugin
        self.command = command
        self.status = status
        self.error = error or {}
        self.stderr = stderr

    @property
    def code(self) -> int | None:
        return self.error.get("code")


@dataclass(frozen=True)
class PodSandbox:
    """What the runtime knows of one pod's network attachment."""

    container_id: str
    netns: str
    ifname: str = "eth0"
    namespace: str = "default"
    name: str = ""
    uid: str = ""

    def cni_args(self) -> str:
        args = [("IgnoreUnknown", "1")]
        if self.name:
            args += [("K8S_POD_NAMESPACE", self.namespace), ("K8S_POD_NAME", self.name),
                     ("K8S_POD_INFRA_CONTAINER_ID", self.container_id), ("K8S_POD_UID", self.uid)]
        return ";".join(f"{k}={v}" for k, v in args)


@dataclass(frozen=True)
class PluginRun:
    plugin: str
    command: str
    seconds: float
    stdout: str
    stderr: str


@dataclass
class ChainResult:
    result: dict[str, Any]
    runs: list[PluginRun] = field(default_factory=list)

    def seconds(self, plugin: str) -> float:
        return sum(r.seconds for r in self.runs if r.plugin == plugin)


class CniRuntime:
    def __init__(self, conflist: Mapping[str, Any], plugin_dirs: Sequence[str | os.PathLike],
                 node_netns: str | None = None, timeout: float = 60.0) -> None:
        """`node_netns`: run the plugins inside this network namespace (a lab
        "node"); None runs them in the caller's namespace."""
        self.conflist = copy.deepcopy(dict(conflist))
        self.plugin_dirs = [str(p) for p in plugin_dirs]
        self.node_netns = node_netns
        self.timeout = timeout
        self._cache: dict[tuple[str, str], dict[str, Any]] = {}
        # Plugins are started from threads that live in the node namespace,
        # as a runtime runs in the node's: no preexec hook, so the child is
        # spawned with vfork like a Go runtime's, not a full fork.
        self._spawners = concurrent.futures.ThreadPoolExecutor(
            max_workers=64, thread_name_prefix="cni-runtime",
            initializer=enter_netns if node_netns else None, initargs=(node_netns,) if node_netns else ())

    def close(self) -> None:
        self._spawners.shutdown(wait=True)

    @property
    def version(self) -> str:
        return self.conflist["cniVersion"]

    def plugin_conf(self, plugin: Mapping[str, Any], prev: dict[str, Any] | None) -> dict[str, Any]:
        conf = dict(plugin)
        conf["name"] = self.conflist["name"]
        conf["cniVersion"] = self.version
        if prev is not None:
            conf["prevResult"] = prev
        return conf

    def _find(self, plugin_type: str) -> str:
        for directory in self.plugin_dirs:
            path = os.path.join(directory, plugin_type)
            if os.access(path, os.X_OK):
                return path
        raise FileNotFoundError(f"CNI plugin {plugin_type!r} not found in {self.plugin_dirs}")

    def exec_plugin(self, plugin_type: str, command: str, conf: Mapping[str, Any] | bytes,
                    sandbox: PodSandbox | None) -> PluginRun:
        env = {"CNI_COMMAND": command, "CNI_PATH": os.pathsep.join(self.plugin_dirs),
               "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
        if sandbox is not None:
            env.update(CNI_CONTAINERID=sandbox.container_id, CNI_NETNS=sandbox.netns,
                       CNI_IFNAME=sandbox.ifname, CNI_ARGS=sandbox.cni_args())
        stdin = conf if isinstance(conf, bytes) else json.dumps(conf).encode()
        started = time.monotonic()
        proc = self._spawners.submit(subprocess.run, [self._find(plugin_type)], input=stdin, env=env,
                                     capture_output=True, timeout=self.timeout).result()
        run = PluginRun(plugin_type, command, time.monotonic() - started, proc.stdout.decode(),
                        proc.stderr.decode())
        if proc.returncode != 0:
            try:
                error = json.loads(proc.stdout) if proc.stdout.strip() else None
            except ValueError:
                error = None
            raise CniFailure(plugin_type, command, proc.returncode, error, run.stderr)
        return run

    def cached_result(self, sandbox: PodSandbox) -> dict[str, Any] | None:
        """The ADD result the runtime keeps for DEL/CHECK, as libcni caches it."""
        return self._cache.get((sandbox.container_id, sandbox.ifname))

    def add(self, sandbox: PodSandbox) -> ChainResult:
        prev: dict[str, Any] | None = None
        chain = ChainResult(result={})
        for plugin in self.conflist["plugins"]:
            run = self.exec_plugin(plugin["type"], "ADD", self.plugin_conf(plugin, prev), sandbox)
            chain.runs.append(run)
            prev = json.loads(run.stdout)
        chain.result = prev or {}
        self._cache[(sandbox.container_id, sandbox.ifname)] = chain.result
        return chain

    def delete(self, sandbox: PodSandbox) -> ChainResult:
        prev = self._cache.get((sandbox.container_id, sandbox.ifname))
        chain = ChainResult(result={})
        for plugin in reversed(self.conflist["plugins"]):
            chain.runs.append(self.exec_plugin(plugin["type"], "DEL", self.plugin_conf(plugin, prev), sandbox))
        self._cache.pop((sandbox.container_id, sandbox.ifname), None)
        return chain

    def check(self, sandbox: PodSandbox) -> ChainResult:
        prev = self._cache.get((sandbox.container_id, sandbox.ifname))
        chain = ChainResult(result={})
        for plugin in self.conflist["plugins"]:
            chain.runs.append(self.exec_plugin(plugin["type"], "CHECK", self.plugin_conf(plugin, prev), sandbox))
        return chain

    def status(self) -> ChainResult:
        chain = ChainResult(result={})
        for plugin in self.conflist["plugins"]:
            chain.runs.append(self.exec_plugin(plugin["type"], "STATUS", self.plugin_conf(plugin, None), None))
        return chain

    def gc(self, valid: Sequence[PodSandbox]) -> ChainResult:
        attachments = [{"containerID": s.container_id, "ifname": s.ifname} for s in valid]
        chain = ChainResult(result={})
        for plugin in self.conflist["plugins"]:
            conf = self.plugin_conf(plugin, None)
            conf["cni.dev/valid-attachments"] = attachments
            chain.runs.append(self.exec_plugin(plugin["type"], "GC", conf, None))
        return chain


def load_conflist(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
