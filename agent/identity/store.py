"""The agent's workload certificates: one key + certificate per local service account.

Certificates are short-lived, so the store re-issues each one once a fixed
fraction of its lifetime has passed (half, by default), leaving the other half
to ride out a CA outage. Python's `ssl` loads certificates only from files, so
every certificate and key is also kept on disk:

    <directory>/trust-bundle.pem
    <directory>/<namespace>/<service-account>/cert.pem   (0644)
    <directory>/<namespace>/<service-account>/key.pem    (0600)

Namespace and service account cannot contain '/' or be '.'/'..' (SpiffeId
checks that), so the layout needs no escaping.
"""
from __future__ import annotations

import ssl
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import structlog
from cryptography import x509

from .ca import DEFAULT_LEAF_TTL, Clock, IssuedCert, LocalCA
from .pemfiles import ensure_private_dir, write_private, write_public
from .spiffe import SpiffeId

DEFAULT_ROTATE_FRACTION = 0.5
BUNDLE_FILE = "trust-bundle.pem"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"

_log = structlog.get_logger(__name__)


def rotation_due_at(certificate: x509.Certificate, fraction: float = DEFAULT_ROTATE_FRACTION) -> datetime:
    """The moment `fraction` of the certificate's lifetime has passed."""
    start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    return start + (end - start) * fraction


def needs_rotation(
    certificate: x509.Certificate, now: datetime, fraction: float = DEFAULT_ROTATE_FRACTION
) -> bool:
    """True once the rotation point has passed, or if the clock went back before
    the certificate's start (peers would then refuse it as not yet valid)."""
    return now >= rotation_due_at(certificate, fraction) or now < certificate.not_valid_before_utc


@dataclass(frozen=True)
class CertPaths:
    """Where `ssl` finds one workload's credentials."""

    cert_file: Path
    key_file: Path
    bundle_file: Path


@dataclass(frozen=True)
class WorkloadCert:
    """The store's current credentials for one service account."""

    issued: IssuedCert
    paths: CertPaths

    @property
    def spiffe_id(self) -> SpiffeId:
        return self.issued.spiffe_id

    @property
    def serial(self) -> int:
        return self.issued.serial


@dataclass(frozen=True)
class CertStatus:
    """One row of `ambitctl certs`."""

    spiffe_id: SpiffeId
    serial: int
    not_before: datetime
    not_after: datetime
    rotation_due_at: datetime
    rotation_due: bool

    @property
    def serial_hex(self) -> str:
        return f"{self.serial:x}"


class CertificateStore:
    """Issues, rotates, persists and lists the node's workload certificates."""

    def __init__(
        self,
        ca: LocalCA,
        directory: Path,
        *,
        ttl: timedelta = DEFAULT_LEAF_TTL,
        rotate_fraction: float = DEFAULT_ROTATE_FRACTION,
        clock: Clock | None = None,
    ) -> None:
        """`clock` defaults to the CA's: the two must agree, or a certificate the
        CA just issued could already look due for rotation."""
        if not 0.0 < rotate_fraction < 1.0:
            raise ValueError(f"rotate_fraction must be between 0 and 1, got {rotate_fraction}")
        self._ca = ca
        self._directory = Path(directory)
        self._ttl = ttl
        self._rotate_fraction = rotate_fraction
        self._clock = clock if clock is not None else ca.clock
        self._certs: dict[SpiffeId, WorkloadCert] = {}
        # TLS contexts may be built from worker threads; writes and the
        # `ssl` loads that read the files must not interleave.
        self._lock = threading.RLock()
        self._log = _log.bind(trust_domain=ca.trust_domain, directory=str(self._directory))
        ensure_private_dir(self._directory)
        write_public(self.bundle_path, ca.trust_bundle_pem)

    @property
    def trust_domain(self) -> str:
        return self._ca.trust_domain

    @property
    def trust_bundle_pem(self) -> bytes:
        return self._ca.trust_bundle_pem

    @property
    def rotate_fraction(self) -> float:
        return self._rotate_fraction

    @property
    def bundle_path(self) -> Path:
        return self._directory / BUNDLE_FILE

    def paths(self, spiffe_id: SpiffeId) -> CertPaths:
        base = self._directory / spiffe_id.namespace / spiffe_id.service_account
        return CertPaths(base / CERT_FILE, base / KEY_FILE, self.bundle_path)

    def identities(self) -> list[SpiffeId]:
        with self._lock:
            return sorted(self._certs, key=str)

    def get(self, spiffe_id: SpiffeId) -> WorkloadCert:
        """Current credentials for `spiffe_id`, issued or rotated first if needed."""
        with self._lock:
            current = self._certs.get(spiffe_id)
            if current is not None and not needs_rotation(
                current.issued.certificate, self._clock(), self._rotate_fraction
            ):
                return current
            return self._issue(spiffe_id, replacing=current)

    def rotate_due(self) -> list[SpiffeId]:
        """Re-issue every certificate past its rotation point; for a periodic task."""
        rotated = []
        with self._lock:
            now = self._clock()
            for spiffe_id, current in list(self._certs.items()):
                if needs_rotation(current.issued.certificate, now, self._rotate_fraction):
                    self._issue(spiffe_id, replacing=current)
                    rotated.append(spiffe_id)
        return rotated

    def remove(self, spiffe_id: SpiffeId) -> bool:
        """Forget `spiffe_id` (its last local pod left) and delete its files."""
        with self._lock:
            existed = self._certs.pop(spiffe_id, None) is not None
            paths = self.paths(spiffe_id)
            for path in (paths.key_file, paths.cert_file):
                path.unlink(missing_ok=True)
            for directory in (paths.cert_file.parent, paths.cert_file.parent.parent):
                try:
                    directory.rmdir()
                except OSError:
                    break  # not empty (another service account) or already gone
        if existed:
            self._log.info("cert.removed", spiffe_id=str(spiffe_id))
        return existed

    def load_cert_chain_into(self, context: ssl.SSLContext, spiffe_id: SpiffeId) -> WorkloadCert:
        """Load `spiffe_id`'s current key and certificate into an SSL context."""
        with self._lock:
            current = self.get(spiffe_id)
            context.load_cert_chain(current.paths.cert_file, current.paths.key_file)
            return current

    def status(self) -> list[CertStatus]:
        with self._lock:
            now = self._clock()
            rows = [
                CertStatus(
                    spiffe_id=spiffe_id,
                    serial=cert.serial,
                    not_before=cert.issued.not_before,
                    not_after=cert.issued.not_after,
                    rotation_due_at=rotation_due_at(cert.issued.certificate, self._rotate_fraction),
                    rotation_due=needs_rotation(cert.issued.certificate, now, self._rotate_fraction),
                )
                for spiffe_id, cert in self._certs.items()
            ]
        return sorted(rows, key=lambda row: str(row.spiffe_id))

    def _issue(self, spiffe_id: SpiffeId, replacing: WorkloadCert | None) -> WorkloadCert:
        issued = self._ca.issue(spiffe_id, ttl=self._ttl)
        paths = self.paths(spiffe_id)
        ensure_private_dir(paths.cert_file.parent.parent)
        ensure_private_dir(paths.cert_file.parent)
        # Key first; readers in this process hold the lock, so they never see
        # the new key with the old certificate.
        write_private(paths.key_file, issued.private_key_pem)
        write_public(paths.cert_file, issued.certificate_pem)
        current = WorkloadCert(issued, paths)
        self._certs[spiffe_id] = current
        self._log.info(
            "cert.rotated" if replacing is not None else "cert.issued",
            spiffe_id=str(spiffe_id),
            serial=f"{issued.serial:x}",
            previous_serial=f"{replacing.serial:x}" if replacing is not None else None,
            not_after=str(issued.not_after),
        )
        return current
