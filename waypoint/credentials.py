"""The waypoint's certificate as Envoy secrets on disk, and its rotation.

Envoy reads the waypoint's key and certificate, and the mesh trust bundle,
through file-based SDS: each is a Secret in a JSON file of its own, named by
`path_config_source` with `watched_directory` in the bootstrap. Replacing a
file atomically (rename into that directory) makes Envoy load it without a
restart; new handshakes use the new certificate, tunnels already up keep
theirs. The PEMs are inline in the Secret, so the key and the certificate
always change together.

    <certs>/identity-sds.json   the waypoint's key and certificate (0600)
    <certs>/bundle-sds.json     the CA certificates peers must chain to

The leaf lives 24 h; `CertificateRotator` re-issues it once half of that has
passed (the CertificateStore's rule, as for the agent's own workloads) and
rewrites the identity Secret. The key is made here; the certificate comes from
the mesh CA over Istio's API with the waypoint's own token (or, without
Kubernetes, from a CA key on this host). When the CA cannot be reached the
rotation fails and Envoy keeps the certificate it has.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from ambit.agent.identity.pemfiles import ensure_private_dir, write_private, write_public
from ambit.agent.identity.spiffe import SpiffeId
from ambit.agent.identity.store import CertificateStore, WorkloadCert, needs_rotation, rotation_due_at

IDENTITY_SECRET = "waypoint-identity"
BUNDLE_SECRET = "mesh-trust-bundle"
IDENTITY_FILE = "identity-sds.json"
BUNDLE_FILE = "bundle-sds.json"
_SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

_log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class SecretFiles:
    """Where the bootstrap tells Envoy to find its secrets."""

    directory: Path

    @property
    def identity(self) -> Path:
        return self.directory / IDENTITY_FILE

    @property
    def bundle(self) -> Path:
        return self.directory / BUNDLE_FILE


def identity_secret(certificate_pem: bytes, private_key_pem: bytes) -> dict[str, Any]:
    """The SDS file holding the waypoint's certificate and key (pure)."""
    return {"resources": [{"@type": _SECRET_TYPE, "name": IDENTITY_SECRET, "tls_certificate": {
        "certificate_chain": {"inline_string": certificate_pem.decode()},
        "private_key": {"inline_string": private_key_pem.decode()}}}]}


def bundle_secret(bundle_pem: bytes) -> dict[str, Any]:
    """The SDS file holding the trust bundle (pure)."""
    return {"resources": [{"@type": _SECRET_TYPE, "name": BUNDLE_SECRET, "validation_context": {
        "trusted_ca": {"inline_string": bundle_pem.decode()}}}]}


def write_identity(files: SecretFiles, cert: WorkloadCert) -> None:
    ensure_private_dir(files.directory)
    secret = identity_secret(cert.issued.chain_pem, cert.issued.private_key_pem)
    write_private(files.identity, json.dumps(secret, indent=1).encode())


def write_bundle(files: SecretFiles, bundle_pem: bytes) -> None:
    ensure_private_dir(files.directory)
    write_public(files.bundle, json.dumps(bundle_secret(bundle_pem), indent=1).encode())


class CertificateRotator:
    """Keeps one waypoint identity's Secret current (issue, then re-issue when due).

    Synchronous, for the supervisor's loop: each request to the CA runs on one
    event loop kept for the rotator's life, so a remote CA's channel is reused.
    """

    def __init__(self, store: CertificateStore, identity: SpiffeId, files: SecretFiles) -> None:
        self.store = store
        self.identity = identity
        self.files = files
        self.current: WorkloadCert | None = None
        self._bundle = b""
        self._runner = asyncio.Runner()

    def close(self) -> None:
        self._runner.close()

    def _fresh(self) -> WorkloadCert:
        """The held certificate until it is due, then a new one (IssueError if none came)."""
        held = self.store.current(self.identity)
        if held is not None and not needs_rotation(held.issued.certificate, self.store.clock(),
                                                   self.store.rotate_fraction):
            return held
        return self._runner.run(self.store.renew(self.identity))

    def _write_bundle_if_changed(self) -> None:
        bundle = self.store.trust_bundle_pem
        if bundle != self._bundle:
            write_bundle(self.files, bundle)
            self._bundle = bundle

    def write(self) -> WorkloadCert:
        """Write both Secrets (at start-up); returns the certificate written."""
        self.current = self._fresh()  # first: with a remote CA the roots come with it
        self._write_bundle_if_changed()
        write_identity(self.files, self.current)
        return self.current

    def due_at(self) -> datetime:
        assert self.current is not None, "write() first"
        return rotation_due_at(self.current.issued.certificate, self.store.rotate_fraction)

    def rotate_if_due(self) -> bool:
        """Re-issue and rewrite the identity Secret when the store says it is due."""
        fresh = self._fresh()  # re-issues once due
        if self.current is not None and fresh.serial == self.current.serial:
            return False
        self._write_bundle_if_changed()  # a new root comes before the certificate it signs
        write_identity(self.files, fresh)
        _log.info("waypoint.cert_rotated", spiffe_id=str(self.identity), serial=f"{fresh.serial:x}",
                  previous_serial=f"{self.current.serial:x}" if self.current else None,
                  not_after=str(fresh.issued.not_after))
        self.current = fresh
        return True
