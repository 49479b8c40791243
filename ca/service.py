"""`istio.v1.auth.IstioCertificateService`, served by ambit's CA.

One CreateCertificate, in order (every step can refuse, and says why):

1. authenticate: the bearer token, reviewed (authn.py);  UNAUTHENTICATED
2. the identity: the caller's own, or the impersonated one for a trusted
   node proxy (authz.py);                                PERMISSION_DENIED
3. for impersonation, the caller's node from its own pod, and a pod with
   that identity on that node (pods.py, authz.py);       PERMISSION_DENIED
4. the CSR: well formed, its key acceptable, its one SAN exactly the
   identity of step 2 (csr.py, authz.py);                INVALID_ARGUMENT
5. sign for at most the configured maximum lifetime; answer leaf, root.

When the API server (or the token file) cannot answer, the status is
UNAVAILABLE: the caller retries, and nothing is signed. Every decision is a
log line (`ca.issued` / `ca.refused`) and a metric.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import grpc
import structlog
from cryptography.hazmat.primitives import serialization
from google.protobuf import struct_pb2
from prometheus_client import CollectorRegistry, Counter, Histogram

from ambit.agent.identity.ca import LocalCA
from ambit.agent.identity.spiffe import SpiffeId
from ambit.api.istio import ca_pb2, ca_pb2_grpc

from .authn import Authenticator, Caller, AuthenticatorUnavailable, Unauthenticated, bearer_token
from .authz import (
    INVALID_ARGUMENT,
    UNAUTHENTICATED,
    UNAVAILABLE,
    Refused,
    caller_node,
    check_csr_identity,
    check_scheduled_on,
    wanted_identity,
)
from .csr import InvalidCsr, read_csr
from .pods import PodDirectory, PodsUnavailable

IMPERSONATED_IDENTITY = "ImpersonatedIdentity"
DEFAULT_WORKLOAD_CERT_TTL = timedelta(hours=24)  # istiod's DEFAULT_WORKLOAD_CERT_TTL
DEFAULT_MAX_WORKLOAD_CERT_TTL = timedelta(days=90)  # istiod's MAX_WORKLOAD_CERT_TTL

_STATUS = {name: getattr(grpc.StatusCode, name) for name in
           ("UNAUTHENTICATED", "PERMISSION_DENIED", "INVALID_ARGUMENT", "UNAVAILABLE")}

_log = structlog.get_logger("ambit.ca")


@dataclass(frozen=True)
class IssuingPolicy:
    trusted_node_accounts: frozenset[str]
    default_ttl: timedelta = DEFAULT_WORKLOAD_CERT_TTL
    max_ttl: timedelta = DEFAULT_MAX_WORKLOAD_CERT_TTL

    def lifetime(self, requested_seconds: int) -> tuple[timedelta, bool]:
        """(lifetime to sign, whether the request was cut down to the maximum)."""
        if requested_seconds <= 0:
            return min(self.default_ttl, self.max_ttl), False
        if requested_seconds > self.max_ttl.total_seconds():
            return self.max_ttl, True
        return timedelta(seconds=requested_seconds), False


class CaMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.issued = Counter("ambit_ca_certificates_issued", "Certificates signed, by kind of request",
                              ["request"], registry=r)
        self.refused = Counter("ambit_ca_requests_refused", "Certificate requests refused, by gRPC status and reason",
                               ["code", "reason"], registry=r)
        self.seconds = Histogram("ambit_ca_request_seconds", "Time to answer a certificate request",
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
                                 registry=r)


def _field(metadata: struct_pb2.Struct, key: str) -> str:
    if key not in metadata.fields:
        return ""
    value = metadata.fields[key]
    if value.WhichOneof("kind") != "string_value":
        raise Refused(INVALID_ARGUMENT, "bad-metadata", f"metadata[{key!r}] is not a string")
    return value.string_value


class CertificateService(ca_pb2_grpc.IstioCertificateServiceServicer):
    def __init__(self, ca: LocalCA, authenticator: Authenticator, pods: PodDirectory, policy: IssuingPolicy,
                 metrics: CaMetrics | None = None) -> None:
        self._ca = ca
        self._authenticator = authenticator
        self._pods = pods
        self._policy = policy
        self.metrics = metrics or CaMetrics()
        self._root_pem = ca.trust_bundle_pem.decode()

    async def CreateCertificate(self, request: ca_pb2.IstioCertificateRequest,  # noqa: N802 - gRPC's name
                                context: grpc.aio.ServicerContext) -> ca_pb2.IstioCertificateResponse:
        started = time.perf_counter()
        peer = context.peer()
        known: dict[str, str] = {}  # who asked for what, as far as the request got: for the log
        try:
            response = await self._create(request, context.invocation_metadata() or (), peer, known)
        except Refused as refusal:
            self.metrics.refused.labels(refusal.code, refusal.reason).inc()
            self.metrics.seconds.observe(time.perf_counter() - started)
            _log.warning("ca.refused", peer=peer, code=refusal.code, reason=refusal.reason, detail=refusal.detail,
                         **known)
            await context.abort(_STATUS[refusal.code], f"{refusal.reason}: {refusal.detail}")
            raise AssertionError("abort returns by raising")  # pragma: no cover
        self.metrics.seconds.observe(time.perf_counter() - started)
        return response

    async def _create(self, request: ca_pb2.IstioCertificateRequest, metadata: Sequence[tuple[str, str | bytes]],
                      peer: str, known: dict[str, str]) -> ca_pb2.IstioCertificateResponse:
        try:
            caller = await self._authenticator.authenticate(bearer_token(metadata))
        except Unauthenticated as exc:
            raise Refused(UNAUTHENTICATED, "unauthenticated", str(exc)) from None
        except AuthenticatorUnavailable as exc:
            raise Refused(UNAVAILABLE, "authenticator-unavailable", str(exc)) from None
        known["caller"] = str(caller)
        impersonated = _field(request.metadata, IMPERSONATED_IDENTITY)
        if impersonated:
            known["impersonated"] = impersonated
        wanted = wanted_identity(caller, impersonated, self._ca.trust_domain, self._policy.trusted_node_accounts)
        node = ""
        if wanted.impersonating:
            node = await self._authorise_on_node(caller, wanted.identity)
        try:
            csr = read_csr(request.csr)
        except InvalidCsr as exc:
            raise Refused(INVALID_ARGUMENT, "bad-csr", str(exc)) from None
        check_csr_identity(csr.identity, wanted.identity)
        ttl, capped = self._policy.lifetime(request.validity_duration)
        try:
            issued = self._ca.issue(wanted.identity, public_key=csr.public_key, ttl=ttl)
        except ValueError as exc:  # the CA expired, a key it cannot certify
            raise Refused(UNAVAILABLE, "cannot-sign", str(exc)) from None
        kind = "impersonated" if wanted.impersonating else "own"
        self.metrics.issued.labels(kind).inc()
        _log.info("ca.issued", peer=peer, caller=str(caller), identity=str(wanted.identity), request=kind,
                  node=node or None, serial=f"{issued.serial:x}", not_after=str(issued.not_after),
                  requested_ttl_s=request.validity_duration, ttl_capped=capped)
        leaf = issued.certificate.public_bytes(serialization.Encoding.PEM).decode()
        return ca_pb2.IstioCertificateResponse(cert_chain=[leaf, self._root_pem])

    async def _authorise_on_node(self, caller: Caller, identity: SpiffeId) -> str:
        """The caller's node, once a pod with `identity` is known to run there."""
        try:
            caller_pod = await self._pods.pod(caller.namespace, caller.pod_name) if caller.pod_name else None
            if caller.pod_name and caller_pod is None and await self._pods.refresh():
                caller_pod = await self._pods.pod(caller.namespace, caller.pod_name)
            node = caller_node(caller, caller_pod)
            try:
                check_scheduled_on(identity, node, await self._pods.on_node(node))
            except Refused:
                # A pod scheduled a moment ago may not be in a file source yet: look once more.
                if not await self._pods.refresh():
                    raise
                check_scheduled_on(identity, node, await self._pods.on_node(node))
        except PodsUnavailable as exc:
            raise Refused(UNAVAILABLE, "pods-unavailable", str(exc)) from None
        return node
