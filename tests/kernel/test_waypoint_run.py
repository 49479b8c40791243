"""`ambit waypoint --run`: ambit runs Envoy as the waypoint, rotates its
certificate and (`--watch`) applies cluster changes, without restarting Envoy.

Real Envoy, real TLS, real HTTP/2 CONNECT, in a namespace of our own.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
import yaml
from cryptography import x509

from ambit.agent.identity.ca import LocalCA
from ambit.agent.identity.spiffe import SpiffeId
from ambit.agent.identity.store import CertificateStore
from ambit.agent.netns import NetnsThread, netns_path
from ambit.waypoint.runner import child_pids
from tests.support import envoy as envoy_support
from tests.support.fake_apiserver import FakeApiServer
from tests.support.hbone_lab import namespace

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(120)]

TD = "cluster.local"
WAYPOINT_ID = "spiffe://cluster.local/ns/shop/sa/waypoint"
ADDRESS = "10.253.7.1"
VIP = "10.96.7.10"


def cluster(*, with_service: bool = False) -> list[dict[str, Any]]:
    """A waypoint, and (with_service) a Service that uses it, with one in-mesh endpoint."""
    objects: list[dict[str, Any]] = [
        {"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": "shop", "labels": {
            "istio.io/dataplane-mode": "ambient"}}},
        {"kind": "Gateway", "apiVersion": "gateway.networking.k8s.io/v1", "metadata": {
            "name": "waypoint", "namespace": "shop", "labels": {"istio.io/waypoint-for": "all"}},
         "spec": {"gatewayClassName": "istio-waypoint"}},
    ]
    if with_service:
        objects += [
            {"kind": "Pod", "apiVersion": "v1", "metadata": {"name": "web-0", "namespace": "shop",
                                                             "labels": {"app": "web"}},
             "spec": {"nodeName": "node1", "serviceAccountName": "web",
                      "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
             "status": {"phase": "Running", "podIP": "10.253.7.20",
                        "conditions": [{"type": "Ready", "status": "True"}]}},
            {"kind": "Service", "apiVersion": "v1", "metadata": {"name": "web", "namespace": "shop", "labels": {
                "istio.io/use-waypoint": "waypoint"}},
             "spec": {"clusterIP": VIP, "selector": {"app": "web"},
                      "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}},
        ]
    return objects


def write_cluster(path: Path, objects: list[dict[str, Any]] | str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(objects if isinstance(objects, str) else yaml.safe_dump_all(objects))
    os.replace(tmp, path)


def client_context(ca: LocalCA, directory: Path) -> ssl.SSLContext:
    """A mesh client of the same CA (a node proxy, as far as the waypoint can tell)."""
    paths = CertificateStore(ca, directory).get(SpiffeId(TD, "shop", "client")).paths
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(paths.bundle_file)
    context.load_cert_chain(paths.cert_file, paths.key_file)
    context.set_alpn_protocols(["h2"])
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


def served_certificate(node: NetnsThread, client: ssl.SSLContext) -> x509.Certificate:
    """The certificate the waypoint presents on a fresh handshake (mTLS, ALPN h2)."""
    def handshake() -> bytes:
        with socket.create_connection((ADDRESS, 15008), timeout=5) as raw, client.wrap_socket(raw) as tls:
            assert tls.selected_alpn_protocol() == "h2"
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return der
    return x509.load_der_x509_certificate(node.run(handshake))


def connect_status(node: NetnsThread, client: ssl.SSLContext, authority: str) -> int:
    """The :status the waypoint answers an HBONE CONNECT for `authority` with."""
    def ask() -> int:
        with socket.create_connection((ADDRESS, 15008), timeout=5) as raw, client.wrap_socket(raw) as tls:
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.initiate_connection()
            stream = conn.get_next_available_stream_id()
            conn.send_headers(stream, [(":method", "CONNECT"), (":authority", authority)])
            tls.sendall(conn.data_to_send())
            while True:
                data = tls.recv(65536)
                assert data, "the waypoint closed the connection without an answer"
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream:
                        return int(dict(event.headers)[b":status"])
                tls.sendall(conn.data_to_send())
    return node.run(ask)


def eventually(check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except OSError:
            pass
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.2)


@pytest.fixture
def envoy_binary() -> str:
    try:
        return envoy_support.envoy_binary()
    except FileNotFoundError:
        pytest.skip("envoy binary not installed")


def waypoint_log(tmp_path: Path) -> Path:
    """Where running_waypoint's process (and its Envoy) write their output."""
    return tmp_path / "waypoint.log"


def waypoint_events(tmp_path: Path) -> list[str]:
    """The `event` of each complete JSON line the waypoint has logged so far."""
    events = []
    for line in waypoint_log(tmp_path).read_text().splitlines(keepends=True):
        if line.startswith("{") and line.endswith("\n"):
            events.append(json.loads(line)["event"])
    return events


def stopped(tmp_path: Path, proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    """SIGTERM the waypoint, wait for it; its whole output."""
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=timeout)
    return waypoint_log(tmp_path).read_bytes()


@contextlib.contextmanager
def running_waypoint(tmp_path: Path, envoy: str, *extra: str,
                     source: Callable[[NetnsThread], contextlib.AbstractContextManager[list[str]]] | None = None,
                     ) -> Iterator[tuple[NetnsThread, subprocess.Popen[bytes], LocalCA]]:
    """`ambit waypoint shop/waypoint --run ...` in a fresh namespace, the cluster
    from tmp_path/cluster.yaml unless `source(node)` gives other arguments."""
    ca = LocalCA.create(TD)
    ca.save(tmp_path / "ca")
    if source is None and not (tmp_path / "cluster.yaml").exists():
        write_cluster(tmp_path / "cluster.yaml", cluster())
    with namespace("wpr", (ADDRESS,)) as ns:
        node = NetnsThread(netns_path(ns))
        try:
            with (source(node) if source else contextlib.nullcontext(
                    ["--config-file", str(tmp_path / "cluster.yaml")])) as source_args:
                argv = [sys.executable, "-m", "ambit.cli", "waypoint", "shop/waypoint", *source_args,
                        "--ca-dir", str(tmp_path / "ca"), "--out-dir", str(tmp_path / "out"),
                        "--access-log", str(tmp_path / "access.log"),
                        "--run", "--envoy", envoy, "--concurrency", "1", *extra]
                with open(waypoint_log(tmp_path), "ab") as log:  # a file: read while it runs, never fills up
                    proc = node.run(lambda: subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True))
                try:
                    yield node, proc, ca
                finally:
                    if proc.poll() is None:
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
        finally:
            node.close()


def test_the_running_waypoint_rotates_its_certificate_without_restarting_envoy(tmp_path: Path,
                                                                              envoy_binary: str) -> None:
    # A 75 s lifetime: the CA backdates leaves by 60 s and they are replaced at
    # half their lifetime, so one rotation every ~7.5 s.
    with running_waypoint(tmp_path, envoy_binary, "--cert-ttl", "75") as (node, proc, ca):
        client = client_context(ca, tmp_path / "client")
        first = eventually(lambda: proc.poll() is None and served_certificate(node, client),
                           "the waypoint answering on 15008")
        san = first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [WAYPOINT_ID]
        (envoy_pid,) = child_pids(proc.pid)

        # Re-issued at half its lifetime and served by the same Envoy process.
        second = eventually(lambda: (cert := served_certificate(node, client)).serial_number != first.serial_number
                            and cert, "a new certificate served")
        assert second.not_valid_after_utc > first.not_valid_after_utc
        assert child_pids(proc.pid) == [envoy_pid]
        secret = json.loads((tmp_path / "out/certs/identity-sds.json").read_text())["resources"][0]
        on_disk = secret["tls_certificate"]["certificate_chain"]["inline_string"].encode()
        # The file holds what Envoy served, or a later one if it rotated again meanwhile.
        assert x509.load_pem_x509_certificate(on_disk).not_valid_after_utc >= second.not_valid_after_utc

        # SIGTERM reaches Envoy through the supervisor, which exits with Envoy's status.
        err = stopped(tmp_path, proc, 20)
        assert proc.returncode == 0, err.decode()[-2000:]
        assert not Path(f"/proc/{envoy_pid}").exists()  # stopped and reaped
        assert b"Traceback" not in err


def test_watch_applies_cluster_changes_to_the_running_envoy_and_keeps_it_on_bad_input(tmp_path: Path,
                                                                                     envoy_binary: str) -> None:
    with running_waypoint(tmp_path, envoy_binary, "--watch") as (node, proc, ca):
        client = client_context(ca, tmp_path / "client")
        # Nothing uses the waypoint yet: every CONNECT is answered 404.
        assert eventually(lambda: proc.poll() is None and connect_status(node, client, f"{VIP}:80"),
                          "the waypoint answering CONNECT") == 404
        (envoy_pid,) = child_pids(proc.pid)

        # A Service starts using it: the same Envoy now takes CONNECTs for its VIP.
        write_cluster(tmp_path / "cluster.yaml", cluster(with_service=True))
        eventually(lambda: connect_status(node, client, f"{VIP}:80") == 200, "the new Service's route", 15)
        listeners = {l["name"] for l in json.loads((tmp_path / "out/xds/lds.json").read_text())["resources"]}
        assert {f"inbound|{VIP}:80", "connect|10.253.7.20:8080"} <= listeners

        # A file that does not parse is reported; the running configuration stays.
        write_cluster(tmp_path / "cluster.yaml", "kind: [unclosed\n")
        eventually(lambda: "waypoint.config_unusable" in waypoint_events(tmp_path), "the bad file reported", 15)
        assert connect_status(node, client, f"{VIP}:80") == 200

        # The Service goes away: its VIP is unknown again.
        write_cluster(tmp_path / "cluster.yaml", cluster())
        eventually(lambda: connect_status(node, client, f"{VIP}:80") == 404, "the route removed", 15)
        assert child_pids(proc.pid) == [envoy_pid]  # never restarted

        err = stopped(tmp_path, proc, 20)
        assert proc.returncode == 0, err.decode()[-2000:]
        events = waypoint_events(tmp_path)
        assert events.count("waypoint.config_updated") == 2
        assert "waypoint.config_unusable" in events
        assert b"Traceback" not in err


def test_watch_follows_the_kubernetes_api(tmp_path: Path, envoy_binary: str) -> None:
    """The same, with the cluster from an API server (the in-repo one, real list/watch)."""
    servers: list[FakeApiServer] = []

    @contextlib.contextmanager
    def api_server(node: NetnsThread) -> Iterator[list[str]]:
        server = node.run(lambda: FakeApiServer(token="t0ken"))  # listens inside the namespace
        server.start()
        servers.append(server)
        try:
            for obj in cluster():
                server.create(obj)
            kubeconfig = tmp_path / "kubeconfig"
            kubeconfig.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: "{server.url}"}}}}]
users: [{{name: waypoint, user: {{token: t0ken}}}}]
contexts: [{{name: fake, context: {{cluster: fake, user: waypoint}}}}]
current-context: fake
""")
            yield ["--kube", "--kubeconfig", str(kubeconfig)]
        finally:
            server.stop()

    with running_waypoint(tmp_path, envoy_binary, "--watch", source=api_server) as (node, proc, ca):
        client = client_context(ca, tmp_path / "client")
        assert eventually(lambda: proc.poll() is None and connect_status(node, client, f"{VIP}:80"),
                          "the waypoint answering CONNECT") == 404
        (envoy_pid,) = child_pids(proc.pid)
        (server,) = servers
        added = [o for o in cluster(with_service=True) if o["kind"] in ("Pod", "Service")]
        for obj in added:
            server.create(obj)
        eventually(lambda: connect_status(node, client, f"{VIP}:80") == 200, "the new Service's route", 15)
        service = next(o for o in added if o["kind"] == "Service")
        server.delete(service)
        eventually(lambda: connect_status(node, client, f"{VIP}:80") == 404, "the route removed", 15)
        assert child_pids(proc.pid) == [envoy_pid]
        err = stopped(tmp_path, proc, 30)
        assert proc.returncode == 0, err.decode()[-2000:]
        assert b"Traceback" not in err
