#!/usr/bin/env python3
"""What the L7 hand-off to a waypoint costs: added RTT and throughput vs direct HBONE, in the same run.

A three-node lab (real agents, real CNI chain, eBPF capture, prefix `lwpb-`,
underlay 10.105.0.128/25, pods 10.234.128.0/17), one server pod and three
Services that select it:

    direct    client (node1) ==HBONE==> node2 -> web-0
    far       client (node1) ==HBONE==> waypoint far-0 (Envoy, node3)  ==HBONE==> node2 -> web-0
    near      client (node1) ==HBONE==> waypoint near-0 (Envoy, node1) ==HBONE==> node2 -> web-0

`far` is where a waypoint lands when it is on neither end's node (two
underlay crossings); `near` has an instance on the client's node, which node
proxies prefer (the waypoint Service's PreferClose), so the hand-off costs no
extra crossing. Both waypoints run the bootstrap `ambit waypoint` writes
(with one L7 DENY rule each, so RBAC is on the path) and 2 Envoy workers.

Measured from the client pod, per path, interleaved round after round
(medians reported, as the machine may be shared):
- HTTP RTT: GET /healthz on one keep-alive connection, p50/p99 (the waypoint
  parses every request);
- TCP RTT: 64-byte ping-pong on the echo port (the waypoint relays bytes);
- connection set-up: connect + one GET + close (new tunnel each time);
- throughput: GET /bytes/N on one connection.
"added" = path p50 - direct p50. Ends with one JSON line.

    python bench/waypoint.py --quick    # < 1 min
    python bench/waypoint.py
The script is also its own client: run inside the pod with `client ...`.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from stats import percentile  # noqa: E402  (bench/stats.py)

PREFIX = "lwpb-"
UNDERLAY = "10.105.0.128/25"
PODS = "10.234.128.0/17"
PATHS = ("direct", "far", "near")


# --- the client, run inside the client pod ------------------------------------------------------------------

def _read_response(sock: socket.socket, buf: bytearray) -> int:
    """Read one HTTP/1.1 response (Content-Length framed); returns the body length."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the response head")
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if status != 200:
        raise RuntimeError(f"HTTP {status}")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                  if line.lower().startswith(b"content-length:"))
    body = len(rest)
    del buf[:]
    while body < length:
        chunk = sock.recv(min(1 << 20, length - body))
        if not chunk:
            raise ConnectionError("closed mid-body")
        body += len(chunk)
    if body > length:
        raise RuntimeError("read past the body (pipelining is not used)")
    return length


def _connect(host: str, port: int) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def client_http_rtt(host: str, port: int, count: int) -> list[float]:
    request = f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    samples: list[float] = []
    with _connect(host, port) as sock:
        buf = bytearray()
        for i in range(count + 50):
            start = time.perf_counter_ns()
            sock.sendall(request)
            _read_response(sock, buf)
            if i >= 50:  # warm-up: pools, caches
                samples.append((time.perf_counter_ns() - start) / 1000)
    return samples


def client_tcp_rtt(host: str, port: int, count: int) -> list[float]:
    payload = os.urandom(64)
    samples: list[float] = []
    with _connect(host, port) as sock:
        for i in range(count + 50):
            start = time.perf_counter_ns()
            sock.sendall(payload)
            got = 0
            while got < len(payload):
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("echo closed")
                got += len(chunk)
            if i >= 50:
                samples.append((time.perf_counter_ns() - start) / 1000)
    return samples


def client_setup(host: str, port: int, count: int) -> list[float]:
    request = f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    samples: list[float] = []
    for _ in range(count):
        start = time.perf_counter_ns()
        with _connect(host, port) as sock:
            sock.sendall(request)
            _read_response(sock, bytearray())
        samples.append((time.perf_counter_ns() - start) / 1000)
    return samples


def client_throughput(host: str, port: int, size: int) -> float:
    """Gbit/s of one GET /bytes/<size>. Keep-alive: the client closes after the
    body (docs/waypoint.md: a server-first close through Envoy's CONNECT
    terminator can cut the tail of a large body)."""
    with _connect(host, port) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        start = time.perf_counter()
        sock.sendall(f"GET /bytes/{size} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        _read_response(sock, bytearray())
        return size * 8 / (time.perf_counter() - start) / 1e9


def client_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="waypoint.py client")
    parser.add_argument("mode", choices=("http_rtt", "tcp_rtt", "setup", "throughput"))
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("n", type=int, help="samples, or bytes for throughput")
    args = parser.parse_args(argv)
    run = {"http_rtt": client_http_rtt, "tcp_rtt": client_tcp_rtt, "setup": client_setup,
           "throughput": client_throughput}[args.mode]
    print(json.dumps(run(args.host, args.port, args.n)))


# --- the lab ------------------------------------------------------------------------------------------------

def lab_documents() -> str:
    def pod(name: str, node: str, workload: str | None, sa: str, labels: dict[str, str]) -> str:
        annotations = f", annotations: {{lab.ambit.dev/workload: \"{workload}\"}}" if workload else ""
        return (f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: bench, labels: {json.dumps(labels)}"
                f"{annotations}}}\nspec: {{nodeName: {node}, serviceAccountName: {sa}, containers: [{{name: c, "
                f"image: lab, ports: [{{name: http, containerPort: 8080}}, {{name: echo, containerPort: 9000}}]}}]}}\n")

    def service(name: str, waypoint: str | None) -> str:
        labels = f", labels: {{istio.io/use-waypoint: {waypoint}}}" if waypoint else ""
        return (f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: bench{labels}}}\n"
                "spec: {selector: {app: web}, ports: [{name: http, port: 80, targetPort: http}, "
                "{name: echo, port: 9000, targetPort: echo}]}\n")

    def waypoint(name: str, node: str) -> list[str]:
        return [
            f"{{apiVersion: v1, kind: ServiceAccount, metadata: {{name: {name}, namespace: bench}}}}\n",
            pod(f"{name}-0", node, "waypoint", name, {"gateway.networking.k8s.io/gateway-name": name,
                                                      "istio.io/dataplane-mode": "none"}),
            (f"apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: {name}, namespace: bench}}\n"
             "spec: {gatewayClassName: istio-waypoint}\n"),
            (f"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}-l7, "
             f"namespace: bench}}\nspec: {{targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, "
             f"name: {name}}}], action: DENY, rules: [{{to: [{{operation: {{ports: [\"80\"], paths: "
             "[\"/admin*\"]}}]}]}\n"),
        ]

    docs = ["apiVersion: v1\nkind: Namespace\nmetadata: {name: bench, labels: {istio.io/dataplane-mode: ambient}}\n",
            "{apiVersion: v1, kind: ServiceAccount, metadata: {name: web, namespace: bench}}\n",
            "{apiVersion: v1, kind: ServiceAccount, metadata: {name: client, namespace: bench}}\n",
            pod("client-0", "node1", None, "client", {"app": "client"}),
            pod("web-0", "node2", "http,echo", "web", {"app": "web"}),
            *waypoint("far", "node3"), *waypoint("near", "node1"),
            service("direct", None), service("far", "far"), service("near", "near")]
    return "---\n".join(docs)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        client_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer samples, smaller transfers (under a minute)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5, quick 3)")
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 5)
    rtt_count = 500 if args.quick else 3000
    setup_count = 50 if args.quick else 300
    size = (48 if args.quick else 512) << 20

    from ambit.agent import log as logconf
    from ambit.lab import labconfig
    from ambit.lab.plan import LabSettings
    from ambit.lab.topology import Lab

    logconf.configure("error")
    if os.geteuid() != 0:
        sys.exit("the bench builds a lab (namespaces, eBPF): run it as root")
    bpffs_root = Path("/sys/fs/bpf") / f"{PREFIX}bench-{uuid.uuid4().hex[:6]}"
    bpffs_root.mkdir(parents=True)
    settings = LabSettings(prefix=PREFIX, state_dir=Path(f"/tmp/{PREFIX}bench-{uuid.uuid4().hex[:6]}"),
                           underlay_cidr=UNDERLAY, pod_supernet=PODS, bpffs_root=bpffs_root)
    lab = Lab(settings)
    started = time.monotonic()
    samples: dict[str, dict[str, list[float]]] = {p: {"http": [], "tcp": [], "setup": [], "gbps": []} for p in PATHS}
    try:
        lab.up(labconfig.parse_yaml(lab_documents(), "waypoint bench"))
        built = time.monotonic() - started
        vips = {s.key.split("/")[1]: s.cluster_ip for s in lab.status(ask_agents=False).services}

        def client(mode: str, path: str, port: int, n: int) -> Any:
            result = lab.exec("bench/client-0", [sys.executable, str(Path(__file__).resolve()), "client", mode,
                                                 vips[path], str(port), str(n)], timeout=300)
            if result.returncode != 0:
                raise RuntimeError(f"{mode} via {path}: {result.stderr.decode()[-500:]}")
            return json.loads(result.stdout)

        for _ in range(rounds):
            for path in PATHS:
                samples[path]["http"] += client("http_rtt", path, 80, rtt_count)
                samples[path]["tcp"] += client("tcp_rtt", path, 9000, rtt_count)
                samples[path]["setup"] += client("setup", path, 80, setup_count)
                samples[path]["gbps"].append(client("throughput", path, 80, size))
    finally:
        lab.down()
        if bpffs_root.exists() and not any(bpffs_root.iterdir()):
            bpffs_root.rmdir()

    report: dict[str, Any] = {"bench": "waypoint", "quick": args.quick, "rounds": rounds, "lab_up_s": round(built, 1)}
    for path in PATHS:
        s = samples[path]
        report[path] = {
            "http_rtt_us_p50": round(statistics.median(s["http"]), 1),
            "http_rtt_us_p99": round(percentile(s["http"], 99), 1),
            "tcp_rtt_us_p50": round(statistics.median(s["tcp"]), 1),
            "tcp_rtt_us_p99": round(percentile(s["tcp"], 99), 1),
            "setup_us_p50": round(statistics.median(s["setup"]), 1),
            "throughput_gbps": round(statistics.median(s["gbps"]), 2),
        }
    direct = report["direct"]
    for path in ("far", "near"):
        mine = report[path]
        report[f"{path}_added"] = {
            "http_rtt_us_p50": round(mine["http_rtt_us_p50"] - direct["http_rtt_us_p50"], 1),
            "tcp_rtt_us_p50": round(mine["tcp_rtt_us_p50"] - direct["tcp_rtt_us_p50"], 1),
            "setup_us_p50": round(mine["setup_us_p50"] - direct["setup_us_p50"], 1),
            "throughput_ratio": round(mine["throughput_gbps"] / direct["throughput_gbps"], 2),
        }
    report["near_saves_http_rtt_us_p50"] = round(report["far"]["http_rtt_us_p50"] - report["near"]["http_rtt_us_p50"], 1)
    report["seconds"] = round(time.monotonic() - started, 1)
    # Issue 8 asks for the comparison, not a bound: no target, so nothing to meet.
    report["target"] = None
    report["met"] = None
    for path in PATHS:
        r = report[path]
        print(f"{path:>7}: HTTP RTT p50 {r['http_rtt_us_p50']} us (p99 {r['http_rtt_us_p99']}), TCP RTT p50 "
              f"{r['tcp_rtt_us_p50']} us, set-up p50 {r['setup_us_p50']} us, {r['throughput_gbps']} Gbit/s")
    for path in ("far", "near"):
        a = report[f"{path}_added"]
        print(f"  {path} waypoint adds {a['http_rtt_us_p50']} us HTTP RTT, {a['tcp_rtt_us_p50']} us TCP RTT, "
              f"{a['setup_us_p50']} us set-up; throughput x{a['throughput_ratio']} of direct")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
