"""Records are a cache, not the truth: square them with discovery and the
kernel (docs/lifecycle.md, "Drift").

- A capture the kernel kept but no record owns (records lost or corrupt)
  gets its record rebuilt from the kernel plus discovery; it is never
  detached for want of a record.
- A pod of this node that discovery puts in the mesh but no record covers
  (running before ambit was chained, or missed during a re-chain) is found
  in the kernel (podscan.py) and enrolled.
- A record in the mesh for a pod that discovery says is out is released
  from capture (`Enrolment.set_membership`).
What cannot be repaired is reported (`ambitctl status`) and counted
(ambit_pods_not_captured).
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from ..discovery.model import KIND_POD
from ..enrolment import Enrolment, EnrolmentError
from ..workload import ADOPTED, REBUILT, PodRef
from . import podscan

log = structlog.get_logger(__name__)

PERIOD_S = 30.0  # a full check even when discovery says nothing changed
SETTLE_S = 0.2   # a burst of pod events is one check


@dataclass(frozen=True)
class DriftReport:
    """The last check: pods this node should capture and what is off."""

    expected: int = 0                     # pods of this node in the mesh, with an address
    not_captured: tuple[str, ...] = ()    # "ns/name: why", pods expected but not captured
    adopted: tuple[str, ...] = ()         # enrolled by this check without a CNI ADD
    released: tuple[str, ...] = ()        # records taken out of the mesh by this check
    checked_at: float = 0.0


class DriftRepair:
    """Runs the checks: once at start, then on this node's pod changes and every PERIOD_S."""

    def __init__(self, enrolment: Enrolment, node_name: str, mesh: Any | None,
                 on_report: Callable[[DriftReport], None] = lambda report: None,
                 on_adopted: Callable[[str], None] = lambda origin: None) -> None:
        """`mesh` is the agent's MeshRuntime (None without discovery: then
        only lost records are rebuilt, and every captured pod stays)."""
        self.enrolment = enrolment
        self.node_name = node_name
        self.mesh = mesh
        self.report = DriftReport()
        self._on_report = on_report
        self._on_adopted = on_adopted
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None

    # -- records lost: rebuild from the kernel --------------------------------------
    async def rebuild(self, orphans: list[Any]) -> int:
        """Records for captures that outlived them (`Enrolment.reconcile`'s
        orphans). The pod behind each veth is read from the kernel; one that
        is not the captured addresses' pod loses that capture."""
        if not orphans:
            return 0
        found = await asyncio.to_thread(podscan.find_by_host_veth, [c.host_ifindex for c in orphans])
        rebuilt = 0
        for capture in orphans:
            captured = {str(ip) for ip in capture.pod_ips}
            pod = found.get(capture.host_ifindex)
            if pod is None or not captured <= set(pod.addresses):
                await self.enrolment.drop_capture(capture, "its veth is not the captured addresses' pod any more")
                continue
            ref, in_mesh, reason = self._attribute(pod.addresses)
            try:
                if await self.enrolment.adopt(ref, pod.netns, pod.link, pod.pod_ips(), REBUILT, reason,
                                              in_mesh=in_mesh):
                    rebuilt += 1
                    self._on_adopted(REBUILT)
            except EnrolmentError as exc:
                log.error("cannot rebuild a lost record", host_ifindex=capture.host_ifindex, error=str(exc))
        log.info("lost records rebuilt from the kernel", rebuilt=rebuilt, orphans=len(orphans))
        return rebuilt

    def _attribute(self, addresses: tuple[str, ...]) -> tuple[PodRef, bool | None, str]:
        """Who owns these addresses per discovery, and whether it belongs in
        the mesh. An owner discovery does not know keeps its capture: a live
        pod is never detached for want of an answer (fail closed)."""
        if self.mesh is None:
            return PodRef(), True, "no discovery: every pod on the chain is enrolled"
        for address in addresses:
            info = self.mesh.state.pod_by_ip(address)
            if info is not None:
                in_mesh, reason = self.mesh.state.ambient_decision(info)
                return PodRef(info.namespace, info.name, info.uid), in_mesh, reason
        return PodRef(), True, "not in discovery (yet): kept captured until it is"

    # -- pods expected in the mesh ----------------------------------------------------
    async def check(self) -> DriftReport:
        """One pass over this node's pods in discovery."""
        if self.mesh is None or not self.mesh.synced or self.enrolment.frozen:
            return self.report
        expected, missing, released = [], [], []
        for info in self.mesh.state.pods():
            if (info.node_name != self.node_name or not info.ips or info.host_network or info.terminated
                    or info.deletion):
                continue
            in_mesh, reason = self.mesh.state.ambient_decision(info)
            ref = PodRef(info.namespace, info.name, info.uid)
            records = [w for ip in info.ips if (w := self.enrolment.workload_by_ip(ip)) is not None]
            if not in_mesh:
                if any(w.in_mesh for w in records) and await self._set_membership(ref, False, reason):
                    released.append(f"{info.namespace}/{info.name}")
                continue
            expected.append(info)
            if any(w.in_mesh for w in records):
                continue
            if records:  # recorded outside the mesh (labels changed while no agent ran)
                if not await self._set_membership(ref, True, reason):
                    missing.append((info, "recorded, but its capture could not be attached"))
                continue
            missing.append((info, ""))
        adopted, not_captured = [], []
        if any(not why for _, why in missing):
            wanted = [ip for info, why in missing if not why for ip in info.ips]
            found = await asyncio.to_thread(podscan.find_pods, wanted)
            for info, why in missing:
                if why:
                    not_captured.append(f"{info.namespace}/{info.name}: {why}")
                    continue
                kernel = next((found[ip] for ip in info.ips if ip in found), None)
                if kernel is None:
                    not_captured.append(f"{info.namespace}/{info.name}: no pod interface of this node holds "
                                        f"{', '.join(info.ips)}")
                    continue
                ref = PodRef(info.namespace, info.name, info.uid)
                try:
                    workload = await self.enrolment.adopt(ref, kernel.netns, kernel.link, kernel.pod_ips(info.ips),
                                                          ADOPTED, "in the mesh per discovery, no CNI ADD seen")
                except EnrolmentError as exc:
                    not_captured.append(f"{info.namespace}/{info.name}: {exc}")
                    continue
                if workload is not None and workload.in_mesh:
                    adopted.append(f"{info.namespace}/{info.name}")
                    self._on_adopted(ADOPTED)
                else:
                    not_captured.append(f"{info.namespace}/{info.name}: not captured after adoption")
        else:
            not_captured = [f"{i.namespace}/{i.name}: {why}" for i, why in missing]
        self.report = DriftReport(expected=len(expected), not_captured=tuple(not_captured), adopted=tuple(adopted),
                                  released=tuple(released), checked_at=time.time())
        if adopted or released or not_captured:
            log.info("drift", expected=len(expected), adopted=adopted, released=released, not_captured=not_captured)
        self._on_report(self.report)
        return self.report

    async def _set_membership(self, ref: PodRef, in_mesh: bool, reason: str) -> bool:
        try:
            return await self.enrolment.set_membership(ref, in_mesh, reason) > 0
        except EnrolmentError:
            return False

    # -- running -----------------------------------------------------------------------
    def start(self) -> None:
        if self.mesh is None:
            return
        self._unsubscribe = self.mesh.state.subscribe(self._on_change)
        self._task = asyncio.get_running_loop().create_task(self._run())

    def _on_change(self, kind: str, event: str, old: Any, new: Any) -> None:
        pod = new or old
        if kind == KIND_POD and getattr(pod, "node_name", "") == self.node_name:
            self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                await self.check()
            except Exception:  # a bug must not end the checks
                log.exception("drift check failed")
            try:
                await asyncio.wait_for(self._wake.wait(), PERIOD_S)
                await asyncio.sleep(SETTLE_S)
            except TimeoutError:
                pass
            self._wake.clear()

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
