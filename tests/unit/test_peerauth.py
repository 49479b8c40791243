"""PeerAuthentication resolution: mesh < namespace < workload < port, UNSET inherits."""
from __future__ import annotations

from typing import Any

import pytest

from ambit.agent.discovery.policy_model import MtlsMode, PeerAuthentication, PolicyError, parse_peer_authentication
from ambit.agent.policy.peerauth import PeerAuthenticationPolicy

ROOT = "istio-system"
HTTPBIN = {"app": "httpbin"}


def pa(name: str, namespace: str, mode: str | None = None, selector: dict[str, str] | None = None,
       ports: dict[Any, str | None] | None = None, created: str | None = None) -> PeerAuthentication:
    spec: dict[str, Any] = {}
    if mode is not None:
        spec["mtls"] = {"mode": mode}
    if selector is not None:
        spec["selector"] = {"matchLabels": selector}
    if ports is not None:
        spec["portLevelMtls"] = {port: ({"mode": m} if m else {}) for port, m in ports.items()}
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if created is not None:
        metadata["creationTimestamp"] = created
    return parse_peer_authentication({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
                                      "metadata": metadata, "spec": spec})


MESH_STRICT = pa("mesh", ROOT, "STRICT")
MESH_PERMISSIVE = pa("mesh", ROOT, "PERMISSIVE")
NS_STRICT = pa("ns", "bar", "STRICT")
NS_PERMISSIVE = pa("ns", "bar", "PERMISSIVE")
NS_UNSET = pa("ns", "bar")

# (id, policies, port, expected mode, expected deciding policy)
CASES: list[tuple[str, list[PeerAuthentication], int, MtlsMode, str | None]] = [
    ("default-permissive", [], 80, MtlsMode.PERMISSIVE, None),
    ("mesh-strict", [MESH_STRICT], 80, MtlsMode.STRICT, "istio-system/mesh"),
    ("namespace-overrides-mesh", [MESH_STRICT, NS_PERMISSIVE], 80, MtlsMode.PERMISSIVE, "bar/ns"),
    ("namespace-strict-over-permissive-mesh", [MESH_PERMISSIVE, NS_STRICT], 80, MtlsMode.STRICT, "bar/ns"),
    ("namespace-unset-inherits-mesh", [MESH_STRICT, NS_UNSET], 80, MtlsMode.STRICT, "istio-system/mesh"),
    ("other-namespace-ignored", [pa("ns", "foo", "STRICT")], 80, MtlsMode.PERMISSIVE, None),
    ("workload-overrides-namespace", [NS_STRICT, pa("wl", "bar", "PERMISSIVE", HTTPBIN)], 80,
     MtlsMode.PERMISSIVE, "bar/wl"),
    ("workload-disable-is-not-strict", [MESH_STRICT, pa("wl", "bar", "DISABLE", HTTPBIN)], 80,
     MtlsMode.DISABLE, "bar/wl"),
    ("workload-unset-inherits-namespace", [NS_STRICT, pa("wl", "bar", None, HTTPBIN)], 80,
     MtlsMode.STRICT, "bar/ns"),
    ("workload-selector-mismatch", [NS_STRICT, pa("wl", "bar", "PERMISSIVE", {"app": "other"})], 80,
     MtlsMode.STRICT, "bar/ns"),
    ("root-namespace-selector-ignored", [pa("wl", ROOT, "STRICT", HTTPBIN)], 80, MtlsMode.PERMISSIVE, None),
    ("port-permissive-under-strict-workload",
     [pa("wl", "bar", "STRICT", HTTPBIN, {8080: "PERMISSIVE"})], 8080, MtlsMode.PERMISSIVE, "bar/wl"),
    ("port-exception-only-on-its-port",
     [pa("wl", "bar", "STRICT", HTTPBIN, {8080: "PERMISSIVE"})], 80, MtlsMode.STRICT, "bar/wl"),
    ("port-strict-under-permissive-mesh",
     [MESH_PERMISSIVE, pa("wl", "bar", None, HTTPBIN, {"9000": "STRICT"})], 9000, MtlsMode.STRICT, "bar/wl"),
    ("port-permissive-under-strict-namespace-unset-workload",
     [NS_STRICT, pa("wl", "bar", None, HTTPBIN, {8080: "PERMISSIVE"})], 8080, MtlsMode.PERMISSIVE, "bar/wl"),
    ("port-unset-inherits-workload",
     [NS_PERMISSIVE, pa("wl", "bar", "STRICT", HTTPBIN, {8080: None})], 8080, MtlsMode.STRICT, "bar/wl"),
    ("port-unset-inherits-mesh-through-unset-levels",
     [MESH_STRICT, NS_UNSET, pa("wl", "bar", None, HTTPBIN, {8080: None})], 8080, MtlsMode.STRICT,
     "istio-system/mesh"),
    ("oldest-namespace-policy-wins",
     [pa("newer", "bar", "PERMISSIVE", created="2024-05-02T00:00:00Z"),
      pa("older", "bar", "STRICT", created="2024-05-01T00:00:00Z")], 80, MtlsMode.STRICT, "bar/older"),
    ("oldest-workload-policy-wins",
     [pa("a-new", "bar", "STRICT", HTTPBIN, created="2024-05-02T00:00:00Z"),
      pa("b-old", "bar", "PERMISSIVE", {"app": "httpbin"}, created="2024-05-01T00:00:00Z")], 80,
     MtlsMode.PERMISSIVE, "bar/b-old"),
]


@pytest.mark.parametrize(("policies", "port", "mode", "policy"),
                         [pytest.param(p, port, m, k, id=i) for i, p, port, m, k in CASES])
def test_effective_mode(policies: list[PeerAuthentication], port: int, mode: MtlsMode, policy: str | None) -> None:
    peer_auth = PeerAuthenticationPolicy()
    peer_auth.update(policies)
    resolution = peer_auth.mode_for("bar", HTTPBIN, port)
    assert (resolution.mode, resolution.policy) == (mode, policy)
    assert peer_auth.requires_mtls("bar", HTTPBIN, port) is (mode is MtlsMode.STRICT)


def test_workload_in_root_namespace_uses_mesh_policy() -> None:
    peer_auth = PeerAuthenticationPolicy()
    peer_auth.update([MESH_STRICT])
    assert peer_auth.requires_mtls(ROOT, {"app": "istiod"}, 15012)


def test_root_namespace_change_moves_mesh_policy() -> None:
    peer_auth = PeerAuthenticationPolicy()
    peer_auth.update([pa("mesh", "mesh-root", "STRICT")])
    assert not peer_auth.requires_mtls("bar", HTTPBIN, 80)
    peer_auth.set_root_namespace("mesh-root")
    assert peer_auth.requires_mtls("bar", HTTPBIN, 80)


def test_update_replaces_and_invalidates_cache() -> None:
    peer_auth = PeerAuthenticationPolicy()
    peer_auth.update([NS_STRICT])
    assert peer_auth.requires_mtls("bar", HTTPBIN, 80)
    peer_auth.update([])
    assert not peer_auth.requires_mtls("bar", HTTPBIN, 80)


def test_reason_names_level_and_policy() -> None:
    peer_auth = PeerAuthenticationPolicy()
    peer_auth.update([pa("wl", "bar", "STRICT", HTTPBIN, {8080: "PERMISSIVE"})])
    assert peer_auth.mode_for("bar", HTTPBIN, 80).reason == "mTLS STRICT from workload-level PeerAuthentication bar/wl"
    assert "port-level" in peer_auth.mode_for("bar", HTTPBIN, 8080).reason


def _raw(spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": "broken", "namespace": "bar"}, "spec": spec}


@pytest.mark.parametrize(("spec", "message"), [
    pytest.param({"portLevelMtls": {8080: {"mode": "STRICT"}}}, "cannot have port level mTLS", id="ports-no-selector"),
    pytest.param({"selector": {"matchLabels": {}}, "portLevelMtls": {8080: {"mode": "STRICT"}}},
                 "cannot have port level mTLS", id="ports-empty-selector"),
    pytest.param({"selector": {"matchLabels": {"a": "b"}}, "portLevelMtls": {}}, "at least one element",
                 id="ports-empty"),
    pytest.param({"selector": {"matchLabels": {"a": "b"}}, "portLevelMtls": {0: {"mode": "STRICT"}}},
                 "1..65535", id="port-zero"),
    pytest.param({"mtls": {"mode": "MUTUAL"}}, "unknown mode 'MUTUAL'", id="bad-mode"),
    pytest.param({"selector": {"matchLabels": {"a": "*"}}}, "wildcard", id="wildcard-selector"),
])
def test_parse_errors(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyError) as excinfo:
        parse_peer_authentication(_raw(spec))
    assert "PeerAuthentication bar/broken" in str(excinfo.value)
    assert message in str(excinfo.value)
