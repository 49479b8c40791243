"""AuthorizationPolicy at L4, case by case, as ztunnel enforces it.

Each case: the policies in force, one connection to httpbin in namespace
`bar`, and the exact decision expected. The default peer is
spiffe://cluster.local/ns/foo/sa/sleep at 10.0.0.7 calling 10.0.1.5:8000.
"""
from __future__ import annotations

import logging
from typing import Any

import pytest
import structlog
import structlog.testing

from ambit.agent.policy.authz import ConnectionAttributes, Decision, PolicyEngine
from ambit.agent.discovery.policy_model import (
    Action,
    AuthorizationPolicy,
    PolicyError,
    parse_authorization_policy,
    parse_policy,
)
from ambit.agent.policy.peerauth import PeerAuthenticationPolicy

SLEEP = "spiffe://cluster.local/ns/foo/sa/sleep"
OTHER = "spiffe://cluster.local/ns/baz/sa/client"
HTTPBIN = {"app": "httpbin", "version": "v1"}


def ap(name: str, spec: dict[str, Any], namespace: str = "bar",
       annotations: dict[str, str] | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if annotations is not None:
        metadata["annotations"] = annotations
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": metadata, "spec": spec}


def conn(**overrides: Any) -> ConnectionAttributes:
    values: dict[str, Any] = dict(
        source_ip="10.0.0.7", source_principal=SLEEP, destination_ip="10.0.1.5",
        destination_port=8000, destination_namespace="bar", destination_labels=HTTPBIN,
    )
    values.update(overrides)
    return ConnectionAttributes(**values)


PLAINTEXT = dict(source_principal=None, source_namespace=None)
ALLOW_ALL = ap("allow-all", {"rules": [{}]})


def allow_from(**source: Any) -> dict[str, Any]:
    return ap("p", {"action": "ALLOW", "rules": [{"from": [{"source": source}]}]})


def deny_from(**source: Any) -> dict[str, Any]:
    return ap("p", {"action": "DENY", "rules": [{"from": [{"source": source}]}]})


def allow_to(**operation: Any) -> dict[str, Any]:
    return ap("p", {"rules": [{"to": [{"operation": operation}]}]})


def allow_when(key: str, values: list[Any] | None = None, not_values: list[Any] | None = None) -> dict[str, Any]:
    condition: dict[str, Any] = {"key": key}
    if values is not None:
        condition["values"] = values
    if not_values is not None:
        condition["notValues"] = not_values
    return ap("p", {"rules": [{"when": [condition]}]})


ALLOWED_BY_P = (True, "allowed by bar/p rule 0")
DENIED_BY_P = (False, "denied by bar/p rule 0")
NO_ALLOW_MATCHED = (False, "denied: no ALLOW policy matched")
NO_ALLOW_POLICY = (True, "allowed: no ALLOW policy applies")

# (id, policies, connection overrides, (allowed, reason))
CASES: list[tuple[str, list[dict[str, Any]], dict[str, Any], tuple[bool, str]]] = [
    # --- basics: empty sets, rules: [{}], precedence
    ("no-policy-allows", [], {}, NO_ALLOW_POLICY),
    ("allow-without-rules-denies-all", [ap("p", {})], {}, NO_ALLOW_MATCHED),
    ("allow-empty-rule-allows-all", [ap("p", {"rules": [{}]})], {}, ALLOWED_BY_P),
    ("deny-empty-rule-denies-all", [ap("p", {"action": "DENY", "rules": [{}]})], {}, DENIED_BY_P),
    ("deny-before-allow", [ALLOW_ALL, ap("p", {"action": "DENY", "rules": [{}]})], {}, DENIED_BY_P),
    ("deny-not-matching-then-allow", [ALLOW_ALL, deny_from(namespaces=["baz"])], {},
     (True, "allowed by bar/allow-all rule 0")),
    ("any-allow-policy-matching-allows", [allow_from(namespaces=["baz"]), ALLOW_ALL], {},
     (True, "allowed by bar/allow-all rule 0")),
    ("rules-are-ored-index-reported",
     [ap("p", {"rules": [{"from": [{"source": {"namespaces": ["baz"]}}]},
                         {"from": [{"source": {"namespaces": ["foo"]}}]}]})], {},
     (True, "allowed by bar/p rule 1")),
    ("clauses-are-anded",
     [ap("p", {"rules": [{"from": [{"source": {"namespaces": ["foo"]}}],
                          "to": [{"operation": {"ports": ["9000"]}}]}]})], {}, NO_ALLOW_MATCHED),
    ("entries-in-a-clause-are-ored",
     [ap("p", {"rules": [{"from": [{"source": {"namespaces": ["baz"]}},
                                   {"source": {"principals": ["cluster.local/ns/foo/sa/sleep"]}}]}]})],
     {}, ALLOWED_BY_P),
    ("fields-in-an-entry-are-anded",
     [allow_from(namespaces=["foo"], ipBlocks=["192.168.0.0/16"])], {}, NO_ALLOW_MATCHED),
    # --- from.source fields and their negations
    ("principals-exact-match", [allow_from(principals=["cluster.local/ns/foo/sa/sleep"])], {}, ALLOWED_BY_P),
    ("principals-exact-mismatch", [allow_from(principals=["cluster.local/ns/foo/sa/other"])], {},
     NO_ALLOW_MATCHED),
    ("principals-prefix-wildcard", [allow_from(principals=["cluster.local/ns/foo/*"])], {}, ALLOWED_BY_P),
    ("principals-suffix-wildcard", [allow_from(principals=["*/sa/sleep"])], {}, ALLOWED_BY_P),
    ("principals-suffix-wildcard-mismatch", [allow_from(principals=["*/sa/other"])], {}, NO_ALLOW_MATCHED),
    ("principals-star-any-mtls-peer", [allow_from(principals=["*"])], {}, ALLOWED_BY_P),
    ("principals-written-with-spiffe-never-match",
     [allow_from(principals=["spiffe://cluster.local/ns/foo/sa/sleep"])], {}, NO_ALLOW_MATCHED),
    ("not-principals-excludes-peer", [allow_from(notPrincipals=["cluster.local/ns/foo/sa/sleep"])], {},
     NO_ALLOW_MATCHED),
    ("not-principals-other-peer", [allow_from(notPrincipals=["cluster.local/ns/foo/sa/sleep"])],
     {"source_principal": OTHER}, ALLOWED_BY_P),
    ("namespaces-match", [allow_from(namespaces=["foo"])], {}, ALLOWED_BY_P),
    ("namespaces-mismatch", [allow_from(namespaces=["baz"])], {}, NO_ALLOW_MATCHED),
    ("namespaces-prefix-wildcard", [allow_from(namespaces=["fo*"])], {}, ALLOWED_BY_P),
    ("namespace-from-explicit-attribute", [allow_from(namespaces=["baz"])],
     {"source_namespace": "baz"}, ALLOWED_BY_P),
    ("not-namespaces-excludes-peer", [allow_from(notNamespaces=["foo"])], {}, NO_ALLOW_MATCHED),
    ("not-namespaces-other-peer", [allow_from(notNamespaces=["foo"])], {"source_principal": OTHER},
     ALLOWED_BY_P),
    ("service-accounts-ns-qualified", [allow_from(serviceAccounts=["foo/sleep"])], {}, ALLOWED_BY_P),
    ("service-accounts-bare-name-is-policy-namespace", [allow_from(serviceAccounts=["sleep"])], {},
     NO_ALLOW_MATCHED),
    ("not-service-accounts-excludes-peer", [allow_from(notServiceAccounts=["foo/sleep"])], {},
     NO_ALLOW_MATCHED),
    ("ip-blocks-cidr-match", [allow_from(ipBlocks=["10.0.0.0/24"])], {}, ALLOWED_BY_P),
    ("ip-blocks-single-ip-mismatch", [allow_from(ipBlocks=["10.0.0.8"])], {}, NO_ALLOW_MATCHED),
    ("ip-blocks-single-ip-match", [allow_from(ipBlocks=["10.0.0.7"])], {}, ALLOWED_BY_P),
    ("ip-blocks-other-family", [allow_from(ipBlocks=["fd00::/8"])], {}, NO_ALLOW_MATCHED),
    ("ip-blocks-ipv6", [allow_from(ipBlocks=["fd00::/8"])],
     {"source_ip": "fd00::7", "destination_ip": "fd00::15"}, ALLOWED_BY_P),
    ("not-ip-blocks-excludes-source", [allow_from(notIpBlocks=["10.0.0.0/8"])], {}, NO_ALLOW_MATCHED),
    ("not-ip-blocks-other-source", [allow_from(notIpBlocks=["10.0.0.0/8"])], {"source_ip": "172.16.0.1"},
     ALLOWED_BY_P),
    # --- plaintext peers: every negation holds, every positive field fails
    ("plaintext-not-namespaces-allowed", [allow_from(notNamespaces=["foo"])], PLAINTEXT, ALLOWED_BY_P),
    ("plaintext-not-principals-allowed", [allow_from(notPrincipals=["*"])], PLAINTEXT, ALLOWED_BY_P),
    ("plaintext-not-service-accounts-allowed", [allow_from(notServiceAccounts=["foo/sleep"])], PLAINTEXT,
     ALLOWED_BY_P),
    ("plaintext-namespaces-star-fails", [allow_from(namespaces=["*"])], PLAINTEXT, NO_ALLOW_MATCHED),
    ("plaintext-principals-star-fails", [allow_from(principals=["*"])], PLAINTEXT, NO_ALLOW_MATCHED),
    ("plaintext-deny-not-namespaces-denies", [deny_from(notNamespaces=["bar"])], PLAINTEXT, DENIED_BY_P),
    ("plaintext-ip-blocks-still-apply", [allow_from(ipBlocks=["10.0.0.0/24"])], PLAINTEXT, ALLOWED_BY_P),
    # --- to.operation ports
    ("ports-int-match", [allow_to(ports=[8000])], {}, ALLOWED_BY_P),
    ("ports-string-mismatch", [allow_to(ports=["9000"])], {}, NO_ALLOW_MATCHED),
    ("not-ports-excludes", [allow_to(notPorts=["8000"])], {}, NO_ALLOW_MATCHED),
    ("not-ports-other-port", [allow_to(notPorts=["8000"])], {"destination_port": 9000}, ALLOWED_BY_P),
    ("to-entries-are-ored", [ap("p", {"rules": [{"to": [{"operation": {"ports": ["9000"]}},
                                                        {"operation": {"ports": ["8000"]}}]}]})], {}, ALLOWED_BY_P),
    ("to-entries-ports-or-not-ports", [ap("p", {"rules": [{"to": [{"operation": {"ports": ["9000"]}},
                                                                  {"operation": {"notPorts": ["9000"]}}]}]})],
     {}, ALLOWED_BY_P),
    ("ports-and-not-ports-in-one-entry", [allow_to(ports=["8000", "9000"], notPorts=["8000"])], {},
     NO_ALLOW_MATCHED),
    # --- when conditions
    ("when-source-ip", [allow_when("source.ip", ["10.0.0.0/24"])], {}, ALLOWED_BY_P),
    ("when-source-ip-not-values", [allow_when("source.ip", not_values=["10.0.0.7"])], {}, NO_ALLOW_MATCHED),
    ("when-source-namespace", [allow_when("source.namespace", ["foo"])], {}, ALLOWED_BY_P),
    ("when-source-namespace-plaintext", [allow_when("source.namespace", not_values=["foo"])], PLAINTEXT,
     ALLOWED_BY_P),
    ("when-source-principal-wildcard", [allow_when("source.principal", ["cluster.local/ns/foo/*"])], {},
     ALLOWED_BY_P),
    ("when-destination-ip", [allow_when("destination.ip", ["10.0.1.0/24"])], {}, ALLOWED_BY_P),
    ("when-destination-ip-mismatch", [allow_when("destination.ip", ["10.0.2.0/24"])], {}, NO_ALLOW_MATCHED),
    ("when-destination-port", [allow_when("destination.port", [8000])], {}, ALLOWED_BY_P),
    ("when-destination-port-not-values", [allow_when("destination.port", not_values=["8000"])], {},
     NO_ALLOW_MATCHED),
    ("when-conditions-are-anded",
     [ap("p", {"rules": [{"when": [{"key": "source.namespace", "values": ["foo"]},
                                   {"key": "destination.port", "values": ["9000"]}]}]})], {},
     NO_ALLOW_MATCHED),
    # --- L7 translation (ARCHITECTURE.md)
    ("allow-with-paths-matches-nothing", [allow_to(paths=["/status"])], {}, NO_ALLOW_MATCHED),
    ("allow-mixing-l4-and-methods-dropped", [allow_to(ports=["8000"], methods=["GET"])], {}, NO_ALLOW_MATCHED),
    ("allow-with-request-principals-dropped", [allow_from(requestPrincipals=["*"])], {}, NO_ALLOW_MATCHED),
    ("allow-with-remote-ip-blocks-dropped", [allow_from(remoteIpBlocks=["10.0.0.0/8"])], {},
     NO_ALLOW_MATCHED),
    ("allow-with-header-condition-dropped", [allow_when("request.headers[x-user]", ["alice"])], {},
     NO_ALLOW_MATCHED),
    ("allow-l7-rule-dropped-l4-rule-kept",
     [ap("p", {"rules": [{"to": [{"operation": {"paths": ["/admin"]}}]},
                         {"from": [{"source": {"namespaces": ["foo"]}}]}]})], {},
     (True, "allowed by bar/p rule 1")),
    ("deny-from-x-to-methods-does-nothing",
     [ap("p", {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["foo"]}}],
                                            "to": [{"operation": {"methods": ["GET"]}}]}]})], {},
     NO_ALLOW_POLICY),
    ("deny-methods-on-port-denies-whole-port",
     [ap("p", {"action": "DENY", "rules": [{"to": [{"operation": {"methods": ["POST"], "ports": ["8080"]}}]}]})],
     {"destination_port": 8080}, DENIED_BY_P),
    ("deny-methods-on-port-leaves-other-ports",
     [ap("p", {"action": "DENY", "rules": [{"to": [{"operation": {"methods": ["POST"], "ports": ["8080"]}}]}]})],
     {}, NO_ALLOW_POLICY),
    ("deny-l7-only-entry-never-matches-l4-entry-does",
     [deny_from(requestPrincipals=["*"]),
      ap("q", {"action": "DENY", "rules": [{"from": [{"source": {"requestPrincipals": ["*"]}},
                                                     {"source": {"namespaces": ["foo"]}}]}]})], {},
     (False, "denied by bar/q rule 0")),
    ("deny-request-principals-only-no-effect", [deny_from(requestPrincipals=["*"])], {}, NO_ALLOW_POLICY),
    ("deny-remote-ip-blocks-only-no-effect", [deny_from(remoteIpBlocks=["10.0.0.0/8"])], {}, NO_ALLOW_POLICY),
    ("deny-remote-ip-keeps-ip-blocks", [deny_from(remoteIpBlocks=["1.2.3.4"], ipBlocks=["10.0.0.0/24"])], {},
     DENIED_BY_P),
    ("deny-header-condition-no-effect",
     [ap("p", {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["foo"]}}],
                                            "when": [{"key": "request.headers[x]", "values": ["y"]}]}]})],
     {}, NO_ALLOW_POLICY),
    # --- scope
    ("other-namespace-policy-ignored", [ap("p", {"action": "DENY", "rules": [{}]}, namespace="foo")], {},
     NO_ALLOW_POLICY),
    ("root-namespace-policy-is-mesh-wide",
     [ap("p", {"action": "DENY", "rules": [{}]}, namespace="istio-system")], {},
     (False, "denied by istio-system/p rule 0")),
    ("root-namespace-allow-makes-others-deny",
     [ap("p", {"rules": [{"from": [{"source": {"namespaces": ["baz"]}}]}]}, namespace="istio-system")], {},
     NO_ALLOW_MATCHED),
    ("root-namespace-selector-matches-everywhere",
     [ap("p", {"action": "DENY", "selector": {"matchLabels": {"app": "httpbin"}}, "rules": [{}]},
         namespace="istio-system")], {}, (False, "denied by istio-system/p rule 0")),
    ("root-namespace-selector-other-labels",
     [ap("p", {"action": "DENY", "selector": {"matchLabels": {"app": "reviews"}}, "rules": [{}]},
         namespace="istio-system")], {}, NO_ALLOW_POLICY),
    ("namespace-selector-matches", [ap("p", {"action": "DENY", "selector": {"matchLabels": {"app": "httpbin"}},
                                             "rules": [{}]})], {}, DENIED_BY_P),
    ("namespace-selector-needs-every-label",
     [ap("p", {"action": "DENY", "selector": {"matchLabels": {"app": "httpbin", "version": "v2"}},
               "rules": [{}]})], {}, NO_ALLOW_POLICY),
    ("selector-in-other-namespace-ignored",
     [ap("p", {"action": "DENY", "selector": {"matchLabels": {"app": "httpbin"}}, "rules": [{}]},
         namespace="foo")], {}, NO_ALLOW_POLICY),
    ("selector-without-match-labels-selects-nothing",
     [ap("p", {"action": "DENY", "selector": {}, "rules": [{}]})], {}, NO_ALLOW_POLICY),
    ("empty-match-labels-selects-all-in-namespace",
     [ap("p", {"action": "DENY", "selector": {"matchLabels": {}}, "rules": [{}]})], {}, DENIED_BY_P),
    # --- policies the node proxy does not enforce
    ("target-refs-skipped",
     [ap("p", {"action": "DENY", "targetRefs": [{"kind": "Service", "group": "", "name": "httpbin"}],
               "rules": [{}]})], {}, NO_ALLOW_POLICY),
    ("target-ref-skipped",
     [ap("p", {"targetRef": {"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "wp"}})], {},
     NO_ALLOW_POLICY),
    ("audit-skipped", [ap("p", {"action": "AUDIT", "rules": [{}]})], {}, NO_ALLOW_POLICY),
    ("custom-skipped", [ap("p", {"action": "CUSTOM", "provider": {"name": "ext"}, "rules": [{}]})], {},
     NO_ALLOW_POLICY),
    ("dry-run-skipped", [ap("p", {"action": "DENY", "rules": [{}]}, annotations={"istio.io/dry-run": "true"})],
     {}, NO_ALLOW_POLICY),
    ("dry-run-false-enforced",
     [ap("p", {"action": "DENY", "rules": [{}]}, annotations={"istio.io/dry-run": "false"})], {}, DENIED_BY_P),
]


def test_table_has_enough_cases() -> None:
    assert len(CASES) >= 40
    assert len({case[0] for case in CASES}) == len(CASES), "case ids must be unique"


@pytest.mark.parametrize(("policies", "overrides", "expected"),
                         [pytest.param(p, o, e, id=i) for i, p, o, e in CASES])
def test_policy_case(policies: list[dict[str, Any]], overrides: dict[str, Any],
                     expected: tuple[bool, str]) -> None:
    engine = PolicyEngine()
    engine.update(parse_authorization_policy(p) for p in policies)
    decision = engine.allows(conn(**overrides))
    allowed, reason = expected
    assert (decision.allowed, decision.reason) == (allowed, reason)
    if reason.startswith(("allowed by ", "denied by ")):
        assert decision.policy == reason.split()[2]
    else:
        assert decision.policy is None


# ------------------------------------------------------------ beyond the table

def test_skipped_policies_report_why() -> None:
    engine = PolicyEngine()
    statuses = engine.update([
        parse_authorization_policy(ap("dry", {"action": "DENY", "rules": [{}]},
                                      annotations={"istio.io/dry-run": "1"})),
        parse_authorization_policy(ap("audit", {"action": "AUDIT", "rules": [{}]})),
        parse_authorization_policy(ap("custom", {"action": "CUSTOM", "rules": [{}]})),
        parse_authorization_policy(ap("ref", {"targetRefs": [{"kind": "Service", "name": "x"}]})),
        parse_authorization_policy(ap("http", {"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]})),
    ])
    by_key = {s.policy: s for s in statuses}
    assert not by_key["bar/dry"].enforced and "dry-run" in by_key["bar/dry"].message
    assert not by_key["bar/audit"].enforced and "AUDIT" in by_key["bar/audit"].message
    assert not by_key["bar/custom"].enforced and "CUSTOM" in by_key["bar/custom"].message
    assert not by_key["bar/ref"].enforced and "waypoint" in by_key["bar/ref"].message
    assert by_key["bar/http"].enforced and "methods" in by_key["bar/http"].message
    assert engine.applicable("bar", HTTPBIN).allow == ("bar/http",)


def test_l7_translation_is_visible_in_the_model() -> None:
    allow = parse_authorization_policy(ap("a", {"rules": [{"to": [{"operation": {"paths": ["/x"]}}]},
                                                          {"from": [{"source": {"namespaces": ["foo"]}}]}]}))
    assert allow.dropped_rules == (0,)
    assert [r.index for r in allow.rules] == [1]
    deny = parse_authorization_policy(ap("d", {"action": "DENY", "rules": [
        {"to": [{"operation": {"methods": ["POST"], "ports": ["8080"]}}]}]}))
    assert deny.action is Action.DENY
    operation = deny.rules[0].operations[0]
    assert operation.ports == (8080,) and operation.dropped == ("methods",)
    assert deny.rules[0].l7_attributes == ("methods",)
    assert any("HTTP attributes" in w for w in deny.warnings)


def test_root_namespace_can_be_changed() -> None:
    engine = PolicyEngine()
    engine.update([parse_authorization_policy(ap("p", {"action": "DENY", "rules": [{}]}, namespace="mesh-root"))])
    assert engine.allows(conn()).allowed
    engine.set_root_namespace("mesh-root")
    assert engine.allows(conn()) == Decision(False, "denied by mesh-root/p rule 0", "mesh-root/p")
    # A root-namespace policy also applies to workloads in the root namespace itself.
    assert not engine.allows(conn(destination_namespace="mesh-root")).allowed


def test_upsert_and_remove_change_decisions_and_generation() -> None:
    engine = PolicyEngine()
    start = engine.generation
    engine.upsert(parse_authorization_policy(ap("p", {"action": "DENY", "rules": [{}]})))
    assert not engine.allows(conn()).allowed
    engine.remove("bar", "p")
    assert engine.allows(conn()).allowed
    assert engine.generation == start + 2


def test_selector_policies_follow_labels_after_cache_warmup() -> None:
    engine = PolicyEngine()
    engine.update([parse_authorization_policy(
        ap("p", {"action": "DENY", "selector": {"matchLabels": {"version": "v2"}}, "rules": [{}]}))])
    assert engine.allows(conn()).allowed
    assert not engine.allows(conn(destination_labels={"app": "httpbin", "version": "v2"})).allowed
    assert engine.allows(conn()).allowed
    assert engine.applicable("bar", {"version": "v2"}).deny == ("bar/p",)


def test_strict_peer_authentication_refuses_plaintext_before_policies() -> None:
    peer_auth = PeerAuthenticationPolicy()
    peer_auth.update([parse_policy({
        "apiVersion": "security.istio.io/v1beta1", "kind": "PeerAuthentication",
        "metadata": {"name": "default", "namespace": "bar"}, "spec": {"mtls": {"mode": "STRICT"}}})])
    engine = PolicyEngine(peer_authentication=peer_auth)
    engine.update([parse_authorization_policy(ALLOW_ALL)])
    refused = engine.allows(conn(**PLAINTEXT))
    assert not refused.allowed
    assert refused.policy == "bar/default"
    assert refused.reason.startswith("denied: plaintext refused")
    assert engine.allows(conn()).allowed


def test_denials_are_logged_with_reason() -> None:
    captured = structlog.testing.CapturingLogger()
    logger = structlog.wrap_logger(captured, processors=[],
                                   wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    engine = PolicyEngine(logger=logger)
    engine.update([parse_authorization_policy(ap("p", {"action": "DENY", "rules": [{}]}))])
    engine.allows(conn())
    logs = [dict(call.kwargs, level=call.method_name) for call in captured.calls]
    denied = [entry for entry in logs if entry["event"] == "connection denied"]
    assert len(denied) == 1
    assert denied[0]["reason"] == "denied by bar/p rule 0"
    assert denied[0]["policy"] == "bar/p"
    assert denied[0]["peer"] == "cluster.local/ns/foo/sa/sleep"
    assert denied[0]["dst"] == "10.0.1.5:8000"
    assert denied[0]["level"] == "info"


def test_bad_connection_address_is_refused() -> None:
    with pytest.raises(ValueError, match="not an IPv4 or IPv6 address"):
        conn(source_ip="10.0.0.300")


def test_connection_attributes_derive_identity_fields() -> None:
    attrs = conn()
    assert attrs.principal == "cluster.local/ns/foo/sa/sleep"
    assert attrs.namespace == "foo"
    assert attrs.service_account == ("foo", "sleep")
    plaintext = conn(**PLAINTEXT)
    assert plaintext.principal is None and plaintext.namespace is None


# ------------------------------------------------------------ parse errors

def _bad(spec: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    return ap("broken", spec, **kwargs)


PARSE_ERRORS: list[tuple[str, dict[str, Any], str]] = [
    ("unknown-action", _bad({"action": "REJECT"}), "unknown action 'REJECT'"),
    ("deny-without-rules", _bad({"action": "DENY"}), "DENY without `rules`"),
    ("empty-from", _bad({"rules": [{"from": []}]}), "rules[0].from: must not be empty"),
    ("empty-source", _bad({"rules": [{"from": [{"source": {}}]}]}), "rules[0].from[0].source: must not be empty"),
    ("null-source", _bad({"rules": [{"from": [{}]}]}), "must not be null"),
    ("empty-operation", _bad({"rules": [{"to": [{"operation": {}}]}]}), "must not be empty"),
    ("bad-port", _bad({"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}), "bad port 'http'"),
    ("port-out-of-range", _bad({"rules": [{"to": [{"operation": {"ports": [70000]}}]}]}), "bad port '70000'"),
    ("bad-cidr", _bad({"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/33"]}}]}]}), "bad CIDR range"),
    ("bad-ip", _bad({"rules": [{"from": [{"source": {"notIpBlocks": ["10.0.0.256"]}}]}]}), "bad IP address"),
    ("empty-value", _bad({"rules": [{"from": [{"source": {"namespaces": [""]}}]}]}), "empty value"),
    ("unknown-source-field", _bad({"rules": [{"from": [{"source": {"principal": ["a"]}}]}]}),
     "unknown field(s) principal"),
    ("unknown-spec-field", _bad({"rule": []}), "unknown field(s) rule"),
    ("sa-with-namespaces", _bad({"rules": [{"from": [{"source": {"serviceAccounts": ["a"],
                                                                  "namespaces": ["b"]}}]}]}),
     "cannot set serviceAccounts"),
    ("when-without-values", _bad({"rules": [{"when": [{"key": "source.ip"}]}]}), "at least one of"),
    ("when-unknown-key", _bad({"rules": [{"when": [{"key": "source.pod", "values": ["x"]}]}]}),
     "unknown attribute 'source.pod'"),
    ("when-bad-ip", _bad({"rules": [{"when": [{"key": "destination.ip", "values": ["nope"]}]}]}),
     "bad IP address"),
    ("selector-and-target-refs", _bad({"selector": {"matchLabels": {"a": "b"}},
                                       "targetRefs": [{"kind": "Service", "name": "x"}]}), "only one of selector"),
    ("bad-dry-run", _bad({"rules": [{}]}, annotations={"istio.io/dry-run": "maybe"}), "invalid boolean"),
    ("provider-without-custom", _bad({"provider": {"name": "x"}}), "CUSTOM"),
]


@pytest.mark.parametrize(("obj", "message"), [pytest.param(o, m, id=i) for i, o, m in PARSE_ERRORS])
def test_parse_errors_name_the_policy(obj: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyError) as excinfo:
        parse_authorization_policy(obj)
    text = str(excinfo.value)
    assert "AuthorizationPolicy bar/broken" in text
    assert message in text


@pytest.mark.parametrize(("obj", "message"), [
    pytest.param({"apiVersion": "security.istio.io/v1alpha1", "kind": "AuthorizationPolicy",
                  "metadata": {"name": "x", "namespace": "bar"}}, "apiVersion", id="old-api-version"),
    pytest.param({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                  "metadata": {"name": "x"}}, "metadata.namespace is required", id="no-namespace"),
    pytest.param({"apiVersion": "security.istio.io/v1", "kind": "Sidecar",
                  "metadata": {"name": "x", "namespace": "bar"}}, "unsupported kind", id="other-kind"),
    pytest.param(["not", "a", "mapping"], "unsupported kind", id="not-an-object"),
])
def test_envelope_errors(obj: Any, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_policy(obj)


def test_v1beta1_and_int_ports_accepted() -> None:
    policy = parse_policy({"apiVersion": "security.istio.io/v1beta1", "kind": "AuthorizationPolicy",
                           "metadata": {"name": "x", "namespace": "bar"},
                           "spec": {"rules": [{"to": [{"operation": {"ports": [80, "443"]}}]}]}})
    assert isinstance(policy, AuthorizationPolicy)
    assert policy.rules[0].operations[0].ports == (80, 443)
