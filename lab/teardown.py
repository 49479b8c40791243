"""`ambit lab down`: the lab removed in a kubelet's order, and whatever a crashed
run left behind found from the machine itself (processes.py), not only from
the state file."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from ambit.agent.datapath.constants import BPFFS_ROOT
from ambit.agent.netns import remove_netns

from .cniruntime import CniFailure, CniRuntime
from .errors import LabError, LabNotRunning
from .node import cni_plugin_dirs, netns_path
from .plan import LabSettings
from .processes import ChildProcesses, lab_namespaces, lab_processes, lab_root_links
from .statefile import LabState, NodeRecord, PodRecord
from .status import TeardownReport


def tear_down(s: LabSettings, children: ChildProcesses, log: Any) -> TeardownReport:
    """Remove the lab `s` names and anything a crashed run left: workloads, CNI DEL
    (reverse order), agents and the CA, stray marked processes, namespaces, root
    links, pins and files. Each step works without the ones before it."""
    try:
        state: LabState | None = LabState.load(s.state_file)
    except LabNotRunning:
        state = None
    except LabError as exc:
        log.warning("ignoring unreadable state", error=str(exc))
        state = None
    stopped = 0
    deleted: list[str] = []
    failures: list[str] = []
    if state is not None:
        stopped += children.stop([p.workload for p in state.pods.values() if p.workload])
        for pod in reversed(list(state.pods.values())):
            node = state.nodes.get(pod.node)
            if node is None or not os.path.exists(netns_path(node.netns)):
                continue  # the node's namespace (and its bridge, veths, IPAM) is already gone
            error = cni_del(node, pod)
            if error:
                failures.append(f"CNI DEL of {pod.key}: {error}")
            else:
                deleted.append(pod.key)
        stopped += children.stop([n.agent for n in state.nodes.values() if n.agent])
        stopped += children.stop([state.ca, state.ca_holder])  # the holder's going takes the CA key with it
    stray = lab_processes(s.prefix)
    if stray:
        stopped += children.stop_pids(stray)
    namespaces = lab_namespaces(s.prefix)
    for name in namespaces:
        remove_netns(name)
    links = lab_root_links(s.prefix)
    if links:
        with IPRoute() as ipr:
            for name in links:
                with contextlib.suppress(Exception):
                    ipr.link("del", index=ipr.link_lookup(ifname=name)[0])
    bpffs = []
    if s.bpffs_root.is_dir():
        for path in sorted(s.bpffs_root.glob(f"{s.prefix}*")):
            shutil.rmtree(path, ignore_errors=True)
            bpffs.append(str(path))
    state_removed = s.state_file.exists()
    for path in (s.state_file, s.state_file.with_name(s.state_file.name + ".tmp"), s.cluster_file):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    shutil.rmtree(s.nodes_dir, ignore_errors=True)
    shutil.rmtree(s.ca_dir, ignore_errors=True)  # the lab's CA lives and dies with the lab
    with contextlib.suppress(OSError):
        s.ca_key_dir.rmdir()  # here only ever an empty mount point: the key was in the holder's tmpfs
    if s.bpffs_root == Path(BPFFS_ROOT):
        with contextlib.suppress(OSError):
            s.bpffs_root.rmdir()  # the shared default, once empty (a root given by the caller is theirs)
    with contextlib.suppress(OSError):
        s.state_dir.rmdir()  # only when empty: the directory may have been given by the user
    report = TeardownReport(pods_deleted=tuple(deleted), del_failures=tuple(failures), processes_stopped=stopped,
                            namespaces_removed=namespaces, links_removed=links, bpffs_removed=tuple(bpffs),
                            state_removed=state_removed)
    log.info("lab down", pods=len(deleted), processes=stopped, namespaces=len(namespaces))
    return report


def cni_del(node: NodeRecord, pod: PodRecord) -> str | None:
    """DEL through the whole chain in reverse with the cached ADD result,
    continuing past a failing plugin: the namespaces go next anyway."""
    runtime = CniRuntime(node.conflist, cni_plugin_dirs(), node_netns=netns_path(node.netns), timeout=20.0)
    errors = []
    for plugin in reversed(runtime.conflist["plugins"]):
        try:
            runtime.exec_plugin(plugin["type"], "DEL", runtime.plugin_conf(plugin, pod.cni_result),
                                pod.sandbox())
        except (CniFailure, OSError, subprocess.TimeoutExpired) as exc:
            errors.append(str(exc))
    return "; ".join(errors) or None
