"""The state file: what the lab made, written as it is made (processes by pid and start time), so
`status`, `exec` and `down` work from another process and a crash leaves enough to clean up.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .cniruntime import PodSandbox
from .errors import LabError, LabNotRunning
from .node import netns_path


STATE_VERSION = 1

@dataclass(frozen=True)
class ProcessRecord:
    pid: int
    start_time: int  # /proc/<pid>/stat field 22: tells a recycled pid apart
    log: str


@dataclass(frozen=True)
class NodeRecord:
    name: str
    netns: str
    underlay_ip: str
    pod_cidr: str
    socket: str
    workdir: str
    bpffs_dir: str
    conflist: Mapping[str, Any] = field(hash=False)
    agent: ProcessRecord | None = None


@dataclass(frozen=True)
class PodRecord:
    namespace: str
    name: str
    node: str
    netns: str
    container_id: str
    uid: str
    ip: str | None = None
    cni_result: Mapping[str, Any] | None = field(default=None, hash=False)  # kept for DEL, as libcni does
    workload: ProcessRecord | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def sandbox(self) -> PodSandbox:
        return PodSandbox(container_id=self.container_id, netns=netns_path(self.netns), namespace=self.namespace,
                          name=self.name, uid=self.uid)


class LabState:
    """The state file: what the lab made so far, written after every step."""

    def __init__(self, path: Path, settings: Mapping[str, Any], documents: Sequence[Mapping[str, Any]],
                 node_count: int) -> None:
        self.path = path
        self.settings = dict(settings)
        self.documents = list(documents)
        self.node_count = node_count
        self.phase = "creating"
        self.created = time.time()
        self.nodes: dict[str, NodeRecord] = {}
        self.pods: dict[str, PodRecord] = {}
        self.ca: ProcessRecord | None = None         # `ambit ca serve`
        self.ca_holder: ProcessRecord | None = None  # owns the CA's private filesystem (its key)

    def save(self) -> None:
        data = {"version": STATE_VERSION, "phase": self.phase, "created": self.created, "settings": self.settings,
                "node_count": self.node_count, "documents": self.documents,
                "nodes": [asdict(n) for n in self.nodes.values()], "pods": [asdict(p) for p in self.pods.values()],
                "ca": asdict(self.ca) if self.ca else None,
                "ca_holder": asdict(self.ca_holder) if self.ca_holder else None}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        os.replace(tmp, self.path)

    @classmethod
    def load(cls, path: Path) -> "LabState":
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise LabNotRunning(f"no lab is running (no state file {path})") from None
        except ValueError as exc:
            raise LabError(f"the lab state file {path} is unreadable ({exc}); run `ambit lab down`") from None
        try:
            state = cls(path, data["settings"], data["documents"], data["node_count"])
            state.phase = data.get("phase", "unknown")
            state.created = data.get("created", 0.0)
            for raw in data["nodes"]:
                agent = raw.pop("agent", None)
                state.nodes[raw["name"]] = NodeRecord(**raw, agent=ProcessRecord(**agent) if agent else None)
            state.ca = ProcessRecord(**data["ca"]) if data.get("ca") else None
            state.ca_holder = ProcessRecord(**data["ca_holder"]) if data.get("ca_holder") else None
            for raw in data["pods"]:
                workload = raw.pop("workload", None)
                pod = PodRecord(**raw, workload=ProcessRecord(**workload) if workload else None)
                state.pods[pod.key] = pod
        except (KeyError, TypeError, AttributeError) as exc:
            raise LabError(f"the lab state file {path} is not one this version understands ({exc!r}); "
                           "run `ambit lab down`") from None
        return state
