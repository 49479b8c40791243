"""The waypoint's certificate as Envoy SDS files, and when it is replaced."""
from __future__ import annotations

import json
import socket
import stat
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509

from ambit.agent.identity.ca import LocalCA
from ambit.agent.identity.issuer import IstioCaIssuer
from ambit.agent.backoff import Backoff
from ambit.agent.grpc_wire import StatusCode
from ambit.agent.identity.istio_ca import CaClientSettings, CaRefused, CaUnavailable, IssueError, IstioCaClient
from ambit.agent.identity.spiffe import SpiffeId
from ambit.agent.identity.store import CertificateStore
from ambit.waypoint.credentials import (BUNDLE_SECRET, IDENTITY_SECRET, CertificateRotator, SecretFiles,
                                              bundle_secret, identity_secret)
from ambit.waypoint.cli import retry_while_ca_unavailable
from ambit.waypoint.xds_files import file_config_source
from ambit.waypoint.runner import MAX_CHECK_INTERVAL_S, is_listening, next_check_in
from tests.support.istio_ca_server import SERVER_NAME, ThreadedCa

TD = "cluster.local"
WAYPOINT = SpiffeId(TD, "shop", "waypoint")
START = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


def served(files: SecretFiles) -> x509.Certificate:
    secret = json.loads(files.identity.read_text())["resources"][0]
    return x509.load_pem_x509_certificate(secret["tls_certificate"]["certificate_chain"]["inline_string"].encode())


def rotator(tmp_path: Path, clock: Clock) -> CertificateRotator:
    ca = LocalCA.create(TD, clock=clock)
    files = SecretFiles(tmp_path / "certs")
    return CertificateRotator(CertificateStore(ca, files.directory, ttl=timedelta(hours=24)), WAYPOINT, files)


def test_secrets_are_envoy_sds_resources_with_the_pems_inline() -> None:
    identity = identity_secret(b"CERT", b"KEY")["resources"][0]
    assert identity["@type"].endswith("tls.v3.Secret") and identity["name"] == IDENTITY_SECRET
    assert identity["tls_certificate"] == {"certificate_chain": {"inline_string": "CERT"},
                                           "private_key": {"inline_string": "KEY"}}
    bundle = bundle_secret(b"CA")["resources"][0]
    assert bundle["name"] == BUNDLE_SECRET and bundle["validation_context"] == {"trusted_ca": {"inline_string": "CA"}}
    # Envoy reloads a file moved into the watched directory: the atomic writes' rename.
    assert file_config_source(Path("/w/certs/identity-sds.json")) == {
        "path_config_source": {"path": "/w/certs/identity-sds.json", "watched_directory": {"path": "/w/certs"}},
        "resource_api_version": "V3"}


def test_the_identity_secret_is_private_and_holds_the_waypoints_certificate(tmp_path: Path) -> None:
    rot = rotator(tmp_path, Clock())
    written = rot.write()
    assert stat.S_IMODE(rot.files.identity.stat().st_mode) == 0o600
    assert served(rot.files).serial_number == written.serial
    bundle = json.loads(rot.files.bundle.read_text())["resources"][0]["validation_context"]["trusted_ca"]
    assert bundle["inline_string"].encode() == rot.store.trust_bundle_pem


def test_the_certificate_is_replaced_at_half_its_lifetime_and_not_before(tmp_path: Path) -> None:
    clock = Clock()
    rot = rotator(tmp_path, clock)
    first = rot.write()
    due = rot.due_at()
    assert first.issued.not_before < due < first.issued.not_after
    clock.now = due - timedelta(seconds=1)
    assert not rot.rotate_if_due() and served(rot.files).serial_number == first.serial
    clock.now = due
    assert rot.rotate_if_due()
    assert served(rot.files).serial_number == rot.current.serial != first.serial
    assert not rot.rotate_if_due()  # the fresh one is not due


def test_the_supervisor_sleeps_until_due_but_never_longer_than_a_minute(tmp_path: Path) -> None:
    assert next_check_in(None) == MAX_CHECK_INTERVAL_S
    clock = Clock()
    rot = rotator(tmp_path, clock)
    rot.write()
    due = rot.due_at()
    assert next_check_in(rot, due - timedelta(hours=3)) == MAX_CHECK_INTERVAL_S
    assert next_check_in(rot, due - timedelta(seconds=12)) == 12.0
    assert next_check_in(rot, due + timedelta(seconds=5)) == 1.0  # overdue: look again soon, not in a busy loop


def test_envoy_counts_as_listening_at_any_address_it_was_given() -> None:
    """--listen-address may be a pod IP, not 0.0.0.0; IPv6 too."""
    for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((address, 0))
            port = sock.getsockname()[1]
            assert not is_listening(port)  # bound is not listening
            sock.listen()
            assert is_listening(port)


def test_a_waypoint_gets_and_rotates_its_certificate_over_the_ca_api(tmp_path: Path) -> None:
    """As itself (no impersonation), with its own token; a CA away keeps the current Secret."""
    mesh_ca = LocalCA.create(TD)
    (tmp_path / "token").write_text("waypoint-token")
    (tmp_path / "root.pem").write_bytes(mesh_ca.trust_bundle_pem)
    ca = ThreadedCa(mesh_ca)
    try:
        client = IstioCaClient(CaClientSettings(address=ca.endpoint.address, token_file=tmp_path / "token",
                                                root_cert_file=tmp_path / "root.pem", server_name=SERVER_NAME))
        clock = Clock()
        clock.now = datetime.now(timezone.utc)
        files = SecretFiles(tmp_path / "certs")
        store = CertificateStore(IstioCaIssuer(client, TD, impersonate=False, clock=clock), files.directory,
                                 ttl=timedelta(hours=24))
        rot = CertificateRotator(store, WAYPOINT, files)
        first = rot.write()
        sent = ca.endpoint.servicer.received[0]
        assert sent.impersonated is None and sent.metadata["authorization"] == "Bearer waypoint-token"
        assert served(files).serial_number == first.serial
        bundle = json.loads(files.bundle.read_text())["resources"][0]["validation_context"]["trusted_ca"]
        assert bundle["inline_string"].encode() == mesh_ca.trust_bundle_pem

        clock.now = rot.due_at()
        ca.stop()
        with pytest.raises(IssueError):
            rot.rotate_if_due()
        assert served(files).serial_number == first.serial  # Envoy keeps serving the one it has
        ca.start()
        assert rot.rotate_if_due() and served(files).serial_number == rot.current.serial != first.serial
        rot.close()
    finally:
        ca.close()


def test_a_waypoint_started_before_its_ca_waits_for_it(tmp_path: Path) -> None:
    """The first certificate: asked again with backoff while the CA is away,
    got over the real API once it is back; a refusal or the deadline ends it."""
    mesh_ca = LocalCA.create(TD)
    (tmp_path / "token").write_text("waypoint-token")
    (tmp_path / "root.pem").write_bytes(mesh_ca.trust_bundle_pem)
    ca = ThreadedCa(mesh_ca)
    ca.stop()
    try:
        client = IstioCaClient(CaClientSettings(address=ca.endpoint.address, token_file=tmp_path / "token",
                                                root_cert_file=tmp_path / "root.pem", server_name=SERVER_NAME,
                                                timeout=0.5))  # each attempt waits this long for a connection
        files = SecretFiles(tmp_path / "certs")
        store = CertificateStore(IstioCaIssuer(client, TD, impersonate=False), files.directory,
                                 ttl=timedelta(hours=24))
        rot = CertificateRotator(store, WAYPOINT, files)
        fast = Backoff(initial=0.01, maximum=0.05)
        notes: list[str] = []

        def notify(line: str) -> None:
            notes.append(line)
            if len(notes) == 3:
                ca.start()  # the CA comes up after the third refusal to connect

        cert = retry_while_ca_unavailable(rot.write, 30, fast, notify=notify)
        assert len(notes) == 3 and all("asking again" in line for line in notes), notes
        assert served(files).serial_number == cert.serial

        rot.close()

        ca.stop()
        other = SecretFiles(tmp_path / "other")
        late = CertificateRotator(CertificateStore(IstioCaIssuer(client, TD, impersonate=False), other.directory,
                                                   ttl=timedelta(hours=24)), WAYPOINT, other)
        started = time.monotonic()
        with pytest.raises(CaUnavailable):  # the deadline: the last error, not a hang
            retry_while_ca_unavailable(late.write, 0.3, fast, notify=lambda line: None)
        assert time.monotonic() - started < 10
        late.close()
    finally:
        ca.close()


def test_a_refusal_is_not_retried() -> None:
    calls: list[int] = []

    def refused() -> None:
        calls.append(1)
        raise CaRefused(StatusCode.PERMISSION_DENIED, "not yours")

    with pytest.raises(CaRefused):
        retry_while_ca_unavailable(refused, 30, Backoff(initial=0.01), notify=lambda line: None)
    assert calls == [1]
