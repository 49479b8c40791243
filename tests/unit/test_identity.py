"""Workload identities without the network: SPIFFE IDs, the local CA, the
certificate store and its rotation clock."""
from __future__ import annotations

import asyncio
import os
import ssl
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ambit.agent.identity.ca import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    CLOCK_SKEW_ALLOWANCE,
    InvalidCA,
    LocalCA,
)
from ambit.agent.identity.issuer import LocalIssuer
from ambit.agent.identity.istio_ca import IssueError
from ambit.agent.identity.spiffe import SpiffeId
from ambit.agent.identity.store import (
    CertificateStore,
    needs_rotation,
    rotation_due_at,
)

TD = "cluster.local"
START = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime = START) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def ext(cert: x509.Certificate, cls: type) -> x509.Extension:
    return cert.extensions.get_extension_for_class(cls)


# -- SPIFFE IDs ------------------------------------------------------------


def test_spiffe_id_parses_formats_and_gives_principal() -> None:
    uri = "spiffe://cluster.local/ns/shop/sa/cart-v2"
    sid = SpiffeId.parse(uri)
    assert sid == SpiffeId("cluster.local", "shop", "cart-v2")
    assert str(sid) == uri
    assert sid.principal == "cluster.local/ns/shop/sa/cart-v2"
    assert SpiffeId.from_principal(sid.principal) == sid
    assert {sid, SpiffeId.parse(uri)} == {sid}  # hashable, equal by value


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("https://cluster.local/ns/a/sa/b", "must start with 'spiffe://'"),
        ("SPIFFE://cluster.local/ns/a/sa/b", "must start with 'spiffe://'"),
        ("spiffe://", "trust domain is empty"),
        ("spiffe:///ns/a/sa/b", "trust domain is empty"),
        ("spiffe://cluster.local", "has no path"),
        ("spiffe://cluster.local/", "has no path"),
        ("spiffe://Cluster.Local/ns/a/sa/b", "only lower-case letters"),
        ("spiffe://cluster.local:443/ns/a/sa/b", "must not contain a port"),
        ("spiffe://me@cluster.local/ns/a/sa/b", "must not contain userinfo"),
        ("spiffe://cluster.local/ns/a/sa/b?x=1", "query or fragment"),
        ("spiffe://cluster.local/ns/a/sa/b#frag", "query or fragment"),
        ("spiffe://cluster.local/ns/a/sa/b/", "expected spiffe://<trust-domain>/ns/"),
        ("spiffe://cluster.local/ns/a/sa", "expected spiffe://<trust-domain>/ns/"),
        ("spiffe://cluster.local/namespace/a/sa/b", "expected spiffe://<trust-domain>/ns/"),
        ("spiffe://cluster.local/ns/a/serviceaccount/b", "expected spiffe://<trust-domain>/ns/"),
        ("spiffe://cluster.local/ns//sa/b", "namespace is empty"),
        ("spiffe://cluster.local/ns/a/sa/", "service account is empty"),
        ("spiffe://cluster.local/ns/../sa/b", "must not be '..'"),
        ("spiffe://cluster.local/ns/a/sa/.", "must not be '.'"),
        ("spiffe://cluster.local/ns/a%2Fb/sa/c", "may contain only letters"),
        ("spiffe://cluster.local/ns/a b/sa/c", "may contain only letters"),
        ("spiffe://" + "a" * 256 + "/ns/a/sa/b", "at most 255 are allowed"),
        ("spiffe://cluster.local/ns/a/sa/" + "b" * 2048, "at most 2048 are allowed"),
    ],
)
def test_spiffe_id_parse_rejects_with_a_clear_reason(uri: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        SpiffeId.parse(uri)
    assert message in str(info.value)


def test_spiffe_id_constructor_validates_like_parse() -> None:
    with pytest.raises(ValueError, match="namespace is empty"):
        SpiffeId(TD, "", "b")
    with pytest.raises(ValueError, match="service account 'a/b'"):
        SpiffeId(TD, "ns", "a/b")
    with pytest.raises(ValueError, match="must not carry"):
        SpiffeId.from_principal("spiffe://cluster.local/ns/a/sa/b")


# -- the local CA ----------------------------------------------------------


def test_new_ca_is_a_self_signed_p256_ca_with_pathlen_zero() -> None:
    ca = LocalCA.create(TD, clock=FakeClock())
    cert = ca.certificate
    constraints = ext(cert, x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = ext(cert, x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == TD
    cert.verify_directly_issued_by(cert)  # raises if the self-signature is wrong
    assert cert.not_valid_before_utc == START - CLOCK_SKEW_ALLOWANCE
    assert cert.not_valid_after_utc == START + timedelta(days=365)
    assert ca.trust_bundle_pem == cert.public_bytes(serialization.Encoding.PEM)


def test_ca_save_writes_key_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    ca = LocalCA.create(TD)
    old_umask = os.umask(0)
    try:
        cert_path, key_path = ca.save(tmp_path / "ca")
    finally:
        os.umask(old_umask)
    assert (cert_path.name, key_path.name) == (CA_CERT_FILE, CA_KEY_FILE)
    assert mode_of(key_path) == 0o600
    assert mode_of(cert_path) == 0o644
    assert mode_of(tmp_path / "ca") == 0o700
    # Nothing half-written is left behind by the temp-file-then-rename.
    assert sorted(p.name for p in (tmp_path / "ca").iterdir()) == [CA_CERT_FILE, CA_KEY_FILE]
    assert b"ENCRYPTED" not in key_path.read_bytes()


def test_ca_round_trips_through_files_and_keeps_signing(tmp_path: Path) -> None:
    original = LocalCA.create(TD)
    cert_path, key_path = original.save(tmp_path)
    loaded = LocalCA.load(cert_path, key_path, trust_domain=TD)
    assert loaded.certificate == original.certificate
    leaf = loaded.issue(SpiffeId(TD, "ns", "sa")).certificate
    leaf.verify_directly_issued_by(original.certificate)


def test_load_or_create_creates_once_then_reuses(tmp_path: Path) -> None:
    first = LocalCA.load_or_create(tmp_path / "ca", TD)
    second = LocalCA.load_or_create(tmp_path / "ca", TD)
    assert second.certificate.serial_number == first.certificate.serial_number


def test_load_or_create_refuses_half_a_ca(tmp_path: Path) -> None:
    LocalCA.create(TD).save(tmp_path)
    (tmp_path / CA_CERT_FILE).unlink()
    with pytest.raises(InvalidCA, match="only one of"):
        LocalCA.load_or_create(tmp_path, TD)
    assert (tmp_path / CA_KEY_FILE).exists()  # the surviving key was not overwritten


def test_loading_a_leaf_certificate_as_ca_is_refused(tmp_path: Path) -> None:
    issued = LocalCA.create(TD).issue(SpiffeId(TD, "ns", "sa"))
    (tmp_path / "c.pem").write_bytes(issued.certificate_pem)
    (tmp_path / "k.pem").write_bytes(issued.private_key_pem)
    with pytest.raises(InvalidCA, match="CA:false, so it is not a CA"):
        LocalCA.load(tmp_path / "c.pem", tmp_path / "k.pem", trust_domain=TD)


def test_loading_a_certificate_without_basic_constraints_is_refused(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not a ca")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime.now(timezone.utc) - timedelta(days=1))
        .not_valid_after(datetime.now(timezone.utc) + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "k.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(InvalidCA, match="no basicConstraints"):
        LocalCA.load(tmp_path / "c.pem", tmp_path / "k.pem", trust_domain=TD)


def test_loading_a_ca_with_someone_elses_key_is_refused(tmp_path: Path) -> None:
    cert_path, _ = LocalCA.create(TD).save(tmp_path / "one")
    _, other_key = LocalCA.create(TD).save(tmp_path / "two")
    with pytest.raises(InvalidCA, match="private key does not match"):
        LocalCA.load(cert_path, other_key, trust_domain=TD)


def test_loading_garbage_or_an_expired_ca_is_refused(tmp_path: Path) -> None:
    cert_path, key_path = LocalCA.create(TD, clock=FakeClock()).save(tmp_path)
    later = FakeClock(START + timedelta(days=366))
    with pytest.raises(InvalidCA, match="expired"):
        LocalCA.load(cert_path, key_path, trust_domain=TD, clock=later)
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(InvalidCA, match="not a PEM certificate"):
        LocalCA.load(tmp_path / "junk.pem", key_path, trust_domain=TD)
    with pytest.raises(InvalidCA, match="not a usable PEM private key"):
        LocalCA.load(cert_path, tmp_path / "junk.pem", trust_domain=TD)


# -- issued workload certificates ------------------------------------------


def test_issued_certificate_is_an_x509_svid() -> None:
    clock = FakeClock()
    ca = LocalCA.create(TD, clock=clock)
    sid = SpiffeId(TD, "shop", "cart")
    issued = ca.issue(sid)
    cert = issued.certificate

    san = ext(cert, x509.SubjectAlternativeName)
    assert san.critical  # required because the subject is empty
    assert list(san.value) == [x509.UniformResourceIdentifier(str(sid))]
    assert cert.subject == x509.Name([])
    assert ext(cert, x509.BasicConstraints).value.ca is False
    usage = ext(cert, x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    assert not usage.value.key_encipherment and not usage.value.key_cert_sign
    assert set(ext(cert, x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    }
    assert issued.not_before == START - CLOCK_SKEW_ALLOWANCE
    assert issued.not_after == START + timedelta(hours=24)
    cert.verify_directly_issued_by(ca.certificate)

    assert isinstance(issued.private_key, ec.EllipticCurvePrivateKey)
    assert issued.private_key.curve.name == "secp256r1"
    assert issued.private_key.public_key().public_numbers() == cert.public_key().public_numbers()
    aki = ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier
    assert aki == ext(ca.certificate, x509.SubjectKeyIdentifier).value.digest


def test_issue_for_a_caller_held_key_returns_no_private_key() -> None:
    ca = LocalCA.create(TD)
    key = ec.generate_private_key(ec.SECP256R1())
    issued = ca.issue(SpiffeId(TD, "ns", "sa"), public_key=key.public_key(), ttl=timedelta(hours=1))
    assert issued.private_key is None
    assert issued.certificate.public_key().public_numbers() == key.public_key().public_numbers()
    assert issued.not_after - issued.not_before == timedelta(hours=1) + CLOCK_SKEW_ALLOWANCE
    with pytest.raises(ValueError, match="caller-held key"):
        issued.private_key_pem


def test_rsa_workload_keys_get_key_encipherment_and_weak_ones_are_refused() -> None:
    ca = LocalCA.create(TD)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    issued = ca.issue(SpiffeId(TD, "ns", "sa"), public_key=rsa_key.public_key())
    assert ext(issued.certificate, x509.KeyUsage).value.key_encipherment
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ValueError, match="too small"):
        ca.issue(SpiffeId(TD, "ns", "sa"), public_key=weak.public_key())
    odd_curve = ec.generate_private_key(ec.SECP256K1())
    with pytest.raises(ValueError, match="not allowed"):
        ca.issue(SpiffeId(TD, "ns", "sa"), public_key=odd_curve.public_key())


def test_ca_refuses_foreign_trust_domain_and_bad_lifetimes() -> None:
    ca = LocalCA.create(TD)
    with pytest.raises(ValueError, match="cannot issue for spiffe://other.example/ns/a/sa/b"):
        ca.issue(SpiffeId("other.example", "a", "b"))
    with pytest.raises(ValueError, match="must be positive"):
        ca.issue(SpiffeId(TD, "a", "b"), ttl=timedelta(0))


def test_leaf_never_outlives_its_ca() -> None:
    clock = FakeClock()
    ca = LocalCA.create(TD, validity=timedelta(hours=2), clock=clock)
    issued = ca.issue(SpiffeId(TD, "a", "b"), ttl=timedelta(hours=24))
    assert issued.not_after == ca.not_after == START + timedelta(hours=2)


# -- rotation and the store ------------------------------------------------


def test_needs_rotation_turns_true_at_half_the_lifetime() -> None:
    ca = LocalCA.create(TD, clock=FakeClock())
    cert = ca.issue(SpiffeId(TD, "a", "b"), ttl=timedelta(hours=24)).certificate
    lifetime = timedelta(hours=24) + CLOCK_SKEW_ALLOWANCE
    due = START - CLOCK_SKEW_ALLOWANCE + lifetime / 2
    assert rotation_due_at(cert) == due
    assert not needs_rotation(cert, START)
    assert not needs_rotation(cert, due - timedelta(seconds=1))
    assert needs_rotation(cert, due)
    assert needs_rotation(cert, START + timedelta(days=2))  # expired
    assert needs_rotation(cert, START - timedelta(hours=1))  # clock went back
    assert not needs_rotation(cert, due, fraction=0.8)
    assert needs_rotation(cert, rotation_due_at(cert, 0.8), fraction=0.8)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock) -> CertificateStore:
    ca = LocalCA.create(TD, clock=clock)
    return CertificateStore(ca, tmp_path / "certs", clock=clock)


def test_store_issues_once_and_writes_files_ssl_can_load(store: CertificateStore) -> None:
    sid = SpiffeId(TD, "shop", "cart")
    first = store.get(sid)
    assert store.get(sid) is first
    assert mode_of(first.paths.key_file) == 0o600
    assert mode_of(first.paths.key_file.parent) == 0o700
    assert store.bundle_path.read_bytes() == store.trust_bundle_pem
    on_disk = x509.load_pem_x509_certificate(first.paths.cert_file.read_bytes())
    assert on_disk.serial_number == first.serial
    # The real consumer: ssl accepts the pair (it checks the key matches the cert).
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(first.paths.cert_file, first.paths.key_file)


def test_store_rotates_after_half_the_lifetime_with_a_new_serial(
    store: CertificateStore, clock: FakeClock
) -> None:
    sid = SpiffeId(TD, "shop", "cart")
    first = store.get(sid)
    clock.advance(timedelta(hours=11, minutes=59))
    assert store.get(sid).serial == first.serial
    clock.advance(timedelta(minutes=2))
    second = store.get(sid)
    assert second.serial != first.serial
    assert second.issued.not_before == clock.now - CLOCK_SKEW_ALLOWANCE
    on_disk = x509.load_pem_x509_certificate(second.paths.cert_file.read_bytes())
    assert on_disk.serial_number == second.serial
    assert mode_of(second.paths.key_file) == 0o600
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(second.paths.cert_file, second.paths.key_file)


def test_rotation_and_status_for_ambitctl(store: CertificateStore, clock: FakeClock) -> None:
    early = SpiffeId(TD, "shop", "cart")
    late = SpiffeId(TD, "shop", "web")
    first_early = store.get(early)
    clock.advance(timedelta(hours=6))
    first_late = store.get(late)
    clock.advance(timedelta(hours=7))  # early is 13 h old, late 7 h

    rows = {row.spiffe_id: row for row in store.status()}
    assert rows[early].rotation_due and not rows[late].rotation_due
    assert rows[early].serial == first_early.serial
    assert rows[early].serial_hex == f"{first_early.serial:x}"
    assert rows[late].not_after == first_late.issued.not_after
    assert rows[late].rotation_due_at == rotation_due_at(first_late.issued.certificate)

    assert store.get(early).serial != first_early.serial
    assert store.get(late).serial == first_late.serial
    assert not any(row.rotation_due for row in store.status())
    assert [row.spiffe_id for row in store.status()] == [early, late]
    assert {row.issuer for row in store.status()} == {"local CA"}


def test_store_remove_deletes_credentials(store: CertificateStore, tmp_path: Path) -> None:
    cart, web = SpiffeId(TD, "shop", "cart"), SpiffeId(TD, "shop", "web")
    cart_paths = store.get(cart).paths
    store.get(web)
    assert store.remove(cart)
    assert not cart_paths.key_file.exists() and not cart_paths.cert_file.parent.exists()
    assert cart_paths.cert_file.parent.parent.exists()  # web still lives in namespace shop
    assert store.identities() == [web]
    assert not store.remove(cart)


def test_a_new_store_deletes_the_keys_an_earlier_one_left(store: CertificateStore, tmp_path: Path) -> None:
    left = store.get(SpiffeId(TD, "shop", "cart")).paths
    assert left.key_file.exists()
    CertificateStore(LocalCA.create(TD), tmp_path / "certs")  # the agent restarted
    assert not left.key_file.exists() and not left.cert_file.parent.parent.exists()


def test_store_refuses_foreign_identities_and_bad_fractions(
    store: CertificateStore, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="cannot issue"):
        store.get(SpiffeId("other.example", "a", "b"))
    assert store.status() == []
    with pytest.raises(ValueError, match="between 0 and 1"):
        CertificateStore(LocalCA.create(TD), tmp_path / "x", rotate_fraction=1.0)


class HeldIssuer:
    """A local CA's issuer that waits for the test before answering."""

    def __init__(self, ca: LocalCA) -> None:
        self.inner = LocalIssuer(ca)
        self.trust_domain, self.clock, self.description = ca.trust_domain, ca.clock, "held"
        self.release = asyncio.Event()

    async def issue_new_key(self, identity, ttl):  # type: ignore[no-untyped-def]
        await self.release.wait()
        return await self.inner.issue_new_key(identity, ttl)


def test_removal_during_issuance_refuses_it_and_pod_churn_leaves_no_trace(tmp_path: Path) -> None:
    async def scenario() -> None:
        issuer = HeldIssuer(LocalCA.create(TD))
        store = CertificateStore(issuer, tmp_path / "certs")  # type: ignore[arg-type]
        gone = SpiffeId(TD, "shop", "gone")
        renewal = asyncio.ensure_future(store.renew(gone))
        for _ in range(100):  # until the issuance has started
            if store._removed_while_issuing:
                break
            await asyncio.sleep(0)
        assert store._removed_while_issuing == {gone: False}, "the issuance never started"
        assert not store.remove(gone)  # nothing held yet, but the issuance in flight is marked
        issuer.release.set()
        with pytest.raises(IssueError, match="removed while"):
            await renewal
        assert store.identities() == [] and store._removed_while_issuing == {}
        for generation in range(50):  # service accounts come and go
            churned = SpiffeId(TD, "load", f"sa-{generation}")
            await store.renew(churned)
            assert store.remove(churned)
        assert store.identities() == [] and store._removed_while_issuing == {}
    asyncio.run(scenario())
