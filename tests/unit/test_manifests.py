"""The Kubernetes manifests under install/kubernetes and the Dockerfile.

Every manifest document is read into the `kubernetes` client's models (a
field the model does not know is dropped by the client, so the round trip
back to a dict must give the document unchanged), validated against the
Kubernetes JSON schemas in strict mode (kubernetes-validate), and the
security-relevant fields are checked one by one: what runs privileged, what
of the host is mounted, what the ClusterRole grants. The settings the
ConfigMap hands the containers are fed through the real argument parsers.
The Dockerfile is parsed with dockerfile-parse and checked for structure
and for sources that exist.
"""
from __future__ import annotations

import argparse
import io
import json
import re
import shlex
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser
from kubernetes.client import ApiClient

from ambit.agent.install_cni import cli as install_cli
from ambit.agent.install_cni.cniconf import PluginSettings
from ambit.cni import spec as cnispec

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((REPO / "install" / "kubernetes").glob("*.yaml"))
KUBERNETES_VERSION = "1.30"  # the oldest release the manifests are checked against
MODEL = {("v1", "Namespace"): "V1Namespace", ("v1", "ServiceAccount"): "V1ServiceAccount",
         ("v1", "ConfigMap"): "V1ConfigMap", ("apps/v1", "DaemonSet"): "V1DaemonSet",
         ("apps/v1", "Deployment"): "V1Deployment", ("v1", "Service"): "V1Service",
         ("rbac.authorization.k8s.io/v1", "ClusterRole"): "V1ClusterRole",
         ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): "V1ClusterRoleBinding"}


def documents() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return out


DOCS = documents()


def find(kind: str, name: str) -> dict[str, Any]:
    matches = [doc for _, doc in DOCS if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def to_model(doc: dict[str, Any]) -> Any:
    return ApiClient()._ApiClient__deserialize(doc, MODEL[(doc["apiVersion"], doc["kind"])])


def install_cli_parser() -> argparse.ArgumentParser:
    """`ambit install-cni`'s own argument parser (reads the environment when built)."""
    return install_cli.add_parser(argparse.ArgumentParser().add_subparsers())


def container(pod_spec: dict[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    group = pod_spec["initContainers"] if init else pod_spec["containers"]
    return next(c for c in group if c["name"] == name)


def mounts(c: dict[str, Any], pod_spec: dict[str, Any]) -> dict[str, tuple[str, bool, str | None]]:
    """host path -> (path in the container, read-only, propagation)."""
    host = {v["name"]: v["hostPath"]["path"] for v in pod_spec["volumes"] if "hostPath" in v}
    return {host[m["name"]]: (m["mountPath"], m.get("readOnly", False), m.get("mountPropagation"))
            for m in c.get("volumeMounts", []) if m["name"] in host}


# --- every document ---------------------------------------------------------------------------------------------

def test_there_are_manifests():
    kinds = sorted(doc["kind"] for _, doc in DOCS)
    assert kinds == ["ClusterRole", "ClusterRole", "ClusterRoleBinding", "ClusterRoleBinding", "ConfigMap",
                     "DaemonSet", "DaemonSet", "Deployment", "Namespace", "Service", "ServiceAccount",
                     "ServiceAccount"]


@pytest.mark.parametrize("label, doc", DOCS, ids=[label for label, _ in DOCS])
def test_each_document_is_a_valid_kubernetes_object(label, doc):
    model = to_model(doc)
    assert model.kind == doc["kind"]
    # the client drops what its model does not know: a misspelt field would vanish here
    assert ApiClient().sanitize_for_serialization(model) == doc
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_schema_validator_catches_a_misspelt_field():
    """The check above is only worth something if it fails on a typo."""
    ds = json.loads(json.dumps(find("DaemonSet", "ambit-node")))
    ds["spec"]["template"]["spec"]["hostNetwrok"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, KUBERNETES_VERSION, strict=True)


def test_namespaced_objects_live_in_ambit_system():
    for label, doc in DOCS:
        if doc["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"].get("namespace") == "ambit-system", label
    assert find("Namespace", "ambit-system")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == \
        "privileged"


# --- RBAC -------------------------------------------------------------------------------------------------------

def test_cluster_role_grants_every_kind_the_agent_watches():
    """A kind KubeSource lists without the grant is a 403 for ever: the agent never syncs."""
    from ambit.agent.discovery.kube import GATEWAY_API_GROUP, ISTIO_SECURITY_GROUP
    from ambit.agent.discovery.model import ALL_KINDS
    resources = {"Namespace": ("", "namespaces"), "Pod": ("", "pods"), "Service": ("", "services"),
                 "EndpointSlice": ("discovery.k8s.io", "endpointslices"),
                 "AuthorizationPolicy": (ISTIO_SECURITY_GROUP, "authorizationpolicies"),
                 "PeerAuthentication": (ISTIO_SECURITY_GROUP, "peerauthentications"),
                 "Gateway": (GATEWAY_API_GROUP, "gateways")}
    role = to_model(find("ClusterRole", "ambit-node"))
    granted = {(group, resource) for rule in role.rules for group in rule.api_groups for resource in rule.resources
               if {"list", "watch"} <= set(rule.verbs)}
    for kind in ALL_KINDS:
        assert resources[kind] in granted, f"the agent watches {kind} but the ClusterRole does not grant it"


def test_cluster_role_grants_only_reads_discovery_needs():
    """Nothing to write, no Secrets: the agent holds no CA key and cannot fetch one."""
    role = to_model(find("ClusterRole", "ambit-node"))
    granted = {(group, resource, verb) for rule in role.rules for group in rule.api_groups
               for resource in rule.resources for verb in rule.verbs}
    needed = {("", "pods"), ("", "namespaces"), ("", "services"), ("discovery.k8s.io", "endpointslices"),
              ("security.istio.io", "authorizationpolicies"), ("security.istio.io", "peerauthentications"),
              ("gateway.networking.k8s.io", "gateways")}
    assert granted == {(g, r, v) for g, r in needed for v in ("get", "list", "watch")}
    assert all(rule.resource_names is None and rule.non_resource_urls is None for rule in role.rules)


@pytest.mark.parametrize("name, kind", [("ambit-node", "DaemonSet"), ("ambit-ca", "Deployment")])
def test_bindings_give_each_role_to_its_own_service_account(name, kind):
    binding = to_model(find("ClusterRoleBinding", name))
    assert (binding.role_ref.kind, binding.role_ref.name) == ("ClusterRole", name)
    assert [(s.kind, s.namespace, s.name) for s in binding.subjects] == [("ServiceAccount", "ambit-system", name)]
    assert find(kind, name)["spec"]["template"]["spec"]["serviceAccountName"] == name
    find("ServiceAccount", name)


def test_the_ca_may_review_tokens_and_see_pods_and_nothing_else():
    role = to_model(find("ClusterRole", "ambit-ca"))
    granted = {(group, resource, verb) for rule in role.rules for group in rule.api_groups
               for resource in rule.resources for verb in rule.verbs}
    assert granted == {("authentication.k8s.io", "tokenreviews", "create"), ("", "pods", "get"), ("", "pods", "list")}


# --- the CA Deployment: the only place the key is --------------------------------------------------------------

def test_the_ca_key_secret_is_mounted_by_the_ca_deployment_alone():
    holders = []
    for label, doc in DOCS:
        if doc["kind"] in ("DaemonSet", "Deployment"):
            spec = doc["spec"]["template"]["spec"]
            if any(v.get("secret", {}).get("secretName") == "ambit-ca" for v in spec.get("volumes", [])):
                holders.append(label)
    assert holders == ["ambit.yaml:Deployment/ambit-ca"]


def test_ca_deployment_serves_istios_api_unprivileged(monkeypatch):
    from ambit.ca.cli import add_parser as ca_parser
    deployment = find("Deployment", "ambit-ca")
    spec = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= \
        deployment["spec"]["template"]["metadata"]["labels"].items()
    assert spec["securityContext"]["runAsNonRoot"] is True and "hostNetwork" not in spec
    ca = container(spec, "ambit-ca")
    ctx = ca["securityContext"]
    assert ctx["allowPrivilegeEscalation"] is False and ctx["readOnlyRootFilesystem"] is True
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    env = {e["name"]: e["value"] for e in ca["env"]}
    assert env["CA_TRUSTED_NODE_ACCOUNTS"] == "ambit-system/ambit-node"
    # the command goes through the real parser, with the Deployment's environment
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    parser = argparse.ArgumentParser()
    ca_parser(parser.add_subparsers())
    args = parser.parse_args(ca["command"][1:])
    assert (args.action, str(args.ca_dir), args.dns_name) == ("serve", "/etc/ambit/ca", ["ambit-ca.ambit-system.svc"])
    assert args.trusted_node_accounts == "ambit-system/ambit-node" and args.token_file is None
    assert {"name": "ca", "mountPath": str(args.ca_dir), "readOnly": True} in ca["volumeMounts"]
    service = find("Service", "ambit-ca")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(15012, 15012)]
    port = args.listen.rpartition(":")[2]
    assert int(port) == 15012 and {p["containerPort"] for p in ca["ports"]} == {15012, 15014, 15021}


# --- the node DaemonSet -----------------------------------------------------------------------------------------

@pytest.fixture
def node_pod() -> dict[str, Any]:
    ds = find("DaemonSet", "ambit-node")
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    return ds["spec"]["template"]["spec"]


def test_node_pods_are_upgraded_by_a_hand_over_never_leaving_a_node_without_an_agent():
    strategy = find("DaemonSet", "ambit-node")["spec"]["updateStrategy"]
    assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}


def test_node_pod_runs_on_every_node_in_the_host_network(node_pod):
    model = to_model(find("DaemonSet", "ambit-node")).spec.template.spec
    assert model.host_network is True
    assert model.dns_policy == "ClusterFirstWithHostNet"
    assert model.host_pid is None and model.host_ipc is None
    assert model.priority_class_name == "system-node-critical"
    assert [(t.operator, t.key, t.effect) for t in model.tolerations] == [("Exists", None, None)]
    assert 0 < model.termination_grace_period_seconds <= 60


def test_agent_container(node_pod):
    agent = container(node_pod, "ambit-agent")
    assert agent["securityContext"] == {"privileged": True}
    probe = agent["readinessProbe"]["httpGet"]
    assert (probe["port"], probe["path"]) == (15021, "/healthz/ready")
    # No declared ports: in the host network they are hostPorts, and the upgrade's surge pod
    # would not fit beside the old one (the agent hands 15020/15021 over itself).
    assert "ports" not in agent
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in agent["env"] if "valueFrom" in e}
    assert env == {"NODE_NAME": "spec.nodeName", "POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace"}
    host = mounts(agent, node_pod)
    assert host["/var/run/ambit"] == ("/var/run/ambit", False, None)
    assert host["/var/run/netns"] == ("/var/run/netns", False, "Bidirectional")
    assert host["/sys/fs/bpf"] == ("/sys/fs/bpf", False, "Bidirectional")
    assert host["/lib/modules"] == ("/lib/modules", True, None)
    assert host["/usr/src"] == ("/usr/src", True, None)
    assert "/etc/cni/net.d" not in host and "/opt/cni/bin" not in host  # the agent does not need them


@pytest.mark.parametrize("name, init, args", [("install-cni", True, []),
                                              ("install-cni-watch", False, ["--watch"])])
def test_install_cni_containers(node_pod, name, init, args):
    c = container(node_pod, name, init=init)
    assert c["command"] == ["ambit", "install-cni", *args]
    ctx = c["securityContext"]
    assert "privileged" not in ctx and ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]} and ctx["readOnlyRootFilesystem"] is True
    config = find("ConfigMap", "ambit-config")["data"]
    assert mounts(c, node_pod) == {"/opt/cni/bin": (config["AMBIT_CNI_BIN_DIR"], False, None),
                                   "/etc/cni/net.d": (config["AMBIT_CNI_CONF_DIR"], False, None)}
    assert c["envFrom"] == [{"configMapRef": {"name": "ambit-config"}}]


def test_every_container_has_requests_and_limits():
    for label, doc in DOCS:
        if doc["kind"] not in ("DaemonSet", "Deployment"):
            continue
        spec = doc["spec"]["template"]["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            assert set(c["resources"]) == {"requests", "limits"}, f"{label} {c['name']}"
            assert set(c["resources"]["limits"]) == {"cpu", "memory"}, f"{label} {c['name']}"


def test_all_host_mounts_are_the_expected_ones(node_pod):
    paths = {v["hostPath"]["path"] for v in node_pod["volumes"] if "hostPath" in v}
    assert [v for v in node_pod["volumes"] if "secret" in v] == []
    assert paths == {"/opt/cni/bin", "/etc/cni/net.d", "/sys/fs/bpf", "/var/run/netns", "/var/run/ambit",
                     "/lib/modules", "/usr/src"}


# --- the settings the ConfigMap hands over ----------------------------------------------------------------------

def test_config_map_drives_install_cni(monkeypatch):
    config = find("ConfigMap", "ambit-config")["data"]
    assert all(isinstance(v, str) for v in config.values())
    for key, value in config.items():
        monkeypatch.setenv(key, value)
    args = install_cli_parser().parse_args([])
    assert args.cni_bin_dir == "/host/opt/cni/bin" and args.cni_conf_dir == "/host/etc/cni/net.d"
    assert args.plugin == install_cli.DEFAULT_PLUGIN
    assert args.wait_for_primary == 300
    settings = PluginSettings(agent_socket=args.agent_socket, timeout=cnispec.parse_timeout(args.timeout),
                              log_level=args.cni_log_level)
    assert settings.entry() == {"type": "ambit-cni", "agentSocket": cnispec.DEFAULT_AGENT_SOCKET, "timeout": 5,
                                "logLevel": "info"}


def test_config_map_drives_the_agent(monkeypatch):
    from ambit.agent.main import parse_args
    config = find("ConfigMap", "ambit-config")["data"]
    for key, value in config.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("NODE_NAME", "worker-1")
    agent = parse_args([])
    # the plugin runs on the host and dials this path: the agent container must see it at the same place
    assert agent.socket == config["AMBIT_AGENT_SOCKET"] == cnispec.DEFAULT_AGENT_SOCKET
    assert agent.socket.startswith("/var/run/ambit/")
    assert (agent.node_name, agent.capture, agent.state_dir) == ("worker-1", "ebpf", "/var/run/ambit/state")
    # discovery from the API server, certificates from the CA service, asked with the node's own token
    assert agent.discovery == "kube" and agent.ca is not None
    service = find("Service", "ambit-ca")
    assert agent.ca.target == f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc:" \
                              f"{service['spec']['ports'][0]['port']}"
    node_spec = find("DaemonSet", "ambit-node")["spec"]["template"]["spec"]
    agent_container = container(node_spec, "ambit-agent")
    volumes = {v["name"]: v for v in node_spec["volumes"]}
    mounted = {m["name"]: m["mountPath"] for m in agent_container["volumeMounts"]}
    token = volumes["istio-token"]["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "istio-ca"  # what the CA's TokenReview asks for, as istiod's
    assert agent.ca.token_file == Path(mounted["istio-token"]) / token["path"]
    assert volumes["istio-ca-root-cert"]["configMap"]["name"] == "istio-ca-root-cert"
    assert agent.ca.root_cert_file == Path(mounted["istio-ca-root-cert"]) / "root-cert.pem"


# --- uninstall --------------------------------------------------------------------------------------------------

def test_uninstall_daemonset():
    spec = find("DaemonSet", "ambit-cni-uninstall")["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert "hostNetwork" not in spec
    c = container(spec, "uninstall-cni", init=True)
    assert c["command"][:2] == ["ambit", "install-cni"]
    parsed = install_cli_parser().parse_args(c["command"][2:])
    assert parsed.uninstall and not parsed.watch
    assert mounts(c, spec) == {"/opt/cni/bin": (parsed.cni_bin_dir, False, None),
                               "/etc/cni/net.d": (parsed.cni_conf_dir, False, None)}
    assert "privileged" not in c["securityContext"]


# --- Dockerfile -------------------------------------------------------------------------------------------------

KNOWN_INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
                      "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL", "COMMENT"}


@pytest.fixture
def dockerfile() -> list[dict[str, Any]]:
    parser = DockerfileParser(fileobj=io.BytesIO((REPO / "Dockerfile").read_bytes()))
    return [i for i in parser.structure if i["instruction"] != "COMMENT"]


def test_dockerfile_structure(dockerfile):
    assert {i["instruction"] for i in dockerfile} <= KNOWN_INSTRUCTIONS
    first = next(i for i in dockerfile if i["instruction"] != "ARG")
    assert first["instruction"] == "FROM"
    stages = [i["value"].split() for i in dockerfile if i["instruction"] == "FROM"]
    assert all(s[0].startswith("debian:") for s in stages)
    assert stages[0][1:] == ["AS", "cni-builder"] and len(stages[-1]) == 1  # builder, then the image
    entry = next(i for i in dockerfile if i["instruction"] == "ENTRYPOINT")
    assert json.loads(entry["value"]) == ["ambit-agent"]
    runs = " ".join(i["value"] for i in dockerfile if i["instruction"] == "RUN")
    assert "python3-bpfcc" in runs and "freeze-cni.sh" in runs


def test_dockerfile_copy_sources_exist(dockerfile):
    stage_names: list[str] = []
    for i in dockerfile:
        if i["instruction"] == "FROM":
            words = i["value"].split()
            if len(words) == 3:
                stage_names.append(words[2])
        if i["instruction"] not in ("COPY", "ADD"):
            continue
        words = shlex.split(i["value"])
        flags = [w for w in words if w.startswith("--")]
        sources = [w for w in words if not w.startswith("--")][:-1]
        assert sources, i["value"]
        from_stage = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
        if from_stage is not None:
            assert from_stage in stage_names, f"COPY from unknown stage {from_stage}"
            continue
        for source in sources:
            assert list(REPO.glob(source)), f"Dockerfile line {i['startline'] + 1}: COPY source {source} missing"


def test_dockerfile_ships_the_frozen_plugin_where_install_cni_looks(dockerfile):
    copy = next(i for i in dockerfile if i["instruction"] == "COPY" and "--from=cni-builder" in i["value"])
    source, dest = shlex.split(copy["value"])[1:]
    # freeze-cni.sh writes build/cni-frozen/ambit-cni/ in the builder's /src
    assert source == "/src/build/cni-frozen/ambit-cni"
    assert re.search(r"^out=build/cni-frozen$", (REPO / "scripts" / "freeze-cni.sh").read_text(), re.M)
    assert dest + "/ambit-cni" == install_cli.DEFAULT_PLUGIN == \
        find("ConfigMap", "ambit-config")["data"]["AMBIT_CNI_PLUGIN"]
    pins = re.search(r"grep -ihE '([^']+)' requirements.txt requirements-dev.txt",
                     " ".join(i["value"] for i in dockerfile)).group(1)
    pinned = [line for name in ("requirements.txt", "requirements-dev.txt")
              for line in (REPO / name).read_text().splitlines() if re.match(pins, line, re.I)]
    assert sorted(p.split("==")[0].lower() for p in pinned) == ["h2", "pyinstaller"]
