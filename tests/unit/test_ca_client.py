"""The agent's CA client against a CA server built from the same proto with grpcio,
one that can misbehave: wrong identity, wrong key, broken chains, errors, stalls.

Real TLS on localhost, real gRPC; the CA is tests/support/istio_ca_server.py.
"""
from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ambit.agent.backoff import Backoff
from ambit.agent.identity.ca import LocalCA
from ambit.agent.identity import credentials_child
from ambit.agent.identity.credentials_child import ChildProcessCaIssuer
from ambit.agent.identity.csr import certificate_request, new_workload_key
from ambit.agent.identity.issuer import BadCertificate, IstioCaIssuer
from ambit.agent.identity.istio_ca import CaClientSettings, CaRefused, CaUnavailable, IssueError, IstioCaClient
from ambit.agent.identity.rotation import CertificateRotation
from ambit.agent.identity.spiffe import SpiffeId
from ambit.agent.identity.store import CertificateStore
from tests.support.waiting import until
from tests.support.istio_ca_server import SERVER_NAME, CaEndpoint, ScriptedCa, pem, scripted_ca

TD = "cluster.local"
CART = SpiffeId(TD, "shop", "cart")
WEB = SpiffeId(TD, "shop", "web")
FAST = Backoff(initial=0.05, maximum=0.2)


@pytest.fixture
def mesh_ca() -> LocalCA:
    return LocalCA.create(TD)


@pytest.fixture
def files(tmp_path: Path, mesh_ca: LocalCA) -> tuple[Path, Path]:
    token, root = tmp_path / "istio-token", tmp_path / "root-cert.pem"
    token.write_text("node-agent-token-1\n")
    root.write_bytes(mesh_ca.trust_bundle_pem)
    return token, root


def settings(endpoint: CaEndpoint, files: tuple[Path, Path], **kw: object) -> CaClientSettings:
    token, root = files
    return CaClientSettings(address=endpoint.address, token_file=token, root_cert_file=root,
                            server_name=SERVER_NAME, **kw)  # type: ignore[arg-type]


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 30))


# -- the request on the wire ----------------------------------------------------


def test_the_request_carries_csr_token_cluster_and_impersonated_identity(mesh_ca: LocalCA, files) -> None:
    async def scenario() -> None:
        async with scripted_ca(mesh_ca) as endpoint:
            client = IstioCaClient(settings(endpoint, files, cluster_id="east"))
            issuer = IstioCaIssuer(client, TD)
            key = new_workload_key()
            issued = await issuer.issue(CART, key, timedelta(hours=12))
            first = endpoint.servicer.received[0]
            assert first.metadata["authorization"] == "Bearer node-agent-token-1"
            assert first.metadata["clusterid"] == "east"
            assert first.impersonated == str(CART)
            assert first.validity_duration == 12 * 3600
            assert first.san == CART and first.csr.is_signature_valid
            assert first.csr.public_key().public_numbers() == key.public_key().public_numbers()
            assert issued.root is not None and issued.root.serial_number == mesh_ca.certificate.serial_number
            assert issued.issuer == f"Istio CA at {endpoint.address}"

            # The kubelet rotates the projected token: the next request sends the new one.
            files[0].write_text("node-agent-token-2")
            await issuer.issue(WEB, new_workload_key(), timedelta(hours=1))
            assert endpoint.servicer.received[1].metadata["authorization"] == "Bearer node-agent-token-2"

            # A waypoint asks as itself: no ImpersonatedIdentity.
            await IstioCaIssuer(client, TD, impersonate=False).issue(WEB, new_workload_key(), timedelta(hours=1))
            assert endpoint.servicer.received[2].impersonated is None
            await client.close()
    run(scenario)


def test_the_csr_names_only_the_identity_and_proves_the_key() -> None:
    key = new_workload_key()
    csr = x509.load_pem_x509_csr(certificate_request(CART, key).encode())
    assert csr.is_signature_valid
    assert csr.subject == x509.Name([])
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and san.value.get_values_for_type(x509.UniformResourceIdentifier) == [str(CART)]
    assert len(list(san.value)) == 1


# -- answers the agent must refuse ----------------------------------------------


def _refused(mesh_ca: LocalCA, files, make_behaviour: Callable[[ScriptedCa], object],
             expected: type[Exception], match: str) -> None:
    """Refused in-process (waypoints, `ambit ca` tools) and by the agent's credentials child alike."""
    async def scenario() -> None:
        async with scripted_ca(mesh_ca) as endpoint:
            endpoint.servicer.behaviour = make_behaviour(endpoint.servicer)  # type: ignore[assignment]
            client = IstioCaClient(settings(endpoint, files, timeout=1.0))
            for issuer in (IstioCaIssuer(client, TD), ChildProcessCaIssuer(client, TD)):
                with pytest.raises(expected, match=match):
                    await issuer.issue_new_key(CART, timedelta(hours=1))
            await client.close()
    run(scenario)


def test_a_leaf_for_another_identity_is_refused(mesh_ca: LocalCA, files) -> None:
    _refused(mesh_ca, files, lambda ca: ca.sign_as(WEB), BadCertificate,
             f"asked for {CART}, the CA certified {WEB}")


def test_a_leaf_for_another_key_is_refused(mesh_ca: LocalCA, files) -> None:
    _refused(mesh_ca, files, lambda ca: ca.sign_another_key(), BadCertificate, "not for the key this node sent")


def test_a_chain_without_root_or_with_a_stranger_root_is_refused(mesh_ca: LocalCA, files) -> None:
    def leaf_only(ca: ScriptedCa):  # type: ignore[no-untyped-def]
        async def behaviour(received, context):  # type: ignore[no-untyped-def]
            return ca.signed(received.san, received.csr.public_key())[:1]
        return behaviour

    def stranger_root(ca: ScriptedCa):  # type: ignore[no-untyped-def]
        async def behaviour(received, context):  # type: ignore[no-untyped-def]
            leaf = ca.signed(received.san, received.csr.public_key())[0]
            return [leaf, LocalCA.create(TD).trust_bundle_pem.decode()]
        return behaviour

    _refused(mesh_ca, files, leaf_only, BadCertificate, "a leaf and its root are needed")
    _refused(mesh_ca, files, stranger_root, BadCertificate, "chain .* is broken")


def test_garbage_and_empty_answers_are_refused(mesh_ca: LocalCA, files) -> None:
    _refused(mesh_ca, files, lambda ca: ca.answer(["not a certificate"]), BadCertificate, "not PEM")
    _refused(mesh_ca, files, lambda ca: ca.answer([]), BadCertificate, "returned 0 certificate")


def test_an_expired_leaf_is_refused(mesh_ca: LocalCA, files) -> None:
    def expired(ca: ScriptedCa):  # type: ignore[no-untyped-def]
        async def behaviour(received, context):  # type: ignore[no-untyped-def]
            two_days_ago = LocalCA.create(TD, clock=lambda: ca.ca.clock() - timedelta(days=2))
            issued = two_days_ago.issue(received.san, public_key=received.csr.public_key(), ttl=timedelta(hours=1))
            return [pem(issued.certificate), two_days_ago.trust_bundle_pem.decode()]
        return behaviour

    _refused(mesh_ca, files, expired, BadCertificate, "not valid now")


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                                  grpc.StatusCode.INVALID_ARGUMENT])
def test_refusals_keep_their_status(mesh_ca: LocalCA, files, code: grpc.StatusCode) -> None:
    async def scenario() -> None:
        async with scripted_ca(mesh_ca) as endpoint:
            endpoint.servicer.behaviour = endpoint.servicer.fail(code, "because")
            client = IstioCaClient(settings(endpoint, files))
            with pytest.raises(CaRefused) as refused:
                await IstioCaIssuer(client, TD).issue(CART, new_workload_key(), timedelta(hours=1))
            assert refused.value.code.name == code.name and "because" in str(refused.value)
            await client.close()
    run(scenario)


def test_a_stalled_or_absent_ca_is_unavailable_within_the_timeout(mesh_ca: LocalCA, files) -> None:
    _refused(mesh_ca, files, lambda ca: ca.stall(5), CaUnavailable, "DEADLINE_EXCEEDED")

    async def absent() -> None:
        endpoint = CaEndpoint(ScriptedCa(mesh_ca))
        await endpoint.start()
        await endpoint.stop()  # the port is now closed
        client = IstioCaClient(settings(endpoint, files, timeout=1.0))
        with pytest.raises(CaUnavailable):
            await IstioCaIssuer(client, TD).issue(CART, new_workload_key(), timedelta(hours=1))
        await client.close()
    run(absent)


def test_a_ca_whose_tls_certificate_does_not_chain_to_the_root_is_not_trusted(mesh_ca: LocalCA, files) -> None:
    async def scenario() -> None:
        async with scripted_ca(LocalCA.create(TD)) as impostor:  # same API, another CA's TLS certificate
            client = IstioCaClient(settings(impostor, files, timeout=2.0))
            with pytest.raises(CaUnavailable):
                await IstioCaIssuer(client, TD).issue(CART, new_workload_key(), timedelta(hours=1))
            assert impostor.servicer.received == []  # the token never went out
            await client.close()
    run(scenario)


def test_missing_token_or_root_files_say_which(mesh_ca: LocalCA, files, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with scripted_ca(mesh_ca) as endpoint:
            client = IstioCaClient(settings(endpoint, (tmp_path / "nope", files[1])))
            with pytest.raises(IssueError, match="cannot read the CA token"):
                await client.create_certificate("csr", 60)
            client = IstioCaClient(settings(endpoint, (files[0], tmp_path / "no-root.pem")))
            with pytest.raises(IssueError, match="cannot read the CA root certificate"):
                await client.create_certificate("csr", 60)
    run(scenario)


def test_the_channel_follows_a_new_root_certificate(mesh_ca: LocalCA, files) -> None:
    async def scenario() -> None:
        new_ca = LocalCA.create(TD)
        async with scripted_ca(mesh_ca) as old_endpoint, scripted_ca(new_ca) as new_endpoint:
            client = IstioCaClient(settings(old_endpoint, files))
            issuer = IstioCaIssuer(client, TD)
            await issuer.issue(CART, new_workload_key(), timedelta(hours=1))
            # The CA moved to a new root; the ConfigMap (the file) follows; the client too.
            client.settings = settings(new_endpoint, files)
            files[1].write_bytes(new_ca.trust_bundle_pem)
            issued = await issuer.issue(CART, new_workload_key(), timedelta(hours=1))
            assert issued.root is not None and issued.root.serial_number == new_ca.certificate.serial_number
            await client.close()
    run(scenario)


# -- the store and the rotation over the wire -------------------------------------


def test_the_agents_credentials_child_makes_the_key_and_the_agent_keeps_only_pem_and_dates(
        mesh_ca: LocalCA, files, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with scripted_ca(mesh_ca) as endpoint:
            client = IstioCaClient(settings(endpoint, files))
            store = CertificateStore(ChildProcessCaIssuer(client, TD), tmp_path / "certs")
            held = await store.certificate(CART)
            received = endpoint.servicer.received[0]
            assert received.impersonated == str(CART) and received.csr.is_signature_valid
            leaf = x509.load_pem_x509_certificates(held.issued.chain_pem)[0]
            key = serialization.load_pem_private_key(held.issued.private_key_pem, None)
            assert leaf.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
            assert received.csr.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
            assert (held.serial, held.issued.not_before, held.issued.not_after) == (
                leaf.serial_number, leaf.not_valid_before_utc, leaf.not_valid_after_utc)
            assert held.issued.root_pem == mesh_ca.trust_bundle_pem == store.bundle_path.read_bytes()
            assert held.issued.issuer == f"Istio CA at {endpoint.address}"
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            store.load_cert_chain_into(context, CART)  # the key file matches the certificate file
            assert store.status()[0].rotation_due_at == leaf.not_valid_before_utc + (
                leaf.not_valid_after_utc - leaf.not_valid_before_utc) / 2
            await client.close()
    run(scenario)


def test_a_credentials_child_that_dies_is_an_issue_error_naming_why(mesh_ca: LocalCA, files,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        async with scripted_ca(mesh_ca) as endpoint:
            client = IstioCaClient(settings(endpoint, files))
            monkeypatch.setattr(credentials_child, "CHILD_MODULE", "ambit.agent.identity.no_such_module")
            with pytest.raises(IssueError, match="credentials child failed: .*No module named"):
                await ChildProcessCaIssuer(client, TD).issue_new_key(CART, timedelta(hours=1))
            assert endpoint.servicer.received == []
            await client.close()
    run(scenario)


def test_one_request_per_identity_however_many_connections_ask(mesh_ca: LocalCA, files, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with scripted_ca(mesh_ca) as endpoint:
            endpoint.servicer.behaviour = endpoint.servicer.stall(0.2)
            client = IstioCaClient(settings(endpoint, files))
            store = CertificateStore(IstioCaIssuer(client, TD), tmp_path / "certs")
            certs = await asyncio.gather(*(store.certificate(CART) for _ in range(20)))
            assert len({c.serial for c in certs}) == 1
            assert len(endpoint.servicer.received) == 1
            assert store.bundle_path.read_bytes() == mesh_ca.trust_bundle_pem
            held = store.status()[0]
            assert held.issuer == f"Istio CA at {endpoint.address}"
            await client.close()
    run(scenario)


def test_rotation_retries_while_the_ca_is_away_and_serves_with_what_it_has(
        mesh_ca: LocalCA, files, tmp_path: Path) -> None:
    async def scenario() -> None:
        endpoint = CaEndpoint(ScriptedCa(mesh_ca))
        await endpoint.start()
        client = IstioCaClient(settings(endpoint, files, timeout=1.0))
        # 80 s leaves (backdated 60 s by the CA): due for rotation 10 s after issue.
        store = CertificateStore(IstioCaIssuer(client, TD), tmp_path / "certs", ttl=timedelta(seconds=80))
        rotation = CertificateRotation(store, FAST, random.Random(1))
        rotation.start()
        rotation.want([CART])
        first = await until(lambda: store.current(CART), "cart's first certificate")
        port = endpoint.port

        await endpoint.stop()  # the CA goes away
        rotation.want([CART, WEB])  # a new pod's identity, while the CA is away
        await until(lambda: WEB in rotation.failures() and rotation.failures()[WEB], "web's request failing")
        assert (await store.certificate(CART)).serial == first.serial  # still served

        back = CaEndpoint(endpoint.servicer, port)  # back on the same address
        await back.start()
        web = await until(lambda: store.current(WEB), "web's certificate once the CA is back")
        assert web.issued.spiffe_id == WEB and WEB not in rotation.failures()

        # At the rotation point a new certificate replaces the first.
        rotated = await until(lambda: (c := store.current(CART)) is not None and c.serial != first.serial and c,
                              "cart's certificate rotated", timeout=20)
        assert rotated.issued.not_after > first.issued.not_after

        rotation.want([WEB])  # the cart pods left: its key goes
        assert store.current(CART) is None and not store.paths(CART).key_file.exists()
        await rotation.stop()
        await back.stop()
        await client.close()
    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_refused_identity_is_retried_and_never_installed(mesh_ca: LocalCA, files, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with scripted_ca(mesh_ca) as endpoint:
            endpoint.servicer.behaviour = endpoint.servicer.sign_as(WEB)  # a CA gone wrong
            client = IstioCaClient(settings(endpoint, files))
            store = CertificateStore(IstioCaIssuer(client, TD), tmp_path / "certs")
            rotation = CertificateRotation(store, FAST, random.Random(2))
            rotation.start()
            rotation.want([CART])
            await until(lambda: len(endpoint.servicer.received) >= 3, "three requests")
            assert store.current(CART) is None and store.current(WEB) is None
            assert "the CA certified" in rotation.failures()[CART]
            with pytest.raises(BadCertificate):
                await store.certificate(CART)  # a connection for cart gets no certificate either
            await rotation.stop()
            await client.close()
    run(scenario)


def test_keys_are_p256_and_private_to_the_node(mesh_ca: LocalCA, files, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with scripted_ca(mesh_ca) as endpoint:
            client = IstioCaClient(settings(endpoint, files))
            store = CertificateStore(IstioCaIssuer(client, TD), tmp_path / "certs")
            cert = await store.certificate(CART)
            assert isinstance(cert.issued.private_key, ec.EllipticCurvePrivateKey)
            assert isinstance(cert.issued.private_key.curve, ec.SECP256R1)
            assert (cert.paths.key_file.stat().st_mode & 0o777) == 0o600
            await client.close()
    run(scenario)
