"""No fail-open decision (issue 16, item 2): attacks on the moments the node
agent cannot decide, on a two-node lab with real agents, the real CNI chain
and eBPF capture.

    node1: legacy/probe-0 (outside the mesh: the plaintext attacker; with a
           certificate of its own from the lab's CA, asked for as node1's agent
           would, it is also a hostile mesh peer)
    node2: vault/safe-0 (STRICT), shop/web-1 and shop/api-0 (PERMISSIVE)

Each scenario changes what discovery says (the lab's cluster file, as the API
server's view would change) and checks the refusal from both ends: the
attacker's connection fails, the destination's server never sees a byte, and
node2's agent says why in its access log and counts it. The last one restarts
node2's agent on the Kubernetes API (the in-repo server) with one kind
withheld, so its discovery never syncs.

Prefix `lfcl-`, underlay 10.112.0.0/24, pods 10.222.0.0/16.
"""
from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import ssl
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h2.events
from cryptography import x509
from cryptography.hazmat.primitives import serialization
import pytest
import yaml

from ambit.agent.cli.client import AgentClient
from ambit.agent.identity.ca import IssuedCert, utc_now
from ambit.agent.identity.spiffe import SpiffeId
from ambit.agent.identity.store import CertificateStore
from ambit.agent.identity.tls import client_context, peer_spiffe_id
from ambit.agent.netns import NetnsThread, netns_path
from ambit.lab.labconfig import parse_documents
from ambit.lab.node import LabNode, NodeAgent
from ambit.lab.processes import lab_namespaces, lab_processes
from ambit.lab.topology import Lab, LabSettings, render_cluster
from tests.support.bpffs import lab_bpffs_root
from tests.support.fake_apiserver import FakeApiServer
from tests.support.hbone_lab import RawH2Client, run_in_netns, status_of
from tests.support.labobserve import access_log, log_mark, metric, readiness, scrape, wait_event
from tests.support.podnet import RecordingEcho, TcpServer, connect, recv_exactly, refused
from tests.support.waiting import wait_until

pytestmark = pytest.mark.kernel

PREFIX = "lfcl-"
UNDERLAY = "10.112.0.0/24"
PODS = "10.222.0.0/16"
PORT = 9000
TRUST_DOMAIN = "cluster.local"
FAILED_CLOSED = "ambit_connections_failed_closed_total"
AMBITCTL = str(Path(sys.executable).parent / "ambitctl")


def _namespace(name: str, ambient: bool) -> dict[str, Any]:
    labels = {"istio.io/dataplane-mode": "ambient"} if ambient else {}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def _account(namespace: str, name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace}}


def _pod(namespace: str, name: str, node: str, account: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": {"app": name.rsplit("-", 1)[0]}},
            "spec": {"nodeName": node, "serviceAccountName": account,
                     "containers": [{"name": "main", "image": "test"}]}}


CLUSTER = [
    _namespace("vault", True), _namespace("shop", True), _namespace("legacy", False),
    {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
     "metadata": {"name": "strict", "namespace": "vault"}, "spec": {"mtls": {"mode": "STRICT"}}},
    _account("vault", "safe"), _account("shop", "web"), _account("legacy", "probe"),
    _pod("vault", "safe-0", "node2", "safe"),
    _pod("shop", "web-1", "node2", "web"),
    _pod("shop", "api-0", "node2", "web"),
    _pod("legacy", "probe-0", "node1", "probe"),
]
SERVERS = ("vault/safe-0", "shop/web-1", "shop/api-0")

Documents = list[dict[str, Any]]


class LabCaCertificates:
    """The attacker's certificate, a valid one: what node1's agent gets from
    the lab's CA for a pod of node1 (asked from node1 with its token)."""

    trust_domain = TRUST_DOMAIN
    description = "the lab's CA, asked as node1's agent"

    def __init__(self, lab: Lab, directory: Path) -> None:
        self.lab = lab
        self.directory = directory
        self.clock = utc_now

    async def issue(self, identity: SpiffeId, key: object, ttl: object) -> IssuedCert:
        out = self.directory / identity.namespace / identity.service_account
        answer = self.lab.ask_ca("node1", str(identity), out_dir=out)
        assert answer["issued"], answer
        return IssuedCert(identity, x509.load_pem_x509_certificate((out / "cert.pem").read_bytes()),
                          serialization.load_pem_private_key((out / "key.pem").read_bytes(), None),  # type: ignore[arg-type]
                          root=x509.load_pem_x509_certificate((out / "root-cert.pem").read_bytes()),
                          issuer=self.description)

    async def issue_new_key(self, identity: SpiffeId, ttl: object) -> IssuedCert:
        """The lab's CA answer carries its own new key (ask_ca writes key.pem)."""
        return await self.issue(identity, None, ttl)


class FailClosedLab:
    def __init__(self, lab: Lab, identities: Path) -> None:
        self.lab = lab
        self.ips = {p.key: p.ip for p in lab.status(ask_agents=False).pods}
        self.echoes = {pod: RecordingEcho() for pod in SERVERS}
        self.servers = [TcpServer(self.netns(pod), PORT, self.echoes[pod]) for pod in SERVERS]
        self.certificates = CertificateStore(LabCaCertificates(lab, identities / "from-ca"), identities)

    def close(self) -> None:
        for server in self.servers:
            server.close()

    def netns(self, pod: str) -> str:
        return self.lab.find_pod(pod).netns

    def node_socket(self, node: str) -> str:
        return self.lab.state().nodes[node].socket

    # -- what discovery says -------------------------------------------------------------------------
    def publish(self, change: Callable[[Documents], Documents] = lambda docs: docs) -> None:
        """Write the cluster file as the lab renders it, passed through
        `change`, and wait until both agents hold that revision of it."""
        plan = self.lab.plan(parse_documents(copy.deepcopy(CLUSTER), self.lab.settings.service_cidr))
        documents = change(render_cluster(plan, self.lab.state()))
        path = self.lab.settings.cluster_file
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:6]}.tmp")
        tmp.write_text(yaml.safe_dump_all(documents, sort_keys=False))
        os.replace(tmp, path)
        self.lab.wait_applied()

    # -- the attacker ----------------------------------------------------------------------------------
    def refused(self, client: str, server: str) -> bool:
        """True when a new connection is closed without an answer: reset or EOF."""
        return refused(self.netns(client), self.ips[server], PORT)

    def exchange(self, client: str, server: str) -> bytes:
        with connect(self.netns(client), self.ips[server], PORT) as sock:
            payload = f"hello from {client}".encode()
            sock.sendall(payload)
            return recv_exactly(sock, len(payload))

    def hbone(self, client: str, server: str, identity: SpiffeId) -> tuple[SpiffeId | None, int | None, str]:
        """From `client`'s namespace, as `identity` (a valid certificate of the
        lab CA): mTLS to `server`:15008 and CONNECT `server`:PORT. Returns the
        identity the server presented (None: no TLS), the CONNECT status and
        what went wrong."""
        asyncio.run(self.certificates.certificate(identity))
        context = client_context(self.certificates, identity)
        ip = self.ips[server]

        async def attempt() -> tuple[SpiffeId | None, int | None, str]:
            try:
                h2c = await RawH2Client.connect(ip, 15008, context)
            except (OSError, ssl.SSLError) as exc:
                return None, None, f"{type(exc).__name__}: {exc}"
            try:
                presented = peer_spiffe_id(h2c.writer.get_extra_info("ssl_object"))
                stream = h2c.h2.get_next_available_stream_id()
                h2c.h2.send_headers(stream, [(":method", "CONNECT"), (":authority", f"{ip}:{PORT}")])
                await h2c.flush()
                response = await h2c.wait_for(lambda e: isinstance(e, h2.events.ResponseReceived))
                return presented, status_of(response) if response else None, ""
            finally:
                await h2c.close()

        return run_in_netns(self.netns(client), attempt, timeout=30)

    def failed_closed(self, node: str, listener: str) -> float:
        return metric(scrape(self.lab, node), FAILED_CLOSED, listener=listener, reason="unknown_destination")


def without_address(*pods: str) -> Callable[[Documents], Documents]:
    """Discovery knows these pods' objects but not their addresses yet (the
    API server publishes status.podIP after the CNI ADD)."""
    def change(documents: Documents) -> Documents:
        for doc in documents:
            if doc["kind"] == "Pod" and f"{doc['metadata']['namespace']}/{doc['metadata']['name']}" in pods:
                doc["status"] = {"phase": "Pending"}
        return documents
    return change


def without_object(pod: str) -> Callable[[Documents], Documents]:
    """Discovery does not know the pod at all (its object not seen yet, or
    force-deleted while the sandbox runs)."""
    def change(documents: Documents) -> Documents:
        return [d for d in documents
                if not (d["kind"] == "Pod" and f"{d['metadata']['namespace']}/{d['metadata']['name']}" == pod)]
    return change


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Iterator[FailClosedLab]:
    assert not lab_namespaces(PREFIX), f"a previous run left {PREFIX} namespaces: `ambit lab down --prefix {PREFIX}`"
    with lab_bpffs_root(PREFIX) as bpffs_root:
        settings = LabSettings(prefix=PREFIX, state_dir=tmp_path_factory.mktemp("lfcl") / "state",
                               underlay_cidr=UNDERLAY, pod_supernet=PODS, bpffs_root=bpffs_root)
        lab = Lab(settings)
        env: FailClosedLab | None = None
        try:
            lab.up(parse_documents(copy.deepcopy(CLUSTER)))
            env = FailClosedLab(lab, tmp_path_factory.mktemp("lfcl-identities"))
            yield env
        finally:
            if env is not None:
                env.close()
            lab.down()
    assert lab_namespaces(PREFIX) == () and lab_processes(PREFIX) == ()


def test_plaintext_to_a_strict_pod_whose_address_discovery_does_not_know_yet_is_denied(env):
    """Before: node2 found no pod at the address and decided for a workload
    in no namespace, where vault's STRICT does not apply: allowed."""
    env.publish(without_address("vault/safe-0", "shop/web-1"))
    probe = env.ips["legacy/probe-0"]
    mark = log_mark(env.lab, "node2")

    assert env.refused("legacy/probe-0", "vault/safe-0")
    # The same moment for a PERMISSIVE pod: decided as that pod (its record), so plaintext gets through.
    assert env.exchange("legacy/probe-0", "shop/web-1") == b"hello from legacy/probe-0"

    assert env.echoes["vault/safe-0"].received.get(probe, 0) == 0
    denied = access_log(env.lab, "node2", mark, listener="inbound_plaintext", decision="deny",
                        dst=f"{env.ips['vault/safe-0']}:{PORT}")
    assert "plaintext refused" in denied["reason"] and "vault/strict" in denied["reason"]
    allowed = access_log(env.lab, "node2", mark, listener="inbound_plaintext", decision="allow")
    assert allowed["dst_identity"] == "spiffe://cluster.local/ns/shop/sa/web"


def test_a_pod_object_claiming_a_strict_pods_address_does_not_lend_it_its_policy(env):
    """Discovery still shows a stale pod at the address that node2 enrolled
    for vault/safe-0 (an IP reused before the old object went). Before: the
    address was taken for that pod, PERMISSIVE, and plaintext got through."""
    safe_ip = env.ips["vault/safe-0"]

    def stale_claim(documents: Documents) -> Documents:
        documents = without_address("vault/safe-0")(documents)
        stale = copy.deepcopy(_pod("shop", "old-0", "node2", "web"))
        stale["status"] = {"phase": "Running", "podIP": safe_ip, "podIPs": [{"ip": safe_ip}],
                           "conditions": [{"type": "Ready", "status": "True"}]}
        return [*documents, stale]

    env.publish(stale_claim)
    probe = env.ips["legacy/probe-0"]
    mark = log_mark(env.lab, "node2")

    assert env.refused("legacy/probe-0", "vault/safe-0")

    assert env.echoes["vault/safe-0"].received.get(probe, 0) == 0
    denied = access_log(env.lab, "node2", mark, listener="inbound_plaintext", decision="deny")
    assert "vault/strict" in denied["reason"], denied
    assert denied["dst_identity"] == "spiffe://cluster.local/ns/vault/sa/safe"


def test_plaintext_to_an_enrolled_pod_discovery_does_not_know_is_denied_as_unknown(env):
    """Before: the pod object's removal released the pod from capture, so
    plaintext reached it directly, past the proxy."""
    env.publish(without_object("vault/safe-0"))
    probe = env.ips["legacy/probe-0"]
    counted = env.failed_closed("node2", "inbound_plaintext")
    mark = log_mark(env.lab, "node2")

    assert env.refused("legacy/probe-0", "vault/safe-0")

    assert env.echoes["vault/safe-0"].received.get(probe, 0) == 0
    denied = access_log(env.lab, "node2", mark, listener="inbound_plaintext", decision="deny")
    assert denied["reason"].startswith("denied: unknown destination:"), denied
    assert "enrolled on this node as vault/safe-0, a pod discovery does not know" in denied["reason"]
    assert env.failed_closed("node2", "inbound_plaintext") == counted + 1


def test_hbone_to_an_address_the_agent_cannot_attribute_is_refused(env):
    """A hostile mesh peer with a valid certificate dials 15008 of an enrolled
    address whose pod discovery does not know: there is no workload to present
    or decide for. Refused before TLS, in the access log and counted."""
    env.publish(without_object("vault/safe-0"))
    counted = env.failed_closed("node2", "hbone")
    mark = log_mark(env.lab, "node2")

    presented, status, error = env.hbone("legacy/probe-0", "vault/safe-0", SpiffeId(TRUST_DOMAIN, "legacy", "probe"))

    assert presented is None and status is None, (presented, status)
    assert error, "the TLS handshake should have failed"
    denied = access_log(env.lab, "node2", mark, listener="hbone", decision="deny")
    assert "unknown destination" in denied["reason"] and "vault/safe-0" in denied["reason"], denied
    assert env.failed_closed("node2", "hbone") == counted + 1
    assert env.echoes["vault/safe-0"].received.get(env.ips["legacy/probe-0"], 0) == 0


def test_hbone_to_a_pod_enrolled_before_discovery_saw_its_address_presents_that_pods_identity(env):
    """The attributed side of the same moment: the record names the pod, the
    pod object gives its service account, so the tunnel is served as
    vault/safe-0 and its policy decides (before: refused, no identity)."""
    env.publish(without_address("vault/safe-0"))

    presented, status, error = env.hbone("legacy/probe-0", "vault/safe-0", SpiffeId(TRUST_DOMAIN, "legacy", "probe"))

    assert error == "" and presented == SpiffeId(TRUST_DOMAIN, "vault", "safe")
    assert status == 200  # mTLS satisfies STRICT; no AuthorizationPolicy


# --- policies the parser rejects ----------------------------------------------------------------------------

def with_policy(policy: dict[str, Any]) -> Callable[[Documents], Documents]:
    """Discovery holds `policy` as written (the lab would refuse to plan a broken one)."""
    return lambda documents: [*documents, policy]


BROKEN_WEB_POLICY = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                     "metadata": {"name": "web-from-shop", "namespace": "shop"},
                     "spec": {"selector": {"matchLabels": {"app": "web"}},
                              "rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}}  # a port must be a number


def test_an_authorization_policy_the_parser_rejects_denies_its_scope_and_its_scope_only(env):
    """Before: the broken policy was logged and did not exist, so shop/web-1
    took plaintext from anyone."""
    env.publish(with_policy(BROKEN_WEB_POLICY))
    probe = env.ips["legacy/probe-0"]
    received = env.echoes["shop/web-1"].received.get(probe, 0)
    counted = metric(scrape(env.lab, "node2"), FAILED_CLOSED, reason="policy_invalid")
    mark = log_mark(env.lab, "node2")

    assert env.refused("legacy/probe-0", "shop/web-1")
    # Its scope only: shop's pod without the label, and vault's pod over mTLS, still answer.
    assert env.exchange("legacy/probe-0", "shop/api-0") == b"hello from legacy/probe-0"
    presented, status, _ = env.hbone("legacy/probe-0", "vault/safe-0", SpiffeId(TRUST_DOMAIN, "legacy", "probe"))
    assert presented == SpiffeId(TRUST_DOMAIN, "vault", "safe") and status == 200

    assert env.echoes["shop/web-1"].received.get(probe, 0) == received
    denied = access_log(env.lab, "node2", mark, listener="inbound_plaintext", decision="deny")
    assert denied["reason"].startswith("denied: AuthorizationPolicy shop/web-from-shop failed to parse"), denied
    assert "workloads of namespace shop labelled app=web" in denied["reason"] and "bad port" in denied["reason"]
    text = scrape(env.lab, "node2")
    assert metric(text, "ambit_policies_rejected", kind="AuthorizationPolicy") == 1
    assert metric(text, FAILED_CLOSED, listener="inbound_plaintext", reason="policy_invalid") == counted + 1
    shown = subprocess.run([AMBITCTL, "--socket", env.node_socket("node2"), "policies", "shop/web-1"],
                           capture_output=True, text=True, timeout=20).stdout
    assert "1 policy failed to parse" in shown and "shop/web-from-shop" in shown and "bad port" in shown, shown


def test_a_peer_authentication_the_parser_rejects_denies_its_scope_even_over_mtls(env):
    """It could have said anything from DISABLE to STRICT: its workloads take
    nothing, mTLS included (before: it did not exist, PERMISSIVE applied)."""
    broken = {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
              "metadata": {"name": "safe-mtls", "namespace": "vault"},
              "spec": {"selector": {"matchLabels": {"app": "safe"}}, "mtls": {"mode": "STRICTEST"}}}
    env.publish(with_policy(broken))
    mark = log_mark(env.lab, "node2")

    presented, status, _ = env.hbone("legacy/probe-0", "vault/safe-0", SpiffeId(TRUST_DOMAIN, "legacy", "probe"))

    assert presented == SpiffeId(TRUST_DOMAIN, "vault", "safe") and status == 401
    refused = wait_event(env.lab, "node2", mark, "connection", listener="hbone", decision="deny")
    assert "PeerAuthentication vault/safe-mtls failed to parse" in refused["reason"], refused
    assert metric(scrape(env.lab, "node2"), "ambit_policies_rejected", kind="PeerAuthentication") == 1
    assert env.exchange("legacy/probe-0", "shop/web-1") == b"hello from legacy/probe-0"  # not its scope


# --- discovery that never syncs (this one restarts node2's agent: it comes last) -------------------------------

GRANTS = {("", "namespaces"), ("", "pods"), ("", "services"), ("discovery.k8s.io", "endpointslices"),
          ("security.istio.io", "authorizationpolicies"), ("security.istio.io", "peerauthentications"),
          ("gateway.networking.k8s.io", "gateways")}
WITHHELD = ("security.istio.io", "authorizationpolicies")


class KubeAgent(NodeAgent):
    """The lab node's agent with the same options, but discovery from an API server."""

    def __init__(self, node: LabNode, marker: dict[str, str], kubeconfig: Path) -> None:
        super().__init__(node, marker)
        self.kubeconfig = kubeconfig

    def argv(self) -> list[str]:
        return [*super().argv(), "--discovery", "kube", "--kubeconfig", str(self.kubeconfig)]


@contextlib.contextmanager
def api_server(env: FailClosedLab, node: str, objects: Documents, tmp_path: Path) -> Iterator[tuple[FakeApiServer, Path]]:
    """The in-repo API server, listening in `node`'s namespace, holding `objects`."""
    with NetnsThread(netns_path(env.lab.state().nodes[node].netns)) as thread:
        server = thread.run(lambda: FakeApiServer(token="t0ken", allowed=GRANTS - {WITHHELD}))
    server.start()
    try:
        for obj in objects:
            server.create(obj)
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: "{server.url}"}}}}]
users: [{{name: ambit-node, user: {{token: t0ken}}}}]
contexts: [{{name: fake, context: {{cluster: fake, user: ambit-node}}}}]
current-context: fake
""")
        yield server, kubeconfig
    finally:
        server.stop()


@contextlib.contextmanager
def agent_on_kube(env: FailClosedLab, node: str, kubeconfig: Path) -> Iterator[KubeAgent]:
    """Replace `node`'s agent with one on the Kubernetes API; the lab's own comes back afterwards."""
    plan = env.lab.plan(parse_documents(copy.deepcopy(CLUSTER), env.lab.settings.service_cidr))
    env.lab.stop_agent(node)
    agent = KubeAgent(LabNode(plan.node(node)), env.lab.marker, kubeconfig)
    try:
        agent.start(wait=False)
        yield agent
    finally:
        agent.stop()
        env.lab.start_agent(node)


def status_of_agent(env: FailClosedLab, node: str) -> Any:
    with AgentClient(env.node_socket(node), timeout=2.0) as client:
        return client.status()


def test_an_agent_whose_discovery_never_syncs_refuses_new_connections_and_is_not_ready(env, tmp_path):
    """node2's agent restarts on the Kubernetes API with AuthorizationPolicy
    withheld (403, as under a ClusterRole without it). Its pods stay captured
    and the agent serves its API, but it is not ready and refuses every new
    connection to them, however long the retries last, instead of serving them
    on a view without the DENY policy it cannot list. Before: after waiting 30 s
    it served that partial view, and the DENY did not exist."""
    env.publish()
    probe = env.ips["legacy/probe-0"]
    deny_probe = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                  "metadata": {"name": "no-probe", "namespace": "shop"},
                  "spec": {"action": "DENY", "selector": {"matchLabels": {"app": "web"}},
                           "rules": [{"from": [{"source": {"ipBlocks": [f"{probe}/32"]}}]}]}}
    plan = env.lab.plan(parse_documents(copy.deepcopy(CLUSTER), env.lab.settings.service_cidr))
    objects = [d for d in render_cluster(plan, env.lab.state())
               if d["kind"] in ("Namespace", "Pod", "PeerAuthentication")] + [deny_probe]
    received = env.echoes["shop/web-1"].received.get(probe, 0)

    with api_server(env, "node2", objects, tmp_path) as (server, kubeconfig), \
            agent_on_kube(env, "node2", kubeconfig) as agent:
        def refused_the_kind() -> Any:
            assert agent.proc is not None and agent.proc.poll() is None, agent.logs()[-3000:]
            try:
                status = status_of_agent(env, "node2")
            except Exception:  # not serving its API yet
                return None
            return status if "AuthorizationPolicy" in status.discovery_pending else None

        status = wait_until(refused_the_kind, "node2's agent reporting AuthorizationPolicy not synced", 30)
        mark = log_mark(env.lab, "node2")

        assert not status.ready and status.discovery_pending["AuthorizationPolicy"] == "HTTP 403 Forbidden"
        assert "has not synced" in status.reason and "AuthorizationPolicy: HTTP 403 Forbidden" in status.reason
        code, body = readiness(env.lab, "node2")
        assert code == 503 and "AuthorizationPolicy: HTTP 403 Forbidden" in body, body
        shown = subprocess.run([AMBITCTL, "--socket", env.node_socket("node2"), "status"], capture_output=True,
                               text=True, timeout=20).stdout
        assert "ready:       no (" in shown and "not synced: AuthorizationPolicy: HTTP 403 Forbidden" in shown, shown

        # However many times the list is refused (no timeout turns the partial view into a served one):
        failures = len(server.list_requests("AuthorizationPolicy"))
        wait_until(lambda: len(server.list_requests("AuthorizationPolicy")) >= failures + 3,
                   "three more refused lists of AuthorizationPolicy", 30)
        assert env.refused("legacy/probe-0", "shop/web-1")
        presented, status_code, _ = env.hbone("legacy/probe-0", "vault/safe-0", SpiffeId(TRUST_DOMAIN, "legacy", "probe"))
        assert presented is None and status_code is None

        assert env.echoes["shop/web-1"].received.get(probe, 0) == received
        for listener in ("inbound_plaintext", "hbone"):
            refused = access_log(env.lab, "node2", mark, listener=listener, decision="deny")
            assert refused["reason"].startswith("refused: discovery has not synced"), refused
            assert "AuthorizationPolicy: HTTP 403 Forbidden" in refused["reason"]
        assert status_of_agent(env, "node2").failed_closed["discovery_not_synced"] >= 2
        assert metric(scrape(env.lab, "node2"), FAILED_CLOSED, reason="discovery_not_synced") >= 2

        # The ClusterRole is fixed: the agent syncs, turns ready, and the DENY it could not see applies.
        server.allowed = GRANTS
        wait_until(lambda: status_of_agent(env, "node2").ready, "node2's agent ready once the kind is granted", 60)
        assert readiness(env.lab, "node2")[0] == 200
        assert env.refused("legacy/probe-0", "shop/web-1")
        denied = access_log(env.lab, "node2", mark, listener="inbound_plaintext", decision="deny",
                            reason="denied by shop/no-probe rule 0")
        assert denied["dst"] == f"{env.ips['shop/web-1']}:{PORT}"
        presented, status_code, _ = env.hbone("legacy/probe-0", "vault/safe-0", SpiffeId(TRUST_DOMAIN, "legacy", "probe"))
        assert presented == SpiffeId(TRUST_DOMAIN, "vault", "safe") and status_code == 200
