"""Where an outbound connection goes (agent/proxy/routing.py), one table per route.

The cluster: namespace `shop` in the mesh and `legacy` outside it; the client
pod and web-0 on node1 (this node), web-1 on node2; Services pointing at one
of them or at nothing ready. Each row is one connection the client makes and
what OutboundRouter.plan must answer. The waypoint hand-off has its label
matrix in test_waypoint_selection.py; its table here covers the route itself.
"""
from __future__ import annotations

from typing import Any

import pytest

from ambit.agent.discovery.attribution import Attributor
from ambit.agent.discovery.state import ClusterState
from ambit.agent.identity.spiffe import SpiffeId
from ambit.agent.proxy.routing import OutboundRouter, Route
from ambit.agent.workload import PodRef

TD = "cluster.local"
NODE = "node1"
CLIENT, WEB0, WEB1, LEGACY, OPTED_OUT, NOT_READY = "10.1.1.2", "10.1.1.3", "10.1.2.3", "10.1.2.4", "10.1.1.5", "10.1.2.6"
WP = "10.1.2.9"
VIP_WEB0, VIP_WEB1, VIP_LEGACY, VIP_EMPTY, VIP_BOTH, VIP_WAYPOINTED = (f"10.96.0.{n}" for n in (10, 11, 12, 13, 14, 15))
OUTSIDE = "192.0.2.7"  # no pod, no Service: outside the cluster
WEB = SpiffeId(TD, "shop", "web")


def namespace(name: str, ambient: bool) -> dict[str, Any]:
    labels = {"istio.io/dataplane-mode": "ambient"} if ambient else {}
    return {"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": name, "labels": labels}}


def pod(name: str, ip: str, node: str, *, ns: str = "shop", sa: str = "web", ready: bool = True,
        **labels: str) -> dict[str, Any]:
    return {"kind": "Pod", "apiVersion": "v1", "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"nodeName": node, "serviceAccountName": sa,
                     "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": ip,
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def service(name: str, vip: str, selector: dict[str, str], *, ns: str = "shop", **labels: str) -> dict[str, Any]:
    return {"kind": "Service", "apiVersion": "v1", "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"clusterIP": vip, "selector": selector,
                     "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}


OBJECTS = [
    namespace("shop", ambient=True), namespace("legacy", ambient=False),
    pod("client-0", CLIENT, "node1", sa="client", app="client"),
    pod("web-0", WEB0, "node1", app="web", instance="web-0"),
    pod("web-1", WEB1, "node2", app="web", instance="web-1"),
    pod("opted-out", OPTED_OUT, "node1", app="opted-out", **{"istio.io/dataplane-mode": "none"}),
    pod("not-ready", NOT_READY, "node2", app="not-ready", ready=False),
    pod("probe-0", LEGACY, "node2", ns="legacy", sa="probe", app="probe"),
    pod("waypoint-0", WP, "node2", sa="waypoint", **{"gateway.networking.k8s.io/gateway-name": "waypoint",
                                                    "istio.io/dataplane-mode": "none"}),
    {"kind": "Gateway", "apiVersion": "gateway.networking.k8s.io/v1",
     "metadata": {"name": "waypoint", "namespace": "shop"}, "spec": {"gatewayClassName": "istio-waypoint"}},
    service("web0", VIP_WEB0, {"instance": "web-0"}),
    service("web1", VIP_WEB1, {"instance": "web-1"}),
    service("both", VIP_BOTH, {"app": "web"}),
    service("empty", VIP_EMPTY, {"app": "not-ready"}),
    service("probe", VIP_LEGACY, {"app": "probe"}, ns="legacy"),
    service("waypointed", VIP_WAYPOINTED, {"instance": "web-1"}, **{"istio.io/use-waypoint": "waypoint"}),
]


@pytest.fixture(scope="module")
def router() -> OutboundRouter:
    """node1's router; the client is its enrolled pod (enrolment records by address)."""
    state = ClusterState()
    for obj in OBJECTS:
        assert state.apply("ADDED", obj), obj
    records = {CLIENT: PodRef("shop", "client-0")}
    return OutboundRouter(state, NODE, TD, Attributor(state, NODE, records.get))


def plan(router: OutboundRouter, dst: str, port: int, client: str = CLIENT):
    return router.plan_for(client, dst, port, dry_run=True)


# (case, dialled ip, port, endpoint ip, endpoint port, service)
LOCAL = [
    ("a pod on this node by its IP", WEB0, 8080, WEB0, 8080, None),
    ("a Service whose endpoint is on this node: the named targetPort resolved", VIP_WEB0, 80, WEB0, 8080, "shop/web0"),
]


@pytest.mark.parametrize("case, dst, port, ip, target, svc", LOCAL, ids=[c[0] for c in LOCAL])
def test_local(router, case, dst, port, ip, target, svc):
    p = plan(router, dst, port)
    assert (p.route, p.dst_ip, p.dst_port, p.service) == (Route.LOCAL, ip, target, svc), p.reason
    assert p.destination_identity == WEB and p.source_identity == SpiffeId(TD, "shop", "client")


HBONE = [
    ("a pod on another node by its IP", WEB1, 8080, WEB1, 8080, None),
    ("a Service whose endpoint is on another node", VIP_WEB1, 80, WEB1, 8080, "shop/web1"),
]


@pytest.mark.parametrize("case, dst, port, ip, target, svc", HBONE, ids=[c[0] for c in HBONE])
def test_hbone(router, case, dst, port, ip, target, svc):
    p = plan(router, dst, port)
    assert (p.route, p.dst_ip, p.dst_port, p.service) == (Route.HBONE, ip, target, svc), p.reason
    # to the endpoint's own 15008, CONNECT naming the endpoint, expecting its identity
    assert (p.next_hop_ip, p.authority, p.destination_identity) == (ip, f"{ip}:{target}", WEB)


PASSTHROUGH = [
    ("an address outside the cluster", OUTSIDE, 443, OUTSIDE, 443, "not a known pod"),
    ("a pod in a namespace outside the mesh", LEGACY, 8080, LEGACY, 8080, "not in the mesh"),
    ("a pod that opts out by label", OPTED_OUT, 8080, OPTED_OUT, 8080, "not in the mesh"),
    ("a Service whose endpoint is outside the mesh", VIP_LEGACY, 80, LEGACY, 8080, "not in the mesh"),
    ("a Service VIP on a port it does not declare: just an address", VIP_WEB1, 81, VIP_WEB1, 81, "not a known pod"),
]


@pytest.mark.parametrize("case, dst, port, ip, target, why", PASSTHROUGH, ids=[c[0] for c in PASSTHROUGH])
def test_passthrough(router, case, dst, port, ip, target, why):
    """Plain TCP from the client's own address, as if there were no mesh: no identity is expected."""
    p = plan(router, dst, port)
    assert (p.route, p.dst_ip, p.dst_port) == (Route.PASSTHROUGH, ip, target), p.reason
    assert why in p.reason and p.destination_identity is None


REFUSE = [
    ("a client this node did not enrol: no identity to present", "10.1.1.99", WEB1, 8080,
     "not a pod enrolled on this node"),
    ("a client discovery knows but this node did not enrol: its address is no identity", WEB0, WEB1, 8080,
     "not a pod enrolled on this node"),
    ("a Service without a ready endpoint", CLIENT, VIP_EMPTY, 80, "no ready endpoint"),
]


@pytest.mark.parametrize("case, client, dst, port, why", REFUSE, ids=[c[0] for c in REFUSE])
def test_refuse(router, case, client, dst, port, why):
    """Fail closed: the client is reset, nothing is sent in plaintext."""
    p = plan(router, dst, port, client=client)
    assert p.route is Route.REFUSE and why in p.reason, p.reason


WAYPOINT = [
    ("a Service labelled with a waypoint: CONNECT names the VIP as dialled", VIP_WAYPOINTED, 80),
]


@pytest.mark.parametrize("case, dst, port", WAYPOINT, ids=[c[0] for c in WAYPOINT])
def test_waypoint(router, case, dst, port):
    p = plan(router, dst, port)
    assert (p.route, p.waypoint, p.next_hop_ip, p.authority) == (Route.WAYPOINT, "shop/waypoint", WP,
                                                                  f"{dst}:{port}"), p.reason
    assert p.destination_identity == SpiffeId(TD, "shop", "waypoint")


def test_a_service_spreads_evenly_and_a_dry_run_does_not_move_the_spread(router):
    first = router.plan_for(CLIENT, VIP_BOTH, 80, dry_run=True)
    assert router.plan_for(CLIENT, VIP_BOTH, 80, dry_run=True).dst_ip == first.dst_ip  # peeking changes nothing
    picked = [router.plan_for(CLIENT, VIP_BOTH, 80).dst_ip for _ in range(4)]
    assert picked[0] == first.dst_ip and sorted(picked) == sorted([WEB0, WEB1] * 2)
    assert {router.plan_for(CLIENT, VIP_BOTH, 80).route for _ in range(2)} == {Route.LOCAL, Route.HBONE}


def test_identities_are_made_once_per_service_account_and_follow_a_changed_one(monkeypatch):
    """The router keeps each SPIFFE ID it made (per namespace and service
    account, bounded): a pod whose service account changes gets the new one, a
    full cache starts again, and a name SpiffeId refuses is refused every time."""
    from ambit.agent.discovery.model import PodInfo
    from ambit.agent.proxy import routing

    state = ClusterState()
    router = OutboundRouter(state, NODE, TD)
    made = []
    real = ClusterState.identity
    monkeypatch.setattr(ClusterState, "identity", staticmethod(lambda pod, td: made.append(pod) or real(pod, td)))
    web = PodInfo("shop", "web-0", service_account="web")
    first = router.identity(web)
    assert first == WEB and router.identity(PodInfo("shop", "web-1", service_account="web")) is first
    assert len(made) == 1
    assert router.identity(PodInfo("shop", "web-0", service_account="")) == SpiffeId(TD, "shop", "default")
    assert router.identity(PodInfo("shop", "web-0", service_account="api")) == SpiffeId(TD, "shop", "api")
    assert router.identity(PodInfo("other", "web-0", service_account="web")) == SpiffeId(TD, "other", "web")
    assert len(made) == 4
    monkeypatch.setattr(routing, "MAX_CACHED_IDENTITIES", 4)
    router.identity(PodInfo("shop", "x", service_account="five"))  # full: emptied, then kept
    assert router.identity(web) == WEB and len(made) == 6
    for _ in range(2):
        with pytest.raises(ValueError):
            router.identity(PodInfo("shop", "bad", service_account="no/slash"))
