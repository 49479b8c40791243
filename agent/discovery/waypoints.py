"""Which waypoint, if any, stands in front of a Service or a pod: Istio's rules.

istiod computes this for ztunnel (the `waypoint` of each Service and
Workload); ambit reads the same labels from its cluster state:

- `istio.io/use-waypoint: <name>` on the Service (for traffic dialled to the
  Service) or on the Pod (for traffic dialled to the pod's own IP); an object
  without the label inherits its Namespace's. `none` opts the object out,
  whatever its namespace says.
- `istio.io/use-waypoint-namespace: <ns>` on the same object names the
  waypoint's namespace (default: the labelled object's own namespace).
- The waypoint is the Gateway of that namespace and name with class
  istio-waypoint. Its `istio.io/waypoint-for` label says which traffic it
  takes: service (the default), workload, all, none. A reference to a missing
  Gateway, or to one not for that kind of traffic, attaches nothing (istiod
  reports it on the object's status and traffic goes direct).
- Its instances are the pods its Service selects
  (`gateway.networking.k8s.io/gateway-name: <name>` in its namespace).
  Traffic from an instance of the waypoint never goes back through it: a
  waypoint must be able to reach what it stands in front of.

Pure: reads the state, decides, explains (every answer carries a reason).
"""
from __future__ import annotations

import enum
from collections.abc import Hashable, Mapping
from dataclasses import dataclass

from .balance import EvenSpread
from .model import PodInfo, ServiceInfo
from .state import GATEWAY_NAME_LABEL, ClusterState

USE_WAYPOINT_LABEL = "istio.io/use-waypoint"
USE_WAYPOINT_NAMESPACE_LABEL = "istio.io/use-waypoint-namespace"
WAYPOINT_FOR_LABEL = "istio.io/waypoint-for"
WAYPOINT_GATEWAY_CLASS = "istio-waypoint"
OPT_OUT = "none"


class WaypointFor(enum.Enum):
    """The Gateway's `istio.io/waypoint-for`: which traffic the waypoint takes."""

    SERVICE = "service"
    WORKLOAD = "workload"
    ALL = "all"
    NONE = "none"

    @property
    def takes_services(self) -> bool:
        return self in (WaypointFor.SERVICE, WaypointFor.ALL)

    @property
    def takes_workloads(self) -> bool:
        return self in (WaypointFor.WORKLOAD, WaypointFor.ALL)


@dataclass(frozen=True)
class Waypoint:
    namespace: str
    name: str
    takes: WaypointFor = WaypointFor.SERVICE

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def __str__(self) -> str:
        return self.key


@dataclass(frozen=True)
class WaypointChoice:
    """The answer for one Service or pod: the waypoint (None: direct) and why."""

    waypoint: Waypoint | None
    reason: str


@dataclass(frozen=True)
class _Request:
    """What the labels ask for, before the Gateway is looked up."""

    namespace: str
    name: str
    where: str  # "service shop/web", "namespace shop": whose label it is


class WaypointResolver:
    """Istio's waypoint attachment over a ClusterState; one per proxy."""

    def __init__(self, state: ClusterState) -> None:
        self.state = state
        self.spread = EvenSpread()  # over a waypoint's instances (candidates() names the key)

    # -- the Gateway ------------------------------------------------------------------------
    def waypoint(self, namespace: str, name: str) -> tuple[Waypoint | None, str]:
        """The waypoint Gateway `namespace/name`, or None and why not."""
        gateway = self.state.gateway(namespace, name)
        if gateway is None:
            return None, f"waypoint {namespace}/{name} does not exist (no Gateway)"
        if gateway.gateway_class != WAYPOINT_GATEWAY_CLASS:
            return None, (f"Gateway {namespace}/{name} has class {gateway.gateway_class or '(none)'}, "
                          f"not {WAYPOINT_GATEWAY_CLASS}")
        raw = gateway.labels.get(WAYPOINT_FOR_LABEL, WaypointFor.SERVICE.value)
        try:
            takes = WaypointFor(raw)
        except ValueError:
            return None, f"waypoint {namespace}/{name} has an unknown {WAYPOINT_FOR_LABEL}={raw!r}"
        return Waypoint(namespace, name, takes), ""

    # -- attachment -------------------------------------------------------------------------
    def for_service(self, service: ServiceInfo) -> WaypointChoice:
        """The waypoint of traffic dialled to `service` (its VIP)."""
        request, why = self._requested(service.labels, service.namespace, f"service {service}")
        return self._attach(request, why, "services")

    def for_workload(self, pod: PodInfo) -> WaypointChoice:
        """The waypoint of traffic dialled to the pod's own IP."""
        request, why = self._requested(pod.labels, pod.namespace, f"pod {pod}")
        choice = self._attach(request, why, "workloads")
        if choice.waypoint is not None and self.is_instance(pod, choice.waypoint):
            return WaypointChoice(None, f"pod {pod} is an instance of waypoint {choice.waypoint} itself")
        return choice

    def _attach(self, request: _Request | None, why: str, traffic: str) -> WaypointChoice:
        """The requested waypoint if it exists and takes `traffic`
        ("services" or "workloads"); else no waypoint, and why."""
        if request is None:
            return WaypointChoice(None, why)
        waypoint, missing = self.waypoint(request.namespace, request.name)
        if waypoint is None:
            return WaypointChoice(None, f"{missing}; {request.where} asks for it: traffic goes direct")
        takes = waypoint.takes.takes_services if traffic == "services" else waypoint.takes.takes_workloads
        if not takes:
            return WaypointChoice(None, f"waypoint {waypoint} is for {waypoint.takes.value} traffic, not {traffic} "
                                        f"({request.where} asks for it): traffic goes direct")
        return WaypointChoice(waypoint, f"{request.where} uses waypoint {waypoint}")

    def _requested(self, labels: Mapping[str, str], namespace: str, what: str) -> tuple[_Request | None, str]:
        name = labels.get(USE_WAYPOINT_LABEL)
        if name is not None:
            if name == OPT_OUT:
                return None, f"{what} opts out ({USE_WAYPOINT_LABEL}={OPT_OUT})"
            return _Request(labels.get(USE_WAYPOINT_NAMESPACE_LABEL) or namespace, name, what), ""
        ns = self.state.namespace(namespace)
        ns_labels = ns.labels if ns is not None else {}
        name = ns_labels.get(USE_WAYPOINT_LABEL)
        if name is None:
            return None, f"neither {what} nor namespace {namespace} has {USE_WAYPOINT_LABEL}"
        if name == OPT_OUT:
            return None, f"namespace {namespace} opts out ({USE_WAYPOINT_LABEL}={OPT_OUT})"
        return _Request(ns_labels.get(USE_WAYPOINT_NAMESPACE_LABEL) or namespace, name,
                        f"namespace {namespace} (label inherited by {what})"), ""

    # -- instances --------------------------------------------------------------------------
    @staticmethod
    def is_instance(pod: PodInfo, waypoint: Waypoint) -> bool:
        return pod.namespace == waypoint.namespace and pod.labels.get(GATEWAY_NAME_LABEL) == waypoint.name

    def instances(self, waypoint: Waypoint) -> list[PodInfo]:
        """The waypoint's pods that can take traffic now, in a stable order."""
        return [pod for pod in self.state.gateway_pods(waypoint.namespace, waypoint.name) if _serving(pod)]

    def pick_instance(self, waypoint: Waypoint, near_node: str, dry_run: bool = False) -> PodInfo | None:
        """An instance for one connection: one on `near_node` when there is
        one (Istio gives the waypoint's Service PreferClose traffic
        distribution), else spread evenly over all."""
        key, candidates = self.candidates(waypoint, near_node)
        choose = self.spread.peek if dry_run else self.spread.pick
        return choose(key, candidates)

    def candidates(self, waypoint: Waypoint, near_node: str) -> tuple[Hashable, list[PodInfo]]:
        """What pick_instance picks from, and its `spread` key: kept by a
        caller that caches them (the pick stays per connection)."""
        instances = self.instances(waypoint)
        close = [pod for pod in instances if pod.node_name == near_node]
        return ("waypoint", waypoint.namespace, waypoint.name, bool(close)), close or instances


def _serving(pod: PodInfo) -> bool:
    """Live, with an address, and ready (a pod without any status exists only
    in local files: take it as up, as ClusterState.endpoints does)."""
    if pod.deletion is not None or pod.terminated or pod.host_network or not pod.ips:
        return False
    return pod.phase == "" or (pod.phase == "Running" and pod.ready)
