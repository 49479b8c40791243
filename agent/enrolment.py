"""Pods in and out of the mesh: the agent's side of CNI ADD/DEL/CHECK/GC.

Every decision is checked against the kernel (the pod's veth peer, the
namespace) and recorded on disk; the capture backend does the datapath work.
Operations on one attachment are serialized; different pods proceed in
parallel, with kernel calls on worker threads.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Protocol

import structlog

from .datapath.podlink import PodLink, PodLinkError, host_link_exists, inspect_pod_link
from .enrolment_records import StateStore
from .workload import ADOPTED, ADOPTED_PREFIX, FROM_CNI, OUTSIDE_MESH, AttachmentKey, PodRef, Workload

log = structlog.get_logger(__name__)


class EnrolmentError(Exception):
    """A refusal with a kind the RPC layer maps to a gRPC status."""

    INVALID = "invalid"
    NOT_FOUND = "not-found"
    PRECONDITION = "precondition"
    UNAVAILABLE = "unavailable"  # frozen for a hand-over: try again (at the successor)

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Selector(Protocol):
    """Decides whether a pod belongs to the mesh."""

    def decide(self, pod: PodRef) -> tuple[bool, str]: ...


class EnrolEveryPod:
    """Without discovery every pod on the chain is enrolled."""

    def decide(self, pod: PodRef) -> tuple[bool, str]:
        return True, "no discovery configured: every pod on this CNI chain is enrolled"


class CaptureBackend(Protocol):
    """The datapath work for one pod; methods run on worker threads."""

    name: str

    def attach(self, workload: Workload, link: PodLink) -> str: ...

    def detach(self, workload: Workload) -> None: ...

    def verify(self, workload: Workload) -> str | None: ...

    def reconcile(self, workloads: list[Workload]) -> list[Any]:
        """Returns the captures no record owns whose veth is still there."""
        ...

    def detach_capture(self, capture: Any) -> None: ...


class RecordOnly:
    """Records pods without touching their traffic (`--capture none`)."""

    name = "none"

    def attach(self, workload: Workload, link: PodLink) -> str:
        return "recorded"

    def detach(self, workload: Workload) -> None:
        return None

    def verify(self, workload: Workload) -> str | None:
        return None

    def reconcile(self, workloads: list[Workload]) -> list[Any]:
        return []

    def detach_capture(self, capture: Any) -> None:
        return None


@dataclass(frozen=True)
class EnrolRequest:
    key: AttachmentKey
    netns: str
    pod: PodRef
    ips: tuple[str, ...]
    network: str


@dataclass(frozen=True)
class EnrolResult:
    enrolled: bool
    reason: str
    workload: Workload | None


def _normalise_ips(ips: Iterable[str]) -> tuple[str, ...]:
    out = []
    for ip in ips:
        try:
            out.append(str(ipaddress.ip_interface(ip)))
        except ValueError:
            raise EnrolmentError(EnrolmentError.INVALID, f"invalid pod address {ip!r}") from None
    if not out:
        raise EnrolmentError(EnrolmentError.INVALID, "the pod has no addresses")
    return tuple(out)


class Enrolment:
    def __init__(self, store: StateStore, backend: CaptureBackend, selector: Selector | None = None,
                 on_capture_failure: Callable[[], None] | None = None) -> None:
        self.store = store
        self.backend = backend
        self.selector = selector or EnrolEveryPod()
        self._on_capture_failure = on_capture_failure or (lambda: None)
        self._workloads: dict[AttachmentKey, Workload] = {}
        self._by_ip: dict[str, Workload] = {}  # the proxy asks per connection: no scans
        self._locks: dict[AttachmentKey, asyncio.Lock] = {}
        self._frozen: str | None = None  # why no record may change (a successor takes over)
        self._changing_now = 0
        self._quiet = asyncio.Event()
        self._quiet.set()

    # -- bookkeeping -------------------------------------------------------
    def workloads(self) -> list[Workload]:
        return sorted(self._workloads.values(), key=lambda w: (w.pod.namespace, w.pod.name, w.key.container_id))

    def get(self, key: AttachmentKey) -> Workload | None:
        return self._workloads.get(key)

    def enrolled_count(self) -> int:
        return sum(1 for w in self._workloads.values() if w.in_mesh)

    def workload_by_ip(self, ip: str) -> Workload | None:
        """The recorded pod that owns `ip`."""
        return self._by_ip.get(ip)

    def _put(self, workload: Workload) -> None:
        self._pop(workload.key)
        self._workloads[workload.key] = workload
        for ip in workload.addresses:
            self._by_ip[ip] = workload

    def _pop(self, key: AttachmentKey) -> None:
        old = self._workloads.pop(key, None)
        if old is None:
            return
        for ip in old.addresses:
            if self._by_ip.get(ip) is old:
                del self._by_ip[ip]
                # Rare: another record still claims the address (a stale one
                # about to be released); keep answering with it.
                for other in self._workloads.values():
                    if ip in other.addresses:
                        self._by_ip[ip] = other
                        break

    def _lock(self, key: AttachmentKey) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    def _forget_lock(self, key: AttachmentKey) -> None:
        lock = self._locks.get(key)
        if lock is not None and not lock.locked():
            del self._locks[key]

    # -- one agent changes records at a time --------------------------------
    @property
    def frozen(self) -> bool:
        return self._frozen is not None

    async def freeze(self, reason: str) -> None:
        """Change no record or capture from now on; returns once the changes
        under way have finished (they run to their end)."""
        self._frozen = reason
        await self._quiet.wait()
        log.info("enrolment frozen", reason=reason)

    def unfreeze(self) -> None:
        self._frozen = None
        log.info("enrolment unfrozen")

    @contextlib.asynccontextmanager
    async def _changing(self) -> AsyncIterator[None]:
        if self._frozen is not None:
            raise EnrolmentError(EnrolmentError.UNAVAILABLE, f"this agent is handing over: {self._frozen}")
        self._changing_now += 1
        self._quiet.clear()
        try:
            yield
        finally:
            self._changing_now -= 1
            if not self._changing_now:
                self._quiet.set()

    # -- CNI operations ----------------------------------------------------
    async def _decide(self, pod: PodRef) -> tuple[bool, str]:
        ensure_known = getattr(self.selector, "ensure_known", None)
        if ensure_known is not None:
            await ensure_known(pod)  # an API read off the event loop, when the watch lags the ADD
        return self.selector.decide(pod)

    async def enrol(self, req: EnrolRequest) -> EnrolResult:
        """CNI ADD. Every pod is recorded (so a later label change can bring
        it into the mesh live); only pods the selector wants are captured."""
        async with self._changing():
            return await self._enrol(req)

    async def _enrol(self, req: EnrolRequest) -> EnrolResult:
        ips = _normalise_ips(req.ips)
        wanted, reason = await self._decide(req.pod)
        started = time.monotonic()
        async with self._lock(req.key):
            try:
                link = await asyncio.to_thread(inspect_pod_link, req.netns, req.key.ifname)
                inspected = time.monotonic()
            except PodLinkError as exc:
                if not wanted:
                    # Not ours to capture: never fail a pod's start for it.
                    log.info("pod not in the mesh (and its link cannot be read)", pod=str(req.pod),
                             attachment=str(req.key), reason=reason, error=str(exc))
                    return EnrolResult(False, reason, None)
                kind = {PodLinkError.NETNS_MISSING: EnrolmentError.NOT_FOUND,
                        PodLinkError.NO_INTERFACE: EnrolmentError.NOT_FOUND}.get(exc.reason,
                                                                                EnrolmentError.PRECONDITION)
                log.warning("cannot enrol pod", pod=str(req.pod), attachment=str(req.key), error=str(exc))
                raise EnrolmentError(kind, str(exc)) from None
            refusal = (_foreign_addresses(ips, link, req.key.ifname)
                       or await self._claimed_by_live_pod(req.key, ips, req.netns))
            if refusal is not None:
                # Enrolling an address binds it to this veth (and the proxy
                # gives its traffic this pod's identity): never for an address
                # the pod does not have, never away from a live owner.
                log.warning("enrolment refused" if wanted else "pod not recorded", pod=str(req.pod),
                            attachment=str(req.key), prev_result=list(ips), reason=refusal[1])
                if not wanted:
                    return EnrolResult(False, f"{reason}; not recorded: {refusal[1]}", None)
                raise EnrolmentError(*refusal)
            await self._drop_conflicting(req.key, ips, req.netns)
            workload = Workload(key=req.key, netns=req.netns, pod=req.pod, ips=ips, network=req.network,
                                host_veth=link.host_ifname, host_veth_ifindex=link.host_ifindex,
                                container_ifindex=link.container_ifindex, enrolled_at=time.time(),
                                capture=OUTSIDE_MESH)
            if wanted:
                workload = await self._capture(workload, link)
            captured = time.monotonic()
            self._remember(workload)
            log.info("pod enrolled" if wanted else "pod recorded, not in the mesh", pod=str(req.pod),
                     attachment=str(req.key), ips=list(ips), host_veth=link.host_ifname,
                     host_ifindex=link.host_ifindex, capture=workload.capture, reason=reason,
                     inspect_ms=round((inspected - started) * 1000, 1),
                     capture_ms=round((captured - inspected) * 1000, 1),
                     total_ms=round((time.monotonic() - started) * 1000, 1))
        self._forget_lock(req.key)
        return EnrolResult(wanted, reason, workload)

    async def _capture(self, workload: Workload, link: PodLink) -> Workload:
        try:
            capture = await asyncio.to_thread(self.backend.attach, workload, link)
        except Exception as exc:
            self._on_capture_failure()
            log.error("capture failed; pod not enrolled", pod=str(workload.pod), attachment=str(workload.key),
                      host_veth=link.host_ifname, error=str(exc))
            await asyncio.to_thread(self.backend.detach, workload)
            raise EnrolmentError(EnrolmentError.PRECONDITION,
                                 f"could not capture traffic on {link.host_ifname}: {exc}") from None
        return replace(workload, capture=capture)

    def _remember(self, workload: Workload) -> None:
        self.store.save(workload)
        self._put(workload)

    async def set_membership(self, pod: PodRef, in_mesh: bool, reason: str) -> int:
        """A label change moved a running pod in or out of the mesh: capture
        or release its recorded attachments live. Returns how many changed."""
        async with self._changing():
            return await self._set_membership(pod, in_mesh, reason)

    async def _set_membership(self, pod: PodRef, in_mesh: bool, reason: str) -> int:
        changed = 0
        for workload in [w for w in self._workloads.values() if _same_pod(w.pod, pod)]:
            async with self._lock(workload.key):
                current = self._workloads.get(workload.key)
                if current is None or current.in_mesh == in_mesh:
                    continue
                if in_mesh:
                    try:
                        link = await asyncio.to_thread(inspect_pod_link, current.netns, current.key.ifname)
                        updated = await self._capture(current, link)
                    except (PodLinkError, EnrolmentError) as exc:
                        log.error("cannot bring pod into the mesh", pod=str(pod), error=str(exc))
                        continue
                else:
                    await asyncio.to_thread(self.backend.detach, current)
                    updated = replace(current, capture=OUTSIDE_MESH)
                self._remember(updated)
                changed += 1
                log.info("pod joined the mesh" if in_mesh else "pod left the mesh", pod=str(pod),
                         attachment=str(current.key), reason=reason, capture=updated.capture)
            self._forget_lock(workload.key)
        return changed

    async def _claimed_by_live_pod(self, key: AttachmentKey, ips: tuple[str, ...],
                                   netns: str) -> tuple[str, str] | None:
        """A refusal when another attachment whose pod still runs (its
        namespace and host veth exist) owns one of the addresses: a claim
        alone never takes an address from a live pod. The same interface
        under a key of the agent's own is that pod, not another."""
        for ip in sorted({ip.split("/")[0] for ip in ips}):
            owner = self._by_ip.get(ip)
            if owner is None or owner.key == key or _renamed(owner, key, netns):
                continue
            if await asyncio.to_thread(_still_there, owner):
                return (EnrolmentError.PRECONDITION,
                        f"address {ip} belongs to live pod {owner.pod} ({owner.key}, host veth {owner.host_veth}); "
                        "it is released when that pod's DEL (or the agent's garbage collection) removes it")
        return None

    async def _drop_conflicting(self, key: AttachmentKey, ips: tuple[str, ...], netns: str = "") -> None:
        """An address still recorded for another attachment belongs to a pod
        that went away without a DEL (its namespace or veth is gone, see
        _claimed_by_live_pod): release it so capture state is never shared
        between two pods. The same interface recorded under a key of the
        agent's own (adopted or rebuilt) is the same pod: its record takes
        the runtime's key, and its capture is never interrupted."""
        addresses = {ip.split("/")[0] for ip in ips}
        while True:
            stale = next((self._by_ip[ip] for ip in addresses
                          if ip in self._by_ip and self._by_ip[ip].key != key), None)
            if stale is None:
                return
            if _renamed(stale, key, netns):
                log.info("the runtime names an adopted pod: its record takes the runtime's key",
                         old=str(stale.key), attachment=str(key), pod=str(stale.pod))
                self.store.delete(stale.key)
                self._pop(stale.key)
                continue
            log.warning("address reused: releasing the stale attachment", stale=str(stale.key),
                        pod=str(stale.pod), ips=sorted(addresses & set(stale.addresses)))
            await self._release_locked(stale)

    async def release(self, key: AttachmentKey, netns: str = "", pod: PodRef | None = None) -> bool:
        """CNI DEL. A pod the agent adopted (its record has a key of the
        agent's own) is found by its namespace or pod uid."""
        async with self._changing():
            if key not in self._workloads:
                own = self._own_record_for(key, netns, pod)
                if own is not None:
                    key = own.key
            return await self._release(key)

    def _own_record_for(self, key: AttachmentKey, netns: str, pod: PodRef | None) -> Workload | None:
        """The adopted or rebuilt record of the runtime's attachment `key`."""
        for workload in self._workloads.values():
            if workload.origin == FROM_CNI or workload.key.ifname != key.ifname:
                continue
            if (netns and workload.netns == netns) or (pod and pod.uid and workload.pod.uid == pod.uid):
                return workload
        return None

    async def _release(self, key: AttachmentKey) -> bool:
        async with self._lock(key):
            workload = self._workloads.get(key)
            if workload is None:
                log.debug("nothing to release", attachment=str(key))
                released = False
            else:
                await self._release_locked(workload)
                released = True
        self._forget_lock(key)
        return released

    async def _release_locked(self, workload: Workload) -> None:
        if workload.in_mesh:
            await asyncio.to_thread(self.backend.detach, workload)
        self.store.delete(workload.key)
        self._pop(workload.key)
        log.info("pod released", pod=str(workload.pod), attachment=str(workload.key), host_veth=workload.host_veth)

    async def check(self, key: AttachmentKey, pod: PodRef, netns: str, ips: Iterable[str]) -> None:
        workload = self._workloads.get(key) or self._own_record_for(key, netns, pod)
        if workload is None or not workload.in_mesh:
            wanted, _ = await self._decide(pod)
            if wanted:
                raise EnrolmentError(EnrolmentError.PRECONDITION,
                                     f"pod {pod} ({key}) should be in the mesh but is not enrolled")
            return
        problems = []
        given = {ip.split("/")[0] for ip in ips}
        if given and given != set(workload.addresses):
            problems.append(f"addresses {sorted(given)} differ from enrolled {list(workload.addresses)}")
        if netns and netns != workload.netns:
            problems.append(f"netns {netns} differs from enrolled {workload.netns}")
        if not await asyncio.to_thread(host_link_exists, workload.host_veth_ifindex, workload.host_veth):
            problems.append(f"host veth {workload.host_veth} (index {workload.host_veth_ifindex}) is gone")
        else:
            issue = await asyncio.to_thread(self.backend.verify, workload)
            if issue:
                problems.append(issue)
        if problems:
            raise EnrolmentError(EnrolmentError.PRECONDITION, "; ".join(problems))

    async def garbage_collect(self, valid: Iterable[AttachmentKey], network: str) -> list[AttachmentKey]:
        keep = set(valid)
        # Adopted and rebuilt records are not the runtime's: it cannot list
        # them as valid. DEL (matched by namespace) or drift repair ends them.
        stale = [w for w in self._workloads.values() if w.origin == FROM_CNI
                 and w.key not in keep and (not network or not w.network or w.network == network)]
        async with self._changing():
            for workload in stale:
                await self._release(workload.key)
        if stale:
            log.info("garbage collected", released=[str(w.key) for w in stale], network=network)
        return [w.key for w in stale]

    # -- pods no CNI ADD told us about ----------------------------------------
    async def adopt(self, pod: PodRef, netns: str, link: PodLink, ips: tuple[str, ...], origin: str, reason: str,
                    in_mesh: bool | None = None) -> Workload | None:
        """Record a pod found in the kernel (origin ADOPTED: it was running
        before ambit was chained; REBUILT: its capture outlived its record)
        under a key of the agent's own, and capture it if it belongs in the
        mesh (`in_mesh`, else the selector decides). `ips`: the pod's
        addresses (CIDR form) among those on its interface. None when one of
        them is recorded already (nothing to do)."""
        async with self._changing():
            ips = _normalise_ips(ips)
            if any(self._by_ip.get(a.split("/")[0]) for a in ips):
                return None
            identity = pod.uid or str(os.stat(netns).st_ino)
            key = AttachmentKey(f"{ADOPTED_PREFIX}{identity}", link.container_ifname)
            if in_mesh is None:
                in_mesh, reason = await self._decide(pod)
            async with self._lock(key):
                workload = Workload(key=key, netns=netns, pod=pod, ips=ips, network="",
                                    host_veth=link.host_ifname, host_veth_ifindex=link.host_ifindex,
                                    container_ifindex=link.container_ifindex, enrolled_at=time.time(),
                                    capture=OUTSIDE_MESH, origin=origin)
                if in_mesh:
                    workload = await self._capture(workload, link)
                self._remember(workload)
            self._forget_lock(key)
            log.info("pod adopted" if origin == ADOPTED else "record rebuilt", pod=str(pod), attachment=str(key),
                     netns=netns, ips=list(workload.addresses), host_veth=link.host_ifname, capture=workload.capture,
                     reason=reason)
            return workload

    async def drop_capture(self, capture: Any, why: str) -> None:
        """Remove a capture no record owns and no pod of ours explains."""
        async with self._changing():
            log.info("removing a capture no pod owns", host_ifindex=capture.host_ifindex,
                     pod_ips=[str(ip) for ip in capture.pod_ips], reason=why)
            await asyncio.to_thread(self.backend.detach_capture, capture)

    # -- restart -------------------------------------------------------------
    async def reconcile(self) -> list[Any]:
        """Re-adopt the records of live pods and release the rest. Returns the
        host veths still captured that no record owns (records lost): their
        pods keep their capture; lifecycle/drift.py rebuilds their records."""
        adopted, released = 0, 0
        for workload in self.store.load_all():
            alive = await asyncio.to_thread(_still_there, workload)
            self._put(workload)
            if alive:
                adopted += 1
            else:
                await self._release(workload.key)
                released += 1
        orphans = await asyncio.to_thread(self.backend.reconcile, [w for w in self.workloads() if w.in_mesh])
        log.info("reconciled enrolment records", adopted=adopted, released=released, capture=self.backend.name,
                 captured_without_record=len(orphans))
        return orphans


def _foreign_addresses(ips: tuple[str, ...], link: PodLink, ifname: str) -> tuple[str, str] | None:
    """A refusal when prevResult names addresses the pod's interface does
    not have: a chain bug or a forged result, never to be bound to this
    veth."""
    on_link = {a.split("/")[0] for a in link.addresses}
    foreign = sorted({ip.split("/")[0] for ip in ips} - on_link)
    if not foreign:
        return None
    return (EnrolmentError.INVALID,
            f"prevResult addresses {', '.join(foreign)} are not on the pod's interface {ifname} "
            f"(it has {', '.join(sorted(on_link)) or 'none'}): not enrolling an address the pod does not have")


def _renamed(recorded: Workload, key: AttachmentKey, netns: str) -> bool:
    """Whether the runtime's attachment `key` in `netns` is `recorded`, an
    adopted or rebuilt record (a key of the agent's own) of the same interface."""
    return recorded.origin != FROM_CNI and recorded.netns == netns and recorded.key.ifname == key.ifname


def _same_pod(a: PodRef, b: PodRef) -> bool:
    if a.uid and b.uid:
        return a.uid == b.uid
    return (a.namespace, a.name) == (b.namespace, b.name)


def _still_there(workload: Workload) -> bool:
    return os.path.exists(workload.netns) and host_link_exists(workload.host_veth_ifindex, workload.host_veth)
