"""`ambit ca` over the wire: TLS, gRPC, TokenReview and pods from the (fake) API server.

Each refusal the issue names is asserted with the gRPC status the proto's
users expect and the CA's counter for it; the client is the agent's own.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from ambit.agent.discovery.kube import api_client_from
from ambit.agent.identity.ca import LocalCA
from ambit.agent.identity.csr import certificate_request, new_workload_key
from ambit.agent.identity.issuer import IstioCaIssuer
from ambit.agent.identity.istio_ca import CaClientSettings, CaRefused, CaUnavailable, IstioCaClient
from ambit.agent.identity.spiffe import SpiffeId
from ambit.api.istio import ca_pb2, ca_pb2_grpc
from ambit.ca.authn import StaticTokenAuthenticator, TokenReviewAuthenticator
from ambit.ca.pods import FilePods, KubePods
from ambit.ca.server import CaServer, Listen
from ambit.ca.service import CaMetrics, CertificateService, IssuingPolicy
from tests.support.fake_apiserver import FakeApiServer

TD = "cluster.local"
CA_NAME = "ambit-ca.ambit-system.svc"
API_TOKEN = "the-ca-s-own-token"
NODE_ACCOUNT = "ambit-system/ambit-node"
CART = SpiffeId(TD, "shop", "cart")
WEB = SpiffeId(TD, "shop", "web")
GRANTS = {("", "pods"), ("authentication.k8s.io", "tokenreviews")}


def pod(namespace: str, name: str, sa: str, node: str, phase: str = "Running") -> dict:
    return {"kind": "Pod", "metadata": {"namespace": namespace, "name": name},
            "spec": {"serviceAccountName": sa, "nodeName": node, "containers": [{"name": "c"}]},
            "status": {"phase": phase, "podIP": "10.0.0.1"}}


CLUSTER = [
    pod("ambit-system", "ambit-node-a", "ambit-node", "node1"),
    pod("ambit-system", "ambit-node-b", "ambit-node", "node2"),
    pod("shop", "cart-1", "cart", "node1"),
    pod("shop", "web-1", "web", "node2"),
    pod("shop", "batch-1", "batch", "node1", phase="Succeeded"),
]


@dataclass
class Running:
    ca: LocalCA
    server: CaServer
    root: Path
    tmp: Path

    @property
    def metrics(self) -> CollectorRegistry:
        return self.server.service.metrics.registry

    def refused(self, code: str, reason: str) -> float:
        return self.metrics.get_sample_value("ambit_ca_requests_refused_total", {"code": code, "reason": reason}) or 0

    def issued(self, kind: str) -> float:
        return self.metrics.get_sample_value("ambit_ca_certificates_issued_total", {"request": kind}) or 0

    def client(self, token: str, name: str = "token") -> IstioCaClient:
        path = self.tmp / name
        path.write_text(token)
        return IstioCaClient(CaClientSettings(address=f"127.0.0.1:{self.server.port}", token_file=path,
                                              root_cert_file=self.root, server_name=CA_NAME, timeout=5.0))


@asynccontextmanager
async def ca_service(tmp: Path, authenticator, pods, max_ttl: timedelta = timedelta(days=90)) -> AsyncIterator[Running]:
    ca = LocalCA.create(TD)
    root = tmp / "root-cert.pem"
    root.write_bytes(ca.trust_bundle_pem)
    service = CertificateService(ca, authenticator, pods, IssuingPolicy(frozenset({NODE_ACCOUNT}), max_ttl=max_ttl),
                                 CaMetrics())
    server = CaServer(service, ca, [CA_NAME], Listen("127.0.0.1:0", "127.0.0.1", 0, 0))
    await server.start()
    try:
        yield Running(ca, server, root, tmp)
    finally:
        await server.stop(None)


@contextmanager
def api_server() -> Iterator[FakeApiServer]:
    with FakeApiServer(token=API_TOKEN, allowed=GRANTS) as fake:
        for obj in CLUSTER:
            fake.create(obj)
        yield fake


def kube_ca(fake: FakeApiServer, tmp: Path, **kw: object):  # type: ignore[no-untyped-def]
    api = api_client_from(host=fake.url, token=API_TOKEN)
    return ca_service(tmp, TokenReviewAuthenticator(api), KubePods(api), **kw)  # type: ignore[arg-type]


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 60))


async def issue(client: IstioCaClient, identity: SpiffeId, impersonate: bool = True):  # type: ignore[no-untyped-def]
    try:
        return await IstioCaIssuer(client, TD, impersonate=impersonate).issue(identity, new_workload_key(),
                                                                            timedelta(hours=24))
    finally:
        await client.close()


async def refused(client: IstioCaClient, identity: SpiffeId, impersonate: bool = True) -> CaRefused:
    with pytest.raises(CaRefused) as caught:
        await issue(client, identity, impersonate)
    return caught.value


def test_a_node_agent_gets_certificates_for_its_own_pods_only(tmp_path: Path) -> None:
    async def scenario() -> None:
        with api_server() as fake:
            async with kube_ca(fake, tmp_path) as ca:
                agent_a = fake.mint_token("ambit-system", "ambit-node", audiences=("istio-ca",), pod="ambit-node-a")
                issued = await issue(ca.client(agent_a), CART)
                assert issued.spiffe_id == CART and issued.root is not None
                issued.certificate.verify_directly_issued_by(ca.ca.certificate)
                assert ca.issued("impersonated") == 1

                # web runs on node2: node1's agent may not have it.
                refusal = await refused(ca.client(agent_a), WEB)
                assert refusal.code.name == "PERMISSION_DENIED" and "node node1" in str(refusal)
                assert ca.refused("PERMISSION_DENIED", "identity-not-on-node") == 1

                # ... node2's may.
                agent_b = fake.mint_token("ambit-system", "ambit-node", audiences=("istio-ca",), pod="ambit-node-b")
                assert (await issue(ca.client(agent_b), WEB)).spiffe_id == WEB

                # A finished pod vouches for nothing.
                batch = SpiffeId(TD, "shop", "batch")
                assert (await refused(ca.client(agent_a), batch)).code.name == "PERMISSION_DENIED"
                assert ca.refused("PERMISSION_DENIED", "identity-not-on-node") == 2

                # The CA asked the API server, per request: a TokenReview with istio-ca, pods by node.
                review = fake.token_reviews()[0]
                assert review.method == "POST"
                assert any(r.query.get("fieldSelector") == "spec.nodeName=node1" for r in fake.list_requests("Pod"))
    run(scenario)


def test_a_new_pod_is_authorised_the_moment_the_api_server_has_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        with api_server() as fake:
            async with kube_ca(fake, tmp_path) as ca:
                agent_a = fake.mint_token("ambit-system", "ambit-node", audiences=("istio-ca",), pod="ambit-node-a")
                assert (await refused(ca.client(agent_a), WEB)).code.name == "PERMISSION_DENIED"
                fake.create(pod("shop", "web-2", "web", "node1"))
                assert (await issue(ca.client(agent_a), WEB)).spiffe_id == WEB
    run(scenario)


@pytest.mark.parametrize("kind", ["forged", "expired", "wrong-audience", "pod-deleted", "no-token"])
def test_tokens_that_prove_nothing_are_unauthenticated(tmp_path: Path, kind: str) -> None:
    async def scenario() -> None:
        with api_server() as fake:
            async with kube_ca(fake, tmp_path) as ca:
                good = fake.mint_token("ambit-system", "ambit-node", audiences=("istio-ca",), pod="ambit-node-a")
                if kind == "forged":
                    header, payload, signature = good.split(".")
                    claims = json.loads(__import__("base64").urlsafe_b64decode(payload + "=="))
                    claims["kubernetes.io"]["pod"]["name"] = "ambit-node-b"  # claim to be node2's agent
                    token = ".".join([header, __import__("base64").urlsafe_b64encode(
                        json.dumps(claims).encode()).rstrip(b"=").decode(), signature])
                elif kind == "expired":
                    token = fake.mint_token("ambit-system", "ambit-node", audiences=("istio-ca",),
                                            pod="ambit-node-a", expires_in=-5)
                elif kind == "wrong-audience":
                    token = fake.mint_token("ambit-system", "ambit-node", pod="ambit-node-a")  # the API's audience
                elif kind == "pod-deleted":
                    token = good
                    fake.delete({"kind": "Pod", "metadata": {"namespace": "ambit-system", "name": "ambit-node-a"}})
                if kind == "no-token":
                    channel = grpc.aio.secure_channel(
                        f"127.0.0.1:{ca.server.port}", grpc.ssl_channel_credentials(ca.root.read_bytes()),
                        options=[("grpc.ssl_target_name_override", CA_NAME)])
                    request = ca_pb2.IstioCertificateRequest(csr=certificate_request(CART, new_workload_key()))
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await ca_pb2_grpc.IstioCertificateServiceStub(channel).CreateCertificate(request, timeout=5)
                    await channel.close()
                    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
                else:
                    assert (await refused(ca.client(token), CART)).code.name == "UNAUTHENTICATED"
                assert ca.refused("UNAUTHENTICATED", "unauthenticated") == 1
                assert ca.issued("impersonated") == 0
    run(scenario)


def test_only_node_agents_may_ask_for_others_but_anyone_for_itself(tmp_path: Path) -> None:
    async def scenario() -> None:
        with api_server() as fake:
            async with kube_ca(fake, tmp_path) as ca:
                cart = fake.mint_token("shop", "cart", audiences=("istio-ca",), pod="cart-1")
                # cart's pod shares node1 with... cart only; it asks for web's identity, and for cart's.
                for wanted in (WEB, CART):
                    refusal = await refused(ca.client(cart), wanted)
                    assert refusal.code.name == "PERMISSION_DENIED" and "not a trusted node" in str(refusal)
                assert ca.refused("PERMISSION_DENIED", "not-a-node-proxy") == 2
                # As itself (a waypoint's way): its own identity, nothing else.
                assert (await issue(ca.client(cart), CART, impersonate=False)).spiffe_id == CART
                assert ca.issued("own") == 1
                # The CSR may not ask for another identity than the token's.
                refusal = await refused(ca.client(cart), WEB, impersonate=False)
                assert refusal.code.name == "INVALID_ARGUMENT"
                assert ca.refused("INVALID_ARGUMENT", "csr-identity-mismatch") == 1
    run(scenario)


def test_a_csr_whose_san_is_not_the_impersonated_identity_is_invalid(tmp_path: Path) -> None:
    async def scenario() -> None:
        with api_server() as fake:
            fake.create(pod("shop", "web-9", "web", "node1"))  # both on node1: only the mismatch is wrong
            async with kube_ca(fake, tmp_path) as ca:
                agent_a = fake.mint_token("ambit-system", "ambit-node", audiences=("istio-ca",), pod="ambit-node-a")
                client = ca.client(agent_a)
                with pytest.raises(CaRefused) as caught:
                    await client.create_certificate(certificate_request(WEB, new_workload_key()), 3600,
                                                    impersonate=CART)
                await client.close()
                assert caught.value.code.name == "INVALID_ARGUMENT"
                assert ca.refused("INVALID_ARGUMENT", "csr-identity-mismatch") == 1
                client = ca.client(agent_a)
                with pytest.raises(CaRefused) as caught:
                    await client.create_certificate("-----BEGIN CERTIFICATE REQUEST-----\nnope\n", 3600,
                                                    impersonate=CART)
                await client.close()
                assert caught.value.code.name == "INVALID_ARGUMENT"
                assert ca.refused("INVALID_ARGUMENT", "bad-csr") == 1
    run(scenario)


def test_the_lifetime_is_capped(tmp_path: Path) -> None:
    async def scenario() -> None:
        with api_server() as fake:
            async with kube_ca(fake, tmp_path, max_ttl=timedelta(hours=1)) as ca:
                agent_a = fake.mint_token("ambit-system", "ambit-node", audiences=("istio-ca",), pod="ambit-node-a")
                issued = await issue(ca.client(agent_a), CART)  # asks for 24 h
                lifetime = issued.not_after - issued.not_before
                assert lifetime <= timedelta(hours=1, minutes=1)
    run(scenario)


def test_without_the_api_server_nothing_is_signed_and_the_caller_retries(tmp_path: Path) -> None:
    async def scenario() -> None:
        with api_server() as fake:
            agent_a = fake.mint_token("ambit-system", "ambit-node", audiences=("istio-ca",), pod="ambit-node-a")
            url = fake.url
        api = api_client_from(host=url, token=API_TOKEN)  # the API server is gone
        async with ca_service(tmp_path, TokenReviewAuthenticator(api, timeout=1.0), KubePods(api)) as ca:
            with pytest.raises(CaUnavailable):
                await issue(ca.client(agent_a), CART)
            assert ca.refused("UNAVAILABLE", "authenticator-unavailable") == 1
    run(scenario)


def test_rbac_the_ca_lacks_is_unavailable_not_a_verdict(tmp_path: Path) -> None:
    async def scenario() -> None:
        with FakeApiServer(token=API_TOKEN, allowed={("", "pods")}) as fake:  # no tokenreviews create
            for obj in CLUSTER:
                fake.create(obj)
            api = api_client_from(host=fake.url, token=API_TOKEN)
            async with ca_service(tmp_path, TokenReviewAuthenticator(api), KubePods(api)) as ca:
                agent_a = fake.mint_token("ambit-system", "ambit-node", audiences=("istio-ca",), pod="ambit-node-a")
                with pytest.raises(CaUnavailable, match="403"):
                    await issue(ca.client(agent_a), CART)
    run(scenario)


# -- the lab's way: a token file and the cluster file ------------------------------


def test_token_file_and_cluster_files_authorise_per_node(tmp_path: Path) -> None:
    async def scenario() -> None:
        cluster = tmp_path / "cluster.json"
        cluster.write_text(json.dumps({"kind": "List", "items": CLUSTER[2:]}))
        tokens = tmp_path / "tokens.csv"
        tokens.write_text("# token,namespace/serviceaccount,node\n"
                          "node1-secret,ambit-system/ambit-node,node1\n"
                          "waypoint-secret,shop/waypoint,node1\n")
        tokens.chmod(0o600)
        pods = FilePods([cluster])
        await pods.start()
        async with ca_service(tmp_path, StaticTokenAuthenticator(tokens), pods) as ca:
            assert (await issue(ca.client("node1-secret"), CART)).spiffe_id == CART
            assert (await refused(ca.client("node1-secret"), WEB)).code.name == "PERMISSION_DENIED"
            assert (await refused(ca.client("guess"), CART)).code.name == "UNAUTHENTICATED"
            waypoint = SpiffeId(TD, "shop", "waypoint")
            assert (await issue(ca.client("waypoint-secret"), waypoint, impersonate=False)).spiffe_id == waypoint
            # web moves to node1: the file changes and the very next request sees it (no poll wait).
            cluster.write_text(json.dumps({"kind": "List", "items": [*CLUSTER[2:], pod("shop", "web-2", "web",
                                                                                       "node1")]}))
            assert (await issue(ca.client("node1-secret"), WEB)).spiffe_id == WEB
        await pods.stop()
    run(scenario)
