"""A policy that fails to parse denies every connection to the workloads it
would select, instead of silently not existing. Its scope is read from what
did parse: a selector that parsed selects; no selector, or one that is itself
what failed, means the whole namespace (the root namespace: the mesh)."""
from __future__ import annotations

from typing import Any

import pytest

from ambit.agent.discovery.policy_model import rejected_policy
from ambit.agent.discovery.state import ClusterState
from ambit.agent.policy.authz import POLICY_INVALID, ConnectionAttributes, PolicyEngine
from ambit.agent.policy.peerauth import PeerAuthenticationPolicy

ROOT = "istio-system"
WEB = {"app": "web"}


def authz(name: str, ns: str = "shop", *, selector: Any = None, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"action": "ALLOW", "rules": [{}], **spec}
    if selector is not None:
        body["selector"] = selector
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": body}


def peer_auth(name: str, ns: str = "shop", *, selector: Any = None, mode: str = "STRICT") -> dict[str, Any]:
    body: dict[str, Any] = {"mtls": {"mode": mode}}
    if selector is not None:
        body["selector"] = selector
    return {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": name, "namespace": ns}, "spec": body}


BROKEN_RULES = {"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}  # a port must be a number


@pytest.mark.parametrize(("obj", "selector", "denies", "scope"), [
    (authz("p", selector={"matchLabels": WEB}, **BROKEN_RULES), (("app", "web"),), True,
     "workloads of namespace shop labelled app=web"),
    (authz("p", **BROKEN_RULES), None, True, "every workload of namespace shop"),
    (authz("p", selector={"matchLabels": {"app": "web*"}}), None, True,
     "every workload of namespace shop (its selector did not parse)"),
    (authz("p", selector={"matchLabels": WEB, "matchExpressions": []}), None, True,
     "every workload of namespace shop (its selector did not parse)"),
    (authz("p", selector={}, **BROKEN_RULES), None, False, "none: its selector has no labels"),
    (authz("p", targetRefs=[{"kind": "Service", "name": "web"}], action="ALLOW ALL"), None, False,
     "none here: a waypoint's policy (targetRef)"),
    (authz("p", action="CUSTOM", **BROKEN_RULES), None, False, "none: the node proxy does not enforce CUSTOM"),
    ({**authz("p", **BROKEN_RULES), "spec": "ALLOW everything"}, None, True, "every workload of namespace shop"),
    (peer_auth("p", selector={"matchLabels": WEB}, mode="STRICTEST"), (("app", "web"),), True,
     "workloads of namespace shop labelled app=web"),
    (peer_auth("p", selector={}, mode="STRICTEST"), None, True, "every workload of namespace shop"),
])
def test_the_scope_of_a_rejected_policy_is_what_it_would_select(obj, selector, denies, scope):
    found = rejected_policy(obj["kind"], "shop", "p", obj, "the parser's error")

    assert (found.selector, found.denies, found.scope) == (selector, denies, scope)
    assert found.key == f"{obj['kind']} shop/p" and found.error == "the parser's error"


def test_a_dry_run_policy_that_fails_to_parse_denies_nothing():
    obj = authz("p", **BROKEN_RULES)
    obj["metadata"]["annotations"] = {"istio.io/dry-run": "true"}
    assert not rejected_policy("AuthorizationPolicy", "shop", "p", obj, "e").denies


class Mesh:
    def __init__(self, *objects: dict[str, Any]) -> None:
        self.peer_authentication = PeerAuthenticationPolicy(ROOT)
        self.engine = PolicyEngine(ROOT, peer_authentication=self.peer_authentication)
        self.state = ClusterState(self.engine, self.peer_authentication)
        for obj in objects:
            self.state.apply("ADDED", obj)

    def decide(self, namespace: str, labels: dict[str, str], peer: str | None = "cluster.local/ns/shop/sa/client"):
        return self.engine.allows(ConnectionAttributes(
            source_ip="10.0.0.1", destination_ip="10.0.0.2", destination_port=8080, destination_namespace=namespace,
            destination_labels=labels, source_principal=peer))


def test_a_rejected_policy_denies_its_scope_and_only_its_scope():
    mesh = Mesh(authz("web-only", selector={"matchLabels": WEB}, **BROKEN_RULES))

    denied = mesh.decide("shop", WEB)
    assert not denied.allowed and denied.fail_closed == POLICY_INVALID
    assert denied.policy == "AuthorizationPolicy shop/web-only"
    assert "shop/web-only failed to parse" in denied.reason and "bad port" in denied.reason
    assert mesh.decide("shop", {"app": "api"}).allowed  # same namespace, not selected
    assert mesh.decide("vault", WEB).allowed            # another namespace


def test_fixing_or_deleting_the_policy_lifts_the_deny():
    broken = authz("web-only", selector={"matchLabels": WEB}, **BROKEN_RULES)
    mesh = Mesh(broken)
    assert not mesh.decide("shop", WEB).allowed

    mesh.state.apply("MODIFIED", authz("web-only", selector={"matchLabels": WEB}))
    assert mesh.decide("shop", WEB).reason == "allowed by shop/web-only rule 0"
    mesh.state.apply("MODIFIED", broken)
    mesh.state.apply("DELETED", broken)
    assert mesh.decide("shop", WEB).allowed and mesh.state.rejected_policies() == []


def test_in_the_root_namespace_the_scope_is_the_mesh():
    mesh = Mesh(authz("mesh-wide", ROOT, **BROKEN_RULES),
                authz("mesh-web", ROOT, selector={"matchLabels": {"tier": "front"}}, **BROKEN_RULES))

    everywhere = mesh.decide("vault", {"app": "db"})
    assert not everywhere.allowed and everywhere.policy == f"AuthorizationPolicy {ROOT}/mesh-wide"
    assert f"every workload of every namespace (root namespace {ROOT})" in everywhere.reason
    assert not mesh.decide("shop", {"tier": "front"}).allowed
    (status,) = [s for s in mesh.engine.statuses() if s.policy == f"AuthorizationPolicy {ROOT}/mesh-wide"]
    assert status.enforced and "denies every connection to every workload of every namespace" in status.message


def test_a_rejected_peer_authentication_denies_its_scope_even_over_mtls():
    """It could have said STRICT or PERMISSIVE: nobody can tell, so its workloads take nothing."""
    mesh = Mesh(peer_auth("web-mtls", selector={"matchLabels": WEB}, mode="STRICTEST"))

    over_mtls = mesh.decide("shop", WEB)
    assert not over_mtls.allowed and over_mtls.fail_closed == POLICY_INVALID
    assert over_mtls.policy == "PeerAuthentication shop/web-mtls"
    assert not mesh.decide("shop", WEB, peer=None).allowed
    assert mesh.decide("shop", {"app": "api"}, peer=None).allowed


def test_a_policy_the_node_proxy_would_not_enforce_is_reported_and_denies_nothing():
    mesh = Mesh(authz("at-waypoint", targetRefs=[{"kind": "Service", "name": "web"}], **BROKEN_RULES))

    assert mesh.decide("shop", WEB).allowed
    (status,) = [s for s in mesh.engine.statuses() if s.policy == "AuthorizationPolicy shop/at-waypoint"]
    assert not status.enforced and status.message.startswith("rejected:") and "denies nothing" in status.message
