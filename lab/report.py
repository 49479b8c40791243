"""How the lab shows itself: its steps as they run (quietly, or numbered with timings), and
`ambit lab status` as a person reads it. Shared by the lab, `ambit lab up` (cli.py) and the tour."""
from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator, Protocol, Sequence, TextIO

import structlog

log = structlog.get_logger(__name__)


class StepReporter(Protocol):
    """Where `up` reports its steps (the CLI prints them with timings)."""

    def step(self, title: str) -> contextlib.AbstractContextManager[None]: ...


class QuietSteps:
    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[None]:
        log.debug("lab step", step=title)
        yield


class PrintedSteps:
    """One line per step, with the time it took when that was a second or more."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.count = 0

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[None]:
        self.count += 1
        self.out.write(f"[{self.count}] {title} ...")
        self.out.flush()
        started = time.monotonic()
        try:
            yield
        except BaseException:
            self.out.write(" failed\n")
            self.out.flush()
            raise
        elapsed = time.monotonic() - started
        self.out.write(f" done{f' ({elapsed:.1f}s)' if elapsed >= 1 else ''}\n")
        self.out.flush()


def _table(rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]


def format_status(status: Any) -> str:
    """`ambit lab status` as a person reads it."""
    lines = [f"lab {status.prefix!r}: {status.phase}{'' if status.healthy else ' (NOT healthy: see below)'}",
             f"  underlay {status.underlay_cidr} on bridge {status.underlay_bridge} in namespace "
             f"{status.underlay_netns}", "", "nodes"]
    rows = [["NAME", "NAMESPACE", "UNDERLAY IP", "POD CIDR", "AGENT", "SOCKET"]]
    for n in status.nodes:
        if n.agent_pid is None:
            agent = "not started"
        elif not n.agent_alive:
            agent = f"pid {n.agent_pid} DEAD"
        elif n.agent_ready:
            agent = f"pid {n.agent_pid} ready, {n.agent_enrolled} of {n.agent_records} pod(s) in the mesh"
        else:
            agent = f"pid {n.agent_pid} NOT READY ({n.agent_detail})"
        rows.append([n.name, n.netns + ("" if n.netns_present else " (gone)"), n.underlay_ip, n.pod_cidr, agent,
                     n.socket])
    lines += _table(rows)
    if status.ca is not None:
        ca = status.ca
        state = "not started" if ca.pid is None else f"pid {ca.pid} " + ("serving" if ca.alive else "STOPPED")
        lines += ["", f"CA  `ambit ca serve` on {ca.address}: {state} (its key only in its own mount namespace; "
                      f"log {ca.log})"]
    lines += ["", "pods"]
    rows = [["POD", "NODE", "IP", "SERVICE ACCOUNT", "AMBIENT", "WORKLOAD"]]
    for p in status.pods:
        if not p.workloads:
            workload = "- (client only)"
        else:
            workload = " ".join(p.workloads) + (f" (pid {p.workload_pid})" if p.workload_alive
                                                else f" (pid {p.workload_pid} DEAD)")
        rows.append([p.key, p.node, (p.ip or "-") + ("" if p.netns_present else " (netns gone)"),
                     p.service_account, "yes" if p.ambient else "no", workload])
    lines += _table(rows)
    if status.services:
        lines += ["", "services (ClusterIPs are answered by ambit's proxy once capture is on)"]
        rows = [["SERVICE", "CLUSTER IP", "PORTS", "ENDPOINTS"]]
        rows += [[s.key, s.cluster_ip or "None", ", ".join(s.ports), ", ".join(s.endpoints) or "-"]
                 for s in status.services]
        lines += _table(rows)
    if status.policies:
        lines += ["", "policies (handed to the agent as written)"] + [f"  {p}" for p in status.policies]
    lines += ["", f"state {status.state_file}; objects with addresses {status.cluster_file}"]
    return "\n".join(lines)
