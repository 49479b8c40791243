"""Identities in the lab come from the CA service, and only the CA holds the key.

    underlay: the CA (`ambit ca serve`, its own process and mount namespace) on the underlay's last address
    node1: shop/client-0, shop/web-0            node2: shop/web-1, legacy/probe-0, shop/waypoint-0 (Envoy)

Agents ask the CA (Istio's certificate API, a token each) for the identities
of their pods; the waypoint asks for its own. Attacks, each refused with the
status Istio's API users expect and counted/logged by the CA: node1's agent
asking for an identity that runs only on node2, a forged token, a waypoint's
token asking for another identity. The CA goes away: tunnels already up and
certificates held keep working, and a pod scheduled meanwhile gets its
certificate once the CA is back. Certificates live 90 s here, so they are
replaced (every ~15 s) while a tunnel stays up.

One lab for the module, prefix `lcat-`, checked clean by tests/kernel/conftest.py.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ambit.agent.cli.client import AgentClient
from ambit.agent.netns import NetnsThread, netns_path
from ambit.lab import labconfig
from ambit.lab.topology import Lab
from ambit.waypoint.runner import child_pids
from tests.support.waiting import wait_until
from tests.support.logfile import read_json_lines
from tests.support.labobserve import spiffe

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(400)]

WORKLOAD = [sys.executable, "-m", "ambit.lab.podapp"]
CLIENT = [sys.executable, str(Path(__file__).resolve().parents[1] / "support" / "labclient.py")]
CERT_TTL_S = "90"


LAB = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
{apiVersion: v1, kind: Namespace, metadata: {name: legacy}}
---
{apiVersion: v1, kind: ServiceAccount, metadata: {name: client, namespace: shop}}
---
{apiVersion: v1, kind: ServiceAccount, metadata: {name: web, namespace: shop}}
---
{apiVersion: v1, kind: ServiceAccount, metadata: {name: waypoint, namespace: shop}}
---
{apiVersion: v1, kind: ServiceAccount, metadata: {name: newcomer, namespace: shop}}
---
{apiVersion: v1, kind: ServiceAccount, metadata: {name: probe, namespace: legacy}}
---
apiVersion: v1
kind: Pod
metadata: {name: client-0, namespace: shop}
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
metadata: {name: probe-0, namespace: legacy}
spec: {nodeName: node2, serviceAccountName: probe, containers: [{name: c, image: lab}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {selector: {app: web}, ports: [{name: http, port: 80, targetPort: http}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop, labels: {istio.io/waypoint-for: service}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Pod
metadata:
  name: waypoint-0
  namespace: shop
  labels: {gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}
  annotations: {lab.ambit.dev/workload: waypoint}
spec: {nodeName: node2, serviceAccountName: waypoint, containers: [{name: istio-proxy, image: envoy}]}
"""


@pytest.fixture(scope="module")
def lab(lab_factory) -> Iterator[Lab]:
    with lab_factory.settings("lcat") as settings:
        lab = Lab(dataclasses.replace(settings, agent_args=("--cert-ttl", CERT_TTL_S)))
        try:
            lab.up(labconfig.parse_yaml(LAB, "CA lab"))
            yield lab
        finally:
            lab.down()


# --- helpers --------------------------------------------------------------------------------------------------

def ip(lab: Lab, pod: str) -> str:
    address = lab.find_pod(pod).ip
    assert address is not None
    return address


def certs(lab: Lab, node: str) -> Any:
    with AgentClient(lab.state().nodes[node].socket, timeout=5.0) as client:
        return client.certificates()


def serials(lab: Lab, node: str) -> dict[str, str]:
    return {c.identity: c.serial for c in certs(lab, node).certificates}


def ca_metrics(lab: Lab) -> str:
    address = lab.status(ask_agents=False).ca.address.rpartition(":")[0]
    with NetnsThread(netns_path(lab.settings.underlay_netns)) as thread:
        return thread.run(lambda: urllib.request.urlopen(f"http://{address}:15014/metrics", timeout=5).read().decode())


def refused_count(metrics: str, code: str, reason: str) -> float:
    prefix = f'ambit_ca_requests_refused_total{{code="{code}",reason="{reason}"}} '
    return next((float(line[len(prefix):]) for line in metrics.splitlines() if line.startswith(prefix)), 0.0)


def ca_log_lines(lab: Lab, event: str) -> list[dict[str, Any]]:
    return read_json_lines(lab.settings.ca_dir / "ca.log", event)


def call(lab: Lab, client: str, url: str) -> subprocess.CompletedProcess:
    return lab.exec(client, [*WORKLOAD, "get", url, "--timeout", "5"], timeout=30)


class Held:
    """One echo connection kept open from `client` to `server`, exchanging every 0.1 s
    and keeping its count of exchanges in a file, so a test waits on exchanges seen."""

    def __init__(self, lab: Lab, client: str, server: str, tmp: Path) -> None:
        self.stop, ready, self.count_file = tmp / "stop", tmp / "ready", tmp / "exchanges"
        self.where = f"the held connection {client} -> {server}:9000"
        argv = [*CLIENT, "hold", ip(lab, server), "9000", "--until-file", str(self.stop), "--ready-file", str(ready),
                "--progress-file", str(self.count_file)]
        self.report: dict[str, Any] = {}

        def run() -> None:
            result = lab.exec(client, argv, timeout=300)
            self.report.update(json.loads(result.stdout) if result.returncode == 0 else
                               {"error": result.stderr.decode()[-2000:]})

        self.thread = threading.Thread(target=run)
        self.thread.start()
        wait_until(lambda: ready.exists() or not self.thread.is_alive(), f"{self.where}'s first exchange", 30, 0.1)
        assert ready.exists(), f"{self.where} ended before its first exchange: {self.report}"

    def exchanges(self) -> int:
        """Exchanges done so far, as the client last wrote them."""
        try:
            return int(self.count_file.read_text())
        except FileNotFoundError:
            return 0

    def wait_for_exchanges(self, more: int, after: str) -> int:
        """Wait until `more` exchanges beyond the count now went through; the count then."""
        target = self.exchanges() + more
        wait_until(lambda: self.exchanges() >= target or not self.thread.is_alive(),
                   lambda: f"{more} exchanges on {self.where} {after} (at {self.exchanges()} of {target})", 30, 0.1)
        assert self.exchanges() >= target, f"{self.where} ended {after}: {self.report}"
        return self.exchanges()

    def finish(self) -> dict[str, Any]:
        self.stop.touch()
        self.thread.join(60)
        assert not self.thread.is_alive(), f"{self.where} did not end within 60 s of being told to stop"
        return self.report


def processes_of(lab: Lab) -> dict[str, list[int]]:
    state = lab.state()
    waypoint = state.pods["shop/waypoint-0"].workload
    assert waypoint is not None
    return {"agents": [n.agent.pid for n in state.nodes.values() if n.agent],
            "waypoint": [waypoint.pid, *child_pids(waypoint.pid)],  # ambit waypoint and its Envoy
            "workloads": [p.workload.pid for k, p in state.pods.items() if p.workload and k != "shop/waypoint-0"],
            "lab": [os.getpid()]}


def files_under(root: Path) -> Iterator[Path]:
    for directory, _, names in os.walk(root):
        for name in names:
            yield Path(directory) / name


# --- the CA is its own process, and only it holds the key -----------------------------------------------------------

def test_only_the_ca_process_can_open_a_file_holding_the_ca_key(lab):
    state = lab.state()
    assert state.ca is not None and state.ca_holder is not None
    key_dir, state_dir = lab.settings.ca_key_dir, lab.settings.state_dir
    # The CA (and its filesystem's holder) see the key ...
    key_pem = Path(f"/proc/{state.ca.pid}/root{key_dir}/ca-key.pem").read_bytes()
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert Path(f"/proc/{state.ca_holder.pid}/root{key_dir}/ca-key.pem").read_bytes() == key_pem
    key_der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    secret = key.private_numbers().private_value.to_bytes(32, "big")  # the raw scalar, in whatever encoding
    # ... and it is the key of the root everyone trusts.
    root = (lab.settings.ca_dir / "root-cert.pem").read_bytes()
    assert key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo) \
        in _spki_pem(root)
    # The CA runs in the underlay's network namespace, not in a node's.
    assert os.stat(f"/proc/{state.ca.pid}/ns/net").st_ino == os.stat(netns_path(lab.settings.underlay_netns)).st_ino
    assert b"ca\x00serve" in Path(f"/proc/{state.ca.pid}/cmdline").read_bytes()
    # Nobody else has a file with it: every agent, the waypoint and its Envoy, the
    # workloads and the lab itself, each through its own view of the filesystem.
    checked = 0
    for who, pids in processes_of(lab).items():
        for pid in pids:
            view = Path(f"/proc/{pid}/root")
            assert not (view / str(key_dir).lstrip("/") / "ca-key.pem").exists(), f"{who} pid {pid} sees the key"
            assert list((view / str(key_dir).lstrip("/")).iterdir()) == [], f"{who} pid {pid} sees the CA's files"
            assert b"--ca-dir" not in Path(f"/proc/{pid}/cmdline").read_bytes(), f"{who} pid {pid} got --ca-dir"
            for path in files_under(view / str(state_dir).lstrip("/")):
                if path.is_socket() or path.is_fifo():
                    continue
                data = path.read_bytes()
                assert key_pem not in data and key_der not in data and secret not in data, \
                    f"{who} pid {pid} can read the CA key in {path}"
                checked += 1
    assert checked > 20  # the check did look at the lab's files (certificates, keys, logs, ...)


def _spki_pem(root_pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(root_pem).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_agents_hold_certificates_for_their_own_pods_from_the_ca(lab):
    for node, expected in (("node1", {spiffe("shop", "client"), spiffe("shop", "web")}),
                           ("node2", {spiffe("shop", "web")})):  # legacy is out of the mesh, the waypoint its own
        reply = wait_until(lambda n=node: (r := certs(lab, n)) and {c.identity for c in r.certificates} == expected
                           and r, f"{node}'s certificates", 60, 0.2)
        assert reply.ca == f"Istio CA at {lab.status(ask_agents=False).ca.address}"
        assert {c.issuer for c in reply.certificates} == {reply.ca}
    issued = {(e["identity"], e["node"]) for e in ca_log_lines(lab, "ca.issued") if e["request"] == "impersonated"}
    assert {(spiffe("shop", "client"), "node1"), (spiffe("shop", "web"), "node1"),
            (spiffe("shop", "web"), "node2")} <= issued
    # The waypoint asked as itself, with its own token.
    own = [e for e in ca_log_lines(lab, "ca.issued") if e["request"] == "own"]
    assert {e["identity"] for e in own} == {spiffe("shop", "waypoint")}
    # And a call through all of it works: client (node1) -> web-1 (node2) over HBONE.
    result = call(lab, "shop/client-0", f"http://{ip(lab, 'shop/web-1')}:8080/")
    assert result.returncode == 0 and json.loads(result.stdout)["peer"] == ip(lab, "shop/client-0")


# --- attacks ------------------------------------------------------------------------------------------------------

def test_node1_cannot_get_an_identity_that_runs_only_on_node2(lab):
    before = refused_count(ca_metrics(lab), "PERMISSION_DENIED", "identity-not-on-node")
    answer = lab.ask_ca("node1", spiffe("legacy", "probe"))  # with node1's token; probe-0 runs on node2 only
    assert (answer["issued"], answer["code"]) == (False, "PERMISSION_DENIED")
    assert "no pod of legacy/probe runs on node node1" in answer["message"]
    assert refused_count(ca_metrics(lab), "PERMISSION_DENIED", "identity-not-on-node") == before + 1
    logged = ca_log_lines(lab, "ca.refused")[-1]
    assert (logged["reason"], logged["impersonated"]) == ("identity-not-on-node", spiffe("legacy", "probe"))
    assert "node1" in logged["caller"]
    # node2's own agent may.
    assert lab.ask_ca("node2", spiffe("legacy", "probe"))["issued"]


def test_a_forged_token_and_a_waypoints_token_get_nothing(lab, tmp_path):
    metrics = ca_metrics(lab)
    forged = tmp_path / "forged"
    forged.write_text("ambit-node-on-node2-please")
    answer = lab.ask_ca("node1", spiffe("shop", "web"), token_file=forged)
    assert (answer["issued"], answer["code"]) == (False, "UNAUTHENTICATED")
    # The waypoint's token is good for its own identity, not for impersonating a pod of its node.
    waypoint_token = next(Path(lab.state().nodes["node2"].workdir).glob("pods/shop-waypoint-0.ca-token"))
    answer = lab.ask_ca("node2", spiffe("shop", "web"), token_file=waypoint_token)
    assert (answer["issued"], answer["code"]) == (False, "PERMISSION_DENIED")
    after = ca_metrics(lab)
    assert refused_count(after, "UNAUTHENTICATED", "unauthenticated") == \
        refused_count(metrics, "UNAUTHENTICATED", "unauthenticated") + 1
    assert refused_count(after, "PERMISSION_DENIED", "not-a-node-proxy") == \
        refused_count(metrics, "PERMISSION_DENIED", "not-a-node-proxy") + 1


# --- the CA away, and rotation -------------------------------------------------------------------------------------

def test_without_the_ca_tunnels_and_certificates_keep_working_and_a_new_pod_is_served_once_it_is_back(lab, tmp_path):
    held = Held(lab, "shop/client-0", "shop/web-1", tmp_path)  # one HBONE tunnel, node1 -> node2
    lab.stop_ca()
    try:
        assert lab.status(ask_agents=False).ca.alive is False
        # The tunnel that was up carries on without the CA.
        held.wait_for_exchanges(10, "with the CA stopped")
        # New connections between pods that hold certificates still work.
        result = call(lab, "shop/client-0", f"http://{ip(lab, 'shop/web-1')}:8080/")
        assert result.returncode == 0, result.stderr
        # A pod scheduled now on node1, with an identity node1 has no certificate for.
        lab.add_pod({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "newcomer-0", "namespace": "shop"},
                     "spec": {"nodeName": "node1", "serviceAccountName": "newcomer",
                              "containers": [{"name": "c", "image": "lab"}]}})
        newcomer = spiffe("shop", "newcomer")
        failing = wait_until(lambda: {f.identity: f.error for f in certs(lab, "node1").failing}.get(newcomer),
                             "node1 reporting the newcomer's request failing", 60, 0.2)
        assert "UNAVAILABLE" in failing or "DEADLINE" in failing
        assert newcomer not in serials(lab, "node1")
        # It cannot talk in the mesh yet: no certificate, no tunnel (never plaintext).
        assert call(lab, "shop/newcomer-0", f"http://{ip(lab, 'shop/web-1')}:8080/").returncode != 0
    finally:
        lab.start_ca()
    wait_until(lambda: newcomer in serials(lab, "node1"), "the newcomer's certificate", 120, 0.2)
    result = call(lab, "shop/newcomer-0", f"http://{ip(lab, 'shop/web-1')}:8080/")
    assert result.returncode == 0 and json.loads(result.stdout)["peer"] == ip(lab, "shop/newcomer-0")
    done = held.wait_for_exchanges(10, "once the CA was back")
    report = held.finish()
    assert report.get("failures") == [] and report["exchanges"] >= done, report


def test_rotation_replaces_certificates_without_dropping_tunnels(lab, tmp_path):
    client, web = spiffe("shop", "client"), spiffe("shop", "web")
    held = Held(lab, "shop/client-0", "shop/web-1", tmp_path)  # the tunnel is up: an exchange went through it

    def holding() -> dict[str, str | None]:
        return {"node1": serials(lab, "node1").get(client), "node2": serials(lab, "node2").get(web)}

    # The serials held now that the tunnel is up (read after it, so a rotation seen below happened under it).
    before = wait_until(lambda: (h := holding()) and all(h.values()) and h,
                        "node1 holding shop/client's certificate and node2 shop/web's", 60, 0.2)
    # 90 s certificates, replaced at half their life (backdated 60 s): within ~15 s, or at the
    # next retry of a rotation the CA's absence (the test before) left in backoff.
    seen: dict[str, Any] = {}

    def rotated() -> bool:
        seen.update(holding(), failing={n: {str(f.identity): f.error for f in certs(lab, n).failing}
                                        for n in ("node1", "node2")})
        return seen["node1"] not in (None, before["node1"]) and seen["node2"] not in (None, before["node2"])

    wait_until(rotated, lambda: f"node1's client and node2's web certificates replaced (held {before}, now {seen})",
               90, 0.2)
    # The held connection goes on after both were replaced ...
    done = held.wait_for_exchanges(10, "after both certificates were replaced")
    # ... and a new connection works.
    result = call(lab, "shop/client-0", f"http://{ip(lab, 'shop/web-1')}:8080/")
    assert result.returncode == 0, result.stderr
    report = held.finish()
    assert report.get("failures") == [] and report["exchanges"] >= done, report
