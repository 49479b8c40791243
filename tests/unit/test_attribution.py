"""Destination attribution and what the proxy's decisions make of it: an
address is the pod its enrolment record names (with the pod object's labels),
else the pod discovery says holds it; anything else is an unknown destination,
denied (ztunnel's rule), never evaluated as a workload without namespace."""
from __future__ import annotations

from typing import Any

from ambit.agent.discovery.attribution import Attributor
from ambit.agent.discovery.state import ClusterState
from ambit.agent.identity.spiffe import SpiffeId
from ambit.agent.policy.authz import UNKNOWN_DESTINATION, UNKNOWN_SOURCE, PolicyEngine
from ambit.agent.policy.enforce import Authorizer
from ambit.agent.policy.peerauth import PeerAuthenticationPolicy
from ambit.agent.proxy.routing import OutboundRouter, Route
from ambit.agent.workload import PodRef

NODE = "node1"


def namespace(name: str, ambient: bool = True) -> dict[str, Any]:
    labels = {"istio.io/dataplane-mode": "ambient"} if ambient else {}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def pod(ns: str, name: str, ip: str | None, *, node: str = NODE, labels: dict[str, str] | None = None,
        uid: str | None = None, sa: str = "web") -> dict[str, Any]:
    obj: dict[str, Any] = {"apiVersion": "v1", "kind": "Pod",
                           "metadata": {"name": name, "namespace": ns, "uid": uid or f"uid-{name}",
                                        "labels": labels or {}},
                           "spec": {"nodeName": node, "serviceAccountName": sa,
                                    "containers": [{"name": "main", "image": "app"}]},
                           "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}
    if ip is not None:
        obj["status"].update(podIP=ip, podIPs=[{"ip": ip}])
    return obj


def strict(ns: str) -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": "strict", "namespace": ns}, "spec": {"mtls": {"mode": "STRICT"}}}


def deny_selected(ns: str, app: str) -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": f"deny-{app}", "namespace": ns},
            "spec": {"action": "DENY", "selector": {"matchLabels": {"app": app}}, "rules": [{}]}}


class Mesh:
    """A cluster state, this node's enrolment records by address, and the decisions built on them."""

    def __init__(self, *objects: dict[str, Any]) -> None:
        self.peer_authentication = PeerAuthenticationPolicy("istio-system")
        self.engine = PolicyEngine("istio-system", peer_authentication=self.peer_authentication)
        self.state = ClusterState(self.engine, self.peer_authentication)
        for obj in objects:
            self.state.apply("ADDED", obj)
        self.records: dict[str, PodRef] = {}
        self.attributor = Attributor(self.state, NODE, self.records.get)
        self.authorizer = Authorizer(self.state, self.engine, self.attributor)
        self.router = OutboundRouter(self.state, NODE, "cluster.local", self.attributor)

    def enrol(self, ip: str, ns: str, name: str, uid: str | None = None) -> None:
        self.records[ip] = PodRef(ns, name, uid or f"uid-{name}")

    def plaintext(self, dst_ip: str, port: int = 8080):
        return self.authorizer.check(source_ip="10.0.9.9", source_identity=None, dst_ip=dst_ip, dst_port=port)


def test_an_enrolled_pod_whose_address_discovery_lacks_is_its_record_with_the_pod_objects_labels():
    mesh = Mesh(namespace("shop"), pod("shop", "web-0", None, labels={"app": "web"}))
    mesh.enrol("10.1.0.5", "shop", "web-0")

    found = mesh.attributor.attribute("10.1.0.5")

    assert found.pod is not None and (found.pod.namespace, found.pod.name) == ("shop", "web-0")
    assert found.pod.labels == {"app": "web"} and found.enrolled and found.reason == "enrolment record"


def test_the_record_wins_over_a_stale_pod_object_that_still_lists_the_address():
    mesh = Mesh(namespace("shop"), pod("shop", "old", "10.1.0.5", labels={"app": "old"}),
                pod("shop", "new", None, labels={"app": "new"}))
    mesh.enrol("10.1.0.5", "shop", "new")

    assert mesh.attributor.attribute("10.1.0.5").pod.name == "new"
    # Its policies are the new pod's: a DENY selecting app=new applies, one selecting app=old does not.
    mesh.state.apply("ADDED", deny_selected("shop", "new"))
    assert mesh.plaintext("10.1.0.5").reason == "denied by shop/deny-new rule 0"


def test_an_enrolled_address_is_unattributed_when_discovery_contradicts_or_lacks_its_pod():
    mesh = Mesh(namespace("shop"),
                pod("shop", "recreated", None, uid="uid-now"),
                pod("shop", "moved", None, node="node2"),
                pod("shop", "renumbered", "10.1.0.99"))
    cases = {"10.1.0.1": ("ghost", None, "a pod discovery does not know"),
             "10.1.0.2": ("recreated", "uid-before", "is uid uid-now"),
             "10.1.0.3": ("moved", None, "on node node2"),
             "10.1.0.4": ("renumbered", None, "the address(es) 10.1.0.99")}
    for ip, (name, uid, _) in cases.items():
        mesh.enrol(ip, "shop", name, uid)

    for ip, (name, _, why) in cases.items():
        found = mesh.attributor.attribute(ip)
        assert found.pod is None and found.enrolled, ip
        assert f"enrolled on this node as shop/{name}" in found.reason and why in found.reason, found.reason


def test_other_addresses_are_what_discovery_says_or_nobody():
    mesh = Mesh(namespace("shop"), pod("shop", "remote", "10.2.0.7", node="node2"))

    remote = mesh.attributor.attribute("10.2.0.7")
    nobody = mesh.attributor.attribute("10.9.9.9")

    assert remote.pod.name == "remote" and not remote.enrolled
    assert nobody.pod is None and not nobody.enrolled and "unknown to discovery" in nobody.reason


def test_the_per_connection_lookups_agree_with_attribute():
    """pod() and enrolled_pod() are what a connection calls; attribute() is
    only for the reason. They must name the same pod for every case."""
    mesh = Mesh(namespace("shop"), pod("shop", "web-0", None), pod("shop", "moved", None, node="node2"),
                pod("shop", "remote", "10.2.0.7", node="node2"))
    mesh.enrol("10.1.0.5", "shop", "web-0")
    mesh.enrol("10.1.0.6", "shop", "moved")
    mesh.enrol("10.1.0.7", "shop", "ghost")

    for ip in ("10.1.0.5", "10.1.0.6", "10.1.0.7", "10.2.0.7", "10.9.9.9"):
        found = mesh.attributor.attribute(ip)
        assert mesh.attributor.pod(ip) == found.pod, ip
        assert mesh.attributor.enrolled_pod(ip) == (found.pod if found.enrolled else None), ip
    assert mesh.attributor.enrolled_pod("10.1.0.5").name == "web-0"
    assert mesh.attributor.enrolled_pod("10.2.0.7") is None  # discovery alone never gives an identity to present


def test_plaintext_to_a_strict_pod_discovery_has_no_address_for_is_refused_by_strict():
    """Before: the destination was looked up by address only, found nobody, and
    was evaluated as a workload in no namespace: STRICT never applied."""
    mesh = Mesh(namespace("shop"), pod("shop", "web-0", None), strict("shop"))
    mesh.enrol("10.1.0.5", "shop", "web-0")

    decision = mesh.plaintext("10.1.0.5")

    assert not decision.allowed and "plaintext refused" in decision.reason and "shop/strict" in decision.reason
    assert decision.fail_closed == ""  # a policy's verdict, not the agent failing closed


def test_a_destination_nobody_holds_is_denied_as_unknown_whatever_the_policies_allow():
    mesh = Mesh(namespace("shop"), pod("shop", "web-0", "10.1.0.5"))  # no policy at all: allow-all
    mesh.enrol("10.1.0.6", "shop", "ghost")

    assert mesh.plaintext("10.1.0.5").allowed
    for ip in ("10.1.0.6", "10.9.9.9"):
        decision = mesh.plaintext(ip)
        assert not decision.allowed and decision.fail_closed == UNKNOWN_DESTINATION
        assert decision.reason.startswith("denied: unknown destination:"), decision.reason


def test_outbound_to_a_local_pod_discovery_has_no_address_for_is_decided_locally_not_passed_through():
    mesh = Mesh(namespace("shop"), pod("shop", "client", "10.1.0.2", sa="client"), pod("shop", "web-0", None))
    mesh.enrol("10.1.0.2", "shop", "client")
    mesh.enrol("10.1.0.5", "shop", "web-0")
    mesh.enrol("10.1.0.6", "shop", "ghost")

    local = mesh.router.plan_for("10.1.0.2", "10.1.0.5", 8080, dry_run=True)
    ghost = mesh.router.plan_for("10.1.0.2", "10.1.0.6", 8080, dry_run=True)
    outside = mesh.router.plan_for("10.1.0.2", "192.0.2.1", 443, dry_run=True)

    assert local.route is Route.LOCAL and str(local.destination_identity) == "spiffe://cluster.local/ns/shop/sa/web"
    assert ghost.route is Route.REFUSE and ghost.fail_closed == UNKNOWN_DESTINATION  # never a bypass of its policy
    assert outside.route is Route.PASSTHROUGH and outside.fail_closed == ""


def test_an_outbound_client_is_its_enrolment_record_never_its_address_alone():
    """The source's identity is the pod this node enrolled with the client
    address (the datapath binds it to that pod's veth), as its pod object
    describes it: discovery listing the address under another pod, or not
    at all, changes nothing; without a record there is no identity."""
    mesh = Mesh(namespace("shop"), pod("shop", "client", None, sa="client"),
                pod("shop", "web-0", "10.1.0.5"), pod("shop", "stale", "10.1.0.2", sa="admin", node="node2"))
    mesh.enrol("10.1.0.2", "shop", "client")

    plan = mesh.router.plan_for("10.1.0.2", "10.1.0.5", 8080, dry_run=True)
    assert plan.route is Route.LOCAL and str(plan.source_identity) == "spiffe://cluster.local/ns/shop/sa/client"

    mesh.records.clear()  # discovery still says stale holds 10.1.0.2: not enough to speak for anyone
    refused = mesh.router.plan_for("10.1.0.2", "10.1.0.5", 8080, dry_run=True)
    assert refused.route is Route.REFUSE and refused.fail_closed == UNKNOWN_SOURCE
    assert refused.source_identity is None and "not a pod enrolled on this node" in refused.reason

    mesh.enrol("10.1.0.2", "shop", "client", uid="another")  # the record names a pod discovery knows otherwise
    contradicted = mesh.router.plan_for("10.1.0.2", "10.1.0.5", 8080, dry_run=True)
    assert contradicted.route is Route.REFUSE and contradicted.fail_closed == UNKNOWN_SOURCE
    assert "uid another" in contradicted.reason


# --- remembered verdicts: an identity-bearing peer's verdict per (client IP, peer, destination IP, port)
# is reused only while policy and the destination pod are what it was decided on, and logged like a fresh one.

PEER = SpiffeId("cluster.local", "shop", "client")


class RecordingLog:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict]] = []

    def debug(self, event: str, **kw) -> None:
        self.lines.append(("debug", event, kw))

    def info(self, event: str, **kw) -> None:
        self.lines.append(("info", event, kw))

    def bind(self, **kw):
        return self


def check(mesh: Mesh, dst_ip: str = "10.1.0.5", port: int = 8080, source_ip: str = "10.2.0.9",
          peer: SpiffeId = PEER):
    return mesh.authorizer.check(source_ip=source_ip, source_identity=peer, dst_ip=dst_ip, dst_port=port)


def test_a_remembered_verdict_is_reused_and_logged_again():
    mesh = Mesh(namespace("shop"), pod("shop", "web-0", "10.1.0.5", labels={"app": "web"}))
    log = RecordingLog()
    mesh.engine._log = log

    first, second = check(mesh), check(mesh)

    assert first.allowed and second is first
    assert [line[:2] for line in log.lines] == [("debug", "connection allowed")] * 2
    assert log.lines[0] == log.lines[1]


def test_a_policy_change_drops_remembered_verdicts():
    mesh = Mesh(namespace("shop"), pod("shop", "web-0", "10.1.0.5", labels={"app": "web"}))
    assert check(mesh).allowed

    mesh.state.apply("ADDED", deny_selected("shop", "web"))

    assert check(mesh).reason == "denied by shop/deny-web rule 0"


def test_a_changed_destination_pod_is_decided_afresh():
    mesh = Mesh(namespace("shop"), pod("shop", "web-0", "10.1.0.5", labels={"app": "old"}),
                deny_selected("shop", "web"))
    assert check(mesh).allowed

    mesh.state.apply("MODIFIED", pod("shop", "web-0", "10.1.0.5", labels={"app": "web"}))

    assert not check(mesh).allowed


def test_each_input_of_the_key_is_decided_on_its_own():
    mesh = Mesh(namespace("shop"), pod("shop", "web-0", "10.1.0.5", labels={"app": "web"}),
                {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                 "metadata": {"name": "only", "namespace": "shop"},
                 "spec": {"action": "ALLOW", "rules": [{"from": [{"source": {"principals": [PEER.principal],
                                                                            "ipBlocks": ["10.2.0.0/24"]}}],
                                                        "to": [{"operation": {"ports": ["8080"]}}]}]}})
    other = SpiffeId("cluster.local", "shop", "other")

    assert check(mesh).allowed
    assert not check(mesh, peer=other).allowed
    assert not check(mesh, source_ip="10.3.0.9").allowed
    assert not check(mesh, port=9090).allowed
    assert check(mesh).allowed


def test_an_unknown_destination_fails_closed_even_after_it_was_allowed():
    mesh = Mesh(namespace("shop"), pod("shop", "web-0", "10.1.0.5", labels={"app": "web"}))
    assert check(mesh).allowed

    mesh.state.apply("DELETED", pod("shop", "web-0", "10.1.0.5", labels={"app": "web"}))

    decision = check(mesh)
    assert not decision.allowed and decision.fail_closed == UNKNOWN_DESTINATION
