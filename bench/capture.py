#!/usr/bin/env python3
"""Same-node cost of capture + relay, against the direct path, in one run.

One node namespace with a real ambit-agent (eBPF capture); pods made by the
real CNI chain on one bridge: A -> B are enrolled, so A's connections go
through tc redirect -> proxy namespace -> sk_assign -> relay -> B; C -> D
are not (same bridge, same kernel path otherwise). iperf3 measures 1 and 4
stream throughput; a 64-byte ping-pong measures RTT. Ends with one JSON line.

Targets: relay throughput >= 0.25x direct; added RTT p50 <= 150 us.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Collection

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from stats import percentile  # noqa: E402  (bench/stats.py)
from iperf import iperf_received  # noqa: E402  (bench/iperf.py)

from ambit.lab.cniruntime import CniRuntime, PodSandbox  # noqa: E402
from ambit.waypoint.runner import is_listening  # noqa: E402
from ambit.lab.node import (AgentProcess, NodeNamespace, bridge_conflist, cni_plugin_dirs,  # noqa: E402
                            make_pod_netns, remove_netns, spawn_in_netns)

TARGET_THROUGHPUT_RATIO = 0.25
TARGET_ADDED_RTT_P50_US = 150.0

PING_PONG = r"""
import socket, sys, time
ip, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection((ip, port))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
msg = b"x" * 64
samples = []
for i in range(n + 50):
    t = time.perf_counter_ns()
    s.sendall(msg)
    got = 0
    while got < 64:
        got += len(s.recv(64 - got))
    if i >= 50:
        samples.append(time.perf_counter_ns() - t)
print(" ".join(map(str, samples)))
"""

ECHO_SERVER = r"""
import socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1]))); srv.listen(8)
print("ready", flush=True)
while True:
    c, _ = srv.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while data := c.recv(65536):
        c.sendall(data)
    c.close()
"""


def wait_listening(proc: subprocess.Popen, port: int, timeout: float = 10.0) -> None:
    """Until `proc` listens on `port` (in its own namespace), or fail saying so."""
    deadline = time.monotonic() + timeout
    while not is_listening(port, proc.pid):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args[0]} (pid {proc.pid}) never listened on port {port}"
                               + (f": it exited with {proc.returncode}" if proc.poll() is not None else ""))
        time.sleep(0.02)


def start_servers(netns: str, cpus: Collection[int] | None = None) -> list[subprocess.Popen]:
    """iperf3 -s and the echo server in `netns` (on `cpus`), once both listen."""
    iperf, echo = spawn_in_netns(netns, lambda: (
        subprocess.Popen(["iperf3", "-s", "-p", "5201"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen([sys.executable, "-c", ECHO_SERVER, "7000"], stdout=subprocess.PIPE)), cpus)
    assert echo.stdout is not None and echo.stdout.readline().strip() == b"ready"
    wait_listening(iperf, 5201)
    return [iperf, echo]


def iperf_gbps(client_ns: str, server_ip: str, streams: int, seconds: float,
               cpus: Collection[int] | None = None) -> float:
    """iperf3 from client_ns (on `cpus`)."""
    received = spawn_in_netns(client_ns, lambda: iperf_received(
        ["iperf3", "-c", server_ip, "-p", "5201", "-P", str(streams), "-t", str(seconds)], seconds), cpus)
    return received["bits_per_second"] / 1e9


def rtt_us(client_ns: str, server_ip: str, count: int, cpus: Collection[int] | None = None,
           timeout: float = 120) -> list[float]:
    """64-byte round trips (us) from client_ns (on `cpus`) to the echo server on port 7000."""
    out = spawn_in_netns(client_ns, lambda: subprocess.run(
        [sys.executable, "-c", PING_PONG, server_ip, "7000", str(count)], capture_output=True, text=True,
        timeout=timeout, check=True), cpus)
    return [int(x) / 1000 for x in out.stdout.split()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs (under a minute)")
    args = parser.parse_args()
    seconds = 3 if args.quick else 10
    pings = 2000 if args.quick else 20000

    with NodeNamespace(f"bcap-{uuid.uuid4().hex[:6]}") as node, \
            AgentProcess(node, "bench", capture="ebpf", extra_args=("--log-level", "warn")) as agent:
        ipam = node.workdir / "ipam"
        mesh = CniRuntime(bridge_conflist("bcap", "10.241.0.0/24", agent.socket, ipam_dir=ipam), cni_plugin_dirs(),
                          node_netns=node.path)
        plain = CniRuntime(bridge_conflist("bcap", "10.241.0.0/24", agent.socket, ipam_dir=ipam, ambit=False),
                           cni_plugin_dirs(), node_netns=node.path)
        pods, procs = [], []
        try:
            ips = {}
            for name, runtime in (("a", mesh), ("b", mesh), ("c", plain), ("d", plain)):
                sb = PodSandbox(uuid.uuid4().hex, make_pod_netns(f"bcap-{name}-{uuid.uuid4().hex[:4]}"), name=name)
                pods.append((runtime, sb))
                ips[name] = runtime.add(sb).result["ips"][0]["address"].split("/")[0]
            ns = {sb.name: sb.netns for _, sb in pods}
            procs += start_servers(ns["b"]) + start_servers(ns["d"])

            results = {}
            for label, client, server in (("direct", "c", "d"), ("mesh", "a", "b")):
                results[label] = {
                    "gbps_1": iperf_gbps(ns[client], ips[server], 1, seconds),
                    "gbps_4": iperf_gbps(ns[client], ips[server], 4, seconds),
                    "rtt": rtt_us(ns[client], ips[server], pings),
                }
        finally:
            for p in procs:
                p.kill()
                p.wait()
            for runtime, sb in reversed(pods):
                try:
                    runtime.delete(sb)
                finally:
                    remove_netns(sb.netns.rsplit("/", 1)[1])

    d, m = results["direct"], results["mesh"]
    ratio_1 = m["gbps_1"] / d["gbps_1"]
    ratio_4 = m["gbps_4"] / d["gbps_4"]
    added_p50 = percentile(m["rtt"], 50) - percentile(d["rtt"], 50)
    added_p99 = percentile(m["rtt"], 99) - percentile(d["rtt"], 99)
    print(f"same node, {seconds}s iperf3 runs, {pings} 64-byte round trips")
    print(f"{'':8} {'1 stream':>12} {'4 streams':>12} {'RTT p50':>10} {'RTT p99':>10}")
    for label, r in (("direct", d), ("mesh", m)):
        print(f"{label:8} {r['gbps_1']:9.2f} Gb/s {r['gbps_4']:9.2f} Gb/s {percentile(r['rtt'], 50):7.1f} us "
              f"{percentile(r['rtt'], 99):7.1f} us")
    print(f"ratio    {ratio_1:12.2f} {ratio_4:12.2f}   added p50 {added_p50:.1f} us, p99 {added_p99:.1f} us")
    met = min(ratio_1, ratio_4) >= TARGET_THROUGHPUT_RATIO and added_p50 <= TARGET_ADDED_RTT_P50_US
    print(json.dumps({
        "bench": "capture", "throughput_1s_vs_direct": round(ratio_1, 3), "throughput_4s_vs_direct": round(ratio_4, 3),
        "direct_gbps_1": round(d["gbps_1"], 2), "mesh_gbps_1": round(m["gbps_1"], 2),
        "direct_gbps_4": round(d["gbps_4"], 2), "mesh_gbps_4": round(m["gbps_4"], 2),
        "rtt_p50_direct_us": round(percentile(d["rtt"], 50), 1), "rtt_p50_mesh_us": round(percentile(m["rtt"], 50), 1),
        "added_rtt_p50_us": round(added_p50, 1), "added_rtt_p99_us": round(added_p99, 1),
        "target_throughput_ratio": TARGET_THROUGHPUT_RATIO, "target_added_rtt_p50_us": TARGET_ADDED_RTT_P50_US,
        "met": met}))


if __name__ == "__main__":
    main()
