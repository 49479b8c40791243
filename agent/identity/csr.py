"""A workload's key and certificate signing request, made on the node.

The key is generated here and never leaves the node: only the CSR (its
public half and the identity asked for) goes to the CA. EC P-256, as
ztunnel; the CSR's subject is empty and its one SAN, critical, is the
SPIFFE ID, so a CA that copies names from the CSR and one that does not
produce the same certificate.
"""
from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .spiffe import SpiffeId


def new_workload_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def certificate_request(identity: SpiffeId, key: ec.EllipticCurvePrivateKey) -> str:
    """The PEM CSR for `identity`, signed by `key` (proof of possession)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]), critical=True)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")
