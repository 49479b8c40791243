"""Read-only views for ambitctl."""
from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any, Callable


from ambit.api.v1 import agent_pb2 as pb

from .. import __version__, eventloop
from ..discovery.report import NO_DISCOVERY, DiscoveryReport
from ..datapath import constants
from ..enrolment import Enrolment
from ..proxy.connections import ConnectionInfo
from ..proxy.trace import trace_connection
from ..rtnl_query import RtnlQuery
from .unary import StatusCode


@dataclass(frozen=True)
class ProxyView:
    """What the Debug service may read of the running proxy."""

    capture: str
    proxy_netns: str
    listeners: Callable[[], list[str]]
    connections: Callable[[], tuple[ConnectionInfo, ...]]
    failed_closed: Callable[[], dict[str, int]] = dict  # refusals where it could not decide, by reason
    verdicts: Callable[[], dict[str, int]] = dict


def _capture_counts(verdicts: dict[str, int]) -> dict[str, Any]:
    return dict(capture_verdicts=verdicts,
                spoofed_packets_dropped=sum(verdicts.get(v, 0) for v in constants.SOURCE_BINDING_DROPS),
                ipv6_tcp_dropped=sum(verdicts.get(v, 0) for v in constants.IPV6_DROPS))


def _node_addresses() -> set[str]:
    """The agent's (the node's) own addresses."""
    with RtnlQuery() as query:
        return query.own_addresses()


NO_PROXY = ProxyView(capture="none", proxy_netns="", listeners=lambda: [], connections=lambda: ())


class DebugService:
    def __init__(self, enrolment: Enrolment, node: str, started_at: float,
                 readiness: Callable[[], tuple[bool, str]], proxy: Callable[[], ProxyView] = lambda: NO_PROXY,
                 mesh: Callable[[], Any] = lambda: None,
                 discovery: Callable[[], DiscoveryReport] = lambda: NO_DISCOVERY,
                 lifecycle: Callable[[], tuple[str, int]] = lambda: ("serving", 0),
                 drift: Callable[[], Any] = lambda: None) -> None:
        """`mesh` returns the agent's MeshRuntime (None without discovery);
        `lifecycle` its phase and the pid it handed over to (0: none);
        `drift` the last DriftReport (None without one)."""
        self.enrolment = enrolment
        self.node = node
        self.started_at = started_at
        self.readiness = readiness
        self.proxy = proxy
        self.mesh = mesh
        self.discovery = discovery
        self.lifecycle = lifecycle
        self.drift = drift

    async def _need_mesh(self, context) -> Any:
        runtime = self.mesh()
        if runtime is None or runtime.mesh is None:
            await context.abort(StatusCode.FAILED_PRECONDITION,
                                "the agent runs without discovery (--discovery none): no identities or policies")
        return runtime

    async def ListPolicies(self, request: pb.ListPoliciesRequest, context) -> pb.ListPoliciesResponse:
        runtime = await self._need_mesh(context)
        engine, state = runtime.engine, runtime.state
        statuses = {s.policy: s for s in engine.statuses()}
        reply = pb.ListPoliciesResponse(workload=request.workload)
        if not request.workload:
            keys = list(statuses)
        else:
            ns, _, name = request.workload.partition("/")
            pod = state.pod(ns, name) if name else runtime.mesh.attributor.pod(request.workload)
            if pod is None:
                await context.abort(StatusCode.NOT_FOUND, f"no pod {request.workload!r} in the cluster view")
            applicable = engine.applicable(pod.namespace, pod.labels)
            keys = [*applicable.deny, *applicable.allow]
            mtls = runtime.peer_authentication.effective(pod.namespace, pod.labels).for_port(0)
            reply.workload = f"{pod.namespace}/{pod.name}"
            reply.mtls = f"{mtls.mode.value} ({mtls.level}{' ' + mtls.policy if mtls.policy else ''})"
        for key in keys:
            status = statuses.get(key)
            rejected = engine.rejected(key)
            if rejected is not None:
                reply.policies.append(pb.Policy(
                    namespace=rejected.namespace, name=rejected.name, kind=rejected.kind,
                    action="DENY" if rejected.denies else "", enforced=rejected.denies,
                    message=status.message if status else "", error=rejected.error))
                continue
            policy = engine.policy(key)
            ns, _, name = key.partition("/")
            reply.policies.append(pb.Policy(
                namespace=ns, name=name, kind="AuthorizationPolicy",
                action=policy.action.value if policy is not None else "",
                enforced=status.enforced if status else True, message=status.message if status else ""))
        return reply

    async def ListCertificates(self, request: pb.ListCertificatesRequest, context) -> pb.ListCertificatesResponse:
        runtime = await self._need_mesh(context)
        certificates = runtime.mesh.certificates
        reply = pb.ListCertificatesResponse(trust_domain=runtime.settings.trust_domain, ca=certificates.issuer)
        for cert in certificates.status():
            reply.certificates.append(pb.Certificate(
                identity=str(cert.spiffe_id), serial=cert.serial_hex, not_before=cert.not_before.timestamp(),
                not_after=cert.not_after.timestamp(), rotation_due_at=cert.rotation_due_at.timestamp(),
                rotation_due=cert.rotation_due, issuer=cert.issuer))
        failing = runtime.rotation.failures() if runtime.rotation is not None else {}
        for identity, error in sorted(failing.items(), key=lambda item: str(item[0])):
            reply.failing.append(pb.CertificateRequestFailure(identity=str(identity), error=error))
        return reply

    async def Trace(self, request: pb.TraceRequest, context) -> pb.TraceResponse:
        runtime = self.mesh()
        local = {ip: w for w in self.enrolment.workloads() for ip in w.addresses}
        result = trace_connection(request.source_ip, request.destination_ip, request.destination_port, local,
                                  runtime.mesh if runtime is not None else None, self.proxy().capture,
                                  frozenset(await asyncio.to_thread(_node_addresses)))
        return pb.TraceResponse(steps=[pb.TraceStep(stage=s.stage, detail=s.detail) for s in result.steps],
                                listener=result.listener, route=result.route, decision=result.decision,
                                reason=result.reason)

    async def ListWorkloads(self, request: pb.ListWorkloadsRequest, context) -> pb.ListWorkloadsResponse:
        return pb.ListWorkloadsResponse(workloads=[w.to_proto() for w in self.enrolment.workloads()])

    async def AgentStatus(self, request: pb.AgentStatusRequest, context) -> pb.AgentStatusResponse:
        ready, reason = self.readiness()
        proxy = self.proxy()
        discovery = self.discovery()
        phase, successor = self.lifecycle()
        drift = self.drift()
        return pb.AgentStatusResponse(pid=os.getpid(), phase=phase, successor_pid=successor,
                                      pods_expected=drift.expected if drift else 0,
                                      not_captured=list(drift.not_captured) if drift else [],
                                      version=__version__, node=self.node, started_at=self.started_at,
                                      enrolled=self.enrolment.enrolled_count(), ready=ready, reason=reason,
                                      capture=proxy.capture, listeners=proxy.listeners(),
                                      proxy_netns=proxy.proxy_netns, live_connections=len(proxy.connections()),
                                      discovery=discovery.source, discovery_synced=discovery.synced,
                                      discovered_pods=discovery.pods_with_addresses,
                                      event_loop=eventloop.current_name(), discovery_revision=discovery.revision,
                                      discovered_objects=dict(discovery.objects),
                                      ready_waypoints=discovery.ready_waypoints,
                                      discovery_errors=dict(discovery.errors),
                                      discovery_pending=dict(discovery.pending),
                                      failed_closed=proxy.failed_closed(),
                                      **_capture_counts(await asyncio.to_thread(proxy.verdicts)))

    async def ListConnections(self, request: pb.ListConnectionsRequest, context) -> pb.ListConnectionsResponse:
        return pb.ListConnectionsResponse(connections=[
            pb.Connection(id=c.id, listener=c.listener.value, client=str(c.client),
                          original_destination=str(c.original_dst), source_identity=c.source_identity,
                          destination_identity=c.destination_identity, bytes_sent=c.bytes_to_upstream,
                          bytes_received=c.bytes_to_client, started_at=c.started_at, state=c.state.value,
                          decision=c.decision, reason=c.reason, via=c.via)
            for c in self.proxy().connections()])
