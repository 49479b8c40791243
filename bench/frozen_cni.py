#!/usr/bin/env python3
"""The frozen ambit-cni against the Python ones, in one run.

Three builds of the same plugin, each in its own bin directory:
  frozen  build/cni-frozen (PyInstaller, one directory; installed behind a
          symlink exactly as `ambit install-cni` installs it)
  staged  build/cni-bin/ambit-cni (`/usr/bin/python3 -IS`, scripts/stage-cni.sh)
  venv    .venv/bin/ambit-cni (the console script of the editable install)

Start-up: `VERSION` with nothing but CNI_COMMAND in the environment, median
wall time and CPU time (user + system, from wait4) per run, the builds
interleaved so drift hits all alike. ADD and DEL: the ambit-cni step of a
real chain (bridge + host-local + ambit-cni) in a throwaway node namespace
with a real agent, one pod at a time, median per build.

The issue sets no target for these: "met" only says that every figure was
measured. Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from ambit.agent.install_cni.installer import PluginSource, install_plugin  # noqa: E402
from ambit.lab.cniruntime import REFERENCE_PLUGINS, CniRuntime, PodSandbox  # noqa: E402
from ambit.lab.node import AgentProcess, NodeNamespace, bridge_conflist, make_pod_netns, remove_netns  # noqa: E402

BUILDS = ("frozen", "staged", "venv")
PREFIX = "bfz-"


def prepare(bin_root: Path) -> dict[str, Path]:
    """One bin directory per build, each holding an `ambit-cni`."""
    subprocess.run(["bash", str(REPO / "scripts" / "freeze-cni.sh"), "--if-stale"], check=True,
                   stdout=subprocess.DEVNULL)
    if not (REPO / "build" / "cni-bin" / "ambit-cni").exists():
        subprocess.run(["bash", str(REPO / "scripts" / "stage-cni.sh")], check=True)
    dirs = {name: bin_root / name for name in BUILDS}
    for d in dirs.values():
        d.mkdir()
    install_plugin(PluginSource.locate(REPO / "build" / "cni-frozen" / "ambit-cni"), dirs["frozen"])
    shutil.copy2(REPO / "build" / "cni-bin" / "ambit-cni", dirs["staged"] / "ambit-cni")
    venv_script = Path(sys.executable).parent / "ambit-cni"
    if not venv_script.exists():
        venv_script = REPO / ".venv" / "bin" / "ambit-cni"
    shutil.copy2(venv_script, dirs["venv"] / "ambit-cni")
    return dirs


def one_start(exe: Path) -> tuple[float, float]:
    """Wall and CPU seconds of one `VERSION`, with an empty environment."""
    started = time.perf_counter()
    proc = subprocess.Popen([str(exe)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={"CNI_COMMAND": "VERSION"}, cwd="/")
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{exe} VERSION exited {proc.returncode}")
    return wall, usage.ru_utime + usage.ru_stime


def startup(dirs: dict[str, Path], runs: int) -> dict[str, dict[str, float]]:
    walls: dict[str, list[float]] = {b: [] for b in BUILDS}
    cpus: dict[str, list[float]] = {b: [] for b in BUILDS}
    for b in BUILDS:
        one_start(dirs[b] / "ambit-cni")  # warm the page cache
    for _ in range(runs):
        for b in BUILDS:
            wall, cpu = one_start(dirs[b] / "ambit-cni")
            walls[b].append(wall)
            cpus[b].append(cpu)
    return {b: {"wall": statistics.median(walls[b]), "cpu": statistics.median(cpus[b])} for b in BUILDS}


def add_del(dirs: dict[str, Path], pods: int) -> dict[str, dict[str, float]]:
    adds: dict[str, list[float]] = {b: [] for b in BUILDS}
    dels: dict[str, list[float]] = {b: [] for b in BUILDS}
    with NodeNamespace(f"{PREFIX}node-{uuid.uuid4().hex[:6]}") as node, AgentProcess(node, "bench") as agent:
        conflist = bridge_conflist("bfz", "10.239.0.0/24", agent.socket, ipam_dir=node.workdir / "ipam",
                                   portmap=False)
        runtimes = {b: CniRuntime(conflist, [dirs[b], REFERENCE_PLUGINS], node_netns=node.path) for b in BUILDS}
        try:
            for i in range(pods + 1):  # the first round warms up
                for b in BUILDS:
                    sb = PodSandbox(container_id=uuid.uuid4().hex,
                                    netns=make_pod_netns(f"{PREFIX}{uuid.uuid4().hex[:8]}"),
                                    namespace="bench", name=f"{b}-{i}", uid=str(uuid.uuid4()))
                    try:
                        added = runtimes[b].add(sb)
                        deleted = runtimes[b].delete(sb)
                    finally:
                        remove_netns(sb.netns.rsplit("/", 1)[1])
                    if i:
                        adds[b].append(added.seconds("ambit-cni"))
                        dels[b].append(deleted.seconds("ambit-cni"))
        finally:
            for runtime in runtimes.values():
                runtime.close()
    return {b: {"add": statistics.median(adds[b]), "del": statistics.median(dels[b])} for b in BUILDS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer runs (under a minute)")
    parser.add_argument("--runs", type=int, default=200, help="VERSION runs per build (default: %(default)s)")
    parser.add_argument("--pods", type=int, default=40, help="ADD+DEL pairs per build (default: %(default)s)")
    args = parser.parse_args()
    runs, pods = (40, 10) if args.quick else (args.runs, args.pods)

    bin_root = Path(tempfile.mkdtemp(prefix=PREFIX))
    try:
        dirs = prepare(bin_root)
        started = startup(dirs, runs)
        chained = add_del(dirs, pods)
    finally:
        shutil.rmtree(bin_root, ignore_errors=True)

    bundle = REPO / "build" / "cni-frozen" / "ambit-cni"
    size_mb = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file()) / 1e6
    ms = lambda s: round(s * 1000, 1)  # noqa: E731
    print(f"ambit-cni builds, VERSION x {runs} each (empty environment), ADD+DEL x {pods} each (real chain)")
    print(f"  {'build':8} {'start-up':>10} {'start CPU':>10} {'ADD step':>10} {'DEL step':>10}")
    for b in BUILDS:
        print(f"  {b:8} {ms(started[b]['wall']):8.1f}ms {ms(started[b]['cpu']):8.1f}ms "
              f"{ms(chained[b]['add']):8.1f}ms {ms(chained[b]['del']):8.1f}ms")
    print(f"  frozen build: PyInstaller one-directory, {size_mb:.1f} MB; no target is set: 'met' means measured")
    report: dict[str, object] = {"bench": "frozen_cni", "startup_runs": runs, "add_del_pods": pods,
                                 "frozen_build": "pyinstaller-onedir", "frozen_size_mb": round(size_mb, 1)}
    for b in BUILDS:
        report[f"{b}_startup_ms"] = ms(started[b]["wall"])
        report[f"{b}_startup_cpu_ms"] = ms(started[b]["cpu"])
        report[f"{b}_add_ms"] = ms(chained[b]["add"])
        report[f"{b}_del_ms"] = ms(chained[b]["del"])
    report["frozen_vs_venv_startup"] = round(started["frozen"]["wall"] / started["venv"]["wall"], 2)
    report["frozen_vs_staged_startup"] = round(started["frozen"]["wall"] / started["staged"]["wall"], 2)
    report["target"] = None
    report["met"] = True  # measured; the issue gives no number to meet
    print(json.dumps(report))


if __name__ == "__main__":
    main()
