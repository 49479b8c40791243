"""The lab as the machine shows it, whatever the state file says: its namespaces, its processes
(the AMBIT_LAB marker, or running inside a lab namespace), its links, and what a crashed run left.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from ambit.agent.netlink import iproute
from ambit.agent.netns import create_netns as _create_netns

from .node import netns_path
from .plan import LabSettings
from .statefile import ProcessRecord


MARKER_ENV = "AMBIT_LAB"

def create_netns(name: str) -> str:
    """A named network namespace with loopback up, made without forking:
    a forked copy of this process would run the lab's signal handlers (and
    its teardown) on Ctrl-C."""
    path = _create_netns(name)
    with iproute(path) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
    return path


def process_start_time(pid: int) -> int | None:
    """Start time of a live (not zombie) process, None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _ancestors() -> set[int]:
    """This process and its ancestors: never killed by a scan (think of
    `ambit lab down` typed in a shell opened with `ambit lab exec`)."""
    found = {os.getpid()}
    pid = os.getppid()
    while pid > 1 and pid not in found:
        found.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError):
            break
    return found


def lab_namespaces(prefix: str) -> tuple[str, ...]:
    try:
        return tuple(sorted(n for n in os.listdir("/var/run/netns") if n.startswith(prefix)))
    except FileNotFoundError:
        return ()


def lab_processes(prefix: str) -> tuple[int, ...]:
    """Processes carrying the lab's marker, or living in one of its namespaces."""
    marker = f"{MARKER_ENV}={prefix}".encode()
    inside: set[tuple[int, int]] = set()
    for name in lab_namespaces(prefix):
        with contextlib.suppress(OSError):
            st = os.stat(netns_path(name))
            inside.add((st.st_dev, st.st_ino))
    spared = _ancestors()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in spared:
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                marked = marker in f.read().split(b"\0")
            if not marked:
                st = os.stat(f"/proc/{pid}/ns/net")
                marked = (st.st_dev, st.st_ino) in inside
        except OSError:
            continue
        if marked and process_start_time(pid) is not None:
            found.append(pid)
    return tuple(sorted(found))


def lab_root_links(prefix: str) -> tuple[str, ...]:
    """Lab links in the machine's own namespace: the lab never makes any, so
    one here is debris (e.g. a veth stranded by a crash mid-move)."""
    with IPRoute() as ipr:
        return tuple(sorted(name for link in ipr.get_links()
                            if (name := link.get("ifname") or "").startswith(prefix)))


def send_signal(pid: int, sig: int) -> None:
    """Signal the process and, when it leads one, its process group (the lab
    starts agents and workloads in their own sessions)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


@dataclass(frozen=True)
class Leftovers:
    """What a lab run left behind, found by scanning rather than trusting the state."""

    namespaces: tuple[str, ...] = ()
    processes: tuple[int, ...] = ()
    links: tuple[str, ...] = ()
    bpffs_dirs: tuple[str, ...] = ()
    state_file: str | None = None

    def __bool__(self) -> bool:
        return bool(self.namespaces or self.processes or self.links or self.bpffs_dirs or self.state_file)

    def describe(self) -> str:
        parts = []
        if self.state_file:
            parts.append(f"state file {self.state_file}")
        if self.namespaces:
            parts.append(f"{len(self.namespaces)} namespace(s) ({', '.join(self.namespaces[:4])}"
                         f"{', ...' if len(self.namespaces) > 4 else ''})")
        if self.processes:
            parts.append(f"{len(self.processes)} process(es) (pid {', '.join(map(str, self.processes[:6]))})")
        if self.links:
            parts.append(f"link(s) {', '.join(self.links)}")
        if self.bpffs_dirs:
            parts.append(f"pinned eBPF dir(s) {', '.join(self.bpffs_dirs)}")
        return "; ".join(parts)


def find_leftovers(settings: LabSettings) -> Leftovers:
    bpffs = ()
    if settings.bpffs_root.is_dir():
        bpffs = tuple(sorted(str(p) for p in settings.bpffs_root.glob(f"{settings.prefix}*")))
    return Leftovers(namespaces=lab_namespaces(settings.prefix), processes=lab_processes(settings.prefix),
                     links=lab_root_links(settings.prefix), bpffs_dirs=bpffs,
                     state_file=str(settings.state_file) if settings.state_file.exists() else None)


def require_root() -> None:
    if os.geteuid() != 0:
        raise PermissionError("the lab creates network namespaces and runs processes in them: run it as root")


def is_alive(record: ProcessRecord) -> bool:
    """The recorded process still runs (the same pid and start time, not a reused pid)."""
    return process_start_time(record.pid) == record.start_time


class ChildProcesses:
    """The processes one Lab object started, so they are reaped (no zombies), and
    the way every lab process is stopped: SIGTERM, a grace, then SIGKILL."""

    def __init__(self, log: Any) -> None:
        self._log = log
        self._children: dict[int, subprocess.Popen] = {}

    def add(self, proc: subprocess.Popen) -> None:
        self._children[proc.pid] = proc

    def stop(self, records: Sequence[ProcessRecord | None]) -> int:
        """Stop recorded processes that are still the ones we started."""
        return self.stop_pids([r.pid for r in records if r is not None and is_alive(r)])

    def stop_pids(self, pids: Sequence[int], grace: float = 8.0) -> int:
        """SIGTERM, then SIGKILL what is left after `grace` seconds."""
        for pid in pids:
            send_signal(pid, signal.SIGTERM)
        remaining = self.wait_gone(pids, grace)
        for pid in remaining:
            self._log.warning("process ignored SIGTERM, killing it", pid=pid)
            send_signal(pid, signal.SIGKILL)
        self.wait_gone(remaining, 5.0)
        return len(pids)

    def wait_gone(self, pids: Sequence[int], timeout: float) -> list[int]:
        """The pids still running after `timeout` (polling /proc: a process we
        did not start cannot be waited for)."""
        deadline = time.monotonic() + timeout
        while True:
            for pid in pids:
                self.reap(pid)
            remaining = [pid for pid in pids if process_start_time(pid) is not None]
            if not remaining or time.monotonic() >= deadline:
                return remaining
            time.sleep(0.02)

    def reap(self, pid: int) -> None:
        child = self._children.get(pid)
        if child is not None:
            if child.poll() is not None:
                del self._children[pid]
            return
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
