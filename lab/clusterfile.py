"""The cluster file: the lab's objects as an API server would show them once scheduled. The agents
and waypoints discover the cluster from it; each agent reports the revision it holds.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

from ambit.agent.discovery.file_source import content_revision
from .plan import LabPlan
from .statefile import LabState, PodRecord


def write_cluster_file(path: Path, plan: LabPlan, state: LabState) -> str:
    """Atomically, so an agent polling it never reads half a file; returns
    its revision, which each agent reports once it holds this content."""
    data = yaml.safe_dump_all(render_cluster(plan, state), sort_keys=False).encode()
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return content_revision([data])


def ready_waypoints(plan: LabPlan, state: LabState) -> frozenset[str]:
    """"namespace/name" of each waypoint that the cluster file shows with a ready pod."""
    return frozenset(f"{p.pod.namespace}/{p.pod.waypoint}" for p in plan.pods
                     if p.pod.waypoint and (record := state.pods.get(p.pod.key)) is not None
                     and record.ip and _ready(record, bool(p.pod.workloads)))


def _ready(record: PodRecord, has_workloads: bool) -> bool:
    """A pod with workloads is ready once they started; one without, once it has an address."""
    return record.workload is not None or not has_workloads


def render_cluster(plan: LabPlan, state: LabState) -> list[dict[str, Any]]:
    """The input objects as an API server would show them once scheduled:
    pods with spec.nodeName and status.podIP/hostIP, services with their
    clusterIP, Node objects with their addresses."""
    services = {s.key: s for s in plan.config.services}
    planned_nodes = {p.pod.key: p.node for p in plan.pods}
    planned_workloads = {p.pod.key: bool(p.pod.workloads) for p in plan.pods}
    out: list[dict[str, Any]] = []
    for node in plan.nodes:
        out.append({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node.name},
                    "spec": {"podCIDR": node.pod_cidr, "podCIDRs": [node.pod_cidr]},
                    "status": {"addresses": [{"type": "InternalIP", "address": node.underlay_ip}]}})
    for doc in plan.config.documents:
        obj = copy.deepcopy(dict(doc))
        kind = obj.get("kind")
        meta = obj.get("metadata") or {}
        key = f"{meta.get('namespace', 'default')}/{meta.get('name')}"
        if kind == "Node":
            continue
        if kind == "Pod" and key in state.pods and state.pods[key].ip:
            record = state.pods[key]
            obj.setdefault("spec", {})["nodeName"] = record.node
            ready = "True" if _ready(record, planned_workloads.get(key, False)) else "False"
            obj["status"] = {"phase": "Running", "hostIP": state.nodes[record.node].underlay_ip,
                             "podIP": record.ip, "podIPs": [{"ip": record.ip}],
                             "conditions": [{"type": "Ready", "status": ready}]}
            obj["metadata"] = {**meta, "uid": record.uid}
        elif kind == "Pod" and key in planned_nodes:
            # Scheduled, not started yet: what the API server shows before the kubelet runs it.
            obj.setdefault("spec", {})["nodeName"] = planned_nodes[key]
            obj["status"] = {"phase": "Pending"}
        elif kind == "Service" and key in services:
            obj.setdefault("spec", {})["clusterIP"] = services[key].cluster_ip or "None"
        out.append(obj)
    return out
