"""A client of Istio's certificate API: istiod, cert-manager's istio-csr, or `ambit ca`.

One call, `IstioCertificateService/CreateCertificate`, over TLS verified
against the mesh root (`--ca-root-cert`, the `istio-ca-root-cert`
ConfigMap's root-cert.pem), authenticated by the node agent's projected
service-account token (`--ca-token-file`, audience `istio-ca`), re-read for
every request because the kubelet rotates it. The defaults are ztunnel's, so
an agent pointed at istiod needs no other setting.

What the CA answered is returned as is; checking it is the issuer's job
(issuer.py), because "is this the certificate I asked for" needs the key.

The call is grpc_call.py's (h2 over TLS, a connection per call, waiting for
a CA that is away until the deadline): grpcio would cost every agent ~17 MB
of RSS for a call per identity every few hours.
"""
from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import structlog
from google.protobuf import struct_pb2

from ambit.api.istio import ca_pb2

from ..grpc_call import client_context, unary_call
from ..grpc_wire import RpcError, StatusCode
from .spiffe import SpiffeId

DEFAULT_CA_ADDRESS = "istiod.istio-system.svc:15012"
DEFAULT_TOKEN_FILE = "/var/run/secrets/tokens/istio-token"
DEFAULT_ROOT_CERT = "/var/run/secrets/istio/root-cert.pem"
DEFAULT_CLUSTER_ID = "Kubernetes"
IMPERSONATED_IDENTITY = "ImpersonatedIdentity"
MAX_RESPONSE_BYTES = 1024 * 1024

# Statuses that say "not now" rather than "no": the CA is away, overloaded or
# could not reach the API server. Retried with backoff like the others, but
# logged as the CA being unavailable, not as a refusal.
_TRANSIENT = frozenset({StatusCode.UNAVAILABLE, StatusCode.DEADLINE_EXCEEDED, StatusCode.RESOURCE_EXHAUSTED,
                        StatusCode.ABORTED, StatusCode.CANCELLED})
CREATE_CERTIFICATE = "/istio.v1.auth.IstioCertificateService/CreateCertificate"

_log = structlog.get_logger(__name__)


class IssueError(Exception):
    """No certificate this time; the caller keeps what it has and tries again later."""


class BadCertificate(IssueError):
    """The CA answered with something that is not a certificate for what was asked."""


class CaUnavailable(IssueError):
    """The CA could not be reached or could not answer now."""


class CaRefused(IssueError):
    """The CA answered the request with an error status."""

    def __init__(self, code: StatusCode, message: str) -> None:
        super().__init__(f"the CA refused: {code.name}: {message}")
        self.code = code


@dataclass(frozen=True)
class CaClientSettings:
    address: str = DEFAULT_CA_ADDRESS
    token_file: Path = Path(DEFAULT_TOKEN_FILE)
    root_cert_file: Path = Path(DEFAULT_ROOT_CERT)
    # The name the CA's certificate must carry when it is not the address's
    # host (ztunnel's ALT_CA_HOSTNAME), e.g. when dialling an IP.
    server_name: str = ""
    cluster_id: str = DEFAULT_CLUSTER_ID
    timeout: float = 10.0

    @property
    def target(self) -> str:
        """host:port, also from a URL (`https://istiod.istio-system.svc:15012`, as ztunnel accepts)."""
        address = self.address
        for scheme in ("https://", "grpcs://", "dns:///"):
            if address.startswith(scheme):
                address = address[len(scheme):]
        return address.rstrip("/")


class IstioCaClient:
    def __init__(self, settings: CaClientSettings) -> None:
        self.settings = settings
        self._context: ssl.SSLContext | None = None
        self._root_signature: tuple[int, int, int] | None = None

    @property
    def description(self) -> str:
        return f"Istio CA at {self.settings.target}"

    async def create_certificate(self, csr_pem: str, ttl_seconds: int,
                                 impersonate: SpiffeId | None = None) -> list[str]:
        """The PEM chain the CA returns for `csr_pem` (leaf first, root last)."""
        token = self._token()
        context = self._current_context()
        request = ca_pb2.IstioCertificateRequest(csr=csr_pem, validity_duration=ttl_seconds)
        if impersonate is not None:
            request.metadata.CopyFrom(struct_pb2.Struct(fields={
                IMPERSONATED_IDENTITY: struct_pb2.Value(string_value=str(impersonate))}))
        metadata = (("authorization", f"Bearer {token}"), ("clusterid", self.settings.cluster_id))
        host, port = self._host_port()
        try:
            answer = await unary_call(host, port, context, self.settings.server_name, CREATE_CERTIFICATE,
                                      request.SerializeToString(), metadata, self.settings.timeout,
                                      max_response=MAX_RESPONSE_BYTES)
        except RpcError as exc:
            if exc.code in _TRANSIENT:
                raise CaUnavailable(f"{self.description}: {exc.code.name}: {exc.details}") from None
            raise CaRefused(exc.code, exc.details) from None
        try:
            response = ca_pb2.IstioCertificateResponse.FromString(answer)
        except Exception as exc:  # protobuf's DecodeError
            raise CaRefused(StatusCode.INTERNAL, f"unreadable answer: {exc}") from None
        return list(response.cert_chain)

    async def close(self) -> None:
        """Nothing stays open between calls."""

    def _host_port(self) -> tuple[str, int]:
        host, _, port = self.settings.target.rpartition(":")
        if not host or not port.isdigit():
            raise IssueError(f"the CA address {self.settings.address!r} is not host:port")
        return host.strip("[]"), int(port)

    def _token(self) -> str:
        path = self.settings.token_file
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise IssueError(f"cannot read the CA token {path}: {exc.strerror or exc}") from None
        if not token:
            raise IssueError(f"the CA token {path} is empty")
        return token

    def _current_context(self) -> ssl.SSLContext:
        """TLS trusting the root file, made again when the file changed (root rotation)."""
        path = self.settings.root_cert_file
        try:
            st = os.stat(path)
            signature = (st.st_mtime_ns, st.st_size, st.st_ino)
            if self._context is not None and signature == self._root_signature:
                return self._context
            root = path.read_bytes()
        except OSError as exc:
            if self._context is not None:
                return self._context  # keep what we have; the file may be mid-update
            raise IssueError(f"cannot read the CA root certificate {path}: {exc.strerror or exc}") from None
        if b"-----BEGIN CERTIFICATE-----" not in root:
            raise IssueError(f"{path} holds no PEM certificate")
        try:
            context = client_context(root)
        except ssl.SSLError as exc:
            raise IssueError(f"{path}: {exc}") from None
        if self._context is not None:
            _log.info("ca_client.root_reloaded", root=str(path))
        self._context, self._root_signature = context, signature
        return context
