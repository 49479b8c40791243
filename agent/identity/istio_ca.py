"""A client of Istio's certificate API: istiod, cert-manager's istio-csr, or `ambit ca`.

One call, `IstioCertificateService/CreateCertificate`, over TLS verified
against the mesh root (`--ca-root-cert`, the `istio-ca-root-cert`
ConfigMap's root-cert.pem), authenticated by the node agent's projected
service-account token (`--ca-token-file`, audience `istio-ca`), re-read for
every request because the kubelet rotates it. The defaults are ztunnel's, so
an agent pointed at istiod needs no other setting.

What the CA answered is returned as is; checking it is the issuer's job
(issuer.py), because "is this the certificate I asked for" needs the key.
"""
from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from google.protobuf import struct_pb2

from ambit.api.istio import ca_pb2

if TYPE_CHECKING:
    import grpc

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
# grpcio is imported when the first channel is made: an agent with a local CA never needs it.
_TRANSIENT = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "CANCELLED"})

_log = structlog.get_logger(__name__)


class IssueError(Exception):
    """No certificate this time; the caller keeps what it has and tries again later."""


class CaUnavailable(IssueError):
    """The CA could not be reached or could not answer now."""


class CaRefused(IssueError):
    """The CA answered the request with an error status."""

    def __init__(self, code: "grpc.StatusCode", message: str) -> None:
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
        self._channel: Any = None  # grpc.aio.Channel
        self._stub: Any = None     # ca_pb2_grpc.IstioCertificateServiceStub
        self._root_signature: tuple[int, int, int] | None = None
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def description(self) -> str:
        return f"Istio CA at {self.settings.target}"

    async def create_certificate(self, csr_pem: str, ttl_seconds: int,
                                 impersonate: SpiffeId | None = None) -> list[str]:
        """The PEM chain the CA returns for `csr_pem` (leaf first, root last)."""
        import grpc

        token = self._token()
        stub = await self._current_stub()
        request = ca_pb2.IstioCertificateRequest(csr=csr_pem, validity_duration=ttl_seconds)
        if impersonate is not None:
            request.metadata.CopyFrom(struct_pb2.Struct(fields={
                IMPERSONATED_IDENTITY: struct_pb2.Value(string_value=str(impersonate))}))
        metadata = (("authorization", f"Bearer {token}"), ("clusterid", self.settings.cluster_id))
        try:
            # wait_for_ready: a CA that is coming back (the channel reconnecting) gets
            # the whole timeout, rather than the call failing at once.
            response = await stub.CreateCertificate(request, metadata=metadata, timeout=self.settings.timeout,
                                                    wait_for_ready=True)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code.name in _TRANSIENT:
                raise CaUnavailable(f"{self.description}: {code.name}: {exc.details()}") from None
            raise CaRefused(code, exc.details() or "") from None
        return list(response.cert_chain)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None

    def _token(self) -> str:
        path = self.settings.token_file
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise IssueError(f"cannot read the CA token {path}: {exc.strerror or exc}") from None
        if not token:
            raise IssueError(f"the CA token {path} is empty")
        return token

    async def _current_stub(self) -> Any:
        """The channel, rebuilt when the root certificate file changed (root rotation)."""
        import grpc

        from ambit.api.istio import ca_pb2_grpc

        path = self.settings.root_cert_file
        try:
            st = os.stat(path)
            signature = (st.st_mtime_ns, st.st_size, st.st_ino)
            if self._stub is not None and signature == self._root_signature:
                return self._stub
            root = path.read_bytes()
        except OSError as exc:
            if self._stub is not None:
                return self._stub  # keep the channel we have; the file may be mid-update
            raise IssueError(f"cannot read the CA root certificate {path}: {exc.strerror or exc}") from None
        if b"-----BEGIN CERTIFICATE-----" not in root:
            raise IssueError(f"{path} holds no PEM certificate")
        old = self._channel
        options: list[tuple[str, object]] = [("grpc.max_receive_message_length", MAX_RESPONSE_BYTES),
                                             # The CA may be away for minutes: reconnect soon after it is back.
                                             ("grpc.initial_reconnect_backoff_ms", 500),
                                             ("grpc.max_reconnect_backoff_ms", 5000)]
        if self.settings.server_name:
            options.append(("grpc.ssl_target_name_override", self.settings.server_name))
        self._channel = grpc.aio.secure_channel(self.settings.target, grpc.ssl_channel_credentials(root),
                                                options=options)
        self._stub = ca_pb2_grpc.IstioCertificateServiceStub(self._channel)
        if old is not None:
            _log.info("ca_client.root_reloaded", root=str(path))
            # Calls still on the old channel finish there; nobody waits for it.
            closing = asyncio.get_running_loop().create_task(old.close(grace=self.settings.timeout))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
        self._root_signature = signature
        return self._stub
