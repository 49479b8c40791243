"""Which connections a node proxy hands to a waypoint, and which waypoint instance: Istio's labels as a table.

Each case is a small cluster (namespaces `shop` and `infra`, a client pod on
node1, web pods behind Service shop/web, waypoint Gateways and their pods)
with the labels under test, and one connection the client makes; the
expected route, the waypoint (if any), the CONNECT authority and the next
hop are what OutboundRouter.plan must answer.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from ambit.agent.discovery.waypoints import WaypointFor, WaypointResolver
from ambit.agent.identity.spiffe import SpiffeId
from ambit.agent.proxy.routing import OutboundPlan, OutboundRouter, Route
from ambit.waypoint.destinations import state_from_objects

TD = "cluster.local"
CLIENT = "10.1.1.2"
WEB0, WEB1 = "10.1.1.3", "10.1.2.3"  # node1, node2
WP_NODE2, WP_NODE1 = "10.1.2.9", "10.1.1.9"
INFRA_WP = "10.1.2.20"
VIP = "10.96.0.10"


def plan_from(router: OutboundRouter, client_ip: str, *dialled: Any, **options: Any) -> OutboundPlan:
    """The router's plan for a client pod (found by its address here; the
    proxy gives the pod its enrolment record names)."""
    client = router.state.pod_by_ip(client_ip)
    assert client is not None
    return router.plan(client, *dialled, **options)


def namespace(name: str, **labels: str) -> dict[str, Any]:
    return {"kind": "Namespace", "apiVersion": "v1",
            "metadata": {"name": name, "labels": {"istio.io/dataplane-mode": "ambient", **labels}}}


def pod(name: str, ip: str, node: str, ns: str = "shop", sa: str = "web", **labels: str) -> dict[str, Any]:
    return {"kind": "Pod", "apiVersion": "v1", "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"nodeName": node, "serviceAccountName": sa, "containers": [{"name": "c", "ports": [
                {"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}}


def waypoint_pod(name: str, ip: str, node: str, gateway: str = "waypoint", ns: str = "shop") -> dict[str, Any]:
    return pod(name, ip, node, ns, sa=gateway, **{"gateway.networking.k8s.io/gateway-name": gateway,
                                                  "istio.io/dataplane-mode": "none"})


def gateway(name: str = "waypoint", ns: str = "shop", waypoint_for: str | None = None,
            gateway_class: str = "istio-waypoint") -> dict[str, Any]:
    labels = {"istio.io/waypoint-for": waypoint_for} if waypoint_for else {}
    return {"kind": "Gateway", "apiVersion": "gateway.networking.k8s.io/v1",
            "metadata": {"name": name, "namespace": ns, "labels": labels}, "spec": {"gatewayClassName": gateway_class}}


def web_service(**labels: str) -> dict[str, Any]:
    return {"kind": "Service", "apiVersion": "v1", "metadata": {"name": "web", "namespace": "shop", "labels": labels},
            "spec": {"clusterIP": VIP, "selector": {"app": "web"},
                     "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}


def cluster(*, shop_ns: dict[str, str] | None = None, service: dict[str, str] | None = None,
            web: dict[str, str] | None = None, extra: list[dict[str, Any]] | None = None,
            waypoint_for: str | None = None, with_gateway: bool = True) -> list[dict[str, Any]]:
    objects = [namespace("shop", **(shop_ns or {})), namespace("infra"),
               pod("client-0", CLIENT, "node1", sa="client", app="client"),
               pod("web-0", WEB0, "node1", app="web", **(web or {})), pod("web-1", WEB1, "node2", app="web"),
               web_service(**(service or {})), waypoint_pod("waypoint-0", WP_NODE2, "node2")]
    if with_gateway:
        objects.append(gateway(waypoint_for=waypoint_for))
    return objects + (extra or [])


USE = "istio.io/use-waypoint"
USE_NS = "istio.io/use-waypoint-namespace"

# (case, objects, dialled address, expected route, waypoint, next hop)
CASES = [
    ("service label -> its waypoint, authority is the VIP as dialled",
     cluster(service={USE: "waypoint"}), (VIP, 80), Route.WAYPOINT, "shop/waypoint", WP_NODE2),
    ("service inherits the namespace label",
     cluster(shop_ns={USE: "waypoint"}), (VIP, 80), Route.WAYPOINT, "shop/waypoint", WP_NODE2),
    ("service label none opts out of the namespace's waypoint",
     cluster(shop_ns={USE: "waypoint"}, service={USE: "none"}), (VIP, 80), None, None, None),
    ("namespace label none, service label wins",
     cluster(shop_ns={USE: "none"}, service={USE: "waypoint"}), (VIP, 80), Route.WAYPOINT, "shop/waypoint", WP_NODE2),
    ("no label anywhere: direct",
     cluster(), (VIP, 80), None, None, None),
    ("waypoint-for workload does not take service traffic",
     cluster(service={USE: "waypoint"}, waypoint_for="workload"), (VIP, 80), None, None, None),
    ("waypoint-for all takes service traffic",
     cluster(service={USE: "waypoint"}, waypoint_for="all"), (VIP, 80), Route.WAYPOINT, "shop/waypoint", WP_NODE2),
    ("waypoint-for none takes nothing",
     cluster(service={USE: "waypoint"}, waypoint_for="none"), (VIP, 80), None, None, None),
    ("an unknown waypoint-for value attaches nothing",
     cluster(service={USE: "waypoint"}, waypoint_for="everything"), (VIP, 80), None, None, None),
    ("pod label, waypoint for workloads, dialled by pod IP",
     cluster(web={USE: "waypoint"}, waypoint_for="workload"), (WEB0, 8080), Route.WAYPOINT, "shop/waypoint",
     WP_NODE2),
    ("pod label, waypoint for services only: pod IP traffic goes direct",
     cluster(web={USE: "waypoint"}), (WEB0, 8080), None, None, None),
    ("namespace label reaches pods too (waypoint-for all)",
     cluster(shop_ns={USE: "waypoint"}, waypoint_for="all"), (WEB1, 8080), Route.WAYPOINT, "shop/waypoint", WP_NODE2),
    ("pod label none opts the pod out of the namespace's waypoint",
     cluster(shop_ns={USE: "waypoint"}, web={USE: "none"}, waypoint_for="all"), (WEB0, 8080), None, None, None),
    ("service-addressed traffic ignores the endpoint's workload waypoint",
     cluster(web={USE: "waypoint"}, waypoint_for="workload"), (VIP, 80), None, None, None),
    ("cross-namespace waypoint via use-waypoint-namespace",
     cluster(service={USE: "shared", USE_NS: "infra"},
             extra=[gateway("shared", "infra"), waypoint_pod("shared-0", INFRA_WP, "node2", "shared", "infra")]),
     (VIP, 80), Route.WAYPOINT, "infra/shared", INFRA_WP),
    ("cross-namespace: without use-waypoint-namespace the name is looked up in the service's namespace",
     cluster(service={USE: "shared"}, extra=[gateway("shared", "infra"),
                                             waypoint_pod("shared-0", INFRA_WP, "node2", "shared", "infra")]),
     (VIP, 80), None, None, None),
    ("namespace's use-waypoint-namespace applies with its label",
     cluster(shop_ns={USE: "shared", USE_NS: "infra"},
             extra=[gateway("shared", "infra"), waypoint_pod("shared-0", INFRA_WP, "node2", "shared", "infra")]),
     (VIP, 80), Route.WAYPOINT, "infra/shared", INFRA_WP),
    ("a Gateway of another class is not a waypoint",
     cluster(service={USE: "gw"}, extra=[gateway("gw", gateway_class="istio")]), (VIP, 80), None, None, None),
    ("a missing Gateway attaches nothing (Istio reports it; traffic goes direct)",
     cluster(service={USE: "waypoint"}, with_gateway=False), (VIP, 80), None, None, None),
    ("a waypoint without a ready instance refuses the connection",
     [o for o in cluster(service={USE: "waypoint"}) if o["metadata"]["name"] != "waypoint-0"], (VIP, 80),
     Route.REFUSE, None, None),
    ("an instance on the client's node is preferred (PreferClose)",
     cluster(service={USE: "waypoint"}, extra=[waypoint_pod("waypoint-1", WP_NODE1, "node1")]), (VIP, 80),
     Route.WAYPOINT, "shop/waypoint", WP_NODE1),
]


@pytest.mark.parametrize("objects, dialled, route, waypoint, next_hop", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_waypoint_selection(objects: list[dict[str, Any]], dialled: tuple[str, int], route: Route | None,
                            waypoint: str | None, next_hop: str | None) -> None:
    router = OutboundRouter(state_from_objects(objects), "node1", TD)
    plan = plan_from(router, CLIENT, *dialled)
    if route is None:  # direct: the usual L4 routes, to an endpoint
        assert plan.route in (Route.LOCAL, Route.HBONE), plan.reason
        assert plan.waypoint is None and plan.via_ip is None
        assert plan.dst_ip in (WEB0, WEB1) and plan.next_hop_ip == plan.dst_ip
        return
    assert plan.route is route, plan.reason
    assert plan.waypoint == waypoint or (route is Route.REFUSE and "no ready instance" in plan.reason)
    if route is Route.WAYPOINT:
        assert (plan.dst_ip, plan.dst_port) == dialled and plan.authority == f"{dialled[0]}:{dialled[1]}"
        assert plan.next_hop_ip == next_hop
        ns, name = waypoint.split("/")
        assert plan.destination_identity == SpiffeId(TD, ns, name)  # the waypoint's, not the endpoint's
        assert plan.source_identity == SpiffeId(TD, "shop", "client")


def test_traffic_from_the_waypoint_itself_never_loops_back_to_it() -> None:
    """Even if a waypoint instance's own connections were captured (Istio
    keeps waypoints out of the mesh), the router sends them straight on."""
    objects = cluster(shop_ns={USE: "waypoint"}, waypoint_for="all")
    router = OutboundRouter(state_from_objects(objects), "node2", TD)
    for dialled in ((VIP, 80), (WEB0, 8080)):
        assert plan_from(router, CLIENT, *dialled).route is Route.WAYPOINT
        from_waypoint = plan_from(router, WP_NODE2, *dialled)
        assert from_waypoint.route in (Route.LOCAL, Route.HBONE) and from_waypoint.waypoint is None


def test_a_waypoint_instance_has_no_waypoint_of_its_own() -> None:
    state = state_from_objects(cluster(shop_ns={USE: "waypoint"}, waypoint_for="all"))
    resolver = WaypointResolver(state)
    instance = state.pod("shop", "waypoint-0")
    assert instance is not None
    choice = resolver.for_workload(instance)
    assert choice.waypoint is None and "instance of waypoint shop/waypoint itself" in choice.reason


def test_reasons_say_whose_label_it_was() -> None:
    state = state_from_objects(cluster(shop_ns={USE: "waypoint"}, service={USE: "none"}))
    resolver = WaypointResolver(state)
    web = state.service("shop", "web")
    assert web is not None
    assert resolver.for_service(web).reason == "service shop/web opts out (istio.io/use-waypoint=none)"
    web0 = state.pod("shop", "web-0")
    assert web0 is not None
    assert "not workloads" in resolver.for_workload(web0).reason  # inherited, but for services only
    assert resolver.waypoint("shop", "waypoint")[0].takes is WaypointFor.SERVICE  # the default


def test_instances_spread_evenly_when_none_is_close() -> None:
    objects = cluster(service={USE: "waypoint"}, extra=[waypoint_pod("waypoint-1", "10.1.2.10", "node2")])
    router = OutboundRouter(state_from_objects(objects), "node1", TD)
    hops = [plan_from(router, CLIENT, VIP, 80).next_hop_ip for _ in range(4)]
    assert Counter(hops) == {WP_NODE2: 2, "10.1.2.10": 2}
    assert plan_from(router, CLIENT, VIP, 80, dry_run=True).next_hop_ip == plan_from(router, CLIENT, VIP, 80).next_hop_ip


def test_unready_and_deleted_instances_take_no_traffic() -> None:
    objects = cluster(service={USE: "waypoint"})
    for obj in objects:
        if obj["metadata"]["name"] == "waypoint-0":
            obj["status"]["conditions"][0]["status"] = "False"
    plan = plan_from(OutboundRouter(state_from_objects(objects), "node1", TD), CLIENT, VIP, 80)
    assert plan.route is Route.REFUSE and plan.waypoint == "shop/waypoint"
