"""The cluster file: the lab's objects as an API server would show them once scheduled. The agents
and waypoints discover the cluster from it.
"""
from __future__ import annotations

import copy
from typing import Any

from .plan import LabPlan
from .statefile import LabState


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
            ready = "True" if record.workload is not None or not planned_workloads.get(key) else "False"
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
