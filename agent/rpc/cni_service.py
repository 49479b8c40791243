"""The CNI service: what ambit-cni calls on ADD/DEL/CHECK/STATUS/GC.

Errors are mapped to gRPC status codes here and only here; the plugin maps
those to CNI error codes (cni/agent_client.py).
"""
from __future__ import annotations

import asyncio
import time
from typing import Callable

import structlog

from ambit.api.v1 import agent_pb2 as pb

from ..enrolment import Enrolment, EnrolmentError, EnrolRequest
from ..workload import AttachmentKey, PodRef
from .unary import CallContext, StatusCode

log = structlog.get_logger(__name__)

_STATUS = {
    EnrolmentError.INVALID: StatusCode.INVALID_ARGUMENT,
    EnrolmentError.NOT_FOUND: StatusCode.NOT_FOUND,
    EnrolmentError.PRECONDITION: StatusCode.FAILED_PRECONDITION,
    EnrolmentError.UNAVAILABLE: StatusCode.UNAVAILABLE,
}


def _key(attachment: pb.Attachment) -> AttachmentKey:
    return AttachmentKey(container_id=attachment.container_id, ifname=attachment.ifname)


def _pod(ref: pb.PodRef) -> PodRef:
    return PodRef(namespace=ref.namespace, name=ref.name, uid=ref.uid)


async def _refuse(context: CallContext, exc: EnrolmentError) -> None:
    await context.abort(_STATUS[exc.kind], str(exc))


GATE_WAIT_S = 3.0  # under the plugin's default 5 s timeout


class CniService:
    def __init__(self, enrolment: Enrolment, readiness: Callable[[], tuple[bool, str]],
                 observe_latency: Callable[[str, float], None] | None = None,
                 gate: asyncio.Event | None = None) -> None:
        """`gate`: set once this agent owns the records. An agent that took
        the socket over from another serves it before then; calls wait for
        the gate (briefly) instead of deciding on records it does not have."""
        self.enrolment = enrolment
        self.readiness = readiness
        self.observe = observe_latency or (lambda method, seconds: None)
        self.gate = gate

    async def _wait_gate(self, context) -> None:
        if self.gate is None or self.gate.is_set():
            return
        try:
            await asyncio.wait_for(self.gate.wait(), GATE_WAIT_S)
        except TimeoutError:
            await context.abort(StatusCode.UNAVAILABLE, "agent starting: it does not have the records yet")

    async def EnrolPod(self, request: pb.EnrolPodRequest, context) -> pb.EnrolPodResponse:
        started = time.monotonic()
        if not request.attachment.container_id or not request.attachment.ifname:
            await context.abort(StatusCode.INVALID_ARGUMENT, "attachment needs container_id and ifname")
        await self._wait_gate(context)
        ready, why = self.readiness()
        if not ready:
            # The runtime retries on "try again later": better than deciding
            # on a partial view of the cluster.
            await context.abort(StatusCode.UNAVAILABLE, f"agent not ready: {why}")
        try:
            result = await self.enrolment.enrol(EnrolRequest(
                key=_key(request.attachment), netns=request.netns, pod=_pod(request.pod),
                ips=tuple(request.ips), network=request.network))
        except EnrolmentError as exc:
            await _refuse(context, exc)
        finally:
            self.observe("EnrolPod", time.monotonic() - started)
        reply = pb.EnrolPodResponse(enrolled=result.enrolled, reason=result.reason)
        if result.workload is not None:
            reply.workload.CopyFrom(result.workload.to_proto())
        return reply

    async def ReleasePod(self, request: pb.ReleasePodRequest, context) -> pb.ReleasePodResponse:
        started = time.monotonic()
        await self._wait_gate(context)
        try:
            released = await self.enrolment.release(_key(request.attachment), request.netns, _pod(request.pod))
        except EnrolmentError as exc:
            await _refuse(context, exc)
        finally:
            self.observe("ReleasePod", time.monotonic() - started)
        return pb.ReleasePodResponse(released=released)

    async def CheckPod(self, request: pb.CheckPodRequest, context) -> pb.CheckPodResponse:
        await self._wait_gate(context)
        ready, why = self.readiness()
        if not ready:
            # "Should this pod be in the mesh?" has no answer on a partial view.
            await context.abort(StatusCode.UNAVAILABLE, f"agent not ready: {why}")
        try:
            await self.enrolment.check(_key(request.attachment), _pod(request.pod), request.netns, request.ips)
        except EnrolmentError as exc:
            await _refuse(context, exc)
        return pb.CheckPodResponse()

    async def PluginStatus(self, request: pb.PluginStatusRequest, context) -> pb.PluginStatusResponse:
        ready, reason = self.readiness()
        return pb.PluginStatusResponse(ready=ready, reason=reason)

    async def GarbageCollect(self, request: pb.GarbageCollectRequest, context) -> pb.GarbageCollectResponse:
        await self._wait_gate(context)
        try:
            released = await self.enrolment.garbage_collect([_key(a) for a in request.valid], request.network)
        except EnrolmentError as exc:
            await _refuse(context, exc)
        return pb.GarbageCollectResponse(released=[pb.Attachment(container_id=k.container_id, ifname=k.ifname)
                                                   for k in released])
