#!/usr/bin/env python3
"""What an agent upgrade or restart costs the traffic it carries.

The default two-node lab (real agents, real CNI chain, eBPF capture; prefix
`bupg-`) under continuous load from shop/client-0 (node1): new short HTTP
connections at a steady rate to web-1 (node2: HBONE) and web-0 (node1: same
node), plus long-lived echo streams to both that carry bytes all along
(bench/steady_load.py). Then, on each chosen node, one event per load run:

  upgrade  a new agent starts beside the running one and takes over
           (`ambit lab restart NODE --upgrade`)
  sigterm  SIGTERM, the old agent exits, a new one is started
  kill     SIGKILL, a new one is started

For each: new connections failed (and how many began after the new agent
was ready), long-lived connections reset and the bytes they lost, the
window in which failures happened (seconds from the event), and whether a
byte of ours crossed the underlay in plaintext. Ends with one JSON line.

Targets: upgrade 0 failed new connections and 0 resets of long-lived ones;
sigterm 0 failed new connections begun after the new agent was ready; kill
failures only within the restart window (event .. new agent ready, plus the
client's timeout for connections begun in it), never a plaintext byte.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.support.waiting import wait_until  # noqa: E402

PREFIX = "bupg-"
UNDERLAY = "10.104.0.0/24"
PODS = "10.248.0.0/16"
CLIENT = "shop/client-0"
LOAD = Path(__file__).resolve().with_name("steady_load.py")
MARKER = b"AMBIT-UPGRADE-CANARY:"
EVENTS = ("upgrade", "sigterm", "kill")


def _iso(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def agent_events(log_path: Path, since: float) -> list[dict[str, Any]]:
    """The agent log's JSON lines written at or after `since` (wall clock)."""
    out = []
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and "timestamp" in entry and _iso(entry["timestamp"]) >= since:
            out.append(entry)
    return out


class Load:
    """steady_load.py running in the client pod's namespace, reporting its progress."""

    def __init__(self, lab: Any, work: Path, *, rate: float, streams: int, stream_rate: float,
                 timeout: float) -> None:
        self.stop_file = work / f"stop-{uuid.uuid4().hex[:6]}"
        self.out = work / f"load-{uuid.uuid4().hex[:6]}.json"
        self.progress_file = work / f"progress-{uuid.uuid4().hex[:6]}.json"
        self.targets = ("cross", "same")
        ips = {key: lab.find_pod(key).ip for key in ("shop/web-0", "shop/web-1")}
        argv = [sys.executable, str(LOAD), "--rate", str(rate), "--streams", str(streams), "--timeout", str(timeout),
                "--stream-rate", f"{stream_rate:g}",
                "--short", f"cross={ips['shop/web-1']}:8080", "--short", f"same={ips['shop/web-0']}:8080",
                "--stream", f"cross={ips['shop/web-1']}:9000", "--stream", f"same={ips['shop/web-0']}:9000",
                "--until-file", str(self.stop_file), "--out", str(self.out),
                "--progress-file", str(self.progress_file)]
        self.proc = lab.spawn(CLIENT, argv)

    def progress(self) -> dict[str, Any] | None:
        """The load's latest report (None before its first); raises if it died."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"the load client exited ({self.proc.returncode}) while it should be running")
        try:
            return json.loads(self.progress_file.read_text())
        except FileNotFoundError:
            return None

    def wait_for_traffic(self, since: dict[str, Any] | None, *, answers: int, stream_bytes: int,
                         begun_after: float | None = None, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until every short target has `answers` more 200s than in `since`
        (None: from the start) and every stream `stream_bytes` more echoed (or
        ended, as a killed agent's streams do); with `begun_after`, also until
        no connection begun before then is still in flight. Returns the report
        that showed it; after `timeout`, an AssertionError naming the flows that lagged."""
        before = since or {"short": {}, "streams": []}
        missing: list[str] = []

        def lagging(report: dict[str, Any] | None) -> list[str]:
            if report is None:
                return ["the load's first report"]
            out = [f"{answers} more answers from {t} (had {before['short'].get(t, {}).get('ok', 0)}, now "
                   f"{report['short'].get(t, {})})" for t in self.targets
                   if report["short"].get(t, {}).get("ok", 0) < before["short"].get(t, {}).get("ok", 0) + answers]
            had = [s["echoed"] for s in before["streams"]] or [0] * len(report["streams"])
            out += [f"{stream_bytes} more bytes echoed on stream {i} to {s['target']} (had {had[i]}, now "
                    f"{s['echoed']})" for i, s in enumerate(report["streams"])
                    if not s["ended"] and s["echoed"] < had[i] + stream_bytes]
            oldest = report["oldest_in_flight"]
            if begun_after is not None and oldest is not None and oldest < begun_after:
                out.append(f"the connections begun before the new agent was ready to conclude (oldest began "
                           f"{begun_after - oldest:.2f}s before)")
            return out

        def arrived() -> dict[str, Any] | None:
            report = self.progress()
            missing[:] = lagging(report)
            return None if missing else report

        return wait_until(arrived, lambda: "; ".join(missing), timeout, 0.05)

    def finish(self) -> dict[str, Any]:
        self.stop_file.touch()
        _, err = self.proc.communicate(timeout=60)
        if self.proc.returncode != 0:
            raise RuntimeError(f"load client failed: {err.decode()[-1500:]}")
        return json.loads(self.out.read_text())


def run_event(lab: Any, node: str, event: str, *, drain_seconds: float) -> tuple[dict[str, float], Callable[[], float]]:
    """Cause `event` on `node`: wall-clock times of what happened, and a
    call that waits for the old agent to exit and says when. Call it only
    once the load has ended: a draining agent relays the streams it holds
    until they end, so waiting for it first would hold them to the deadline."""
    log_path = lab.agent_log(node)
    old = lab.state().nodes[node].agent
    exited: list[float] = []
    watcher = threading.Thread(target=lambda: exited.append(_wait_exit(old.pid if old else None,
                                                                       drain_seconds + 30)), daemon=True)
    watcher.start()
    at = time.time()
    if event == "upgrade":
        lab.upgrade_agent(node)
    elif event == "sigterm":
        lab.restart_agent(node)
    else:
        lab.restart_agent(node, kill=True)
    returned = time.time()
    new = lab.state().nodes[node].agent
    ready = [e for e in agent_events(log_path, at) if e.get("event") == "agent serving"]
    ready_at = _iso(ready[-1]["timestamp"]) if ready else returned

    def old_exited() -> float:
        watcher.join()
        if not exited:
            raise RuntimeError(f"the old agent (pid {old.pid if old else '?'}) did not exit")
        return exited[0]

    return ({"event_at": at, "ready_at": ready_at, "returned_at": returned,
             "old_pid": old.pid if old else 0, "new_pid": new.pid if new else 0}, old_exited)


def _wait_exit(pid: int | None, timeout: float) -> float:
    if pid is None:
        return time.time()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return time.time()
        with open(f"/proc/{pid}/stat") as stat:
            if stat.read().split()[2] == "Z":
                return time.time()
        time.sleep(0.02)
    raise RuntimeError(f"the old agent (pid {pid}) is still running {timeout:.0f}s after the event")


SLOW_S = 1.0  # a new connection this slow waited for at least one SYN retransmission


def plaintext_frames(frames: list[tuple[int, int, bytes]]) -> int:
    """Frames on the underlay carrying our stream marker or an HTTP request in clear."""
    return sum(1 for _, _, payload in frames if MARKER in payload or b"GET / HTTP" in payload)


def hbone_frames(frames: list[tuple[int, int, bytes]]) -> int:
    """Frames with payload to or from 15008: shows the capture saw the cross-node traffic."""
    return sum(1 for sport, dport, payload in frames if payload and 15008 in (sport, dport))


def analyse(event: str, times: dict[str, float], load: dict[str, Any], frames: list[tuple[int, int, bytes]],
            timeout: float) -> dict[str, Any]:
    at, ready = times["event_at"], times["ready_at"]
    short = load["short"]
    failed = [s for s in short if not s["ok"]]
    streams = load["streams"]
    reset = [s for s in streams if not s["ok"]]
    during = [s for s in short if s["ok"] and s["started"] >= at - 1 and s["started"] <= ready + 1]
    report = {
        "event": event,
        "new_connections": len(short),
        "failed": len(failed),
        "failed_after_ready": sum(1 for s in failed if s["started"] >= ready),
        "failed_outside_window": sum(1 for s in failed if not at - timeout <= s["started"] <= ready),
        "failure_window_s": [round(min(s["started"] for s in failed) - at, 2),
                             round(max(s["ended"] for s in failed) - at, 2)] if failed else None,
        "failure_kinds": _count(s["error"] for s in failed),
        "failed_by_target": _count(s["target"] for s in failed),
        "slowest_ok_around_event_s": round(max((s["ended"] - s["started"] for s in during), default=0.0), 3),
        f"slower_than_{SLOW_S:g}s": sum(1 for s in short if s["ok"] and s["ended"] - s["started"] > SLOW_S),
        "streams": len(streams),
        "streams_reset": len(reset),
        "stream_errors": _count(s["error"].split(":")[0] for s in reset),
        "bytes_lost": sum(max(0, s["lost"]) for s in reset),
        "stream_bytes": sum(s["sent"] for s in streams),
        "plaintext_frames": plaintext_frames(frames),
        "hbone_frames": hbone_frames(frames),
        "ready_after_s": round(ready - at, 2),
        "old_exit_after_s": round(times["old_exit_at"] - at, 2),
        "old_exit_after_load_s": round(max(0.0, times["old_exit_at"] - times["load_ended_at"]), 2),
    }
    return report


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


def met(report: dict[str, Any]) -> bool:
    if report["plaintext_frames"] or not report["hbone_frames"]:
        return False  # plaintext seen, or the capture saw nothing to judge by
    match report["event"]:
        case "upgrade":
            return report["failed"] == 0 and report["streams_reset"] == 0
        case "sigterm":
            return report["failed_after_ready"] == 0
        case _:
            return report["failed_outside_window"] == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="node1 only, shorter load (< 1 min)")
    parser.add_argument("--node", action="append", choices=("node1", "node2"),
                        help="whose agent to upgrade/restart (repeatable; default node1 and node2, "
                             "--quick: node1)")
    parser.add_argument("--events", default=",".join(EVENTS), help=f"comma-separated, of {', '.join(EVENTS)}")
    parser.add_argument("--rate", type=float, default=50.0, help="new connections per second per target")
    parser.add_argument("--streams", type=int, default=2, help="long-lived connections per target")
    parser.add_argument("--stream-rate", type=float, default=64 * 1024, help="bytes per second per stream")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds a new connection may take")
    parser.add_argument("--drain-seconds", type=float, default=25.0,
                        help="the agents' --drain-seconds (default: the DaemonSet's, 30 s grace - 5; longer than "
                             "the streams live after the event, so the old agent relays them to their end; a "
                             "shorter one resets them at the deadline, as it should)")
    args = parser.parse_args()
    nodes = args.node or (["node1"] if args.quick else ["node1", "node2"])
    events = [e for e in args.events.split(",") if e]
    unknown = set(events) - set(EVENTS)
    if unknown:
        parser.error(f"unknown events: {', '.join(sorted(unknown))}")
    # Traffic observed on every flow before and after each event: what `rate` gives
    # in 2 s (--quick) or 4 s, and a quarter-second of each stream's bytes.
    answers = int(args.rate * (2.0 if args.quick else 4.0))
    stream_bytes = int(args.stream_rate / 4)

    from ambit.agent import log as logconf
    from ambit.lab import labconfig
    from ambit.lab.topology import Lab, LabSettings
    from ambit.lab.tour import UnderlayCapture

    logconf.configure("error")
    if os.geteuid() != 0:
        sys.exit("the bench builds a lab (namespaces, eBPF): run it as root")
    started = time.monotonic()
    bpffs_root = Path("/sys/fs/bpf") / f"{PREFIX}bench-{uuid.uuid4().hex[:6]}"
    bpffs_root.mkdir(parents=True)
    work = Path(tempfile.mkdtemp(prefix=f"{PREFIX}bench-"))
    agent_args: tuple[str, ...] = ()
    if "--drain-seconds" in _agent_help():
        agent_args = ("--drain-seconds", f"{args.drain_seconds:g}")
    settings = LabSettings(prefix=PREFIX, state_dir=work / "state", underlay_cidr=UNDERLAY, pod_supernet=PODS,
                           bpffs_root=bpffs_root, agent_args=agent_args)
    lab = Lab(settings)
    reports: list[dict[str, Any]] = []
    try:
        plan = lab.plan(labconfig.load_default())
        lab.up(labconfig.load_default())
        for node in nodes:
            for event in events:
                load = Load(lab, work, rate=args.rate, streams=args.streams, stream_rate=args.stream_rate,
                            timeout=args.timeout)
                capture = UnderlayCapture(settings.underlay_netns, plan.node("node1").underlay_port)
                try:
                    # Steady state before the event: answers and echoed bytes observed on every flow.
                    steady = load.wait_for_traffic(None, answers=answers, stream_bytes=stream_bytes)
                    times, old_exited = run_event(lab, node, event, drain_seconds=args.drain_seconds)
                    # As much traffic again through the new agent, and every connection begun
                    # before it was ready concluded (answered, failed or timed out).
                    load.wait_for_traffic(steady, answers=answers, stream_bytes=stream_bytes,
                                          begun_after=times["ready_at"], timeout=60.0 + args.timeout)
                finally:
                    result = load.finish()
                    capture.stop()
                times["load_ended_at"] = time.time()
                times["old_exit_at"] = old_exited()
                report = {"node": node, **analyse(event, times, result, capture.tcp_payloads(), args.timeout)}
                report["met"] = met(report)
                reports.append(report)
                _print(report)
    finally:
        lab.down()
        if bpffs_root.exists() and not any(bpffs_root.iterdir()):
            bpffs_root.rmdir()
        shutil.rmtree(work, ignore_errors=True)  # the load generators' reports, read above
    summary = {"bench": "upgrade", "quick": args.quick, "rate_per_target": args.rate,
               "streams_per_target": args.streams, "timeout_s": args.timeout, "events": reports,
               "seconds": round(time.monotonic() - started, 1),
               "targets": {"upgrade": "0 failed, 0 streams reset", "sigterm": "0 failed after ready",
                           "kill": "failures only in the restart window", "all": "0 plaintext frames"},
               "met": all(r["met"] for r in reports)}
    print(json.dumps(summary))


def _agent_help() -> str:
    agent = Path(sys.executable).parent / "ambit-agent"
    return subprocess.run([str(agent), "--help"], capture_output=True, text=True).stdout


def _print(r: dict[str, Any]) -> None:
    window = f"{r['failure_window_s'][0]:+.2f}s..{r['failure_window_s'][1]:+.2f}s" if r["failure_window_s"] else "-"
    print(f"{r['node']} {r['event']:>7}: {r['failed']}/{r['new_connections']} new connections failed "
          f"({r['failed_after_ready']} after ready, window {window}, {r['failure_kinds']}), "
          f"{r[f'slower_than_{SLOW_S:g}s']} slower than {SLOW_S:g}s; "
          f"{r['streams_reset']}/{r['streams']} streams reset, {r['bytes_lost']} B lost; "
          f"ready +{r['ready_after_s']}s, old exit +{r['old_exit_after_s']}s "
          f"({r['old_exit_after_load_s']}s after the load ended); plaintext frames {r['plaintext_frames']}; "
          f"met={r['met']}", flush=True)


if __name__ == "__main__":
    main()
