"""The lab file: Kubernetes objects in, a checked cluster description out.

Also the pure parts built on it: node placement, the lab plan (names and
addresses), and the built-in HTTP server's request handling.
"""
from __future__ import annotations

import ipaddress
import textwrap
from pathlib import Path

import pytest

from ambit.lab import labconfig
from ambit.agent.discovery.model import ContainerPort
from ambit.lab.labconfig import LabConfigError, parse_documents, parse_yaml
from ambit.lab.errors import LabError
from ambit.lab.plan import lab_conflist, LabSettings, plan_lab
from ambit.lab.podapp import BadRequest, Identity, body_chunks, parse_request_head, respond


def ns(name, labels=None):
    meta = {"name": name, **({"labels": labels} if labels else {})}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}


def sa(namespace, name):
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace}}


def pod(namespace, name, *, node=None, sa_name=None, labels=None, workload=None, ports=None):
    meta = {"name": name, "namespace": namespace, "labels": labels or {}}
    if workload is not None:
        meta["annotations"] = {labconfig.WORKLOAD_ANNOTATION: workload}
    spec = {"containers": [{"name": "c", "image": "x", **({"ports": ports} if ports is not None else {})}]}
    if node:
        spec["nodeName"] = node
    if sa_name:
        spec["serviceAccountName"] = sa_name
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


def svc(namespace, name, selector, ports, cluster_ip=None):
    spec = {"selector": selector, "ports": ports}
    if cluster_ip is not None:
        spec["clusterIP"] = cluster_ip
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace}, "spec": spec}


# --- the default file -------------------------------------------------------------------------------------------

def test_default_lab_is_two_nodes_with_ambient_and_legacy_namespaces():
    cfg = labconfig.load_default()
    assert cfg.node_names() == ("node1", "node2")
    assert cfg.ambient(cfg.pod("shop/web-0")) and not cfg.ambient(cfg.pod("legacy/probe-0"))
    placement = cfg.assign_nodes(cfg.node_names())
    assert placement["shop/web-0"] == "node1" and placement["shop/web-1"] == "node2"
    assert {"shop/client-0", "legacy/probe-0"} <= set(placement)
    web0 = cfg.pod("shop/web-0")
    assert web0.workloads == ("http", "echo") and web0.workload_port("http") == 8080
    assert web0.service_account == "web"
    assert cfg.pod("shop/client-0").workloads == ()
    assert cfg.ambient(cfg.pod("shop/client-0")) and not cfg.ambient(cfg.pod("legacy/probe-0"))
    (web,) = cfg.services
    assert web.key == "shop/web" and ipaddress.ip_address(web.cluster_ip) in ipaddress.ip_network("10.96.0.0/16")
    assert [p.key for p in cfg.endpoints(web)] == ["shop/web-0", "shop/web-1"]
    (policy,) = cfg.policies("AuthorizationPolicy")
    assert policy["spec"]["action"] == "ALLOW"
    assert policy["spec"]["rules"][0]["from"][0]["source"]["namespaces"] == ["shop"]
    assert {("shop", "web"), ("shop", "client"), ("legacy", "probe")} == {
        (a.namespace, a.name) for a in cfg.service_accounts}


def test_default_file_is_found_next_to_the_module():
    path = Path(labconfig.__file__).with_name(labconfig.DEFAULT_FILE)
    assert path.read_text() == labconfig.default_lab_text()


# --- parsing ----------------------------------------------------------------------------------------------------

def test_pod_fields_and_workload_ports():
    cfg = parse_documents([
        ns("shop", {"istio.io/dataplane-mode": "ambient"}), sa("shop", "web"),
        pod("shop", "web-0", node="node2", sa_name="web", labels={"app": "web"}, workload="echo, http",
            ports=[{"name": "http", "containerPort": 8000}, {"containerPort": 53, "protocol": "UDP"}]),
    ])
    p = cfg.pod("shop/web-0")
    assert (p.node_name, p.service_account, dict(p.labels)) == ("node2", "web", {"app": "web"})
    assert p.workloads == ("echo", "http")
    assert p.workload_port("http") == 8000 and p.workload_port("echo") == 9000  # named port, else default
    assert p.ports[1] == ContainerPort("", 53, "UDP")  # read by the agent's own parser


def test_pod_label_opts_out_of_an_ambient_namespace():
    cfg = parse_documents([ns("shop", {"istio.io/dataplane-mode": "ambient"}),
                           pod("shop", "a"), pod("shop", "b", labels={"istio.io/dataplane-mode": "none"})])
    assert cfg.ambient(cfg.pod("shop/a")) and not cfg.ambient(cfg.pod("shop/b"))


def test_service_cluster_ips_are_allocated_around_explicit_ones():
    cfg = parse_documents([
        ns("a"),
        svc("a", "one", {"app": "x"}, [{"port": 80}]),
        svc("a", "two", {"app": "x"}, [{"port": 80}], cluster_ip="10.96.0.10"),
        svc("a", "three", {"app": "x"}, [{"port": 80}], cluster_ip="None"),
    ])
    ips = {s.name: s.cluster_ip for s in cfg.services}
    assert ips == {"one": "10.96.0.11", "two": "10.96.0.10", "three": None}
    assert cfg.services[0].ports[0].target_port == 80  # targetPort defaults to port


def test_service_without_selector_selects_nothing():
    cfg = parse_documents([pod("default", "p", labels={"app": "x"}),
                           svc("default", "s", {}, [{"port": 80}])])
    assert cfg.endpoints(cfg.services[0]) == ()


def test_other_kinds_pass_through_untouched_and_lists_are_expanded():
    policy = {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
              "metadata": {"name": "strict", "namespace": "shop"}, "spec": {"mtls": {"mode": "STRICT"}}}
    cfg = parse_documents([{"apiVersion": "v1", "kind": "List", "items": [ns("shop"), policy]}, None])
    assert cfg.passthrough == (policy,)
    assert cfg.namespace("shop").name == "shop"


def test_node_objects_name_the_nodes():
    cfg = parse_documents([{"kind": "Node", "metadata": {"name": "worker-a"}},
                           {"kind": "Node", "metadata": {"name": "worker-b"}},
                           pod("default", "p", node="worker-b"), pod("default", "q")])
    assert cfg.node_names() == ("worker-a", "worker-b")
    assert cfg.assign_nodes(cfg.node_names()) == {"default/p": "worker-b", "default/q": "worker-a"}
    with pytest.raises(LabConfigError, match="declares 2 Node objects but 3"):
        cfg.node_names(3)


def test_node_count_from_pods_or_explicit_and_round_robin():
    cfg = parse_documents([pod("default", f"p{i}") for i in range(5)] + [pod("default", "pinned", node="node3")])
    assert cfg.node_names() == ("node1", "node2", "node3")
    placed = cfg.assign_nodes(("node1", "node2", "node3"))
    assert [placed[f"default/p{i}"] for i in range(5)] == ["node1", "node2", "node3", "node1", "node2"]
    assert cfg.node_names(4) == ("node1", "node2", "node3", "node4")
    with pytest.raises(LabConfigError, match=r"Pod default/pinned: spec.nodeName: 'node3' is not a lab node"):
        cfg.node_names(2)


@pytest.mark.parametrize("docs, message", [
    ([{"metadata": {"name": "x"}}], r"document 0: kind: is required"),
    (["just a string"], r"document 0: must be a Kubernetes object"),
    ([ns("a"), {"kind": "Pod", "metadata": {"namespace": "a"}}], r"document 1 \(Pod\): metadata.name: is required"),
    ([pod("default", "Web_0")], r"document 0 \(Pod Web_0\): metadata.name: 'Web_0' is not a DNS label"),
    ([pod("shop", "p")], r"document 0 \(Pod p\): metadata.namespace: namespace 'shop' is not defined"),
    ([pod("default", "p", sa_name="ghost")], r"spec.serviceAccountName: service account 'ghost' is not defined"),
    ([pod("default", "p", workload="ftp")], r"annotations.lab.ambit.dev/workload: unknown workload 'ftp'"),
    ([pod("default", "p", workload="http,echo", ports=[{"name": "http", "containerPort": 9000}])],
     r"would listen on the same port"),
    ([pod("default", "p", ports=[{"containerPort": 70000}])],
     r"spec.containers\[0\].ports\[0\].containerPort: expected a port number"),
    ([pod("default", "p", labels={"version": 1})], r"metadata.labels.version: expected a string, got 1"),
    ([pod("default", "p"), pod("default", "p")], r"document 1 \(Pod p\): metadata.name: a Pod named default/p "
                                                 r"is defined twice"),
    ([svc("default", "s", {}, [{"port": "eighty"}])], r"spec.ports\[0\].port: expected a port number"),
    ([svc("default", "s", {}, [{"port": 80}, {"port": 81}])], r"spec.ports: every port needs a name"),
    ([svc("default", "s", {}, [{"port": 80}], cluster_ip="10.0.0.1")], r"10.0.0.1 is outside the lab's service"),
    ([svc("default", "s", {}, [{"port": 80}], cluster_ip="10.96.0.20"),
      svc("default", "t", {}, [{"port": 80}], cluster_ip="10.96.0.20")], r"document 1 .*already used"),
    ([sa("nowhere", "x")], r"document 0 \(ServiceAccount x\): metadata.namespace: namespace 'nowhere'"),
    ([{"kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": "web"}}],
     r"document 0 \(Pod p\): spec.containers: expected a list, got str"),
])
def test_errors_name_the_document_and_the_field(docs, message):
    with pytest.raises(LabConfigError, match=message):
        parse_documents(docs)


def test_yaml_errors_name_the_source():
    with pytest.raises(LabConfigError, match=r"lab.yaml: not valid YAML"):
        parse_yaml("kind: [unclosed", "lab.yaml")
    text = textwrap.dedent("""\
        kind: Namespace
        metadata: {name: shop}
        ---
        kind: Pod
        metadata: {name: p, namespace: shop}
        spec: {nodeName: 7}
        """)
    with pytest.raises(LabConfigError, match=r"^lab.yaml: document 1 \(Pod p\): spec.nodeName: expected a string"):
        parse_yaml(text, "lab.yaml")


def test_load_file_reports_a_missing_file(tmp_path):
    with pytest.raises(LabConfigError, match="cannot read the lab file"):
        labconfig.load_file(tmp_path / "missing.yaml")


def test_generated_lab():
    cfg = labconfig.generated_config(3, 2)
    assert cfg.node_names() == ("node1", "node2", "node3")
    assert len(cfg.pods) == 6 and all(p.workloads == ("http", "echo") for p in cfg.pods)
    placed = cfg.assign_nodes(cfg.node_names())
    assert sorted(placed.values()) == ["node1", "node1", "node2", "node2", "node3", "node3"]
    assert len(cfg.endpoints(cfg.services[0])) == 6
    with pytest.raises(LabConfigError):
        labconfig.generated_config(0, 1)


# --- the plan ---------------------------------------------------------------------------------------------------

def test_plan_names_and_addresses(tmp_path):
    settings = LabSettings(prefix="labu-", state_dir=tmp_path, underlay_cidr="10.101.0.0/24",
                           pod_supernet="10.245.0.0/16", bpffs_root=tmp_path / "bpf")
    plan = plan_lab(labconfig.load_default(), settings)
    n1, n2 = plan.nodes
    assert (n1.netns, n1.underlay_ip, n1.pod_cidr, n1.underlay_port) == ("labu-node1", "10.101.0.1",
                                                                         "10.245.1.0/24", "labu-n1")
    assert (n2.underlay_ip, n2.pod_cidr) == ("10.101.0.2", "10.245.2.0/24")
    assert n1.socket == tmp_path / "nodes" / "node1" / "agent.sock"
    args = n1.agent_args
    assert args[args.index("--proxy-netns") + 1] == "labu-node1-proxy"
    assert args[args.index("--bpffs-dir") + 1] == str(tmp_path / "bpf" / "labu-node1")
    assert args[args.index("--capture") + 1] == "ebpf"
    assert {p.pod.key: (p.node, p.netns) for p in plan.pods}["legacy/probe-0"] == ("node2", "labu-legacy-probe-0")
    chain = lab_conflist(settings, n1)
    assert [p["type"] for p in chain["plugins"]] == ["bridge", "portmap", "ambit-cni"]
    assert chain["plugins"][0]["ipam"]["subnet"] == "10.245.1.0/24"
    assert chain["plugins"][-1]["agentSocket"] == str(n1.socket)


def test_plan_refuses_what_cannot_be_built(tmp_path):
    with pytest.raises(LabError, match="prefix"):
        LabSettings(prefix="this-prefix-is-too-long-")
    small = LabSettings(prefix="labu-", state_dir=tmp_path, underlay_cidr="10.101.0.0/30")
    with pytest.raises(LabError, match="3 nodes do not fit"):
        plan_lab(labconfig.generated_config(3, 0), small, node_count=3)
    clash = parse_documents([ns("a-b"), ns("a"), pod("a-b", "c"), pod("a", "b-c")])
    with pytest.raises(LabError, match="would share the namespace name"):
        plan_lab(clash, LabSettings(prefix="labu-", state_dir=tmp_path))


# --- the built-in HTTP server (pure part) ---------------------------------------------------------------------

def test_http_root_reports_pod_and_peer():
    req = parse_request_head(b"GET /?x=1 HTTP/1.1\r\nHost: a\r\nConnection: close")
    resp = respond(req, Identity("shop/web-0", "node1"), ("10.244.1.3", 40000), ("10.244.2.2", 8080))
    assert resp.status == 200 and not req.keep_alive
    assert b'"peer": "10.244.1.3"' in resp.body and b'"pod": "shop/web-0"' in resp.body


def test_http_bytes_and_errors():
    me, peer = Identity("p"), ("1.2.3.4", 1)
    resp = respond(parse_request_head(b"GET /bytes/200000 HTTP/1.1"), me, peer, peer)
    assert resp.length == 200000 and sum(len(c) for c in body_chunks(resp)) == 200000
    assert respond(parse_request_head(b"GET /bytes/x HTTP/1.1"), me, peer, peer).status == 400
    assert respond(parse_request_head(b"GET /nope HTTP/1.0"), me, peer, peer).status == 404
    assert respond(parse_request_head(b"POST / HTTP/1.1\r\nContent-Length: 3"), me, peer, peer).status == 405
    assert parse_request_head(b"GET / HTTP/1.1").keep_alive
    assert not parse_request_head(b"GET / HTTP/1.0").keep_alive
    for bad in (b"GET /", b"GET / HTTP/2", b"GET / HTTP/1.1\r\nno-colon"):
        with pytest.raises(BadRequest):
            parse_request_head(bad)
