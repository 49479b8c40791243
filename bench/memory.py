#!/usr/bin/env python3
"""Node agent memory with eBPF capture, against an Envoy HBONE chain carrying the same tunnels, same run.

An agent runs on every node, so its memory is paid once per node. Real
agents (`ambit-agent --capture ebpf --discovery files`) in a two-node lab
(`ambit.lab`: node namespaces on an underlay, pods from the real bridge +
host-local + portmap + ambit-cni chain, pods without processes except the
measured client and server). The anchor is Envoy as HBONE client and
server (bench/envoychain.py), carrying the same tunnels and the same load
as ambit at the same time:

  (a) idle, 10 enrolled pods (5 per node);
  (b) 100 enrolled pods (50 per node) and 1,000 idle HBONE tunnels: a client
      in a pod on node 1 holds 1,000 connections to a server pod on node 2
      (one 64-byte exchange each), through both agents; 1,000 through Envoy;
  (c) after 60 s (--quick: 6 s) of 1,000 requests/s (64-byte exchanges over
      20 kept-open connections), the tunnels still held;
  (d) a 10-minute (--quick: 15 s) soak of connection churn, 100 new
      connections/s (100 bytes each way, half-close, close): RSS sampled
      throughout, growth = median of the last fifth over the first fifth,
      and the least-squares slope;
  start to ready: an agent restarted with its program set already pinned
      (no compile), from spawning the process to its "agent ready" log line;
      the median of 3 restarts (and the first start's loader seconds).

RSS from /proc/PID/status, PSS from /proc/PID/smaps_rollup (shared pages
divided among their users). Targets: (b) each agent <= 60 MB RSS and <= the
Envoy on its side; (d) growth < 5%; start to ready <= 1 s. Other engineers'
load on the machine may be present; it shows in the soak as noise.

    python bench/memory.py --quick     # < 1 min
    python bench/memory.py             # the full (c) and 10-minute (d)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
from stats import percentile  # noqa: E402  (bench/stats.py)
from envoychain import EnvoyChain, build_pingpong, tune_client_namespace  # noqa: E402
from labpods import LabWorkspace, PodProcesses, done_line  # noqa: E402

from ambit.lab import labconfig  # noqa: E402
from ambit.lab.topology import Lab  # noqa: E402

PREFIX = "bmem-"
UNDERLAY = "10.110.0.0/24"
PODS = "10.210.0.0/16"
ECHO_PORT = 7000
TUNNELS = 1000
REQUEST_RATE = 1000
REQUEST_CONNECTIONS = 20
CHURN_RATE = 100
TARGET_RSS_MB = 60.0
TARGET_GROWTH = 0.05
TARGET_START_TO_READY_S = 1.0
CLIENT_POD, SERVER_POD = "lab/node1-pod0", "lab/node2-pod0"


def memory_kib(pid: int) -> dict[str, int]:
    """RSS and PSS of one process, KiB."""
    with open(f"/proc/{pid}/status") as status:
        rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        pss = next(int(line.split()[1]) for line in rollup if line.startswith("Pss:"))
    return {"rss": rss, "pss": pss}


def rss_by_mapping(pid: int, top: int = 8) -> dict[str, float]:
    """Where a process's RSS is, MB per mapping name (a library, [heap],
    anonymous), the largest `top`: what to cut next."""
    sizes: dict[str, int] = {}
    name = ""
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            first = line.split(maxsplit=6)
            if "-" in first[0] and len(first) >= 5 and first[0][0] in "0123456789abcdef":
                name = first[5].strip().rsplit("/", 1)[-1] if len(first) > 5 else "[anonymous]"
            elif first[0] == "Rss:":
                sizes[name] = sizes.get(name, 0) + int(first[1])
    largest = sorted(sizes.items(), key=lambda kv: -kv[1])[:top]
    return {mapping: round(kib / 1024, 1) for mapping, kib in largest}


def lab_config(pods_per_node: int) -> labconfig.LabConfig:
    """The generated lab, every pod without a process (the bench starts its own)."""
    documents = labconfig.generated_documents(2, pods_per_node)
    for doc in documents:
        if doc["kind"] == "Pod":
            doc["metadata"]["annotations"][labconfig.WORKLOAD_ANNOTATION] = "none"
    return labconfig.parse_documents(documents)


def agent_pids(lab: Lab) -> dict[str, int]:
    nodes = lab.state().nodes
    return {"agent_node1": nodes["node1"].agent.pid, "agent_node2": nodes["node2"].agent.pid}


def log_events(path: Path, event: str) -> list[dict[str, Any]]:
    found = []
    with open(path) as log:
        for line in log:
            if line.startswith("{") and f'"event": "{event}"' in line:
                found.append(json.loads(line))
    return found


def restart_to_ready(lab: Lab, node: str) -> tuple[float, bool]:
    """Seconds from spawning the node's agent to its 'agent ready' line, and
    whether it reused the pinned program set (no loader run)."""
    log = lab.agent_log(node)
    reused_before = len(log_events(log, "bpf_programs_reused"))
    ready_before = len(log_events(log, "agent ready"))
    lab.stop_agent(node)
    spawned = time.time()
    lab.start_agent(node)
    reused = len(log_events(log, "bpf_programs_reused")) == reused_before + 1
    ready = log_events(log, "agent ready")[ready_before]
    seconds = datetime.datetime.fromisoformat(ready["timestamp"].replace("Z", "+00:00")).timestamp() - spawned
    return seconds, reused


def hold(start, argv: list[str]) -> subprocess.Popen[bytes]:
    """A `pingpong hold` once all of its connections are up."""
    return start(argv, ready_line=True, stdin=subprocess.PIPE)


def growth(samples: list[tuple[float, int]]) -> tuple[float, float]:
    """(relative growth of the last fifth's median over the first fifth's,
    least-squares slope in KiB per minute)."""
    fifth = max(1, len(samples) // 5)
    first = percentile([v for _, v in samples[:fifth]], 50)
    last = percentile([v for _, v in samples[-fifth:]], 50)
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_v = sum(v for _, v in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    slope = sum((t - mean_t) * (v - mean_v) for t, v in samples) / var if var else 0.0
    return (last - first) / first, slope * 60


def run(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    request_seconds = args.request_seconds or (6 if quick else 60)
    soak_seconds = args.soak_seconds or (15 if quick else 600)
    space = LabWorkspace(PREFIX, UNDERLAY, PODS)
    settings, workdir = space.settings, space.workdir
    report: dict[str, Any] = {"bench": "memory", "mode": "quick" if quick else "full"}
    table: dict[str, dict[str, dict[str, int]]] = {}
    tool = build_pingpong(workdir)
    chain = EnvoyChain(workdir, tool)
    lab = Lab(settings)
    pods = PodProcesses(lab)
    try:
        chain.__enter__()
        # (a) and start to ready: 10 pods.
        try:
            lab.up(lab_config(5))
            loaded = [e for n in ("node1", "node2") for e in log_events(lab.agent_log(n), "bpf_programs_loaded")]
            report["first_start_loader_s"] = round(max(e.get("seconds", 0) for e in loaded), 2) if loaded else None
            table["a_idle_10_pods"] = {name: memory_kib(pid) for name, pid in {**agent_pids(lab), **chain.pids}.items()}
            restarts = [restart_to_ready(lab, "node1") for _ in range(3)]
            report["start_to_ready_s"] = [round(seconds, 3) for seconds, _ in restarts]
            report["start_to_ready_median_s"] = round(percentile(report["start_to_ready_s"], 50), 3)
            report["start_reused_pins"] = all(reused for _, reused in restarts)
        finally:
            lab.down()
        print(f"(a) {table['a_idle_10_pods']}; start to ready {report['start_to_ready_s']} s", file=sys.stderr)

        # (b)-(d): 100 pods, tunnels, load, soak; Envoy alongside.
        lab.up(lab_config(50))
        pids = {**agent_pids(lab), **chain.pids}
        server_ip = lab.find_pod(SERVER_POD).ip
        assert server_ip is not None
        tune_client_namespace(pods.thread(CLIENT_POD))
        pods.start(SERVER_POD, [str(tool), "server", "0.0.0.0", str(ECHO_PORT)], ready_line=True)
        ambit_target = [server_ip, str(ECHO_PORT)]
        envoy_target = [chain.entry[0], str(chain.entry[1])]
        holders = [
            hold(lambda argv, **kw: pods.start(CLIENT_POD, argv, **kw),
                 [str(tool), "hold", *ambit_target, str(TUNNELS), "64"]),
            hold(chain.spawn, [str(tool), "hold", *envoy_target, str(TUNNELS), "64"]),
        ]
        table["b_100_pods_1000_tunnels"] = {name: memory_kib(pid) for name, pid in pids.items()}
        report["b_agent_node2_rss_by_mapping_mb"] = rss_by_mapping(pids["agent_node2"])
        print(f"(b) {table['b_100_pods_1000_tunnels']}", file=sys.stderr)

        rate_args = [str(REQUEST_CONNECTIONS), str(REQUEST_RATE), str(request_seconds), "64"]
        loads = [pods.start(CLIENT_POD, [str(tool), "rate", *ambit_target, *rate_args], output=True),
                 chain.spawn([str(tool), "rate", *envoy_target, *rate_args], output=True)]
        results = [done_line(p, request_seconds + 60) for p in loads]
        report["requests"] = {path: {"ok": ok, "errors": errors, "per_s": round(ok / seconds)}
                              for path, (ok, errors, seconds) in zip(("ambit", "envoy"), results)}
        table["c_after_requests"] = {name: memory_kib(pid) for name, pid in pids.items()}
        print(f"(c) {table['c_after_requests']} {report['requests']}", file=sys.stderr)

        churn_args = [str(soak_seconds), str(CHURN_RATE), "4", "100"]
        loads = [pods.start(CLIENT_POD, [str(tool), "churn", *ambit_target, *churn_args], output=True),
                 chain.spawn([str(tool), "churn", *envoy_target, *churn_args], output=True)]
        # Each load's output is read while it runs: at the end it prints one line per connection
        # (~450 KB for a 10-minute soak), more than a pipe holds, and would block for ever.
        with ThreadPoolExecutor(len(loads)) as readers:
            reading = [readers.submit(done_line, p, soak_seconds + 120) for p in loads]
            samples: dict[str, list[tuple[float, int]]] = {name: [] for name in pids}
            started = time.monotonic()
            interval = max(0.5, soak_seconds / 120)
            while not all(r.done() for r in reading):
                now = time.monotonic() - started
                for name, pid in pids.items():
                    samples[name].append((now, memory_kib(pid)["rss"]))
                time.sleep(interval)
            results = [r.result() for r in reading]
        report["churn"] = {path: {"ok": ok, "errors": errors, "per_s": round(ok / seconds)}
                           for path, (ok, errors, seconds) in zip(("ambit", "envoy"), results)}
        table["d_after_soak"] = {name: memory_kib(pid) for name, pid in pids.items()}
        soak = {name: growth(values) for name, values in samples.items()}
        report["soak_growth"] = {name: round(g, 4) for name, (g, _) in soak.items()}
        report["soak_slope_kib_per_min"] = {name: round(s, 1) for name, (_, s) in soak.items()}
        print(f"(d) {report['soak_growth']} {report['churn']}", file=sys.stderr)
        for holder in holders:
            assert holder.stdin is not None
            holder.stdin.close()
    finally:
        pods.close()
        lab.down()
        chain.close()
        space.remove()

    report["memory_kib"] = table
    b = table["b_100_pods_1000_tunnels"]
    agents_b = {"agent_node1": "envoy_client", "agent_node2": "envoy_server"}
    report["b_agent_rss_mb"] = {a: round(b[a]["rss"] / 1024, 1) for a in agents_b}
    report["b_envoy_rss_mb"] = {e: round(b[e]["rss"] / 1024, 1) for e in agents_b.values()}
    report["targets"] = {"b_rss_mb": TARGET_RSS_MB, "b_rss_vs_envoy": "<=", "d_growth": TARGET_GROWTH,
                         "start_to_ready_s": TARGET_START_TO_READY_S}
    met_b = all(b[a]["rss"] / 1024 <= TARGET_RSS_MB and b[a]["rss"] <= b[e]["rss"] for a, e in agents_b.items())
    met_d = all(report["soak_growth"][a] < TARGET_GROWTH for a in agents_b)
    met_ready = report["start_reused_pins"] and report["start_to_ready_median_s"] <= TARGET_START_TO_READY_S
    report["met_b"], report["met_d"], report["met_start_to_ready"] = met_b, met_d, met_ready
    report["met"] = met_b and met_d and met_ready
    return report


def print_table(report: dict[str, Any]) -> None:
    columns = ("agent_node1", "agent_node2", "envoy_client", "envoy_server")
    rows = (("a_idle_10_pods", "(a) idle, 10 pods"), ("b_100_pods_1000_tunnels", "(b) 100 pods, 1000 tunnels"),
            ("c_after_requests", "(c) after 1000 req/s"), ("d_after_soak", "(d) after churn soak"))
    print(f"\nmemory, MB RSS/PSS ({report['mode']}; node1 = client side, node2 = server side)")
    print(f"{'':30}" + "".join(f"{c:>20}" for c in columns))
    for key, title in rows:
        cells = report["memory_kib"].get(key, {})
        print(f"{title:30}" + "".join(
            f"{cells[c]['rss'] / 1024:>11.1f} /{cells[c]['pss'] / 1024:>6.1f}" if c in cells else f"{'-':>20}"
            for c in columns))
    growth_cells = report["soak_growth"]
    print(f"{'(d) soak growth':30}" + "".join(f"{growth_cells[c] * 100:>19.1f}%" for c in columns))
    print(f"start to ready, restart with the same sources: {report['start_to_ready_s']} s (pinned programs "
          f"reused: {report['start_reused_pins']}; first start's compile: {report['first_start_loader_s']} s)")
    print(f"(b) server-side agent's RSS by mapping, MB: {report['b_agent_node2_rss_by_mapping_mb']}")
    print(f"load: requests {report['requests']}; churn {report['churn']}")
    print(f"targets: (b) <= {TARGET_RSS_MB:.0f} MB and <= Envoy: {report['met_b']}; (d) growth < "
          f"{TARGET_GROWTH:.0%}: {report['met_d']}; start to ready <= {TARGET_START_TO_READY_S} s: "
          f"{report['met_start_to_ready']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="(c) 6 s, (d) 15 s: under a minute")
    parser.add_argument("--request-seconds", type=float, default=0, help="length of (c)")
    parser.add_argument("--soak-seconds", type=float, default=0, help="length of (d)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces, eBPF)")
    from ambit.agent import log as logconf

    logconf.configure("warn")
    started = time.monotonic()
    report = run(args)
    report["bench_seconds"] = round(time.monotonic() - started, 1)
    print_table(report)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
