"""`ambit waypoint`: what a waypoint answers for, its policies as Envoy RBAC, and a bootstrap Envoy accepts.

The cluster: namespace shop (ambient) with Service web (http 80 -> 8080 and
echo 9000 -> 9000) on two pods and a pod outside the mesh, Service db in
the same namespace without a waypoint, a workload-addressed pod, and the
waypoint shop/waypoint (Gateway + one pod). Policies attach to the Gateway,
to Service web, to another Service, by selector (not the waypoint's) and in
dry-run mode.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from ambit.cli.main import main as ambit_main
from ambit.agent.identity.ca import LocalCA
from ambit.agent.identity.spiffe import SpiffeId
from ambit.agent.discovery.policy_model import PolicyError, parse_authorization_policy
from ambit.waypoint.bootstrap import waypoint_resources
from ambit.waypoint.credentials import SecretFiles
from ambit.waypoint.destinations import WaypointError, plan_waypoint, port_protocol, state_from_objects
from ambit.waypoint.xds_files import XdsFiles
from ambit.waypoint.rbac import PEER_PRINCIPAL_KEY, rbac_rules

from tests.support import envoy as envoy_support

TD = "cluster.local"
VIP = "10.96.0.10"


def pod(name: str, ip: str, *, mesh: bool = True, sa: str = "web", ports: tuple[tuple[str, int], ...] = (),
        **labels: str) -> dict[str, Any]:
    if not mesh:
        labels["istio.io/dataplane-mode"] = "none"
    return {"kind": "Pod", "apiVersion": "v1", "metadata": {"name": name, "namespace": "shop", "labels": labels},
            "spec": {"nodeName": "node1", "serviceAccountName": sa, "containers": [{"name": "c", "ports": [
                {"name": n, "containerPort": p} for n, p in ports]}]},
            "status": {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}}


def policy(name: str, spec: dict[str, Any], **annotations: str) -> dict[str, Any]:
    return {"kind": "AuthorizationPolicy", "apiVersion": "security.istio.io/v1",
            "metadata": {"name": name, "namespace": "shop", "annotations": annotations}, "spec": spec}


GATEWAY_REF = [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}]
WEB_PORTS = (("http", 8080), ("echo", 9000))


def objects(waypoint_for: str = "all") -> list[dict[str, Any]]:
    return [
        {"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": "shop", "labels": {
            "istio.io/dataplane-mode": "ambient"}}},
        pod("web-0", "10.1.1.3", ports=WEB_PORTS, app="web"),
        pod("web-1", "10.1.2.3", ports=WEB_PORTS, app="web"),
        pod("web-legacy", "10.1.2.4", mesh=False, ports=WEB_PORTS, app="web"),
        pod("db-0", "10.1.2.5", ports=(("tcp-db", 5432),), app="db"),
        pod("pinned", "10.1.2.6", ports=(("http-api", 7000),), app="pinned",
            **{"istio.io/use-waypoint": "waypoint"}),
        pod("waypoint-0", "10.1.2.9", mesh=False, sa="waypoint", **{
            "gateway.networking.k8s.io/gateway-name": "waypoint"}),
        {"kind": "Service", "apiVersion": "v1", "metadata": {"name": "web", "namespace": "shop", "labels": {
            "istio.io/use-waypoint": "waypoint"}}, "spec": {"clusterIP": VIP, "selector": {"app": "web"}, "ports": [
                {"name": "http", "port": 80, "targetPort": "http"}, {"name": "echo", "port": 9000, "targetPort": 9000}]}},
        {"kind": "Service", "apiVersion": "v1", "metadata": {"name": "db", "namespace": "shop"},
         "spec": {"clusterIP": "10.96.0.11", "selector": {"app": "db"}, "ports": [{"name": "tcp", "port": 5432}]}},
        {"kind": "Gateway", "apiVersion": "gateway.networking.k8s.io/v1", "metadata": {
            "name": "waypoint", "namespace": "shop", "labels": {"istio.io/waypoint-for": waypoint_for}},
         "spec": {"gatewayClassName": "istio-waypoint"}},
        policy("no-admin", {"targetRefs": GATEWAY_REF, "action": "DENY", "rules": [
            {"to": [{"operation": {"ports": ["80"], "paths": ["/admin*"]}}]}]}),
        policy("web-get", {"targetRefs": [{"kind": "Service", "name": "web"}], "rules": [
            {"from": [{"source": {"namespaces": ["shop"]}}], "to": [{"operation": {"methods": ["GET"]}}]},
            {"to": [{"operation": {"ports": ["9000"]}}]}]}),
        policy("db-only", {"targetRefs": [{"kind": "Service", "name": "db"}], "rules": [{}]}),
        policy("by-selector", {"selector": {"matchLabels": {"app": "web"}}, "action": "DENY", "rules": [{}]}),
        policy("trial", {"targetRefs": GATEWAY_REF, "action": "DENY", "rules": [{}]}, **{"istio.io/dry-run": "true"}),
    ]


def test_the_plan_lists_what_uses_the_waypoint() -> None:
    plan = plan_waypoint(state_from_objects(objects()), "shop", "waypoint", TD)
    assert plan.identity == SpiffeId(TD, "shop", "waypoint")  # its pods' service account
    found = {d.authority: d for d in plan.destinations}
    assert set(found) == {f"{VIP}:80", f"{VIP}:9000", "10.1.2.6:7000"}  # not db (no label), not the VIP of db
    http, echo, pinned = found[f"{VIP}:80"], found[f"{VIP}:9000"], found["10.1.2.6:7000"]
    assert (http.protocol, echo.protocol, pinned.protocol) == ("http", "tcp", "http")
    assert [b.authority for b in http.backends] == ["10.1.1.3:8080", "10.1.2.3:8080"]  # targetPort resolved
    assert {b.identity for b in http.backends} == {SpiffeId(TD, "shop", "web")}
    assert [p.key for p in http.policies] == ["shop/no-admin", "shop/web-get"]  # Gateway ref, then Service ref
    assert [p.key for p in pinned.policies] == ["shop/no-admin"]  # Service refs do not reach pod traffic
    assert pinned.backends[0].pod == "shop/pinned" and pinned.target == "pod shop/pinned"
    assert any("10.1.2.4 is not in the mesh" in n for n in plan.notes)
    assert any("shop/trial is dry-run" in n for n in plan.notes)


def test_waypoint_for_service_takes_no_pod_traffic_and_unknown_waypoints_are_an_error() -> None:
    plan = plan_waypoint(state_from_objects(objects("service")), "shop", "waypoint", TD)
    assert {d.authority for d in plan.destinations} == {f"{VIP}:80", f"{VIP}:9000"}
    with pytest.raises(WaypointError, match="does not exist"):
        plan_waypoint(state_from_objects(objects()), "shop", "nope", TD)


@pytest.mark.parametrize("name, protocol", [("http", "http"), ("http-web", "http"), ("HTTP2", "http"),
                                            ("grpc", "http"), ("grpc-web", "http"), ("echo", "tcp"),
                                            ("httpx", "tcp"), ("", "tcp"), ("tcp-http", "tcp")])
def test_port_protocol_follows_istios_port_naming(name: str, protocol: str) -> None:
    assert port_protocol(name) == protocol


# --- policies as RBAC ------------------------------------------------------------------------------------------

def parsed(spec: dict[str, Any]) -> Any:
    return parse_authorization_policy(policy("p", {"targetRefs": GATEWAY_REF, **spec}))


def test_allow_rule_becomes_permission_and_principal() -> None:
    rules = rbac_rules([parsed({"rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/client"],
                                                                 "ipBlocks": ["10.1.0.0/16"]}}],
                                            "to": [{"operation": {"methods": ["GET", "HEAD"], "paths": ["/api/*"]}}]}]})],
                       VIP, 80, http=True)
    assert rules.deny is None and rules.notes == ()
    (only,) = rules.allow["policies"].values()
    assert only["permissions"] == [{"and_rules": {"rules": [
        {"or_rules": {"rules": [{"header": {"name": ":method", "string_match": {"exact": "GET"}}},
                                {"header": {"name": ":method", "string_match": {"exact": "HEAD"}}}]}},
        {"url_path": {"path": {"prefix": "/api/"}}}]}}]
    assert only["principals"] == [{"and_ids": {"ids": [
        {"filter_state": {"key": PEER_PRINCIPAL_KEY,
                          "string_match": {"exact": "spiffe://cluster.local/ns/shop/sa/client"}}},
        {"remote_ip": {"address_prefix": "10.1.0.0", "prefix_len": 16}}]}}]


def test_ports_are_settled_per_destination() -> None:
    spec = {"rules": [{"to": [{"operation": {"ports": ["9000"]}}]}]}
    assert rbac_rules([parsed(spec)], VIP, 9000, http=False).allow["policies"] != {}
    # on port 80 the only rule cannot match: an ALLOW policy that matches nothing allows nothing
    assert rbac_rules([parsed(spec)], VIP, 80, http=True).allow == {"action": "ALLOW", "policies": {}}


def test_http_fields_on_a_tcp_destination_follow_istio() -> None:
    """ALLOW: the rule is dropped (allows less); DENY: the field is ignored (denies more)."""
    allow = rbac_rules([parsed({"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]})], VIP, 9000, http=False)
    assert allow.allow["policies"] == {} and "matches nothing" in allow.notes[0]
    deny = rbac_rules([parsed({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/x"]}}]}]})], VIP, 9000,
                      http=False)
    assert list(deny.deny["policies"].values()) == [{"permissions": [{"any": True}], "principals": [{"any": True}]}]
    assert "denies more" in deny.notes[0]


def test_namespaces_negations_and_when_conditions() -> None:
    rules = rbac_rules([parsed({"action": "DENY", "rules": [{
        "from": [{"source": {"notNamespaces": ["shop"]}}],
        "to": [{"operation": {"notPaths": ["/healthz"]}}],
        "when": [{"key": "request.headers[X-Debug]", "values": ["*"]},
                 {"key": "destination.port", "values": ["80"]}]}]})], VIP, 80, http=True)
    (only,) = rules.deny["policies"].values()
    assert only["principals"] == [{"not_id": {"filter_state": {"key": PEER_PRINCIPAL_KEY, "string_match": {
        "safe_regex": {"regex": "spiffe://[^/]+/ns/shop/sa/[^/]+"}}}}}]
    assert only["permissions"] == [{"and_rules": {"rules": [
        {"not_rule": {"url_path": {"path": {"exact": "/healthz"}}}},
        {"header": {"name": "x-debug", "present_match": True}}]}}]


def test_empty_rules_mean_all_or_nothing() -> None:
    allow_all = rbac_rules([parsed({"rules": [{}]})], VIP, 80, http=True)
    assert list(allow_all.allow["policies"].values()) == [{"permissions": [{"any": True}], "principals": [{"any": True}]}]
    allow_nothing = rbac_rules([parsed({})], VIP, 80, http=True)
    assert allow_nothing.allow == {"action": "ALLOW", "policies": {}}


def test_unsupported_attributes_drop_allow_rules() -> None:
    rules = rbac_rules([parsed({"rules": [{"from": [{"source": {"requestPrincipals": ["*"]}}]},
                                          {"to": [{"operation": {"paths": ["/ok"]}}]}]})], VIP, 80, http=True)
    assert list(rules.allow["policies"]) == ["policy shop/p rules[1]"]
    assert "source.requestPrincipals" in rules.notes[0]


# --- the bootstrap ---------------------------------------------------------------------------------------------

@pytest.fixture
def cluster_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump_all(objects()))
    LocalCA.load_or_create(tmp_path / "ca", TD)
    return path


def test_ambit_waypoint_writes_a_bootstrap_envoy_accepts(cluster_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        envoy = envoy_support.envoy_binary()
    except FileNotFoundError:
        pytest.skip("envoy binary not installed")
    out = cluster_file.parent / "out"
    with pytest.raises(SystemExit) as exit_info:
        ambit_main(["waypoint", "shop/waypoint", "--config-file", str(cluster_file), "--ca-dir",
                    str(cluster_file.parent / "ca"), "--out-dir", str(out)])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "waypoint shop/waypoint (for all traffic) as spiffe://cluster.local/ns/shop/sa/waypoint" in printed
    config = json.loads((out / "envoy.json").read_text())
    # The bootstrap names the files Envoy watches; the resources are in them.
    assert config["dynamic_resources"]["lds_config"]["path_config_source"]["path"] == str(out / "xds" / "lds.json")
    assert config["dynamic_resources"]["cds_config"]["path_config_source"]["path"] == str(out / "xds" / "cds.json")
    resources = XdsFiles(out / "xds").read()
    listeners = {l["name"]: l for l in resources.listeners}
    assert set(listeners) == {"hbone", f"inbound|{VIP}:80", f"inbound|{VIP}:9000", "inbound|10.1.2.6:7000",
                              "connect|10.1.1.3:8080", "connect|10.1.2.3:8080", "connect|10.1.1.3:9000",
                              "connect|10.1.2.3:9000", "connect|10.1.2.6:7000"}
    hbone = listeners["hbone"]
    assert hbone["address"]["socket_address"]["port_value"] == 15008
    # Routes by authority come from RDS: they change under HBONE connections already up.
    rds = hbone["filter_chains"][0]["filters"][0]["typed_config"]["rds"]
    assert rds["config_source"]["path_config_source"]["path"] == str(out / "xds" / "rds.json")
    (routes,) = resources.routes
    assert routes["name"] == rds["route_config_name"]
    # Listeners may arrive before the clusters they name (separate files, warming):
    # a route that validated clusters would get the whole listener update rejected.
    inbound = listeners[f"inbound|{VIP}:80"]["filter_chains"][0]["filters"][0]["typed_config"]
    assert routes["validate_clusters"] is False and inbound["route_config"]["validate_clusters"] is False
    assert {vh["name"] for vh in routes["virtual_hosts"]} == {f"{VIP}:80", f"{VIP}:9000", "10.1.2.6:7000"}
    clusters = {c["name"]: c for c in resources.clusters}
    tls = clusters["hbone|10.1.1.3"]["transport_socket"]["typed_config"]["common_tls_context"]
    validation = tls["combined_validation_context"]
    assert validation["default_validation_context"]["match_typed_subject_alt_names"][0]["matcher"] == {
        "exact": "spiffe://cluster.local/ns/shop/sa/web"}  # the backend's identity is checked
    # Certificate and bundle come from SDS files next to the bootstrap (rotated without a restart).
    (identity,) = tls["tls_certificate_sds_secret_configs"]
    assert identity["sds_config"]["path_config_source"] == {
        "path": str(out / "certs" / "identity-sds.json"), "watched_directory": {"path": str(out / "certs")}}
    secret = json.loads((out / "certs" / "identity-sds.json").read_text())["resources"][0]
    assert secret["name"] == identity["name"] == "waypoint-identity"
    cert = x509.load_pem_x509_certificate(secret["tls_certificate"]["certificate_chain"]["inline_string"].encode())
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier) == ["spiffe://cluster.local/ns/shop/sa/waypoint"]
    assert (out / "certs" / "identity-sds.json").stat().st_mode & 0o777 == 0o600  # holds the key
    bundle = validation["validation_context_sds_secret_config"]
    assert json.loads((out / "certs" / "bundle-sds.json").read_text())["resources"][0]["name"] == bundle["name"]
    result = subprocess.run([envoy, "--mode", "validate", "-c", str(out / "envoy.json")], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "OK" in result.stdout


def test_ambit_waypoint_reports_unusable_input(cluster_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = cluster_file.parent / "out"
    base = ["--config-file", str(cluster_file), "--out-dir", str(out)]
    for argv, code, message in (
            (["waypoint", "shop/nope", "--ca-dir", str(cluster_file.parent / "ca"), *base], 1, "does not exist"),
            (["waypoint", "shop/waypoint", "--ca-dir", str(cluster_file.parent / "no-ca"), *base], 1, "no-ca"),
            (["waypoint", "waypoint", "--ca-dir", str(cluster_file.parent / "ca"), *base], 2, "NAMESPACE/NAME"),
            (["waypoint", "shop/waypoint", "--ca-dir", str(cluster_file.parent / "ca"), "--out-dir", str(out)], 2,
             "give --config-file PATH (repeatable) or --kube"),
            (["waypoint", "shop/waypoint", "--ca-dir", str(cluster_file.parent / "ca"), "--watch", *base], 2,
             "--watch needs --run")):
        with pytest.raises(SystemExit) as exit_info:
            ambit_main(argv)
        assert exit_info.value.code == code
        assert message in capsys.readouterr().err
    assert not (out / "envoy.json").exists()


def test_every_destination_of_an_empty_waypoint_is_refused() -> None:
    state = state_from_objects([o for o in objects() if o["kind"] in ("Namespace", "Gateway")])
    plan = plan_waypoint(state, "shop", "waypoint", TD)
    assert plan.destinations == () and plan.identity == SpiffeId(TD, "shop", "waypoint")  # Istio's default SA
    resources, _ = waypoint_resources(plan, SecretFiles(Path("/certs")), XdsFiles(Path("/xds")))
    assert [l["name"] for l in resources.listeners] == ["hbone"] and resources.clusters == []
    (routes,) = resources.routes
    assert routes["virtual_hosts"] == []  # every CONNECT: 404


# --- the policy model keeps what a waypoint needs -----------------------------------------------------------

def test_target_refs_are_kept_and_checked() -> None:
    parsed_policy = parsed({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/a"], "methods": ["PUT"]}}]}]})
    assert [(r.kind, r.name, r.group) for r in parsed_policy.target_refs] == [
        ("Gateway", "waypoint", "gateway.networking.k8s.io")]
    (rule,) = parsed_policy.waypoint_rules
    assert rule.operations[0].paths == ("/a",) and rule.operations[0].methods == ("PUT",)
    assert parsed_policy.skip_reason is not None  # still not the node proxy's to enforce
    with pytest.raises(PolicyError, match="kind and name are required"):
        parse_authorization_policy(policy("bad", {"targetRefs": [{"kind": "Service"}]}))


# --- the lab's waypoint pods ----------------------------------------------------------------------------------

def test_lab_waypoint_pods_must_name_their_gateway_and_stay_out_of_the_mesh() -> None:
    from ambit.lab import labconfig
    tour = labconfig.load_tour()
    waypoint_pod = tour.pod("shop/waypoint-0")
    assert waypoint_pod.workloads == ("waypoint",) and waypoint_pod.waypoint == "waypoint"
    assert not tour.ambient(waypoint_pod) and waypoint_pod.workload_port("waypoint") == 15008

    def lab_pod(labels: dict[str, str], workload: str = "waypoint") -> str:
        return yaml.safe_dump({"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": "wp", "namespace": "default", "labels": labels,
            "annotations": {"lab.ambit.dev/workload": workload}}, "spec": {}})

    with pytest.raises(labconfig.LabConfigError, match="gateway-name"):
        labconfig.parse_yaml(lab_pod({"istio.io/dataplane-mode": "none"}))
    with pytest.raises(labconfig.LabConfigError, match="must stay out of the mesh"):
        labconfig.parse_yaml(lab_pod({"gateway.networking.k8s.io/gateway-name": "wp"}))
    with pytest.raises(labconfig.LabConfigError, match="runs only the waypoint"):
        labconfig.parse_yaml(lab_pod({"gateway.networking.k8s.io/gateway-name": "wp",
                                      "istio.io/dataplane-mode": "none"}, "waypoint,http"))
