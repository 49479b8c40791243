"""The node's workload certificates: one key + certificate per local service account.

Certificates are short-lived, so each one is replaced once a fixed fraction
of its lifetime has passed (half, by default), leaving the other half to ride
out a CA outage. Every key is generated here (csr.py) and only the request
leaves the node; the issuer (issuer.py) is the local CA or a remote one.

Two ways in:
- `await certificate(id)` / `await renew(id)`, for the agent: a usable
  certificate, or a new one from the issuer; concurrent requests for one
  identity share one issuance;
- `get(id)`, synchronous, for the local CA (waypoint tools, tests): issues or
  rotates on the spot. With a remote issuer it only hands out what is held.

Python's `ssl` loads certificates only from files, so all are kept on disk:

    <directory>/trust-bundle.pem                         the roots peers must chain to
    <directory>/<namespace>/<service-account>/cert.pem   leaf + intermediates (0644)
    <directory>/<namespace>/<service-account>/key.pem    (0600)

Namespace and service account cannot contain '/' or be '.'/'..' (SpiffeId
checks that), so the layout needs no escaping.
"""
from __future__ import annotations

import ssl
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Union

import structlog

from ..singleflight import SingleFlight
from .credentials_child import ChildProcessCaIssuer, HeldCredentials
from .istio_ca import IssueError
from .pemfiles import ensure_private_dir, write_private, write_public
from .spiffe import SpiffeId
from .validity import DEFAULT_LEAF_TTL, Clock

if TYPE_CHECKING:  # no `cryptography` in the agent unless it signs locally (credentials_child.py)
    from cryptography import x509

    from .ca import IssuedCert, LocalCA
    from .issuer import Issuer, LocalIssuer

    Credentials = Union[IssuedCert, HeldCredentials]

DEFAULT_ROTATE_FRACTION = 0.5
BUNDLE_FILE = "trust-bundle.pem"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"

# Called with the identity and its new certificate, or None once removed.
CertListener = Callable[[SpiffeId, "WorkloadCert | None"], None]

_log = structlog.get_logger(__name__)


def _due_at(start: datetime, end: datetime, fraction: float) -> datetime:
    return start + (end - start) * fraction


def rotation_due_at(certificate: x509.Certificate, fraction: float = DEFAULT_ROTATE_FRACTION) -> datetime:
    """The moment `fraction` of the certificate's lifetime has passed."""
    return _due_at(certificate.not_valid_before_utc, certificate.not_valid_after_utc, fraction)


def needs_rotation(
    certificate: x509.Certificate, now: datetime, fraction: float = DEFAULT_ROTATE_FRACTION
) -> bool:
    """True once the rotation point has passed, or if the clock went back before
    the certificate's start (peers would then refuse it as not yet valid)."""
    return _needs_rotation(certificate.not_valid_before_utc, certificate.not_valid_after_utc, now, fraction)


def _needs_rotation(start: datetime, end: datetime, now: datetime, fraction: float) -> bool:
    return now >= _due_at(start, end, fraction) or now < start


def usable(certificate: x509.Certificate, now: datetime) -> bool:
    """Within its validity: peers accept it, even if it is due for replacement."""
    return _usable(certificate.not_valid_before_utc, certificate.not_valid_after_utc, now)


def _usable(start: datetime, end: datetime, now: datetime) -> bool:
    return start <= now < end


def _as_issuer(issuer: Issuer | LocalCA | ChildProcessCaIssuer) -> Issuer | ChildProcessCaIssuer:
    """A LocalCA signs through a LocalIssuer (only then is ca.py, and `cryptography`, loaded)."""
    ca = sys.modules.get(f"{__package__}.ca")
    if ca is not None and isinstance(issuer, ca.LocalCA):
        from .issuer import LocalIssuer
        return LocalIssuer(issuer)
    return issuer  # type: ignore[return-value]


@dataclass(frozen=True)
class CertPaths:
    """Where `ssl` finds one workload's credentials."""

    cert_file: Path
    key_file: Path
    bundle_file: Path


@dataclass(frozen=True)
class WorkloadCert:
    """The store's current credentials for one service account."""

    issued: Credentials
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
    issuer: str = ""

    @property
    def serial_hex(self) -> str:
        return f"{self.serial:x}"


class CertificateStore:
    """Issues, rotates, persists and lists the node's workload certificates."""

    def __init__(
        self,
        issuer: Issuer | LocalCA | ChildProcessCaIssuer,
        directory: Path,
        *,
        ttl: timedelta = DEFAULT_LEAF_TTL,
        rotate_fraction: float = DEFAULT_ROTATE_FRACTION,
        clock: Clock | None = None,
    ) -> None:
        """`clock` defaults to the issuer's: the two must agree, or a certificate
        the CA just issued could already look due for rotation."""
        if not 0.0 < rotate_fraction < 1.0:
            raise ValueError(f"rotate_fraction must be between 0 and 1, got {rotate_fraction}")
        self._issuer = _as_issuer(issuer)
        self._local: LocalIssuer | None = self._issuer if hasattr(self._issuer, "issue_now") else None  # type: ignore[assignment]
        self._directory = Path(directory)
        self._ttl = ttl
        self._rotate_fraction = rotate_fraction
        self._clock = clock if clock is not None else self._issuer.clock
        self._certs: dict[SpiffeId, WorkloadCert] = {}
        # Identities being issued now; remove() marks one True so the late issuance is not installed.
        # Only in-flight entries are kept: one per departed service account would grow with pod churn.
        self._removed_while_issuing: dict[SpiffeId, bool] = {}
        self._renewals: SingleFlight[SpiffeId, WorkloadCert] = SingleFlight()
        self._listeners: list[CertListener] = []
        self._bundle = b""
        # TLS contexts may be built from worker threads; writes and the
        # `ssl` loads that read the files must not interleave.
        self._lock = threading.RLock()
        self._log = _log.bind(trust_domain=self._issuer.trust_domain, directory=str(self._directory))
        ensure_private_dir(self._directory)
        self._delete_earlier_keys()
        if self._local is not None:
            self._write_bundle(self._local.ca.trust_bundle_pem)

    @property
    def trust_domain(self) -> str:
        return self._issuer.trust_domain

    @property
    def issuer(self) -> str:
        return self._issuer.description

    @property
    def trust_bundle_pem(self) -> bytes:
        """The roots of the certificates held (a local CA's from the start)."""
        with self._lock:
            return self._bundle

    @property
    def rotate_fraction(self) -> float:
        return self._rotate_fraction

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def bundle_path(self) -> Path:
        return self._directory / BUNDLE_FILE

    def paths(self, spiffe_id: SpiffeId) -> CertPaths:
        base = self._directory / spiffe_id.namespace / spiffe_id.service_account
        return CertPaths(base / CERT_FILE, base / KEY_FILE, self.bundle_path)

    def identities(self) -> list[SpiffeId]:
        with self._lock:
            return sorted(self._certs, key=str)

    def subscribe(self, listener: CertListener) -> None:
        self._listeners.append(listener)

    def current(self, spiffe_id: SpiffeId) -> WorkloadCert | None:
        with self._lock:
            return self._certs.get(spiffe_id)

    def due_at(self, cert: WorkloadCert) -> datetime:
        return _due_at(cert.issued.not_before, cert.issued.not_after, self._rotate_fraction)

    # -- the agent's way: asynchronous, any issuer ----------------------------

    async def certificate(self, spiffe_id: SpiffeId) -> WorkloadCert:
        """A certificate peers accept now: the one held (even if due: its
        replacement is the rotation's business), else a new one."""
        held = self.current(spiffe_id)
        if held is not None and _usable(held.issued.not_before, held.issued.not_after, self._clock()):
            return held
        return await self.renew(spiffe_id)

    async def renew(self, spiffe_id: SpiffeId) -> WorkloadCert:
        """A new key and certificate; IssueError (or ValueError) when none could be had."""
        return await self._renewals.run(spiffe_id, lambda: self._renew(spiffe_id))

    async def _renew(self, spiffe_id: SpiffeId) -> WorkloadCert:
        with self._lock:
            self._removed_while_issuing[spiffe_id] = False  # renewals of one identity are single-flight
        try:
            issued = await self._issuer.issue_new_key(spiffe_id, self._ttl)
        except BaseException:
            with self._lock:
                self._removed_while_issuing.pop(spiffe_id, None)
            raise
        with self._lock:
            if self._removed_while_issuing.pop(spiffe_id, False):
                raise IssueError(f"{spiffe_id} was removed while its certificate was being issued")
            return self._install(issued)

    # -- the synchronous way: a local CA issues on the spot -------------------

    def get(self, spiffe_id: SpiffeId) -> WorkloadCert:
        """Current credentials for `spiffe_id`; a local CA issues or rotates them
        first if needed, a remote one only hands out what is held and usable."""
        with self._lock:
            held = self._certs.get(spiffe_id)
            now = self._clock()
            if held is not None and not _needs_rotation(held.issued.not_before, held.issued.not_after, now,
                                                        self._rotate_fraction):
                return held
            if self._local is not None:
                from .csr import new_workload_key  # a local CA: `cryptography` is loaded already
                return self._install(self._local.issue_now(spiffe_id, new_workload_key(), self._ttl))
            if held is not None and _usable(held.issued.not_before, held.issued.not_after, now):
                return held
        raise IssueError(f"no certificate for {spiffe_id} yet ({self.issuer})")

    # -- both -----------------------------------------------------------------

    def remove(self, spiffe_id: SpiffeId) -> bool:
        """Forget `spiffe_id` (its last local pod left) and delete its files."""
        with self._lock:
            if spiffe_id in self._removed_while_issuing:
                self._removed_while_issuing[spiffe_id] = True
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
                self._refresh_bundle()
        if existed:
            self._log.info("cert.removed", spiffe_id=str(spiffe_id))
            self._notify(spiffe_id, None)
        return existed

    def load_cert_chain_into(self, context: ssl.SSLContext, spiffe_id: SpiffeId) -> WorkloadCert:
        """Load `spiffe_id`'s current key and certificate into an SSL context."""
        with self._lock:
            held = self.get(spiffe_id)
            context.load_cert_chain(held.paths.cert_file, held.paths.key_file)
            return held

    def status(self) -> list[CertStatus]:
        with self._lock:
            now = self._clock()
            rows = [
                CertStatus(
                    spiffe_id=spiffe_id,
                    serial=cert.serial,
                    not_before=cert.issued.not_before,
                    not_after=cert.issued.not_after,
                    rotation_due_at=self.due_at(cert),
                    rotation_due=_needs_rotation(cert.issued.not_before, cert.issued.not_after, now,
                                                 self._rotate_fraction),
                    issuer=cert.issued.issuer,
                )
                for spiffe_id, cert in self._certs.items()
            ]
        return sorted(rows, key=lambda row: str(row.spiffe_id))

    def _install(self, issued: Credentials) -> WorkloadCert:
        """Under the lock: write the files, make it current, tell the listeners."""
        spiffe_id = issued.spiffe_id
        replacing = self._certs.get(spiffe_id)
        paths = self.paths(spiffe_id)
        ensure_private_dir(paths.cert_file.parent.parent)
        ensure_private_dir(paths.cert_file.parent)
        # Key first; readers in this process hold the lock, so they never see
        # the new key with the old certificate. Not fsynced: after a crash the
        # agent asks again.
        write_private(paths.key_file, issued.private_key_pem, durable=False)
        write_public(paths.cert_file, issued.chain_pem, durable=False)
        current = WorkloadCert(issued, paths)
        self._certs[spiffe_id] = current
        self._refresh_bundle()
        self._log.info(
            "cert.rotated" if replacing is not None else "cert.issued",
            spiffe_id=str(spiffe_id),
            serial=f"{issued.serial:x}",
            previous_serial=f"{replacing.serial:x}" if replacing is not None else None,
            not_after=str(issued.not_after),
            issuer=issued.issuer,
        )
        self._notify(spiffe_id, current)
        return current

    def _delete_earlier_keys(self) -> None:
        """A store starts empty (certificates are asked for again): keys an earlier
        run left, perhaps of identities this node no longer has, go."""
        for key_file in self._directory.glob(f"*/*/{KEY_FILE}"):
            for path in (key_file, key_file.with_name(CERT_FILE)):
                path.unlink(missing_ok=True)
            for directory in (key_file.parent, key_file.parent.parent):
                try:
                    directory.rmdir()
                except OSError:
                    break

    def _refresh_bundle(self) -> None:
        """The bundle is every root a held certificate chains to (two during a root rotation)."""
        roots: dict[bytes, None] = {}
        if self._local is not None:
            roots[self._local.ca.trust_bundle_pem] = None
        for cert in self._certs.values():
            try:
                roots[cert.issued.root_pem] = None
            except ValueError:  # a local CA's leaf for a caller-held key: no root to add
                continue
        bundle = b"".join(roots)
        if bundle and bundle != self._bundle:
            self._write_bundle(bundle)

    def _write_bundle(self, bundle: bytes) -> None:
        write_public(self.bundle_path, bundle, durable=False)
        self._bundle = bundle

    def _notify(self, spiffe_id: SpiffeId, cert: WorkloadCert | None) -> None:
        for listener in list(self._listeners):
            try:
                listener(spiffe_id, cert)
            except Exception:  # a listener's bug must not undo an issuance
                self._log.exception("cert.listener_failed", spiffe_id=str(spiffe_id))
