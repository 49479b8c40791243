"""OutboundRouter remembers plans (agent/proxy/routing.py): a remembered plan
is given only while nothing it was made from changed. Each kind of change
that can alter a plan is made here once and must be seen on the next
connection; refusals where the agent cannot decide stay exactly as without
the cache; a Service's endpoint is still picked per connection."""
from __future__ import annotations

import copy
from typing import Any

import pytest

from ambit.agent.discovery.attribution import Attributor
from ambit.agent.discovery.state import ClusterState
from ambit.agent.proxy.routing import OutboundRouter, Route
from ambit.agent.workload import PodRef

from .test_discovery_state import endpoint_slice
from .test_routing import (CLIENT, LEGACY, NODE, OBJECTS, OUTSIDE, TD, VIP_BOTH, VIP_WAYPOINTED, VIP_WEB1, WEB0,
                           WEB1, WP, namespace, pod, service)

UNENROLLED = "10.1.1.40"  # on this node, no record
GHOST = "10.1.1.41"  # enrolled here, a pod discovery does not know


@pytest.fixture
def setup() -> tuple[OutboundRouter, ClusterState, dict[str, PodRef]]:
    state = ClusterState()
    for obj in copy.deepcopy(OBJECTS):
        assert state.apply("ADDED", obj), obj
    records = {CLIENT: PodRef("shop", "client-0"), GHOST: PodRef("shop", "ghost")}
    return OutboundRouter(state, NODE, TD, Attributor(state, NODE, records.get)), state, records


def connect(router: OutboundRouter, dst: str, port: int = 8080, client: str = CLIENT) -> Any:
    return router.plan_for(client, dst, port)


def test_a_remembered_plan_is_given_again_while_nothing_changed(setup):
    router, _, _ = setup
    first = connect(router, WEB1)
    assert first.route is Route.HBONE and connect(router, WEB1) is first


CHANGES = [
    ("the destination pod moves to this node", WEB1, 8080,
     lambda s, r: s.apply("MODIFIED", pod("web-1", WEB1, "node1", app="web", instance="web-1")), Route.LOCAL),
    ("the destination pod leaves the mesh (its label)", WEB1, 8080,
     lambda s, r: s.apply("MODIFIED", pod("web-1", WEB1, "node2", app="web", instance="web-1",
                                          **{"istio.io/dataplane-mode": "none"})), Route.PASSTHROUGH),
    ("the destination pod is deleted", WEB1, 8080,
     lambda s, r: s.apply("DELETED", pod("web-1", WEB1, "node2")), Route.PASSTHROUGH),
    ("the namespace of a destination joins the mesh", LEGACY, 8080,
     lambda s, r: s.apply("MODIFIED", namespace("legacy", ambient=True)), Route.HBONE),
    ("a Service appears at the address", "10.96.0.99", 80,
     lambda s, r: s.apply("ADDED", service("new", "10.96.0.99", {"instance": "web-0"})), Route.LOCAL),
    ("the Service's selector changes", VIP_WEB1, 80,
     lambda s, r: s.apply("MODIFIED", service("web1", VIP_WEB1, {"instance": "web-0"})), Route.LOCAL),
    ("the Service gets EndpointSlices", VIP_WEB1, 80,
     lambda s, r: s.apply("ADDED", endpoint_slice("web1-a", "web1", ports=[("http", 8080)],
                                                  endpoints=[(WEB0, True, "node1")], ns="shop")),
     Route.LOCAL),
    ("the Service is labelled with a waypoint", VIP_WEB1, 80,
     lambda s, r: s.apply("MODIFIED", service("web1", VIP_WEB1, {"instance": "web-1"},
                                              **{"istio.io/use-waypoint": "waypoint"})), Route.WAYPOINT),
    ("the waypoint's Gateway goes", VIP_WAYPOINTED, 80,
     lambda s, r: s.apply("DELETED", {"kind": "Gateway", "apiVersion": "gateway.networking.k8s.io/v1",
                                      "metadata": {"name": "waypoint", "namespace": "shop"}}), Route.HBONE),
    ("the waypoint's only instance goes", VIP_WAYPOINTED, 80,
     lambda s, r: s.apply("DELETED", pod("waypoint-0", WP, "node2")), Route.REFUSE),
    ("the destination address is enrolled here for a pod discovery does not know", OUTSIDE, 8080,
     lambda s, r: r.__setitem__(OUTSIDE, PodRef("shop", "unknown")), Route.REFUSE),
    ("the client is released", WEB1, 8080, lambda s, r: r.pop(CLIENT), Route.REFUSE),
    ("the client's address is enrolled for another pod", WEB1, 8080,
     lambda s, r: r.__setitem__(CLIENT, PodRef("shop", "web-0")), Route.REFUSE),
]


@pytest.mark.parametrize("case, dst, port, change, after", CHANGES, ids=[c[0] for c in CHANGES])
def test_each_kind_of_change_is_seen_by_the_next_connection(setup, case, dst, port, change, after):
    router, state, records = setup
    before = connect(router, dst, port)
    assert connect(router, dst, port) is before or before.route is Route.WAYPOINT  # remembered
    change(state, records)
    now = connect(router, dst, port)
    fresh = OutboundRouter(state, NODE, TD, Attributor(state, NODE, records.get)).plan_for(CLIENT, dst, port,
                                                                                          dry_run=True)
    assert now.route is after and now.route is not before.route, (before.reason, now.reason)
    assert (now.route, now.reason, now.dst_ip, now.fail_closed) == (fresh.route, fresh.reason, fresh.dst_ip,
                                                                    fresh.fail_closed)


def test_a_policy_change_is_no_plan_change_but_is_seen_anyway(setup):
    """Plans carry no policy fact; any stored change moves the generation all the same."""
    router, state, _ = setup
    connect(router, WEB1)
    generation = state.generation
    state.apply("ADDED", {"kind": "AuthorizationPolicy", "apiVersion": "security.istio.io/v1",
                          "metadata": {"name": "deny", "namespace": "shop"}, "spec": {"action": "DENY", "rules": [{}]}})
    assert state.generation > generation


@pytest.mark.parametrize("client, why", [(UNENROLLED, "not a pod enrolled on this node"),
                                          (GHOST, "a pod discovery does not know")])
def test_a_client_without_a_fitting_record_is_refused_every_time_and_never_remembered(setup, client, why):
    router, _, _ = setup
    for _ in range(3):
        p = connect(router, WEB1, client=client)
        assert p.route is Route.REFUSE and p.fail_closed == "unknown_source" and why in p.reason
    assert router._plans == {}


def test_an_unknown_destination_stays_refused(setup):
    router, _, _ = setup
    for _ in range(3):
        p = connect(router, GHOST)
        assert p.route is Route.REFUSE and p.fail_closed == "unknown_destination", p.reason


def test_the_endpoint_of_a_service_is_picked_per_connection(setup):
    router, _, _ = setup
    picked = [connect(router, VIP_BOTH, 80).dst_ip for _ in range(6)]
    assert sorted(picked) == sorted([WEB0, WEB1] * 3) and picked[0] != picked[1]
    assert len(router._plans) == 1
    assert [connect(router, VIP_BOTH, 80).route for _ in range(2)] in ([Route.LOCAL, Route.HBONE],
                                                                       [Route.HBONE, Route.LOCAL])


def test_the_cache_is_bounded_in_plans(setup):
    router, _, _ = setup
    router.max_cached_plans = 3
    for port in range(1, 10):
        connect(router, WEB1, port)
    assert len(router._plans) == 3 and router._cached_slots == 3
    assert [key[2] for key in router._plans] == [7, 8, 9]  # the oldest went
    connect(router, VIP_BOTH, 80)  # two endpoints: two slots
    assert router._cached_slots <= 3 and (CLIENT, VIP_BOTH, 80) in router._plans
