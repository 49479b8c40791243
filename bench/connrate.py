#!/usr/bin/env python3
"""New connections per second and CPU per connection: direct, an Envoy HBONE chain and ambit, same run.

Short connections are what most services make, and every one costs the
node proxies an accept, a route, a policy decision, a CONNECT, an upstream
connect, a close, an access-log line and metrics. Each connection here: a
client connects, sends 100 bytes, half-closes, reads the 100-byte echo to
EOF, closes (bench/pingpong.c churn, 8 clients in parallel, as fast as they
go).

Paths, each measured in interleaved rounds (medians reported):
  direct cross-node  pod on node 1 -> pod on node 2, neither in the mesh (the lab's own network)
  ambit cross-node   pod on node 1 -> pod on node 2, both in the mesh: eBPF capture, node 1's agent,
                     HBONE (pooled mTLS h2), node 2's agent (policy), the server pod
  envoy cross-node   pod on node 1 -> Envoy in node 1's namespace (tcp_proxy tunnel) ==HBONE over the
                     underlay==> Envoy in node 2's namespace (CONNECT terminator) -> pod on node 2,
                     neither pod in the mesh: the same network as ambit's path, without the capture
                     (bench/envoychain.py; TLS 1.3, h2, Envoy's default workers)
  direct same-node   two pods on node 1 outside the mesh
  ambit same-node    two pods on node 1 in the mesh: capture, policy, a plain relay in one agent
CPU is the proxies' own (user + system, both agents or both Envoys) over
the connections completed, and its system part (the kernel's TCP work,
the receiving side's included: on a veth the sender runs the receiver's
path); rate is connections completed per second.

Targets: ambit's summed CPU per cross-node connection <= 1.5x Envoy's, and
its cross-node rate >= Envoy's. Other engineers' load on the machine may be
present: CPU per connection is the steadier figure.

    python bench/connrate.py --quick   # < 1 min
    python bench/connrate.py           # longer rounds, more of them
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
from stats import percentile  # noqa: E402  (bench/stats.py)
from envoychain import EnvoyChain, EnvoyPlacement, build_pingpong, tune_client_namespace  # noqa: E402
from labpods import LabWorkspace, PodProcesses, churn_result  # noqa: E402

from ambit.agent.discovery.state import DATAPLANE_MODE_LABEL  # noqa: E402
from ambit.agent.netns import NetnsThread, netns_path  # noqa: E402
from ambit.lab import labconfig  # noqa: E402
from ambit.lab.topology import Lab  # noqa: E402

PREFIX = "bcrt-"
UNDERLAY = "10.111.0.0/24"
PODS = "10.211.0.0/16"
ECHO_PORT = 7000
CLIENTS = 8
SIZE = 100
TARGET_CPU_VS_ENVOY = 1.5
TARGET_RATE_VS_ENVOY = 1.0
# (client pod, server pod) of each lab path
LAB_PATHS = {
    "direct_cross": ("plain/client", "plain/server-node2"),
    "ambit_cross": ("mesh/client", "mesh/server-node2"),
    "direct_same": ("plain/client", "plain/server-node1"),
    "ambit_same": ("mesh/client", "mesh/server-node1"),
}
ENVOY_PATH = ("plain/client", "plain/server-node2")
ENVOY_ENTRY_PORT, ENVOY_HBONE_PORT = 15103, 15108
ORDER = ("direct_cross", "envoy_cross", "ambit_cross", "direct_same", "ambit_same")
TICKS = os.sysconf("SC_CLK_TCK")
SIDES = ("client", "server")
FIGURES = ("rate", "cpu_ms_per_conn", "client_cpu_ms_per_conn", "server_cpu_ms_per_conn", "sys_ms_per_conn",
           "p50_ms", "p99_ms")


def cpu_times(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process so far."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


def lab_documents() -> list[dict[str, Any]]:
    """Namespace `mesh` (ambient) and `plain` (not in the mesh), each with a
    client on node 1 and servers on both nodes; no pod runs a process of
    the lab's own (the bench starts the load tool)."""
    docs: list[dict[str, Any]] = []
    for namespace, ambient in (("mesh", True), ("plain", False)):
        docs.append({"apiVersion": "v1", "kind": "Namespace", "metadata": {
            "name": namespace, "labels": {DATAPLANE_MODE_LABEL: "ambient"} if ambient else {}}})
        docs.append({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "bench", "namespace": namespace}})
        for name, node in (("client", "node1"), ("server-node1", "node1"), ("server-node2", "node2")):
            docs.append({"apiVersion": "v1", "kind": "Pod", "metadata": {
                "name": name, "namespace": namespace, "labels": {"app": name},
                "annotations": {labconfig.WORKLOAD_ANNOTATION: "none"}},
                "spec": {"nodeName": node, "serviceAccountName": "bench", "containers": [
                    {"name": "echo", "image": "pingpong", "ports": [{"containerPort": ECHO_PORT}]}]}})
    return docs


def profile(pids: dict[str, int], seconds: float, directory: Path) -> list[subprocess.Popen[bytes]]:
    """py-spy sampling each agent for `seconds` (a development aid: which step
    of a connection costs what); collapsed stacks in directory/<name>.txt."""
    directory.mkdir(parents=True, exist_ok=True)
    spy = Path(sys.executable).parent / "py-spy"
    return [subprocess.Popen([str(spy), "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "250",
                              "--nonblocking", "--format", "raw", "--output", str(directory / f"{name}.txt")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for name, pid in pids.items()]


def strace(pids: dict[str, int], directory: Path, timeout: float = 30.0) -> list[subprocess.Popen[bytes]]:
    """strace -c on each process (a development aid: syscalls per connection;
    it slows what it traces, so its run's figures are not reported), returned
    once every thread of each process shows a tracer."""
    directory.mkdir(parents=True, exist_ok=True)
    tracers = [subprocess.Popen(["strace", "-c", "-f", "-o", str(directory / f"{name}.txt"), "-p", str(pid)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for name, pid in pids.items()]
    deadline = time.monotonic() + timeout
    while not all(_traced(pid) for pid in pids.values()):
        if any(t.poll() is not None for t in tracers) or time.monotonic() > deadline:
            for t in tracers:
                t.kill()
            raise RuntimeError(f"strace did not attach to every thread of {sorted(pids)} within {timeout:g}s")
        time.sleep(0.02)
    return tracers


def _traced(pid: int) -> bool:
    """Every thread of `pid` has a tracer (TracerPid in its status)."""
    task_dir = Path(f"/proc/{pid}/task")
    for status in task_dir.glob("*/status"):
        try:
            tracer = next(line for line in status.read_text().splitlines() if line.startswith("TracerPid:"))
        except (OSError, StopIteration):
            continue  # the thread ended
        if tracer.split()[1] == "0":
            return False
    return task_dir.exists()


def syscall_counts(path: Path) -> dict[str, int]:
    counts = {}
    for line in path.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[-1] != "total" and fields[3].isdigit():
            counts[fields[-1]] = int(fields[3])
    return counts


def measure(start, target: tuple[str, int], sides: dict[str, int], seconds: float, tool: Path) -> dict[str, Any]:
    """One churn run through `target`; the CPU of each side's proxy (`sides`:
    "client"/"server" -> pid; one pid on both for a same-node path) over it."""
    pids = sorted(set(sides.values()))
    before = {pid: cpu_times(pid) for pid in pids}
    proc = start([str(tool), "churn", target[0], str(target[1]), str(seconds), "0", str(CLIENTS), str(SIZE)],
                 output=True)
    ok, errors, elapsed, times = churn_result(proc, seconds + 60)
    after = {pid: cpu_times(pid) for pid in pids}
    used = {pid: (after[pid][0] - before[pid][0], after[pid][1] - before[pid][1]) for pid in pids}
    per = (lambda v: v * 1000 / ok) if ok and pids else (lambda v: None)
    result = {"ok": ok, "errors": errors, "rate": ok / elapsed,
              "cpu_ms_per_conn": per(sum(u + s for u, s in used.values())),
              "sys_ms_per_conn": per(sum(s for _, s in used.values())),
              "p50_ms": percentile(times, 50) if times else None, "p99_ms": percentile(times, 99) if times else None}
    for side in SIDES:
        distinct = side in sides and list(sides.values()).count(sides[side]) == 1
        result[f"{side}_cpu_ms_per_conn"] = per(sum(used[sides[side]])) if distinct else None
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    seconds = args.seconds or (4 if quick else 15)
    rounds = args.rounds or (1 if quick else 3)
    space = LabWorkspace(PREFIX, UNDERLAY, PODS)
    settings, workdir = space.settings, space.workdir
    tool = build_pingpong(workdir)
    lab = Lab(settings)
    pods = PodProcesses(lab)
    chain: EnvoyChain | None = None
    nodes: list[NetnsThread] = []
    results: dict[str, list[dict[str, Any]]] = {path: [] for path in ORDER}
    try:
        lab.up(labconfig.parse_documents(lab_documents()))
        state = lab.state()
        agents = [state.nodes["node1"].agent.pid, state.nodes["node2"].agent.pid]
        for client in {c for c, _ in LAB_PATHS.values()}:
            tune_client_namespace(pods.thread(client))
        for server in sorted({s for _, s in LAB_PATHS.values()}):
            pods.start(server, [str(tool), "server", "0.0.0.0", str(ECHO_PORT)], ready_line=True)
        targets = {path: (lab.find_pod(server).ip, ECHO_PORT) for path, (_, server) in LAB_PATHS.items()}
        # Envoy as the two nodes' proxies, between the same pods' network as the mesh's.
        node1, node2 = state.nodes["node1"], state.nodes["node2"]
        nodes = [NetnsThread(netns_path(node1.netns)), NetnsThread(netns_path(node2.netns))]
        for node in (node1, node2):  # the agents connect upstream from there: tuned as Envoy's namespaces are
            proxy = NetnsThread(netns_path(f"{node.netns}-proxy"))  # lab/plan.py's name for it
            try:
                tune_client_namespace(proxy)
            finally:
                proxy.close()
        gateway = str(next(ipaddress.IPv4Network(node1.pod_cidr).hosts()))  # the bridge, the pods' default route
        chain = EnvoyChain(workdir, tool, EnvoyPlacement(
            nodes[0], nodes[1], entry=(gateway, ENVOY_ENTRY_PORT), hbone=(node2.underlay_ip, ENVOY_HBONE_PORT),
            source_ip=node1.underlay_ip, target=(lab.find_pod(ENVOY_PATH[1]).ip, ECHO_PORT)))
        chain.__enter__()
        envoy_start = lambda argv, **kw: pods.start(ENVOY_PATH[0], argv, **kw)  # noqa: E731
        warm = 1.0
        for path in ORDER:  # warm-up: pools, certificates, first-connection costs
            if path == "envoy_cross":
                measure(envoy_start, chain.entry, {}, warm, tool)
            else:
                measure(lambda argv, **kw: pods.start(LAB_PATHS[path][0], argv, **kw), targets[path], {}, warm, tool)
        for _ in range(rounds):
            for path in ORDER:
                if path == "envoy_cross":
                    envoys = chain.pids
                    result = measure(envoy_start, chain.entry,
                                     {"client": envoys["envoy_client"], "server": envoys["envoy_server"]}, seconds, tool)
                else:
                    client = LAB_PATHS[path][0]
                    pids = ({"client": agents[0], "server": agents[1]} if path == "ambit_cross" else
                            {"client": agents[0], "server": agents[0]} if path == "ambit_same" else {})
                    spies = profile({f"{path}-node1": agents[0], f"{path}-node2": agents[1]}, seconds - 0.5,
                                    args.profile) if args.profile and path.startswith("ambit") else []
                    result = measure(lambda argv, **kw: pods.start(client, argv, **kw), targets[path], pids,
                                     seconds, tool)
                    for spy in spies:
                        spy.wait(30)
                results[path].append(result)
                print(f"{path:13s} {result['rate']:7.0f} conn/s  "
                      f"{result['cpu_ms_per_conn'] or 0:6.3f} CPU ms/conn  errors {result['errors']}", file=sys.stderr)
        if args.strace:
            for path, pids, start, target in (
                    ("ambit_cross", {"node1": agents[0], "node2": agents[1]},
                     lambda argv, **kw: pods.start(LAB_PATHS["ambit_cross"][0], argv, **kw), targets["ambit_cross"]),
                    ("envoy_cross", chain.pids, envoy_start, chain.entry)):
                tracers = strace({f"{path}-{name}": pid for name, pid in pids.items()}, args.strace)
                traced = measure(start, target, {}, 3.0, tool)
                for tracer in tracers:
                    tracer.send_signal(signal.SIGINT)
                    tracer.wait(30)
                for name in pids:
                    counts = syscall_counts(args.strace / f"{path}-{name}.txt")
                    top = sorted(counts.items(), key=lambda kv: -kv[1])[:14]
                    print(f"syscalls per connection, {path} {name} ({traced['ok']} connections): "
                          + ", ".join(f"{k} {v / max(1, traced['ok']):.1f}" for k, v in top), file=sys.stderr)
    finally:
        if chain is not None:
            chain.close()
        for thread in nodes:
            thread.close()
        pods.close()
        lab.down()
        space.remove()

    def med(path: str, key: str) -> float | None:
        values = [r[key] for r in results[path] if r[key] is not None]
        return round(percentile(values, 50), 3) if values else None

    table = {path: {key: med(path, key) for key in FIGURES} for path in ORDER}
    for path in ORDER:
        table[path]["errors"] = sum(r["errors"] for r in results[path])
    ambit, envoy = table["ambit_cross"], table["envoy_cross"]
    cpu_ratio = ambit["cpu_ms_per_conn"] / envoy["cpu_ms_per_conn"]
    rate_ratio = ambit["rate"] / envoy["rate"]
    report = {
        "bench": "connrate", "mode": "quick" if quick else "full", "seconds_per_run": seconds, "rounds": rounds,
        "clients": CLIENTS, "bytes_each_way": SIZE, "paths": table,
        "cpu_per_conn_vs_envoy": round(cpu_ratio, 3), "rate_vs_envoy": round(rate_ratio, 3),
        "targets": {"cpu_per_conn_vs_envoy": TARGET_CPU_VS_ENVOY, "rate_vs_envoy": TARGET_RATE_VS_ENVOY},
        "met_cpu": cpu_ratio <= TARGET_CPU_VS_ENVOY, "met_rate": rate_ratio >= TARGET_RATE_VS_ENVOY,
    }
    report["met"] = report["met_cpu"] and report["met_rate"]
    return report


def print_table(report: dict[str, Any]) -> None:
    print(f"\nnew connections ({report['mode']}: {report['rounds']} round(s) of {report['seconds_per_run']} s per path, "
          f"{report['clients']} clients, {report['bytes_each_way']} B each way, half-close, close)")
    print(f"{'path':14}{'conn/s':>9}{'CPU ms/conn':>13}{'client side':>13}{'server side':>13}{'of it sys':>11}"
          f"{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")

    def ms(value: float | None) -> str:
        return f"{value:.3f}" if value is not None else "-"

    for path, row in report["paths"].items():
        print(f"{path:14}{row['rate'] or 0:9.0f}{ms(row['cpu_ms_per_conn']):>13}{ms(row['client_cpu_ms_per_conn']):>13}"
              f"{ms(row['server_cpu_ms_per_conn']):>13}{ms(row['sys_ms_per_conn']):>11}{row['p50_ms'] or 0:9.2f}"
              f"{row['p99_ms'] or 0:9.2f}{row['errors']:8d}")
    print(f"ambit cross-node vs Envoy: CPU/conn {report['cpu_per_conn_vs_envoy']:.2f}x (target <= "
          f"{TARGET_CPU_VS_ENVOY}: {report['met_cpu']}), rate {report['rate_vs_envoy']:.2f}x (target >= "
          f"{TARGET_RATE_VS_ENVOY}: {report['met_rate']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 4 s per path: under a minute")
    parser.add_argument("--seconds", type=float, default=0, help="length of each run")
    parser.add_argument("--rounds", type=int, default=0, help="rounds over every path")
    parser.add_argument("--profile", type=Path, help="py-spy the agents during the ambit runs (collapsed stacks here)")
    parser.add_argument("--strace", type=Path, help="an extra traced run per proxy: syscalls per connection (here)")
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
