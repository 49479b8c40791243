#!/usr/bin/env python3
"""How fast a node's pods get their certificates from the CA service.

100 pods (each its own service account) are scheduled on one node at once;
the node agent's certificate code (CertificateStore + CertificateRotation +
IstioCaIssuer: a key and a CSR per identity, Istio's CA API over TLS) asks
`ambit ca serve` for all of them, impersonating each with the agent's
pod-bound token. The CA is a real process in the mode it runs in a cluster:
every request is authenticated with a TokenReview and authorised against
the pods on the caller's node, both asked of an API server (the in-repo fake
one, real HTTP). Measured: the time from "these 100 are wanted" until each
certificate is installed (p50/p99) and until all are (total), and the CA
process's CPU per certificate. Baseline in the same run: the same 100
certificates signed in-process by a local CA (no network, no checks).

Target: all 100 served in <= 2 s on this machine.
Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ambit.agent.backoff import Backoff  # noqa: E402
from ambit.agent.identity.ca import LocalCA  # noqa: E402
from ambit.agent.identity.issuer import Issuer, IstioCaIssuer, LocalIssuer  # noqa: E402
from ambit.agent.identity.istio_ca import CaClientSettings, IstioCaClient  # noqa: E402
from ambit.agent.identity.rotation import CertificateRotation  # noqa: E402
from ambit.agent.identity.spiffe import SpiffeId  # noqa: E402
from ambit.agent.identity.store import CertificateStore  # noqa: E402
from stats import percentile  # noqa: E402  (bench/stats.py)
from tests.support.fake_apiserver import FakeApiServer  # noqa: E402

TARGET_TOTAL_S = 2.0
TD = "cluster.local"
NODE = "node1"
API_TOKEN = "bench-ca-api-token"
SERVER_NAME = "ambit-ca.ambit-system.svc"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pod(namespace: str, name: str, sa: str) -> dict:
    return {"kind": "Pod", "metadata": {"namespace": namespace, "name": name},
            "spec": {"serviceAccountName": sa, "nodeName": NODE, "containers": [{"name": "c"}]},
            "status": {"phase": "Running"}}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def start_ca(work: Path, kubeconfig: Path, port: int) -> subprocess.Popen:
    read, write = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ambit.cli", "ca", "serve", "--ca-dir", str(work / "ca"), "--kubeconfig",
         str(kubeconfig), "--listen", f"127.0.0.1:{port}", "--dns-name", SERVER_NAME, "--telemetry-address",
         "127.0.0.1", "--metrics-port", str(free_port()), "--readiness-port", str(free_port()), "--ready-fd",
         str(write), "--log-level", "warn"], pass_fds=(write,), stdin=subprocess.DEVNULL,
        stdout=open(work / "ca.log", "ab"), stderr=subprocess.STDOUT)
    os.close(write)
    ready, _, _ = select.select([read], [], [], 30)
    line = os.read(read, 64) if ready else b""
    os.close(read)
    if not line.startswith(b"ready"):
        proc.kill()
        raise SystemExit(f"the CA did not start: {(work / 'ca.log').read_text()[-1000:]}")
    return proc


async def one_round(issuer: Issuer, identities: list[SpiffeId], directory: Path) -> tuple[float, list[float]]:
    """Seconds until every identity is installed, and each one's own time."""
    store = CertificateStore(issuer, directory)
    rotation = CertificateRotation(store, Backoff(initial=0.05, maximum=0.5))
    installed: dict[SpiffeId, float] = {}
    done = asyncio.Event()

    def on_change(identity: SpiffeId, cert: object) -> None:
        if cert is not None and identity not in installed:
            installed[identity] = time.perf_counter()
            if len(installed) == len(identities):
                done.set()

    store.subscribe(on_change)
    rotation.start()
    started = time.perf_counter()
    rotation.want(identities)
    await asyncio.wait_for(done.wait(), 60)
    total = time.perf_counter() - started
    await rotation.stop()
    return total, [t - started for t in installed.values()]


async def run(args: argparse.Namespace, work: Path) -> dict:
    identities = [SpiffeId(TD, "bench", f"sa-{i:03d}") for i in range(args.pods)]
    with FakeApiServer(token=API_TOKEN, allowed={("", "pods"), ("authentication.k8s.io", "tokenreviews")}) as api:
        api.create(pod("ambit-system", "ambit-node-bench", "ambit-node"))
        for i, identity in enumerate(identities):
            api.create(pod("bench", f"pod-{i:03d}", identity.service_account))
        (work / "token").write_text(api.mint_token("ambit-system", "ambit-node", audiences=("istio-ca",),
                                                   pod="ambit-node-bench"))
        kubeconfig = work / "kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "bench",
            "clusters": [{"name": "bench", "cluster": {"server": api.url}}],
            "users": [{"name": "bench", "user": {"token": API_TOKEN}}],
            "contexts": [{"name": "bench", "context": {"cluster": "bench", "user": "bench"}}]}))
        mesh_ca = LocalCA.create(TD)
        mesh_ca.save(work / "ca")
        port = free_port()
        ca = start_ca(work, kubeconfig, port)
        try:
            client = IstioCaClient(CaClientSettings(address=f"127.0.0.1:{port}", token_file=work / "token",
                                                    root_cert_file=work / "ca" / "ca-cert.pem",
                                                    server_name=SERVER_NAME))
            remote = IstioCaIssuer(client, TD)
            await one_round(remote, identities[:5], work / "warm")  # connection and imports warm
            totals, each, cpu = [], [], []
            for r in range(args.rounds):
                reviews_before = len(api.token_reviews())
                cpu_before = cpu_seconds(ca.pid)
                total, times = await one_round(remote, identities, work / f"round-{r}")
                cpu.append((cpu_seconds(ca.pid) - cpu_before) / len(identities))
                totals.append(total)
                each += times
                reviews = len(api.token_reviews()) - reviews_before
            await client.close()
        finally:
            ca.terminate()
            ca.wait(10)
        local_totals = [(await one_round(LocalIssuer(mesh_ca), identities, work / f"local-{r}"))[0]
                        for r in range(args.rounds)]
    total = statistics.median(totals)
    local = statistics.median(local_totals)
    return {"bench": "ca", "pods": args.pods, "rounds": args.rounds,
            "total_s": round(total, 3), "total_s_max": round(max(totals), 3),
            "per_cert_p50_ms": round(percentile(each, 50) * 1000, 1),
            "per_cert_p99_ms": round(percentile(each, 99) * 1000, 1),
            "ca_cpu_ms_per_cert": round(statistics.median(cpu) * 1000, 2),
            "token_reviews_last_round": reviews,
            "local_ca_total_s": round(local, 3), "ratio_total_vs_local_ca": round(total / local, 1),
            "target_total_s": TARGET_TOTAL_S, "met": max(totals) <= TARGET_TOTAL_S}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round (< 1 min)")
    parser.add_argument("--pods", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.quick:
        args.rounds = 1
    from ambit.agent import eventloop
    from ambit.agent import log as logconf
    logconf.configure("error")
    with tempfile.TemporaryDirectory(prefix="bench-ca-") as tmp:
        result = eventloop.run(run(args, Path(tmp)))
    print(f"{args.pods} certificates, one node, CA with TokenReview + pods by node: all served in "
          f"{result['total_s']} s (median of {args.rounds}; worst {result['total_s_max']} s), per certificate "
          f"p50 {result['per_cert_p50_ms']} ms p99 {result['per_cert_p99_ms']} ms; CA CPU "
          f"{result['ca_cpu_ms_per_cert']} ms per certificate; {result['token_reviews_last_round']} TokenReview(s) "
          f"for {args.pods} requests; a local CA in-process: {result['local_ca_total_s']} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
