"""The built-in local CA: signs short-lived X.509-SVIDs for the lab and tests.

One CA per trust domain. It is either made fresh (EC P-256, self-signed,
CA:true with pathlen 0, so it can sign workload certificates but no other CA)
or loaded from a certificate and key the operator supplies, e.g. one CA shared
by every node of a lab so their workloads trust each other.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Sequence, Union

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .pemfiles import ensure_private_dir, write_private, write_public
from .spiffe import SpiffeId, check_trust_domain
from .validity import CLOCK_SKEW_ALLOWANCE, DEFAULT_LEAF_TTL, Clock, utc_now  # noqa: F401 (also imported from here)

CA_CERT_FILE = "ca-cert.pem"
CA_KEY_FILE = "ca-key.pem"
DEFAULT_CA_VALIDITY = timedelta(days=365)
MIN_RSA_BITS = 2048
_LEAF_CURVES = (ec.SECP256R1, ec.SECP384R1)

CASigningKey = Union[
    ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey
]
LeafPublicKey = Union[ec.EllipticCurvePublicKey, rsa.RSAPublicKey]

_log = structlog.get_logger(__name__)


class InvalidCA(ValueError):
    """The certificate or key offered as a CA cannot be used as one."""


@dataclass(frozen=True)
class IssuedCert:
    """A workload certificate, what it chains to and, when held here, its private key.

    `intermediates` are the CA certificates between the leaf and `root`
    (sent to peers with the leaf); `root` is the trust anchor the CA said it
    chains to; `issuer` says which CA signed it (for `ambitctl certs`).
    """

    spiffe_id: SpiffeId
    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey | None
    intermediates: tuple[x509.Certificate, ...] = ()
    root: x509.Certificate | None = None
    issuer: str = ""

    @property
    def serial(self) -> int:
        return self.certificate.serial_number

    @property
    def not_before(self) -> datetime:
        return self.certificate.not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def chain_pem(self) -> bytes:
        """The leaf and its intermediates: what a TLS endpoint presents."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (self.certificate, *self.intermediates))

    @property
    def root_pem(self) -> bytes:
        if self.root is None:
            raise ValueError(f"certificate for {self.spiffe_id} came without a root")
        return self.root.public_bytes(serialization.Encoding.PEM)

    @property
    def private_key_pem(self) -> bytes:
        if self.private_key is None:
            raise ValueError(f"certificate for {self.spiffe_id} was issued for a caller-held key")
        return _private_key_pem(self.private_key)


def _private_key_pem(key: CASigningKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _spki(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _signature_hash(key: CASigningKey) -> hashes.HashAlgorithm | None:
    # EdDSA signs the message itself; passing a hash is an error.
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return None
    return hashes.SHA256()


def check_leaf_key(public_key: object) -> None:
    """Refuse workload keys too weak (or of a kind) the mesh does not accept."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if not isinstance(public_key.curve, _LEAF_CURVES):
            raise ValueError(f"EC curve {public_key.curve.name} is not allowed for workload keys")
        return
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise ValueError(f"RSA key of {public_key.key_size} bits is too small")
        return
    raise ValueError(f"workload key type {type(public_key).__name__} is not supported")


def _validate_ca(
    certificate: x509.Certificate, private_key: CASigningKey, now: datetime, source: str
) -> None:
    """Refuse anything that would sign certificates nobody can verify."""
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise InvalidCA(f"{source}: certificate has no basicConstraints, so it is not a CA") from None
    if not constraints.ca:
        raise InvalidCA(f"{source}: certificate has basicConstraints CA:false, so it is not a CA")
    try:
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and not usage.key_cert_sign:
        raise InvalidCA(f"{source}: certificate's keyUsage does not allow keyCertSign")
    if not isinstance(
        private_key,
        (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey),
    ):
        raise InvalidCA(f"{source}: key type {type(private_key).__name__} cannot sign certificates")
    if _spki(private_key.public_key()) != _spki(certificate.public_key()):
        raise InvalidCA(f"{source}: private key does not match the CA certificate's public key")
    if now > certificate.not_valid_after_utc:
        raise InvalidCA(f"{source}: CA certificate expired at {certificate.not_valid_after_utc}")
    if now < certificate.not_valid_before_utc:
        raise InvalidCA(
            f"{source}: CA certificate is not valid before {certificate.not_valid_before_utc}"
        )


class LocalCA:
    """Signs X.509-SVIDs for one trust domain."""

    def __init__(
        self,
        trust_domain: str,
        certificate: x509.Certificate,
        private_key: CASigningKey,
        *,
        clock: Clock = utc_now,
        source: str = "CA",
    ) -> None:
        check_trust_domain(trust_domain)
        _validate_ca(certificate, private_key, clock(), source)
        self._trust_domain = trust_domain
        self._certificate = certificate
        self._private_key = private_key
        self._clock = clock
        self._log = _log.bind(trust_domain=trust_domain)

    # -- construction ------------------------------------------------------

    @classmethod
    def create(
        cls,
        trust_domain: str,
        *,
        validity: timedelta = DEFAULT_CA_VALIDITY,
        clock: Clock = utc_now,
    ) -> LocalCA:
        """A fresh self-signed CA with an EC P-256 key."""
        check_trust_domain(trust_domain)
        now = clock()
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                x509.NameAttribute(NameOID.COMMON_NAME, f"ambit local CA for {trust_domain}"),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW_ALLOWANCE)
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        ca = cls(trust_domain, certificate, key, clock=clock, source="new CA")
        ca._log.info("ca.created", serial=f"{certificate.serial_number:x}", not_after=str(ca.not_after))
        return ca

    @classmethod
    def load(
        cls,
        cert_path: Path,
        key_path: Path,
        *,
        trust_domain: str,
        password: bytes | None = None,
        clock: Clock = utc_now,
    ) -> LocalCA:
        """Load an operator's CA; refuses non-CA certificates and foreign keys."""
        cert_path, key_path = Path(cert_path), Path(key_path)
        try:
            certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except ValueError as exc:
            raise InvalidCA(f"{cert_path}: not a PEM certificate ({exc})") from None
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=password)
        except (ValueError, TypeError) as exc:
            raise InvalidCA(f"{key_path}: not a usable PEM private key ({exc})") from None
        return cls(
            trust_domain,
            certificate,
            key,  # type: ignore[arg-type]  # type checked in _validate_ca
            clock=clock,
            source=str(cert_path),
        )

    @classmethod
    def load_or_create(
        cls, directory: Path, trust_domain: str, *, clock: Clock = utc_now
    ) -> LocalCA:
        """The agent's start-up path: reuse the CA in `directory`, else make and save one."""
        directory = Path(directory)
        cert_path, key_path = directory / CA_CERT_FILE, directory / CA_KEY_FILE
        if cert_path.exists() and key_path.exists():
            return cls.load(cert_path, key_path, trust_domain=trust_domain, clock=clock)
        if cert_path.exists() or key_path.exists():
            # Half a CA: overwriting it could destroy the only copy of a key.
            raise InvalidCA(f"{directory}: has only one of {CA_CERT_FILE} and {CA_KEY_FILE}")
        ca = cls.create(trust_domain, clock=clock)
        ca.save(directory)
        return ca

    def save(self, directory: Path) -> tuple[Path, Path]:
        """Write ca-cert.pem (0644) and ca-key.pem (0600) atomically; returns their paths."""
        directory = Path(directory)
        ensure_private_dir(directory)
        cert_path, key_path = directory / CA_CERT_FILE, directory / CA_KEY_FILE
        # Key first: a crash between the two leaves no certificate without its key.
        write_private(key_path, _private_key_pem(self._private_key))
        write_public(cert_path, self.trust_bundle_pem)
        self._log.info("ca.saved", directory=str(directory))
        return cert_path, key_path

    # -- what the CA is ----------------------------------------------------

    @property
    def trust_domain(self) -> str:
        return self._trust_domain

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def certificate(self) -> x509.Certificate:
        return self._certificate

    @property
    def not_after(self) -> datetime:
        return self._certificate.not_valid_after_utc

    @property
    def trust_bundle_pem(self) -> bytes:
        """The PEM every workload of this trust domain verifies peers against."""
        return self._certificate.public_bytes(serialization.Encoding.PEM)

    # -- issuing -----------------------------------------------------------

    def _authority_key_identifier(self) -> x509.AuthorityKeyIdentifier:
        # Chain building matches the leaf's AKI against the CA's SKI, so copy
        # the CA's own SKI (a loaded CA may have computed it another way).
        try:
            ski = self._certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        except x509.ExtensionNotFound:
            return x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self._certificate.public_key()  # type: ignore[arg-type]
            )
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)

    def issue(
        self,
        spiffe_id: SpiffeId,
        *,
        public_key: LeafPublicKey | None = None,
        ttl: timedelta = DEFAULT_LEAF_TTL,
    ) -> IssuedCert:
        """Sign an X.509-SVID for `spiffe_id`; generates an EC P-256 key unless one is given."""
        if spiffe_id.trust_domain != self._trust_domain:
            raise ValueError(
                f"CA for trust domain {self._trust_domain!r} cannot issue for {spiffe_id}"
            )
        if ttl <= timedelta(0):
            raise ValueError(f"certificate lifetime must be positive, got {ttl}")
        private_key: ec.EllipticCurvePrivateKey | None = None
        if public_key is None:
            private_key = ec.generate_private_key(ec.SECP256R1())
            public_key = private_key.public_key()
        check_leaf_key(public_key)

        certificate = self._sign_leaf(
            # X.509-SVID: the identity is the URI SAN alone, the subject may be empty.
            [x509.UniformResourceIdentifier(str(spiffe_id))], public_key, ttl, str(spiffe_id))
        return IssuedCert(spiffe_id, certificate, private_key, root=self._certificate, issuer="local CA")

    def issue_serving(
        self,
        dns_names: Sequence[str],
        *,
        public_key: LeafPublicKey | None = None,
        ttl: timedelta = DEFAULT_LEAF_TTL,
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey | None]:
        """A TLS server certificate for `dns_names` (the CA service's own, as
        istiod serves 15012 with one from its CA); generates the key unless given."""
        if not dns_names:
            raise ValueError("a serving certificate needs at least one DNS name")
        private_key: ec.EllipticCurvePrivateKey | None = None
        if public_key is None:
            private_key = ec.generate_private_key(ec.SECP256R1())
            public_key = private_key.public_key()
        check_leaf_key(public_key)
        names = [x509.DNSName(name) for name in dns_names]
        return self._sign_leaf(names, public_key, ttl, ",".join(dns_names)), private_key

    def _sign_leaf(
        self, names: list[x509.GeneralName], public_key: LeafPublicKey, ttl: timedelta, label: str
    ) -> x509.Certificate:
        """An end-entity certificate for `names` (the SAN), subject empty, usable
        for TLS client and server authentication."""
        now = self._clock()
        not_before = now - CLOCK_SKEW_ALLOWANCE
        not_after = now + ttl
        if not_after > self.not_after:
            # A leaf outliving its issuer fails verification at the CA's expiry anyway.
            self._log.warning("ca.leaf_clamped", subject=label, ca_not_after=str(self.not_after))
            not_after = self.not_after
        if not_after <= now:
            raise ValueError(f"CA expired at {self.not_after}; cannot issue for {label}")

        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self._certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            # With an empty subject the SAN must be critical (RFC 5280 4.2.1.6).
            .add_extension(x509.SubjectAlternativeName(names), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    # Only RSA keys can encipher a key; it means nothing for EC.
                    key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(self._authority_key_identifier(), critical=False)
            .sign(self._private_key, _signature_hash(self._private_key))
        )
        self._log.debug(
            "ca.issued",
            subject=label,
            serial=f"{certificate.serial_number:x}",
            not_after=str(not_after),
        )
        return certificate
