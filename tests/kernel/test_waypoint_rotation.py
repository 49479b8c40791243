"""`ambit waypoint --run`: Envoy serves the waypoint's certificate from SDS files
and picks up each re-issued one without a restart.

Real Envoy, real TLS, in a namespace of our own: the certificate lifetime is
cut to 75 s so that one is replaced every ~7.5 s (the CA backdates leaves by
60 s and the store replaces them at half their lifetime).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from ambit.agent.identity.ca import LocalCA
from ambit.agent.identity.spiffe import SpiffeId
from ambit.agent.identity.store import CertificateStore
from ambit.agent.netns import NetnsThread, netns_path
from tests.support import envoy as envoy_support
from tests.support.hbone_lab import namespace

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(120)]

TD = "cluster.local"
WAYPOINT_ID = "spiffe://cluster.local/ns/shop/sa/waypoint"
ADDRESS = "10.253.7.1"


def cluster() -> list[dict]:
    return [
        {"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": "shop", "labels": {
            "istio.io/dataplane-mode": "ambient"}}},
        {"kind": "Gateway", "apiVersion": "gateway.networking.k8s.io/v1", "metadata": {
            "name": "waypoint", "namespace": "shop", "labels": {"istio.io/waypoint-for": "all"}},
         "spec": {"gatewayClassName": "istio-waypoint"}},
    ]


def served_certificate(netns: NetnsThread, client: ssl.SSLContext) -> x509.Certificate:
    """The certificate the waypoint presents on a fresh handshake (mTLS, ALPN h2)."""
    def handshake() -> bytes:
        with socket.create_connection((ADDRESS, 15008), timeout=5) as raw:
            with client.wrap_socket(raw) as tls:
                assert tls.selected_alpn_protocol() == "h2"
                der = tls.getpeercert(binary_form=True)
                assert der is not None
                return der
    return x509.load_der_x509_certificate(netns.run(handshake))


def envoy_children(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return children


@pytest.fixture
def envoy_binary() -> str:
    try:
        return envoy_support.envoy_binary()
    except FileNotFoundError:
        pytest.skip("envoy binary not installed")


def test_the_running_waypoint_rotates_its_certificate_without_restarting_envoy(tmp_path: Path,
                                                                              envoy_binary: str) -> None:
    ca = LocalCA.create(TD)
    ca.save(tmp_path / "ca")
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump_all(cluster()))
    # A mesh client of the same CA (a node proxy, as far as the waypoint can tell).
    client_certs = CertificateStore(ca, tmp_path / "client").get(SpiffeId(TD, "shop", "client")).paths
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.load_verify_locations(client_certs.bundle_file)
    client.load_cert_chain(client_certs.cert_file, client_certs.key_file)
    client.set_alpn_protocols(["h2"])
    client.minimum_version = ssl.TLSVersion.TLSv1_3

    with namespace("wpr", (ADDRESS,)) as ns:
        node = NetnsThread(netns_path(ns))
        argv = [sys.executable, "-m", "ambit.agent.cli.ambit", "waypoint", "shop/waypoint",
                "--config-file", str(tmp_path / "cluster.yaml"), "--ca-dir", str(tmp_path / "ca"),
                "--out-dir", str(tmp_path / "out"), "--access-log", str(tmp_path / "access.log"),
                "--run", "--envoy", envoy_binary, "--concurrency", "1", "--cert-ttl", "75"]
        proc = node.run(lambda: subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                 start_new_session=True))
        try:
            deadline = time.monotonic() + 30
            first = None
            while first is None:
                try:
                    first = served_certificate(node, client)
                except OSError:
                    assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
                    assert time.monotonic() < deadline, "the waypoint never answered on 15008"
                    time.sleep(0.2)
            san = first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert san.get_values_for_type(x509.UniformResourceIdentifier) == [WAYPOINT_ID]
            (envoy_pid,) = envoy_children(proc.pid)

            # Re-issued at half its lifetime and served by the same Envoy process.
            deadline = time.monotonic() + 30
            second = first
            while second.serial_number == first.serial_number:
                assert time.monotonic() < deadline, "Envoy still serves the first certificate after 30 s"
                time.sleep(0.5)
                second = served_certificate(node, client)
            assert second.not_valid_after_utc > first.not_valid_after_utc
            assert envoy_children(proc.pid) == [envoy_pid]
            secret = json.loads((tmp_path / "out/certs/identity-sds.json").read_text())["resources"][0]
            on_disk = secret["tls_certificate"]["certificate_chain"]["inline_string"].encode()
            # The file holds what Envoy served, or a later one if it rotated again meanwhile.
            assert x509.load_pem_x509_certificate(on_disk).not_valid_after_utc >= second.not_valid_after_utc

            # SIGTERM reaches Envoy through the supervisor, which exits with Envoy's status.
            os.kill(proc.pid, signal.SIGTERM)
            _, err = proc.communicate(timeout=20)
            assert proc.returncode == 0, err.decode()[-2000:]
            assert not Path(f"/proc/{envoy_pid}").exists()  # stopped and reaped
            assert b"Traceback" not in err
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            node.close()
