"""TLS contexts for HBONE and the identity checks `ssl` does not do for us.

Python's `ssl` verifies the peer's chain against the trust bundle; it knows
nothing of SPIFFE. Hostname checking is therefore off (there is no hostname,
and HBONE sends no SNI) and the URI SAN is matched here, after the handshake:
the client checks the server is one of the identities it expects for the
destination, the server maps the client's SAN to the principal that
AuthorizationPolicy sees. Which clients may connect is policy's decision, not
the handshake's.

Both functions taking an `ssl_object` accept an `ssl.SSLSocket` or the
`ssl.SSLObject` asyncio exposes as `transport.get_extra_info("ssl_object")`.
"""
from __future__ import annotations

import ssl
from typing import Collection, Union

from .spiffe import SpiffeId
from .store import CertificateStore

ALPN_H2 = "h2"

TlsConnection = Union[ssl.SSLSocket, ssl.SSLObject]


class IdentityError(Exception):
    """The peer did not present exactly one valid workload SPIFFE ID."""


class IdentityMismatch(IdentityError):
    """The server is not one of the identities the client expected."""

    def __init__(self, actual: SpiffeId, expected: Collection[SpiffeId]) -> None:
        wanted = ", ".join(sorted(str(e) for e in expected)) or "(none)"
        super().__init__(f"server identity {actual} is not one of the expected: {wanted}")
        self.actual = actual
        self.expected = frozenset(expected)


class ForeignTrustDomain(IdentityError):
    """The client's identity belongs to a trust domain this node does not serve."""


class AlpnMismatch(Exception):
    """The peer did not agree to HTTP/2, so this is not an HBONE connection."""


def _hbone_context(protocol: int, store: CertificateStore, spiffe_id: SpiffeId) -> ssl.SSLContext:
    context = ssl.SSLContext(protocol)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    # Must be off before verify_mode is set on a client context; SPIFFE
    # identities are URI SANs, checked by peer_spiffe_id and friends.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    # STRICT refuses malformed certificates (as Python 3.13 does by default);
    # PARTIAL_CHAIN lets an operator-supplied intermediate CA be the anchor.
    context.verify_flags |= ssl.VERIFY_X509_STRICT | ssl.VERIFY_X509_PARTIAL_CHAIN
    # No resumption, as ztunnel: every connection proves its identity afresh.
    context.options |= ssl.OP_NO_TICKET
    context.load_verify_locations(cadata=store.trust_bundle_pem.decode("ascii"))
    context.set_alpn_protocols([ALPN_H2])
    store.load_cert_chain_into(context, spiffe_id)
    return context


def server_context(store: CertificateStore, spiffe_id: SpiffeId) -> ssl.SSLContext:
    """Context for the inbound HBONE listener presenting `spiffe_id`; requires a client cert."""
    context = _hbone_context(ssl.PROTOCOL_TLS_SERVER, store, spiffe_id)
    # OP_NO_TICKET alone makes TLS 1.3 servers switch to stateful tickets;
    # issuing no tickets at all is what turns resumption off.
    context.num_tickets = 0
    return context


def client_context(store: CertificateStore, spiffe_id: SpiffeId) -> ssl.SSLContext:
    """Context for outbound HBONE on behalf of `spiffe_id` (the source workload).

    Wrap sockets with `server_hostname=None` so no SNI is sent; then call
    `verify_server_identity` before sending anything.
    """
    return _hbone_context(ssl.PROTOCOL_TLS_CLIENT, store, spiffe_id)


def peer_spiffe_id(ssl_object: TlsConnection) -> SpiffeId:
    """The SPIFFE ID in the verified peer certificate's only URI SAN."""
    cert = ssl_object.getpeercert()
    if cert is None:
        raise IdentityError("peer presented no certificate")
    if not cert:
        # getpeercert() is empty when the context did not verify the chain.
        raise IdentityError("peer certificate was not verified")
    uris = [value for kind, value in cert.get("subjectAltName", ()) if kind == "URI"]
    if len(uris) != 1:
        # X.509-SVID: exactly one URI SAN, so the identity is never ambiguous.
        raise IdentityError(f"peer certificate has {len(uris)} URI SANs, exactly one is required")
    try:
        return SpiffeId.parse(uris[0])
    except ValueError as exc:
        raise IdentityError(f"peer URI SAN is not a workload SPIFFE ID: {exc}") from None


def verify_server_identity(ssl_object: TlsConnection, expected: Collection[SpiffeId]) -> SpiffeId:
    """Client side: the server must be one of `expected` (empty expects nobody)."""
    actual = peer_spiffe_id(ssl_object)
    if actual not in expected:
        raise IdentityMismatch(actual, expected)
    return actual


def authenticate_client(ssl_object: TlsConnection, trust_domain: str) -> SpiffeId:
    """Server side: the client's identity, which must be in our trust domain."""
    actual = peer_spiffe_id(ssl_object)
    if actual.trust_domain != trust_domain:
        raise ForeignTrustDomain(
            f"client identity {actual} is not in trust domain {trust_domain!r}"
        )
    return actual


def require_alpn_h2(ssl_object: TlsConnection) -> None:
    """HBONE is HTTP/2 only; a peer that did not negotiate `h2` gets refused."""
    selected = ssl_object.selected_alpn_protocol()
    if selected != ALPN_H2:
        raise AlpnMismatch(f"peer negotiated ALPN {selected!r}, HBONE requires {ALPN_H2!r}")
