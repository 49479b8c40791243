"""The CA service's process: IstioCertificateService over TLS, metrics and readiness.

TLS on the gRPC port (15012, istiod's) uses a serving certificate the CA
issues itself for its DNS names, as istiod does in its self-signed mode;
clients verify it against the mesh root (the `istio-ca-root-cert` ConfigMap's
root-cert.pem). It is re-issued at half its lifetime: gRPC asks for the
current one before every new handshake, so rotation needs no restart.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import grpc
import structlog
from cryptography.hazmat.primitives import serialization

from ambit.agent.identity.ca import LocalCA
from ambit.agent.identity.store import needs_rotation
from ambit.agent.telemetry.http import TelemetryServer
from ambit.api.istio import ca_pb2_grpc

from .service import CertificateService

SERVING_CERT_TTL = timedelta(hours=24)

_log = structlog.get_logger("ambit.ca")


class ServingCertificate:
    """The CA's TLS certificate for `dns_names`, replaced once half its life has passed."""

    def __init__(self, ca: LocalCA, dns_names: Sequence[str], ttl: timedelta = SERVING_CERT_TTL) -> None:
        self._ca = ca
        self._dns_names = list(dns_names)
        self._ttl = ttl
        self._lock = threading.Lock()  # gRPC's fetcher runs on its own threads
        self._certificate, self._config = self._issue()

    def _issue(self) -> tuple[object, grpc.ServerCertificateConfiguration]:
        certificate, key = self._ca.issue_serving(self._dns_names, ttl=self._ttl)
        assert key is not None
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        chain_pem = certificate.public_bytes(serialization.Encoding.PEM)
        _log.info("ca.serving_certificate", dns_names=self._dns_names, serial=f"{certificate.serial_number:x}",
                  not_after=str(certificate.not_valid_after_utc))
        return certificate, grpc.ssl_server_certificate_configuration([(key_pem, chain_pem)])

    @property
    def initial(self) -> grpc.ServerCertificateConfiguration:
        return self._config

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's cert_config_fetcher: a new configuration when due, else None (keep)."""
        with self._lock:
            if not needs_rotation(self._certificate, self._ca.clock()):  # type: ignore[arg-type]
                return None
            self._certificate, self._config = self._issue()
            return self._config


@dataclass(frozen=True)
class Listen:
    address: str = "0.0.0.0:15012"
    telemetry_address: str = "0.0.0.0"
    metrics_port: int = 15014  # istiod's monitoring port
    readiness_port: int = 15021


class CaServer:
    def __init__(self, service: CertificateService, ca: LocalCA, dns_names: Sequence[str], listen: Listen) -> None:
        self.service = service
        self.listen = listen
        self.serving = ServingCertificate(ca, dns_names)
        self._server = grpc.aio.server(options=[("grpc.max_concurrent_streams", 256),
                                                ("grpc.max_receive_message_length", 64 * 1024)])
        ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(service, self._server)
        credentials = grpc.dynamic_ssl_server_credentials(self.serving.initial, self.serving.fetch,
                                                          require_client_authentication=False)
        self.port = self._server.add_secure_port(listen.address, credentials)
        if self.port == 0:
            raise OSError(f"cannot listen on {listen.address}")
        self._ready = False
        self.telemetry = TelemetryServer(service.metrics.registry, self.readiness, listen.telemetry_address,
                                         listen.metrics_port, listen.readiness_port)

    def readiness(self) -> tuple[bool, str]:
        return (True, "ready") if self._ready else (False, "starting")

    async def start(self) -> None:
        self.telemetry.start()
        await self._server.start()
        self._ready = True
        _log.info("ca.serving", address=self.listen.address, port=self.port)

    async def stop(self, grace: float = 1.0) -> None:
        self._ready = False
        await self._server.stop(grace)
        self.telemetry.stop()
