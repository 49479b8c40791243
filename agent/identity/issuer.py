"""Where workload certificates come from: the local CA, or a CA spoken to over Istio's API.

Both take a key generated on this node and the identity it is for, and give
back an IssuedCert. `LocalIssuer` signs in-process with a CA key on disk
(no Kubernetes, tests, the lab's simplest path). `IstioCaIssuer` sends a CSR
to istiod, istio-csr or `ambit ca`, asking for the identity as a node proxy
(ImpersonatedIdentity) or as itself (a waypoint), and accepts the answer
only if it is exactly what was asked for:

- the leaf certifies this key, and names exactly the identity requested as
  its one URI SAN (a CA returning anyone else's identity is refused);
- every certificate is signed by the next, the last is a self-signed root,
  and the leaf is valid now.
"""
from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .ca import CLOCK_SKEW_ALLOWANCE, Clock, IssuedCert, LocalCA, utc_now
from .csr import certificate_request, new_workload_key
from .istio_ca import BadCertificate, IstioCaClient
from .spiffe import SpiffeId


class Issuer(Protocol):
    trust_domain: str
    description: str
    clock: Clock

    async def issue(self, identity: SpiffeId, key: ec.EllipticCurvePrivateKey, ttl: timedelta) -> IssuedCert: ...

    async def issue_new_key(self, identity: SpiffeId, ttl: timedelta) -> IssuedCert: ...


class LocalIssuer:
    """Signs with the CA key this process holds."""

    def __init__(self, ca: LocalCA) -> None:
        self.ca = ca
        self.trust_domain = ca.trust_domain
        self.clock = ca.clock
        self.description = "local CA"

    def issue_now(self, identity: SpiffeId, key: ec.EllipticCurvePrivateKey, ttl: timedelta) -> IssuedCert:
        issued = self.ca.issue(identity, public_key=key.public_key(), ttl=ttl)
        return IssuedCert(identity, issued.certificate, key, root=issued.root, issuer=self.description)

    async def issue(self, identity: SpiffeId, key: ec.EllipticCurvePrivateKey, ttl: timedelta) -> IssuedCert:
        return self.issue_now(identity, key, ttl)

    async def issue_new_key(self, identity: SpiffeId, ttl: timedelta) -> IssuedCert:
        return self.issue_now(identity, new_workload_key(), ttl)


class IstioCaIssuer:
    """CSRs to a CA that speaks IstioCertificateService.

    `impersonate`: ask for each identity on its behalf (a node agent, which
    holds its own token and asks for its pods'); False asks for the token's
    own identity (a waypoint), and the answer must still be `identity`.
    """

    def __init__(self, client: IstioCaClient, trust_domain: str, *, impersonate: bool = True,
                 clock: Clock = utc_now) -> None:
        self.client = client
        self.trust_domain = trust_domain
        self.impersonate = impersonate
        self.clock = clock
        self.description = client.description

    async def issue(self, identity: SpiffeId, key: ec.EllipticCurvePrivateKey, ttl: timedelta) -> IssuedCert:
        chain = await self.client.create_certificate(certificate_request(identity, key),
                                                     int(ttl.total_seconds()),
                                                     identity if self.impersonate else None)
        return verified_chain(identity, key, chain, self.clock(), self.description)

    async def issue_new_key(self, identity: SpiffeId, ttl: timedelta) -> IssuedCert:
        return await self.issue(identity, new_workload_key(), ttl)


def _spki(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _load_chain(pems: Sequence[str]) -> list[x509.Certificate]:
    certificates: list[x509.Certificate] = []
    for number, pem in enumerate(pems):
        try:
            # An element may hold more than one certificate (older CAs concatenate).
            certificates.extend(x509.load_pem_x509_certificates(pem.encode("ascii", "replace")))
        except ValueError as exc:
            raise BadCertificate(f"element {number} of the chain is not PEM certificates: {exc}") from None
    return certificates


def verified_chain(identity: SpiffeId, key: ec.EllipticCurvePrivateKey, pems: Sequence[str], now: datetime,
                   issuer: str) -> IssuedCert:
    """The CA's answer as an IssuedCert, if it certifies `key` as `identity`; BadCertificate otherwise."""
    certificates = _load_chain(pems)
    if len(certificates) < 2:
        raise BadCertificate(f"the CA returned {len(certificates)} certificate(s); a leaf and its root are needed")
    leaf, *rest = certificates
    if _spki(leaf.public_key()) != _spki(key.public_key()):
        raise BadCertificate(f"the certificate returned for {identity} is not for the key this node sent")
    try:
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise BadCertificate(f"the certificate returned for {identity} has no subjectAltName") from None
    uris = names.get_values_for_type(x509.UniformResourceIdentifier)
    if uris != [str(identity)]:
        raise BadCertificate(f"asked for {identity}, the CA certified {', '.join(uris) or 'no URI'}")
    for certificate, signer in zip(certificates, rest):
        try:
            certificate.verify_directly_issued_by(signer)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise BadCertificate(f"the chain for {identity} is broken at {certificate.subject.rfc4514_string() or 'the leaf'}"
                                 f": {exc or type(exc).__name__}") from None
    root = rest[-1]
    try:
        root.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature):
        raise BadCertificate("the last certificate of the chain is not a self-signed root") from None
    if not leaf.not_valid_before_utc - CLOCK_SKEW_ALLOWANCE <= now < leaf.not_valid_after_utc:
        raise BadCertificate(f"the certificate for {identity} is not valid now (valid "
                             f"{leaf.not_valid_before_utc} to {leaf.not_valid_after_utc})")
    return IssuedCert(identity, leaf, key, intermediates=tuple(rest[:-1]), root=root, issuer=issuer)
