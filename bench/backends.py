#!/usr/bin/env python3
"""eBPF vs nftables capture on one node, at 10, 100 and 500 enrolled pods.

The seed argues that eBPF beats Netfilter for redirection because Netfilter
makes every packet walk its hook chain. This measures it on ambit's own
datapath: two node namespaces side by side, each with a real ambit-agent
(`--capture ebpf` and `--capture nftables`) and pods made by the real CNI
chain (bridge + host-local + portmap + ambit-cni) on one bridge; the pods
are cheap (a namespace and a veth, no processes) except the measured ones.
The measured path (client, server, agent) is pinned to one CPU and the
traffic runs of the two nodes are interleaved. At each size:

- throughput (iperf3, 1 stream) and 64-byte RTT from enrolled A to enrolled
  B through the proxy, and the same between two pods outside the mesh on
  the same bridge ("direct": what the backend costs traffic it does not
  capture);
- enrol latency (CNI ADD -> capture active) and release latency (CNI DEL)
  of a few extra pods added one at a time: the agent's own time per call
  (ambit_cni_rpc_duration_seconds: the RPC arrives, the pod's link is read,
  the capture is in force, the record is written) and the whole ambit-cni
  step in the chain (plus the plugin's process start).

Then, at the largest size, the throughput once more with TSO, GSO and GRO
switched off on the pods' and the proxies' interfaces: a bulk stream
normally crosses the hooks as packets of up to 64 KB, which hides a
per-packet cost; without offloads every packet is MTU-sized. The targets
are judged on the default (offloads on) runs.

Prints a table and eBPF/nftables ratios, writes a PNG chart, ends with one
JSON line. Targets: eBPF throughput >= 1.1x nftables at 500 pods; eBPF
enrol latency flat (within 20%) from 10 to 500 pods.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))
import capture  # noqa: E402  (bench/capture.py)
from stats import percentile  # noqa: E402

from ambit.lab.cniruntime import CniRuntime, PodSandbox  # noqa: E402
from ambit.lab.node import (AgentProcess, NodeNamespace, bridge_conflist, cni_plugin_dirs,  # noqa: E402
                                  make_pod_netns, remove_netns)
from ambit.agent.netns import netns_path, run_in_netns, socket_in_netns  # noqa: E402
from pyroute2 import Ethtool  # noqa: E402

BACKENDS = ("ebpf", "nftables")
SUBNET = "10.232.0.0/22"  # one node at a time, so both runs may use it
TARGET_THROUGHPUT_RATIO = 1.1
TARGET_ENROL_FLATNESS = 0.20
COLOURS = {"ebpf": "#1f77b4", "nftables": "#d62728"}
# Every process of the measured path (iperf3 / ping-pong on both ends and
# the agent, i.e. the proxy) runs on this one CPU: throughput is then bytes
# per CPU-second of the whole path, and neither backend gains or loses by
# where the scheduler happened to put the three processes (on 2 vCPUs that
# alone moved the RTT between 25 and 180 us from run to run).
BENCH_CPU = 0


@dataclass(frozen=True)
class Settings:
    sizes: tuple[int, ...]
    seconds: float     # per iperf3 run
    repeats: int       # iperf3 runs per point (median)
    pings: int         # 64-byte round trips per point
    probes: int        # pods added and removed one at a time per point
    workers: int       # concurrent CNI ADDs while growing the node


@dataclass(frozen=True)
class Point:
    backend: str
    pods: int
    gbps: float
    gbps_direct: float
    rtt_p50_us: float
    rtt_p99_us: float
    rtt_direct_p50_us: float
    enrol_agent_ms: float     # p50 of the EnrolPod RPC time in the agent
    enrol_step_ms: float      # p50 of the ambit-cni ADD step (process start + RPC)
    release_agent_ms: float
    release_step_ms: float


def rpc_totals(node_path: str, port: int = 15020) -> dict[str, tuple[float, int]]:
    """(sum of seconds, calls) per CNI method from the agent's /metrics."""
    sock = socket_in_netns(node_path, socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(5)
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
        body = b""
        while chunk := sock.recv(65536):
            body += chunk
    finally:
        sock.close()
    text = body.decode()
    totals: dict[str, tuple[float, int]] = {}
    for method in ("EnrolPod", "ReleasePod"):
        found = {kind: float(m.group(1)) for kind in ("sum", "count")
                 if (m := re.search(rf'^ambit_cni_rpc_duration_seconds_{kind}{{method="{method}"}} (\S+)$',
                                    text, re.M))}
        totals[method] = (found.get("sum", 0.0), int(found.get("count", 0)))
    return totals


def mean_ms(before: tuple[float, int], after: tuple[float, int]) -> float:
    calls = after[1] - before[1]
    return (after[0] - before[0]) / calls * 1000 if calls else float("nan")


def pin_process(pid: int) -> None:
    """Every thread of a running process onto the bench CPU (threads made
    later inherit it from their creator)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), {BENCH_CPU})


def segmentation_off(netns: str, ifname: str = "eth0") -> None:
    """TSO, GSO and GRO off on one interface (ethtool through pyroute2, in
    its namespace): every packet then crosses the hooks at MTU size instead
    of up to 64 KB, so per-packet costs are no longer amortised."""
    def switch() -> None:
        ethtool = Ethtool()
        try:
            for flag in ("tcp-segmentation-offload", "generic-segmentation-offload", "generic-receive-offload"):
                ethtool.set_offload_flag(ifname, flag, False)
        finally:
            ethtool.close()
    run_in_netns(netns, switch)


def start_servers(netns: str) -> list[subprocess.Popen]:
    return capture.start_servers(netns, {BENCH_CPU})


def iperf_gbps(client_ns: str, server_ip: str, seconds: float) -> float:
    return capture.iperf_gbps(client_ns, server_ip, 1, seconds, {BENCH_CPU})


def rtt_us(client_ns: str, server_ip: str, count: int) -> list[float]:
    return capture.rtt_us(client_ns, server_ip, count, {BENCH_CPU}, timeout=300)


class BenchNode:
    """One node with an agent of one backend, the measured pods (A -> B
    enrolled, C -> D outside the mesh) and the cheap pods made so far."""

    def __init__(self, backend: str, stack: contextlib.ExitStack) -> None:
        self.backend = backend
        self.tag = uuid.uuid4().hex[:5]
        self.node = stack.enter_context(NodeNamespace(f"bbk-{backend[:4]}-{self.tag}"))
        self.agent = stack.enter_context(AgentProcess(self.node, "bench", capture=backend,
                                                      extra_args=("--log-level", "warn")))
        assert self.agent.proc is not None
        pin_process(self.agent.proc.pid)
        ipam = self.node.workdir / "ipam"
        self.mesh = CniRuntime(bridge_conflist("bbk", SUBNET, self.agent.socket, ipam_dir=ipam), cni_plugin_dirs(),
                               node_netns=self.node.path)
        self.plain = CniRuntime(bridge_conflist("bbk", SUBNET, self.agent.socket, ipam_dir=ipam, ambit=False),
                                cni_plugin_dirs(), node_netns=self.node.path)
        self.netns: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.meshed = 0
        self._made = 0
        stack.callback(self.close)
        a, self.ip_a, _ = self.add("client")
        b, self.ip_b, _ = self.add("server")
        c, self.ip_c, _ = self.add("direct-client", meshed=False)
        d, self.ip_d, _ = self.add("direct-server", meshed=False)
        self.ns_a, self.ns_c = a.netns, c.netns
        self.procs += start_servers(b.netns) + start_servers(d.netns)

    def sandbox(self, name: str) -> PodSandbox:
        self._made += 1
        ns = f"bbk-{self.tag}-{self._made}"
        self.netns.append(ns)
        return PodSandbox(uuid.uuid4().hex, make_pod_netns(ns), namespace="bench", name=f"{name}-{self._made}",
                          uid=str(uuid.uuid4()))

    def add(self, name: str, meshed: bool = True) -> tuple[PodSandbox, str, float]:
        sb = self.sandbox(name)
        result = (self.mesh if meshed else self.plain).add(sb)
        self.meshed += meshed
        return sb, result.result["ips"][0]["address"].split("/")[0], result.seconds("ambit-cni")

    def grow(self, enrolled: int, workers: int) -> None:
        """Enrolled pods up to `enrolled`, added concurrently (cheap pods)."""
        missing = enrolled - self.meshed
        if missing <= 0:
            return
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(lambda _: self.add("idle"), range(missing)))

    def probe_enrol_release(self, count: int) -> tuple[float, float, float, float]:
        """Add then delete `count` pods one at a time (after one warm-up
        pair): medians of the agent's time per call (from its metrics,
        read around each call) and of the ambit-cni step, ADD then DEL."""
        enrol, enrol_step, release, release_step = [], [], [], []
        for i in range(count + 1):
            before = rpc_totals(self.node.path)
            sb, _, step = self.add("probe")
            middle = rpc_totals(self.node.path)
            del_step = self.mesh.delete(sb).seconds("ambit-cni")
            after = rpc_totals(self.node.path)
            self.meshed -= 1
            name = sb.netns.rsplit("/", 1)[1]
            remove_netns(name)
            self.netns.remove(name)
            if i == 0:
                continue  # warm-up: first calls after a pause pay for cold caches
            enrol.append(mean_ms(before["EnrolPod"], middle["EnrolPod"]))
            release.append(mean_ms(middle["ReleasePod"], after["ReleasePod"]))
            enrol_step.append(step * 1000)
            release_step.append(del_step * 1000)
        return (statistics.median(enrol), statistics.median(enrol_step), statistics.median(release),
                statistics.median(release_step))

    def close(self) -> None:
        # The pods' veths go with their namespaces; the agent's --cleanup
        # (AgentProcess exit, which runs after this) removes the capture state.
        for p in self.procs:
            p.kill()
            p.wait()
        for ns in self.netns:
            remove_netns(ns)


def measure(settings: Settings, log) -> tuple[dict[str, list[Point]], dict[str, float]]:
    """Both nodes live side by side; at each size the traffic runs are
    interleaved (eBPF, nftables, nftables, eBPF, ...) so that drift of the
    machine over the run lands on both backends alike."""
    points: dict[str, list[Point]] = {b: [] for b in BACKENDS}
    with contextlib.ExitStack() as stack:
        nodes = {backend: BenchNode(backend, stack) for backend in BACKENDS}
        # Unmeasured warm-up: the first calls into a fresh agent and proxy
        # (imports, caches, first tunnels) made the first size look slower
        # than the larger ones (enrol 7.7 ms at 10 pods, 6.0 at 500).
        for n in nodes.values():
            n.probe_enrol_release(3)
            iperf_gbps(n.ns_a, n.ip_b, 1)
            rtt_us(n.ns_a, n.ip_b, 200)
        for size in settings.sizes:
            started = time.monotonic()
            for node in nodes.values():
                node.grow(size, settings.workers)
            log(f"  {size} enrolled pods on each node (grown in {time.monotonic() - started:.1f}s)")
            probes = {b: n.probe_enrol_release(settings.probes) for b, n in nodes.items()}
            runs: dict[tuple[str, str], list[float]] = {}
            for r in range(settings.repeats):
                for backend in (BACKENDS if r % 2 == 0 else BACKENDS[::-1]):
                    n = nodes[backend]
                    runs.setdefault((backend, "mesh"), []).append(iperf_gbps(n.ns_a, n.ip_b, settings.seconds))
                    runs.setdefault((backend, "direct"), []).append(iperf_gbps(n.ns_c, n.ip_d, settings.seconds))
                    runs.setdefault((backend, "rtt"), []).extend(rtt_us(n.ns_a, n.ip_b, settings.pings))
                    runs.setdefault((backend, "rtt_direct"), []).extend(rtt_us(n.ns_c, n.ip_d, settings.pings))
            for backend in BACKENDS:
                rtt, rtt_direct = runs[backend, "rtt"], runs[backend, "rtt_direct"]
                point = Point(backend, size, statistics.median(runs[backend, "mesh"]),
                              statistics.median(runs[backend, "direct"]), percentile(rtt, 50), percentile(rtt, 99),
                              percentile(rtt_direct, 50), *probes[backend])
                points[backend].append(point)
                log(f"  {backend:8} {size:4} pods: {point.gbps:.2f} Gb/s (direct {point.gbps_direct:.2f}), "
                    f"RTT p50 {point.rtt_p50_us:.0f} us, enrol {point.enrol_agent_ms:.2f} ms, "
                    f"release {point.release_agent_ms:.2f} ms")
        # Last, at the largest size: the same throughput run with segmentation
        # offloads off on every measured pod's and the proxy's interface.
        for node in nodes.values():
            for ns in node.netns:
                segmentation_off(netns_path(ns))
            segmentation_off(netns_path(node.agent.proxy_netns))
        unsegmented: dict[str, list[float]] = {b: [] for b in BACKENDS}
        for r in range(settings.repeats):
            for backend in (BACKENDS if r % 2 == 0 else BACKENDS[::-1]):
                n = nodes[backend]
                unsegmented[backend].append(iperf_gbps(n.ns_a, n.ip_b, settings.seconds))
        offloads_off = {b: statistics.median(v) for b, v in unsegmented.items()}
        log(f"  offloads off at {settings.sizes[-1]} pods: " +
            ", ".join(f"{b} {v:.2f} Gb/s" for b, v in offloads_off.items()))
    return points, offloads_off


# --- report --------------------------------------------------------------
def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def table(points: dict[str, list[Point]], sizes: tuple[int, ...]) -> str:
    rows = [f"{'backend':9} {'pods':>5} {'Gb/s':>7} {'direct':>7} {'RTT p50':>8} {'p99':>7} {'direct':>7} "
            f"{'enrol':>7} {'(cni)':>7} {'release':>8} {'(cni)':>7}",
            f"{'':9} {'':>5} {'mesh':>7} {'Gb/s':>7} {'us':>8} {'us':>7} {'p50 us':>7} "
            f"{'ms':>7} {'ms':>7} {'ms':>8} {'ms':>7}"]
    for backend in BACKENDS:
        for p in points[backend]:
            rows.append(f"{backend:9} {p.pods:5} {p.gbps:7.2f} {p.gbps_direct:7.2f} {p.rtt_p50_us:8.1f} "
                        f"{p.rtt_p99_us:7.1f} {p.rtt_direct_p50_us:7.1f} {p.enrol_agent_ms:7.2f} "
                        f"{p.enrol_step_ms:7.1f} {p.release_agent_ms:8.2f} {p.release_step_ms:7.1f}")
    rows.append("")
    rows.append(f"{'eBPF / nftables':16} {'throughput':>10} {'direct':>7} {'RTT p50':>8} {'enrol':>7} "
                f"{'release':>8}")
    for e, n in zip(points["ebpf"], points["nftables"]):
        rows.append(f"{e.pods:5} pods{'':7} {ratio(e.gbps, n.gbps):10.2f} {ratio(e.gbps_direct, n.gbps_direct):7.2f} "
                    f"{ratio(e.rtt_p50_us, n.rtt_p50_us):8.2f} {ratio(e.enrol_agent_ms, n.enrol_agent_ms):7.2f} "
                    f"{ratio(e.release_agent_ms, n.release_agent_ms):8.2f}")
    return "\n".join(rows)


def chart(points: dict[str, list[Point]], path: Path, title: str, offloads_off: dict[str, float]) -> None:
    """Four panels against the number of enrolled pods, one line per
    backend (dashed: pods outside the mesh on the same node), each panel
    titled with its eBPF/nftables ratio at the largest size; the targets are
    drawn where they apply."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    top = len(points["ebpf"]) - 1
    panels = (
        ("Throughput A→B via the proxy, Gb/s (higher is better)", "gbps", "gbps_direct"),
        ("64-byte round trip A↔B via the proxy, p50 µs (lower is better)", "rtt_p50_us", "rtt_direct_p50_us"),
        ("Enrol: CNI ADD → capture active, ms (agent)", "enrol_agent_ms", None),
        ("Release: CNI DEL → capture removed, ms (agent)", "release_agent_ms", None),
    )
    fig, axes = plt.subplots(2, 2, figsize=(12.5, 8.8))
    for ax, (label, field, direct) in zip(axes.flat, panels):
        xs = [p.pods for p in points["ebpf"]]
        for backend, offset in (("ebpf", 8), ("nftables", -13)):
            ys = [getattr(p, field) for p in points[backend]]
            ax.plot(xs, ys, marker="o", lw=2.4, color=COLOURS[backend])
            for x, y in zip(xs, ys):
                ax.annotate(f"{y:.2f}" if y < 10 else f"{y:.0f}", (x, y), textcoords="offset points",
                            xytext=(0, offset), ha="center", fontsize=8.5, color=COLOURS[backend])
            if direct:
                ax.plot(xs, [getattr(p, direct) for p in points[backend]], ls="--", lw=1.2, marker=".",
                        color=COLOURS[backend], alpha=0.5)
        e, n = getattr(points["ebpf"][top], field), getattr(points["nftables"][top], field)
        ax.set_title(f"{label}\neBPF / nftables at {xs[top]} pods: {ratio(e, n):.2f}x", fontsize=10)
        ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * 1.15)
        if field == "gbps":
            for backend, marker in (("ebpf", "v"), ("nftables", "v")):
                ax.plot([xs[top]], [offloads_off[backend]], marker=marker, ls="", color=COLOURS[backend])
            ax.annotate(f"▼ segmentation offloads off: {offloads_off['ebpf']:.2f} vs {offloads_off['nftables']:.2f}"
                        f" = {ratio(offloads_off['ebpf'], offloads_off['nftables']):.2f}x",
                        (xs[top], min(offloads_off.values())), textcoords="offset points", xytext=(-4, -14),
                        ha="right", fontsize=7.5, color="dimgrey")
            ax.axhline(n * TARGET_THROUGHPUT_RATIO, color=COLOURS["ebpf"], ls=":", lw=1)
            ax.annotate(f"target for eBPF at {xs[top]} pods: {TARGET_THROUGHPUT_RATIO}x nftables",
                        (xs[0], n * TARGET_THROUGHPUT_RATIO), textcoords="offset points", xytext=(-8, 4),
                        ha="left", fontsize=7.5, color=COLOURS["ebpf"])
        if field == "enrol_agent_ms":
            base = points["ebpf"][0].enrol_agent_ms
            ax.axhspan(base * (1 - TARGET_ENROL_FLATNESS), base * (1 + TARGET_ENROL_FLATNESS),
                       color=COLOURS["ebpf"], alpha=0.08)
            ax.annotate(f"target: eBPF within ±{TARGET_ENROL_FLATNESS:.0%} of its {xs[0]}-pod value",
                        (xs[0], base * (1 + TARGET_ENROL_FLATNESS)), textcoords="offset points", xytext=(2, 3),
                        fontsize=7.5, color=COLOURS["ebpf"])
        ax.set_xscale("log")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        ax.set_xlim(xs[0] / 1.6, xs[-1] * 1.6)
        ax.set_xlabel("enrolled pods on the node")
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=COLOURS["ebpf"], marker="o", lw=2.4, label="eBPF (tc + bpf_sk_assign)"),
               Line2D([], [], color=COLOURS["nftables"], marker="o", lw=2.4,
                      label="nftables (policy route + TPROXY)"),
               Line2D([], [], color="grey", ls="--", marker=".", label="same node, two pods outside the mesh")]
    fig.legend(handles=handles, loc="upper center", ncol=3, bbox_to_anchor=(0.5, 0.955), frameon=False,
               fontsize=9.5)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="10 and 100 pods, short runs (under a minute); targets judged at 100 pods")
    parser.add_argument("--out", type=Path, default=BENCH.parent / "build" / "bench" / "backends.png",
                        help="where the chart goes (default: %(default)s)")
    args = parser.parse_args()
    if args.quick:
        settings = Settings(sizes=(10, 100), seconds=1.0, repeats=2, pings=300, probes=5, workers=4)
    else:
        settings = Settings(sizes=(10, 100, 500), seconds=3.0, repeats=4, pings=2000, probes=20, workers=4)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    started = time.monotonic()
    load_before = os.getloadavg()[0]
    log(f"two nodes (eBPF, nftables) growing to {', '.join(map(str, settings.sizes))} enrolled pods")
    points, offloads_off = measure(settings, log)
    elapsed = time.monotonic() - started
    load_after = os.getloadavg()[0]

    top = settings.sizes[-1]
    e_top, n_top = points["ebpf"][-1], points["nftables"][-1]
    e_low = points["ebpf"][0]
    throughput_ratio = ratio(e_top.gbps, n_top.gbps)
    enrol_growth = ratio(e_top.enrol_agent_ms, e_low.enrol_agent_ms) - 1
    step_growth = ratio(e_top.enrol_step_ms, e_low.enrol_step_ms) - 1
    cpus = os.cpu_count()
    print(f"same node, the measured path pinned to 1 CPU (of {cpus}); iperf3 1 stream {settings.seconds:g}s "
          f"x{settings.repeats} (median), {settings.repeats}x{settings.pings} round trips, "
          f"{settings.probes} enrol/release probes per point; load average {load_before:.2f} before, "
          f"{load_after:.2f} after (interleaved runs spread other work on the machine over both backends)")
    print(table(points, settings.sizes))
    off_ratio = ratio(offloads_off["ebpf"], offloads_off["nftables"])
    print(f"\nthroughput at {top} pods with TSO/GSO/GRO off on the pods' and the proxy's interfaces (every "
          f"packet crosses the hooks at MTU size): eBPF {offloads_off['ebpf']:.2f} vs nftables "
          f"{offloads_off['nftables']:.2f} Gb/s = {off_ratio:.2f}x")
    met_throughput = throughput_ratio >= TARGET_THROUGHPUT_RATIO
    met_flat = abs(enrol_growth) <= TARGET_ENROL_FLATNESS
    print(f"\ntarget eBPF throughput >= {TARGET_THROUGHPUT_RATIO}x nftables at {top} pods: "
          f"{throughput_ratio:.2f}x -> {'met' if met_throughput else 'NOT met'}")
    print(f"target eBPF enrol latency flat within {TARGET_ENROL_FLATNESS:.0%} from {e_low.pods} to {top} pods: "
          f"agent {e_low.enrol_agent_ms:.2f} -> {e_top.enrol_agent_ms:.2f} ms ({enrol_growth:+.0%}), "
          f"ambit-cni step {e_low.enrol_step_ms:.1f} -> {e_top.enrol_step_ms:.1f} ms ({step_growth:+.0%}) "
          f"-> {'met' if met_flat else 'NOT met'}")
    title = (f"ambit capture backends on one node (measured path pinned to one CPU): "
             f"eBPF/nftables throughput at {top} pods = {throughput_ratio:.2f}x")
    chart(points, args.out, title, offloads_off)
    print(f"chart: {args.out}  ({elapsed:.0f}s)")
    print(json.dumps({
        "bench": "backends", "sizes": list(settings.sizes), "quick": args.quick, "cpus": cpus,
        "points": {b: [asdict(p) | {k: round(v, 3) for k, v in asdict(p).items() if isinstance(v, float)}
                       for p in points[b]] for b in BACKENDS},
        "throughput_ratio_at_top": round(throughput_ratio, 3),
        "throughput_gbps_offloads_off_at_top": {b: round(v, 3) for b, v in offloads_off.items()},
        "throughput_ratio_offloads_off_at_top": round(off_ratio, 3),
        "rtt_p50_ratio_at_top": round(ratio(e_top.rtt_p50_us, n_top.rtt_p50_us), 3),
        "ebpf_enrol_growth": round(enrol_growth, 3), "ebpf_enrol_step_growth": round(step_growth, 3),
        "target_throughput_ratio": TARGET_THROUGHPUT_RATIO, "target_enrol_flatness": TARGET_ENROL_FLATNESS,
        "met_throughput": met_throughput, "met_enrol_flat": met_flat, "met": met_throughput and met_flat,
        "load_before": round(load_before, 2), "load_after": round(load_after, 2),
        "chart": str(args.out), "seconds": round(elapsed, 1)}))


if __name__ == "__main__":
    main()
