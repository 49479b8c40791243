#!/usr/bin/env python3
"""What ambit-cni adds to pod start-up.

20 pods are added concurrently through a real chain (bridge + host-local +
portmap [+ ambit-cni]) inside a throwaway node namespace with a real agent,
once with ambit-cni in the chain and once without, in the same run. Prints
p50/p99 of the time the ambit-cni step took (what ambit adds to each pod's
ADD) and of the whole chain both ways, and `ambit-cni VERSION` start-up vs
`/usr/lib/cni/portmap VERSION`. Ends with one JSON line.

Target: ambit's added ADD latency p99 <= 300 ms at 20 concurrent on 2 cores.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ambit.lab.node import AgentProcess, NodeNamespace, bridge_conflist, cni_plugin_dirs, make_pod_netns  # noqa: E402
from ambit.lab.cniruntime import CniRuntime, PodSandbox  # noqa: E402
from stats import percentile  # noqa: E402  (bench/stats.py)

TARGET_P99_S = 0.300


def startup_seconds(argv: list[str], runs: int) -> float:
    times = []
    for _ in range(runs + 1):
        started = time.perf_counter()
        subprocess.run(argv, input=b"", env={"CNI_COMMAND": "VERSION"}, capture_output=True, check=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def one_round(runtime: CniRuntime, node: NodeNamespace, pods: int, tag: str) -> tuple[list[float], list[float]]:
    sandboxes = [PodSandbox(container_id=uuid.uuid4().hex, netns=make_pod_netns(f"bca-{tag}{i}"),
                            namespace="bench", name=f"pod-{i}", uid=str(uuid.uuid4())) for i in range(pods)]
    totals: list[float] = []
    ambit: list[float] = []
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=pods) as pool:
            def add(sb: PodSandbox):
                started = time.perf_counter()
                chain = runtime.add(sb)
                return time.perf_counter() - started, chain.seconds("ambit-cni")
            for total, step in pool.map(add, sandboxes):
                totals.append(total)
                ambit.append(step)
        with concurrent.futures.ThreadPoolExecutor(max_workers=pods) as pool:
            list(pool.map(runtime.delete, sandboxes))
    finally:
        for sb in sandboxes:
            node.remove_netns_path(sb.netns)
    return totals, ambit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one round (under a minute)")
    parser.add_argument("--pods", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--plugin", choices=("staged", "frozen"), default="staged",
                        help="staged: the plugin under the host's python3 -IS (scripts/stage-cni.sh); frozen: the "
                             "PyInstaller build the DaemonSet installs on hosts without Python (default: staged)")
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds

    plugin_dirs = cni_plugin_dirs()
    if args.plugin == "frozen":
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        subprocess.run(["bash", os.path.join(repo, "scripts", "freeze-cni.sh"), "--if-stale"], check=True)
        plugin_dirs = [os.path.join(repo, "build", "cni-frozen", "ambit-cni"), plugin_dirs[-1]]
    with NodeNamespace("bca-node") as node, AgentProcess(node, "bca") as agent:
        with_ambit = CniRuntime(bridge_conflist("bca", "10.249.0.0/16", agent.socket, ipam_dir=node.workdir / "ipam",
                                                    portmap=True, ambit=True),
                                plugin_dirs, node_netns=node.path)
        without = CniRuntime(bridge_conflist("bca", "10.249.0.0/16", agent.socket, ipam_dir=node.workdir / "ipam",
                                                 portmap=True, ambit=False),
                             plugin_dirs, node_netns=node.path)
        chain_with, chain_without, ambit_steps = [], [], []
        for r in range(rounds):
            totals, steps = one_round(with_ambit, node, args.pods, f"a{r}-")
            chain_with += totals
            ambit_steps += steps
            totals, _ = one_round(without, node, args.pods, f"b{r}-")
            chain_without += totals

    runs = 5 if args.quick else 20
    ambit_start = startup_seconds([os.path.join(plugin_dirs[0], "ambit-cni")], runs)
    portmap_start = startup_seconds(["/usr/lib/cni/portmap"], runs)

    ms = lambda s: round(s * 1000, 1)  # noqa: E731
    print(f"{args.pods} concurrent ADDs x {rounds} round(s), plugin {os.path.join(plugin_dirs[0], 'ambit-cni')}")
    print(f"  ambit-cni step       p50 {ms(percentile(ambit_steps, 50)):7.1f} ms   p99 {ms(percentile(ambit_steps, 99)):7.1f} ms")
    print(f"  chain with ambit     p50 {ms(percentile(chain_with, 50)):7.1f} ms   p99 {ms(percentile(chain_with, 99)):7.1f} ms")
    print(f"  chain without ambit  p50 {ms(percentile(chain_without, 50)):7.1f} ms   p99 {ms(percentile(chain_without, 99)):7.1f} ms")
    print(f"  VERSION start-up: ambit-cni {ms(ambit_start)} ms, portmap {ms(portmap_start)} ms "
          f"(ratio {ambit_start / portmap_start:.2f})")
    p99 = percentile(ambit_steps, 99)
    print(json.dumps({
        "bench": "cni_add", "plugin": args.plugin, "pods": args.pods, "rounds": rounds,
        "ambit_added_p50_ms": ms(percentile(ambit_steps, 50)), "ambit_added_p99_ms": ms(p99),
        "chain_with_p99_ms": ms(percentile(chain_with, 99)), "chain_without_p99_ms": ms(percentile(chain_without, 99)),
        "startup_ambit_ms": ms(ambit_start), "startup_portmap_ms": ms(portmap_start),
        "startup_vs_portmap": round(ambit_start / portmap_start, 2),
        "target_added_p99_ms": TARGET_P99_S * 1000, "met": p99 <= TARGET_P99_S}))


if __name__ == "__main__":
    main()
