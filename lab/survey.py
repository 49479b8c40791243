"""What `ambit lab status` shows, gathered: the state file's record checked
against the machine (live processes, namespaces present) and, when asked,
each node agent's own answer over its socket."""
from __future__ import annotations

import os

from ambit.agent.cli.client import AgentClient, AgentUnavailable
from ambit.agent.discovery.model import PodInfo

from .labconfig import SERVICE_CIDR, Pod, parse_documents
from .node import netns_path
from .plan import LabCaPlan, LabSettings
from .processes import is_alive
from .statefile import LabState, NodeRecord
from .status import CaStatus, LabStatus, NodeStatus, PodStatus, ServiceStatus


def lab_status(state: LabState, defaults: LabSettings, ca: LabCaPlan, ask_agents: bool = True) -> LabStatus:
    """The lab as its state file records it and as it is now: live processes,
    namespaces present, and (`ask_agents`) each agent's own answer."""
    config = parse_documents(state.documents, state.settings.get("service_cidr", SERVICE_CIDR))
    nodes = tuple(node_status(n, ask_agents) for n in state.nodes.values())
    pods = []
    for record in state.pods.values():
        try:
            pod = config.pod(record.key)
        except KeyError:
            pod = Pod(PodInfo(record.namespace, record.name))
        alive = bool(record.workload and is_alive(record.workload))
        pods.append(PodStatus(key=record.key, node=record.node, netns=record.netns,
                              netns_present=os.path.exists(netns_path(record.netns)), ip=record.ip,
                              service_account=pod.service_account, ambient=config.ambient(pod),
                              workloads=tuple(f"{k}:{pod.workload_port(k)}" for k in pod.workloads),
                              workload_pid=record.workload.pid if record.workload else None,
                              workload_alive=alive))
    ips = {p.key: p.ip for p in state.pods.values()}
    services = tuple(ServiceStatus(
        key=svc.key, cluster_ip=svc.cluster_ip,
        ports=tuple(f"{p.name + ' ' if p.name else ''}{p.port}->{p.target_port}/{p.protocol}" for p in svc.ports),
        endpoints=tuple(ip for pod in config.endpoints(svc) if (ip := ips.get(pod.key))))
        for svc in config.services)
    policies = tuple(f"{o.get('kind')} {o.get('metadata', {}).get('namespace', 'default')}/"
                     f"{o.get('metadata', {}).get('name')}" for o in config.passthrough)
    settings = state.settings
    return LabStatus(prefix=settings.get("prefix", defaults.prefix), phase=state.phase,
                     state_file=str(state.path), cluster_file=str(defaults.cluster_file),
                     underlay_netns=f"{settings.get('prefix', defaults.prefix)}underlay",
                     underlay_bridge=f"{settings.get('prefix', defaults.prefix)}ul0",
                     underlay_cidr=settings.get("underlay_cidr", ""), nodes=nodes, pods=tuple(pods),
                     services=services, policies=policies, ca=ca_status(state, ca))

def ca_status(state: LabState, ca: LabCaPlan) -> CaStatus:
    record = state.ca
    return CaStatus(address=ca.target, pid=record.pid if record else None,
                    alive=bool(record and is_alive(record)), log=str(ca.log))

def node_status(node: NodeRecord, ask_agent: bool) -> NodeStatus:
    alive = bool(node.agent and is_alive(node.agent))
    ready: bool | None = None
    detail = "not running" if node.agent else "not started"
    records: int | None = None
    enrolled: int | None = None
    if alive and ask_agent:
        try:
            with AgentClient(node.socket, timeout=2.0) as client:
                status = client.status()
                ready, detail = status.ready, status.reason or ("ready" if status.ready else "not ready")
                records = len(client.workloads())
                enrolled = status.enrolled
        except (AgentUnavailable, Exception) as exc:  # status must report, not crash
            ready, detail = False, f"not answering: {exc}"
    elif alive:
        detail = "running"
    return NodeStatus(name=node.name, netns=node.netns, netns_present=os.path.exists(netns_path(node.netns)),
                      underlay_ip=node.underlay_ip, pod_cidr=node.pod_cidr, socket=node.socket,
                      agent_pid=node.agent.pid if node.agent else None, agent_alive=alive, agent_ready=ready,
                      agent_detail=detail, agent_records=records, agent_enrolled=enrolled,
                      agent_log=node.agent.log if node.agent else None)
