"""What a certificate signing request asks for, checked before anything is signed.

The CA certifies the CSR's public key for one identity and copies nothing
else from it, but it still refuses requests that ask for more than it gives:
a CSR is accepted only if it is a well-formed PKCS#10 request whose signature
proves possession of the key, of a key type the mesh accepts, naming exactly
one SAN, a workload SPIFFE ID, and no DNS name, IP address or e-mail.
(istio-csr refuses the same; istiod ignores the CSR's names and signs the
caller's identity, which ambit's CA does too, after this check.)
"""
from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509

from ambit.agent.identity.ca import LeafPublicKey, check_leaf_key
from ambit.agent.identity.spiffe import SpiffeId

# A PEM CSR of any sane key is well under this; bigger is someone testing us.
MAX_CSR_BYTES = 16 * 1024


class InvalidCsr(ValueError):
    """The request cannot be signed as sent (INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class CsrRequest:
    public_key: LeafPublicKey
    identity: SpiffeId


def read_csr(pem: str) -> CsrRequest:
    """Parse and check a PEM CSR; raises InvalidCsr saying what is wrong."""
    data = pem.encode("utf-8", "replace")
    if not data.strip():
        raise InvalidCsr("the request carries no CSR")
    if len(data) > MAX_CSR_BYTES:
        raise InvalidCsr(f"CSR of {len(data)} bytes is larger than {MAX_CSR_BYTES}")
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as exc:
        raise InvalidCsr(f"not a PEM certificate request: {exc}") from None
    if not csr.is_signature_valid:
        raise InvalidCsr("the CSR's signature does not verify with its own key")
    try:
        public_key = csr.public_key()
        check_leaf_key(public_key)
    except (ValueError, TypeError) as exc:
        raise InvalidCsr(f"CSR key: {exc}") from None
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise InvalidCsr("the CSR has no subjectAltName; it must name the SPIFFE ID") from None
    except ValueError as exc:  # a malformed extension
        raise InvalidCsr(f"the CSR's extensions do not parse: {exc}") from None
    others = [name for name in san if not isinstance(name, x509.UniformResourceIdentifier)]
    if others:
        raise InvalidCsr(f"the CSR asks for names the CA does not certify: {', '.join(str(n.value) for n in others)}")
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise InvalidCsr(f"the CSR names {len(uris)} URIs; exactly one SPIFFE ID is required")
    try:
        identity = SpiffeId.parse(uris[0])
    except ValueError as exc:
        raise InvalidCsr(f"the CSR's URI is not a workload SPIFFE ID: {exc}") from None
    return CsrRequest(public_key, identity)  # type: ignore[arg-type]  # checked by check_leaf_key
