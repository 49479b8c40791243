"""Real TLS 1.3 handshakes over loopback between HBONE contexts: who gets in,
who is refused, and what identity each end reads from the other."""
from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ambit.agent.identity.ca import LocalCA
from ambit.agent.identity.spiffe import SpiffeId
from ambit.agent.identity.store import CertificateStore
from ambit.agent.identity.tls import (
    ALPN_H2,
    AlpnMismatch,
    ForeignTrustDomain,
    IdentityError,
    IdentityMismatch,
    authenticate_client,
    client_context,
    peer_spiffe_id,
    require_alpn_h2,
    server_context,
    verify_server_identity,
)

TD = "cluster.local"
CART = SpiffeId(TD, "shop", "cart")
PAYMENTS = SpiffeId(TD, "shop", "payments")
IO_TIMEOUT_S = 5.0
GREETING = b"hello from server"

Check = Callable[[ssl.SSLSocket], Any]


@dataclass
class Outcome:
    """What each end saw; a check's return value or the exception it raised."""

    server_error: BaseException | None = None
    server_result: Any = None
    client_error: BaseException | None = None
    client_result: Any = None
    client_received: bytes = b""
    client_session_has_ticket: bool | None = None


def handshake(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    *,
    on_server: Check = lambda conn: None,
    on_client: Check = lambda conn: None,
) -> Outcome:
    """One connection over 127.0.0.1: server in a thread, client here. The
    server sends GREETING only if its check passed; the client reads it."""
    outcome = Outcome()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(IO_TIMEOUT_S)

        def serve() -> None:
            raw, _ = listener.accept()
            raw.settimeout(IO_TIMEOUT_S)
            try:
                with server_ctx.wrap_socket(raw, server_side=True) as conn:
                    outcome.server_result = on_server(conn)
                    conn.sendall(GREETING)
                    conn.recv(1)  # wait for the client to close
            except Exception as exc:  # recorded for the test to judge
                outcome.server_error = exc
            finally:
                raw.close()

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        try:
            with socket.create_connection(listener.getsockname(), timeout=IO_TIMEOUT_S) as raw:
                # HBONE sends no SNI: server_hostname=None.
                with client_ctx.wrap_socket(raw, server_hostname=None) as conn:
                    outcome.client_result = on_client(conn)
                    while len(outcome.client_received) < len(GREETING):
                        chunk = conn.recv(len(GREETING))
                        if not chunk:
                            break
                        outcome.client_received += chunk
                    outcome.client_session_has_ticket = conn.session.has_ticket
        except Exception as exc:
            outcome.client_error = exc
        server.join(IO_TIMEOUT_S)
        assert not server.is_alive(), "server thread hung"
    return outcome


@pytest.fixture
def ca() -> LocalCA:
    return LocalCA.create(TD)


@pytest.fixture
def store(ca: LocalCA, tmp_path: Path) -> CertificateStore:
    return CertificateStore(ca, tmp_path / "certs")


@pytest.fixture
def foreign_store(tmp_path: Path) -> CertificateStore:
    """Same trust domain name, different CA: a stranger's mesh."""
    return CertificateStore(LocalCA.create(TD), tmp_path / "foreign")


def describe(conn: ssl.SSLSocket) -> tuple[str, str | None]:
    return conn.version() or "", conn.selected_alpn_protocol()


# -- the good path ---------------------------------------------------------


@pytest.mark.parametrize(("client_id", "server_id"), [(CART, PAYMENTS), (PAYMENTS, CART)])
def test_mutual_tls_reads_each_peers_identity(
    store: CertificateStore, client_id: SpiffeId, server_id: SpiffeId
) -> None:
    outcome = handshake(
        server_context(store, server_id),
        client_context(store, client_id),
        on_server=lambda conn: (authenticate_client(conn, TD), describe(conn)),
        on_client=lambda conn: (verify_server_identity(conn, {server_id}), describe(conn)),
    )
    assert outcome.server_error is None and outcome.client_error is None
    assert outcome.server_result == (client_id, ("TLSv1.3", ALPN_H2))
    assert outcome.client_result == (server_id, ("TLSv1.3", ALPN_H2))
    assert outcome.server_result[0].principal == client_id.principal
    assert outcome.client_received == GREETING


def test_no_session_ticket_is_issued(store: CertificateStore) -> None:
    outcome = handshake(server_context(store, PAYMENTS), client_context(store, CART))
    assert outcome.client_received == GREETING
    assert outcome.client_session_has_ticket is False
    # Control: the same setup with tickets allowed does hand one out, so the
    # assertion above measures the context setting, not the test harness.
    ticketing = server_context(store, PAYMENTS)
    ticketing.num_tickets = 2
    ticketing.options &= ~ssl.OP_NO_TICKET
    control = handshake(ticketing, client_context(store, CART))
    assert control.client_session_has_ticket is True


def test_contexts_are_tls13_only_with_h2_and_required_certs(store: CertificateStore) -> None:
    for context in (server_context(store, PAYMENTS), client_context(store, CART)):
        assert context.minimum_version == context.maximum_version == ssl.TLSVersion.TLSv1_3
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert context.check_hostname is False
        assert context.options & ssl.OP_NO_TICKET


def test_new_context_after_rotation_presents_the_new_certificate(tmp_path: Path) -> None:
    # Peers check validity against the real time, so the first certificate is
    # issued 13 h in the past and the clock then catches up with the present.
    real_now = datetime.now(timezone.utc)
    now = [real_now - timedelta(hours=13)]
    ca = LocalCA.create(TD, clock=lambda: now[0])
    store = CertificateStore(ca, tmp_path / "certs")
    before = store.get(PAYMENTS).serial
    now[0] = real_now
    outcome = handshake(
        server_context(store, PAYMENTS),
        client_context(store, CART),
        on_client=lambda conn: int(conn.getpeercert()["serialNumber"], 16),
    )
    assert outcome.client_error is None
    assert outcome.client_result == store.get(PAYMENTS).serial != before


def test_asyncio_streams_expose_identities_and_send_no_sni(store: CertificateStore) -> None:
    """The proxy uses asyncio: the same checks work on its SSLObject."""
    server_ctx = server_context(store, PAYMENTS)
    server_names: list[str | None] = []
    server_ctx.sni_callback = lambda sslobj, name, ctx: server_names.append(name)
    seen_by_server: asyncio.Future[SpiffeId]

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        seen_by_server.set_result(authenticate_client(ssl_object, TD))
        writer.write(GREETING)
        await writer.drain()
        writer.close()

    async def scenario() -> tuple[SpiffeId, SpiffeId, bytes]:
        nonlocal seen_by_server
        seen_by_server = asyncio.get_running_loop().create_future()
        server = await asyncio.start_server(on_connection, "127.0.0.1", 0, ssl=server_ctx)
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_context(store, CART), server_hostname=""
            )
            ssl_object = writer.get_extra_info("ssl_object")
            server_id = verify_server_identity(ssl_object, {PAYMENTS})
            require_alpn_h2(ssl_object)
            data = await reader.readexactly(len(GREETING))
            writer.close()
            await writer.wait_closed()
            return server_id, await seen_by_server, data

    server_id, client_id, data = asyncio.run(asyncio.wait_for(scenario(), IO_TIMEOUT_S))
    assert (server_id, client_id, data) == (PAYMENTS, CART, GREETING)
    assert server_names == [None]


# -- refusals --------------------------------------------------------------


def test_client_certificate_from_another_ca_is_refused(
    store: CertificateStore, foreign_store: CertificateStore
) -> None:
    client_ctx = client_context(foreign_store, CART)
    client_ctx.load_verify_locations(cadata=store.trust_bundle_pem.decode())  # it trusts us
    outcome = handshake(server_context(store, PAYMENTS), client_ctx)
    assert isinstance(outcome.server_error, ssl.SSLError)
    assert "certificate verify failed" in str(outcome.server_error)
    # TLS 1.3: the client finishes its handshake first, then gets the alert.
    assert outcome.client_received == b""
    assert isinstance(outcome.client_error, (ssl.SSLError, ConnectionError))


def test_server_certificate_from_another_ca_is_refused(
    store: CertificateStore, foreign_store: CertificateStore
) -> None:
    outcome = handshake(server_context(foreign_store, PAYMENTS), client_context(store, CART))
    assert isinstance(outcome.client_error, ssl.SSLCertVerificationError)
    assert outcome.client_received == b""
    assert outcome.server_error is not None


def test_client_without_certificate_is_refused(store: CertificateStore) -> None:
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.check_hostname = False
    anonymous.load_verify_locations(cadata=store.trust_bundle_pem.decode())
    anonymous.set_alpn_protocols([ALPN_H2])
    outcome = handshake(server_context(store, PAYMENTS), anonymous)
    assert isinstance(outcome.server_error, ssl.SSLError)
    assert "certificate" in str(outcome.server_error).lower()
    assert outcome.client_received == b""


def test_server_with_an_unexpected_identity_is_a_mismatch(store: CertificateStore) -> None:
    outcome = handshake(
        server_context(store, CART),  # the client dialled payments but reached cart
        client_context(store, CART),
        on_client=lambda conn: verify_server_identity(conn, {PAYMENTS}),
    )
    assert isinstance(outcome.client_error, IdentityMismatch)
    assert outcome.client_error.actual == CART
    assert outcome.client_error.expected == frozenset({PAYMENTS})
    assert str(CART) in str(outcome.client_error) and str(PAYMENTS) in str(outcome.client_error)
    assert outcome.client_received == b""


def test_expected_identity_may_be_any_of_a_set(store: CertificateStore) -> None:
    outcome = handshake(
        server_context(store, CART),
        client_context(store, PAYMENTS),
        on_client=lambda conn: verify_server_identity(conn, {PAYMENTS, CART}),
    )
    assert outcome.client_result == CART


def test_tls12_only_client_is_refused(store: CertificateStore) -> None:
    old_client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old_client.check_hostname = False
    old_client.maximum_version = ssl.TLSVersion.TLSv1_2
    old_client.load_verify_locations(cadata=store.trust_bundle_pem.decode())
    paths = store.get(CART).paths
    old_client.load_cert_chain(paths.cert_file, paths.key_file)
    outcome = handshake(server_context(store, PAYMENTS), old_client)
    assert isinstance(outcome.server_error, ssl.SSLError)
    assert isinstance(outcome.client_error, ssl.SSLError)
    assert "unsupported protocol" in str(outcome.server_error).lower()
    assert "protocol version" in str(outcome.client_error).lower()
    assert outcome.client_received == b""


def test_client_not_offering_h2_is_detected(store: CertificateStore) -> None:
    http1_client = client_context(store, CART)
    http1_client.set_alpn_protocols(["http/1.1"])
    outcome = handshake(
        server_context(store, PAYMENTS), http1_client, on_server=require_alpn_h2
    )
    assert isinstance(outcome.server_error, AlpnMismatch)
    assert outcome.client_received == b""


def test_client_from_a_foreign_trust_domain_is_rejected_after_the_handshake(
    store: CertificateStore, tmp_path: Path
) -> None:
    other = CertificateStore(LocalCA.create("other.example"), tmp_path / "other")
    stranger = SpiffeId("other.example", "shop", "cart")
    server_ctx = server_context(store, PAYMENTS)
    server_ctx.load_verify_locations(cadata=other.trust_bundle_pem.decode())  # chain is fine
    client_ctx = client_context(other, stranger)
    client_ctx.load_verify_locations(cadata=store.trust_bundle_pem.decode())
    outcome = handshake(
        server_ctx,
        client_ctx,
        on_server=lambda conn: (peer_spiffe_id(conn), authenticate_client(conn, TD)),
    )
    assert isinstance(outcome.server_error, ForeignTrustDomain)
    assert "other.example" in str(outcome.server_error)


# -- certificates that chain correctly but carry no usable identity --------


def _raw_ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    # The test needs the CA key to sign malformed leaves LocalCA would never issue.
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    now = datetime.now(timezone.utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _write_leaf(
    directory: Path,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    names: list[x509.GeneralName],
) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "odd workload")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = directory / "odd-cert.pem", directory / "odd-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (
            [
                x509.UniformResourceIdentifier(str(CART)),
                x509.UniformResourceIdentifier(str(PAYMENTS)),
            ],
            "has 2 URI SANs",
        ),
        ([x509.DNSName("cart.shop.svc")], "has 0 URI SANs"),
        (
            [x509.UniformResourceIdentifier("spiffe://cluster.local/workload/cart")],
            "not a workload SPIFFE ID",
        ),
    ],
)
def test_peer_without_exactly_one_workload_uri_san_is_refused(
    store: CertificateStore, tmp_path: Path, names: list[x509.GeneralName], message: str
) -> None:
    ca_cert, ca_key = _raw_ca()
    cert_path, key_path = _write_leaf(tmp_path, ca_cert, ca_key, names)
    server_ctx = server_context(store, PAYMENTS)
    server_ctx.load_verify_locations(cadata=ca_cert.public_bytes(serialization.Encoding.PEM).decode())
    client_ctx = client_context(store, CART)
    client_ctx.load_cert_chain(cert_path, key_path)  # present the odd certificate instead
    outcome = handshake(server_ctx, client_ctx, on_server=lambda conn: authenticate_client(conn, TD))
    assert isinstance(outcome.server_error, IdentityError)
    assert message in str(outcome.server_error)


def test_unverified_peer_certificate_is_not_trusted_for_identity(store: CertificateStore) -> None:
    careless = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    careless.check_hostname = False
    careless.verify_mode = ssl.CERT_NONE
    paths = store.get(CART).paths
    careless.load_cert_chain(paths.cert_file, paths.key_file)
    outcome = handshake(server_context(store, PAYMENTS), careless, on_client=peer_spiffe_id)
    assert isinstance(outcome.client_error, IdentityError)
    assert "not verified" in str(outcome.client_error)


def test_context_cache_forgets_an_identity_whose_certificate_was_removed(store: CertificateStore) -> None:
    from ambit.agent.proxy.hbone.tls_contexts import TlsContextCache

    async def scenario() -> None:
        contexts = TlsContextCache(store)
        await contexts.server(PAYMENTS)
        await contexts.client(PAYMENTS)
        await contexts.client(CART)
        assert len(contexts) == 3
        assert store.remove(PAYMENTS)
        assert len(contexts) == 1
        await contexts.client(PAYMENTS)  # back again: built anew
        assert len(contexts) == 2
    asyncio.run(scenario())
