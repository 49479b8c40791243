"""A CA speaking IstioCertificateService that can misbehave, for testing clients.

Built with grpcio from the same proto as ambit's client (and as istiod's
API), so the wire contract itself is exercised: a test sets `behaviour` to
sign as asked, sign someone else's identity or key, return a broken chain,
fail with a status, or stall; every request is recorded with its metadata.
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ambit.agent.identity.ca import LocalCA
from ambit.agent.identity.spiffe import SpiffeId
from ambit.api.istio import ca_pb2, ca_pb2_grpc

SERVER_NAME = "ca.test.svc"


def pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


@dataclass(frozen=True)
class Received:
    csr: x509.CertificateSigningRequest
    validity_duration: int
    impersonated: str | None
    metadata: dict[str, str]

    @property
    def san(self) -> SpiffeId:
        names = self.csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return SpiffeId.parse(names.get_values_for_type(x509.UniformResourceIdentifier)[0])


Behaviour = Callable[[Received, grpc.aio.ServicerContext], Awaitable[list[str]]]


@dataclass
class ScriptedCa(ca_pb2_grpc.IstioCertificateServiceServicer):
    ca: LocalCA
    received: list[Received] = field(default_factory=list)
    behaviour: Behaviour | None = None  # None: sign as asked

    async def CreateCertificate(self, request: ca_pb2.IstioCertificateRequest,  # noqa: N802
                                context: grpc.aio.ServicerContext) -> ca_pb2.IstioCertificateResponse:
        fields = request.metadata.fields
        received = Received(
            x509.load_pem_x509_csr(request.csr.encode()), request.validity_duration,
            fields["ImpersonatedIdentity"].string_value if "ImpersonatedIdentity" in fields else None,
            {k: v if isinstance(v, str) else v.decode() for k, v in context.invocation_metadata()})
        self.received.append(received)
        chain = await (self.behaviour or self.sign_as_asked)(received, context)
        return ca_pb2.IstioCertificateResponse(cert_chain=chain)

    # -- behaviours -----------------------------------------------------------
    async def sign_as_asked(self, received: Received, context: grpc.aio.ServicerContext) -> list[str]:
        return self.signed(received.san, received.csr.public_key(), received.validity_duration)

    def signed(self, identity: SpiffeId, public_key: object, ttl_seconds: int = 3600) -> list[str]:
        issued = self.ca.issue(identity, public_key=public_key,  # type: ignore[arg-type]
                               ttl=timedelta(seconds=ttl_seconds or 3600))
        return [pem(issued.certificate), self.ca.trust_bundle_pem.decode()]

    def sign_as(self, identity: SpiffeId) -> Behaviour:
        async def behaviour(received: Received, context: grpc.aio.ServicerContext) -> list[str]:
            return self.signed(identity, received.csr.public_key(), received.validity_duration)
        return behaviour

    def sign_another_key(self) -> Behaviour:
        async def behaviour(received: Received, context: grpc.aio.ServicerContext) -> list[str]:
            return self.signed(received.san, ec.generate_private_key(ec.SECP256R1()).public_key())
        return behaviour

    def answer(self, chain: list[str]) -> Behaviour:
        async def behaviour(received: Received, context: grpc.aio.ServicerContext) -> list[str]:
            return chain
        return behaviour

    def fail(self, code: grpc.StatusCode, message: str = "no") -> Behaviour:
        async def behaviour(received: Received, context: grpc.aio.ServicerContext) -> list[str]:
            await context.abort(code, message)
            raise AssertionError("unreachable")
        return behaviour

    def stall(self, seconds: float) -> Behaviour:
        async def behaviour(received: Received, context: grpc.aio.ServicerContext) -> list[str]:
            await asyncio.sleep(seconds)
            return await self.sign_as_asked(received, context)
        return behaviour


class CaEndpoint:
    """A running grpc.aio server for a ScriptedCa, TLS with a certificate for SERVER_NAME."""

    def __init__(self, servicer: ScriptedCa, port: int = 0) -> None:
        self.servicer = servicer
        certificate, key = servicer.ca.issue_serving([SERVER_NAME])
        assert key is not None
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        self._credentials = grpc.ssl_server_certificate_configuration(
            [(key_pem, certificate.public_bytes(serialization.Encoding.PEM))])
        self._server: grpc.aio.Server | None = None
        self.port = port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = grpc.aio.server()
        ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(self.servicer, self._server)
        credentials = grpc.dynamic_ssl_server_credentials(self._credentials, lambda: None)
        self.port = self._server.add_secure_port(f"127.0.0.1:{self.port}", credentials)
        await self._server.start()

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(None)
            self._server = None


@contextlib.asynccontextmanager
async def scripted_ca(ca: LocalCA) -> AsyncIterator[CaEndpoint]:
    endpoint = CaEndpoint(ScriptedCa(ca))
    await endpoint.start()
    try:
        yield endpoint
    finally:
        await endpoint.stop()


class ThreadedCa:
    """A CaEndpoint on its own event loop thread, for synchronous clients
    (the waypoint's rotator). `stop()`/`start()` take it away and bring it back
    on the same port."""

    def __init__(self, ca: LocalCA) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="scripted-ca", daemon=True)
        self._thread.start()
        self.endpoint = CaEndpoint(ScriptedCa(ca))
        self.start()

    def _call(self, coroutine: Awaitable[None]) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(10)  # type: ignore[arg-type]

    def start(self) -> None:
        self._call(self.endpoint.start())

    def stop(self) -> None:
        self._call(self.endpoint.stop())

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()
