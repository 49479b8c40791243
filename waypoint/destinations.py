"""What one waypoint stands in front of, read from the cluster state (pure).

Node proxies send a waypoint the connections of every Service and pod that
use it (agent/discovery/waypoints.py), each as an HBONE CONNECT whose
authority is the address as the client dialled it. So the waypoint needs,
per authority it can be asked for:

- a Service VIP:port (waypoint-for service|all): the ready endpoints of that
  port, each as pod IP:targetPort with the pod's identity;
- a pod IP:port (waypoint-for workload|all), one per declared container
  port: that pod itself;
- whether the port speaks HTTP (Istio's rule: the port name is http, http2,
  grpc, ... or starts with one of them and a dash), else it is plain TCP;
- the AuthorizationPolicies attached to it: those whose targetRef(s) name
  the waypoint's Gateway (all its traffic) or, for Service traffic, the
  Service.
Endpoints outside the mesh are left out (the waypoint only speaks HBONE to
its backends), and every omission is noted so `ambit waypoint` can say so.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ambit.agent.discovery.model import ALL_KINDS, ContainerPort, PodInfo, ServiceInfo
from ambit.agent.discovery.state import ClusterState
from ambit.agent.discovery.waypoints import Waypoint, WaypointResolver
from ambit.agent.identity.spiffe import SpiffeId
from ambit.agent.discovery.policy_model import Action, AuthorizationPolicy

GATEWAY_API_GROUP = "gateway.networking.k8s.io"
_HTTP_PROTOCOLS = ("http", "http2", "grpc", "grpc-web", "h2c")


class WaypointError(ValueError):
    """No such waypoint (or nothing it could be built from); says why."""


@dataclass(frozen=True)
class Backend:
    """One endpoint the waypoint opens its own HBONE to: `ip`:15008, CONNECT `ip`:`port`."""

    pod: str  # namespace/name
    ip: str
    port: int
    identity: SpiffeId

    @property
    def authority(self) -> str:
        return _join(self.ip, self.port)


@dataclass(frozen=True)
class Destination:
    """One CONNECT authority the waypoint answers for."""

    ip: str
    port: int
    target: str  # "service shop/web" or "pod shop/web-0": what clients dialled
    protocol: str  # "http" or "tcp"
    backends: tuple[Backend, ...]
    policies: tuple[AuthorizationPolicy, ...]

    @property
    def authority(self) -> str:
        return _join(self.ip, self.port)


@dataclass(frozen=True)
class WaypointPlan:
    waypoint: Waypoint
    identity: SpiffeId
    destinations: tuple[Destination, ...]
    notes: tuple[str, ...] = ()  # what was left out, and why


def _join(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def port_protocol(name: str) -> str:
    """Istio's protocol selection by port name: `http`, `http-web`, `grpc` are HTTP."""
    lowered = name.lower()
    if any(lowered == p or lowered.startswith(p + "-") for p in _HTTP_PROTOCOLS):
        return "http"
    return "tcp"


def state_from_objects(objects: Iterable[Mapping[str, Any]]) -> ClusterState:
    """A ClusterState holding `objects` (files or the lab's rendered objects)."""
    state = ClusterState()
    by_kind: dict[str, list[Mapping[str, Any]]] = {kind: [] for kind in ALL_KINDS}
    for obj in objects:
        kind = obj.get("kind")
        if kind in by_kind:
            by_kind[kind].append(obj)
    for kind, items in by_kind.items():
        state.replace_kind(kind, items)
    return state


def attaches_to_gateway(policy: AuthorizationPolicy, waypoint: Waypoint) -> bool:
    return policy.namespace == waypoint.namespace and any(
        ref.kind == "Gateway" and ref.group in (GATEWAY_API_GROUP, "") and ref.name == waypoint.name
        and ref.namespace in ("", policy.namespace) for ref in policy.target_refs)


def attaches_to_service(policy: AuthorizationPolicy, service: ServiceInfo) -> bool:
    return policy.namespace == service.namespace and any(
        ref.kind == "Service" and ref.group in ("", "core") and ref.name == service.name
        and ref.namespace in ("", policy.namespace) for ref in policy.target_refs)


def plan_waypoint(state: ClusterState, namespace: str, name: str, trust_domain: str,
                  service_account: str | None = None) -> WaypointPlan:
    """Everything `namespace/name` must answer for. Its identity is its pods'
    service account, else `service_account`, else (Istio's default) the
    Gateway's name."""
    resolver = WaypointResolver(state)
    waypoint, missing = resolver.waypoint(namespace, name)
    if waypoint is None:
        raise WaypointError(missing)
    notes: list[str] = []
    accounts = sorted({pod.service_account for pod in state.gateway_pods(namespace, name)})
    if service_account is None:
        if len(accounts) > 1:
            raise WaypointError(f"the pods of waypoint {waypoint} run as several service accounts ({accounts}); "
                                "name the one to issue for")
        service_account = accounts[0] if accounts else name
    identity = SpiffeId(trust_domain, namespace, service_account)

    policies, skipped = _policies(state, waypoint)
    notes += skipped
    gateway_policies = tuple(p for p in policies if attaches_to_gateway(p, waypoint))
    destinations: list[Destination] = []
    if waypoint.takes.takes_services:
        for service in state.services():
            if resolver.for_service(service).waypoint != waypoint:
                continue
            attached = gateway_policies + tuple(p for p in policies if attaches_to_service(p, service)
                                                and p not in gateway_policies)
            destinations += _service_destinations(state, service, attached, trust_domain, notes)
    if waypoint.takes.takes_workloads:
        for pod in state.pods():
            if not pod.ips or not state.ambient_decision(pod)[0] or resolver.for_workload(pod).waypoint != waypoint:
                continue
            destinations += _workload_destinations(state, pod, gateway_policies, trust_domain, notes)
    if not destinations:
        notes.append(f"nothing uses waypoint {waypoint} yet: every CONNECT is answered 404")
    return WaypointPlan(waypoint, identity, tuple(destinations), tuple(notes))


def _policies(state: ClusterState, waypoint: Waypoint) -> tuple[list[AuthorizationPolicy], list[str]]:
    """Policies with targetRef(s) this waypoint can enforce, and notes on the rest."""
    usable: list[AuthorizationPolicy] = []
    notes: list[str] = []
    for policy in state.authorization_policies():
        if not policy.target_refs:
            continue
        if policy.dry_run:
            notes.append(f"policy {policy.key} is dry-run: not enforced")
        elif policy.action not in (Action.ALLOW, Action.DENY):
            notes.append(f"policy {policy.key}: action {policy.action.value} is not supported by the waypoint")
        else:
            usable.append(policy)
    return usable, notes


def _service_destinations(state: ClusterState, service: ServiceInfo, policies: tuple[AuthorizationPolicy, ...],
                          trust_domain: str, notes: list[str]) -> list[Destination]:
    out: list[Destination] = []
    for port in service.ports:
        if port.protocol != "TCP":
            continue
        for vip in service.cluster_ips:
            backends = []
            for endpoint in state.endpoints(service, port, 6 if ":" in vip else 4):
                pod = state.pod_by_ip(endpoint.ip)
                if pod is None or not state.ambient_decision(pod)[0]:
                    notes.append(f"service {service} port {port.port}: endpoint {endpoint.ip} is not in the mesh "
                                 "and is left out")
                    continue
                backends.append(Backend(str(pod), endpoint.ip, endpoint.target_port,
                                        ClusterState.identity(pod, trust_domain)))
            if not backends:
                notes.append(f"service {service} port {port.port} has no ready endpoint in the mesh: 503")
            out.append(Destination(vip, port.port, f"service {service}", port_protocol(port.name), tuple(backends),
                                   policies))
    return out


def _workload_destinations(state: ClusterState, pod: PodInfo, policies: tuple[AuthorizationPolicy, ...],
                           trust_domain: str, notes: list[str]) -> list[Destination]:
    ports: list[ContainerPort] = [p for p in pod.container_ports if p.protocol == "TCP"]
    if not ports:
        notes.append(f"pod {pod} declares no container port: traffic to its IP through the waypoint is refused")
    identity = ClusterState.identity(pod, trust_domain)
    return [Destination(ip, port.port, f"pod {pod}", port_protocol(port.name),
                        (Backend(str(pod), ip, port.port, identity),), policies)
            for port in ports for ip in pod.ips]
