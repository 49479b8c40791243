"""`ambitctl trace SRC DST:PORT`: what would happen to a new connection, as a
dry run of the same decisions the datapath and the proxy make.

Nothing is sent: the capture hooks come from this node's enrolment records
(which pods carry the tc programs), the listener from proxy_ingress's rules
(docs/datapath.md), the route from OutboundRouter.plan and the decision
from the destination's policies, exactly the functions the live path calls.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..datapath import constants as c
from ..workload import Workload
from .node_proxy import Mesh
from .routing import Route


HOST_NETWORK_LIMIT = "host-network traffic bypasses the mesh (stated limit)"
IPV6_LIMIT = "IPv6 is not captured yet: an enrolled pod's IPv6 TCP is dropped"


@dataclass(frozen=True)
class TraceStep:
    stage: str
    detail: str


@dataclass(frozen=True)
class Trace:
    steps: tuple[TraceStep, ...]
    listener: str          # outbound | inbound_plaintext | hbone | none
    route: str             # local | hbone | waypoint | passthrough | refuse | direct
    decision: str          # allow | deny | n/a
    reason: str
    extra: dict[str, str] = field(default_factory=dict)


def trace_connection(src_ip: str, dst_ip: str, dst_port: int, local: dict[str, Workload], mesh: Mesh | None,
                     capture: str, node_addresses: frozenset[str] = frozenset()) -> Trace:
    """`local`: this node's recorded pods by IP (in the mesh or not);
    `node_addresses`: the node's own addresses (host-network traffic)."""
    steps: list[TraceStep] = []

    def step(stage: str, detail: str) -> None:
        steps.append(TraceStep(stage, detail))

    source, target = local.get(src_ip), local.get(dst_ip)
    if capture == "none":
        step("capture", "the agent runs with --capture none: nothing is steered, the connection is direct")
        return Trace(tuple(steps), "none", "direct", "n/a", "no capture backend")

    meshed = [w for w in (source, target) if w is not None and w.in_mesh]
    if src_ip in node_addresses and target is not None and target.in_mesh:
        step("capture", f"{src_ip} is this node's own address: host-network traffic (kubelet probes) reaches "
                        f"{target.pod} without the mesh, as in Istio, so probes keep working; neither identity "
                        "nor policy applies (stated limit, docs/datapath.md) [in_pass_from_node]")
        return Trace(tuple(steps), "none", "direct", "n/a", HOST_NETWORK_LIMIT)
    if dst_ip in node_addresses and source is not None and source.in_mesh:
        step("capture", f"{dst_ip} is this node's own address: {source.pod}'s connections to the node (probe "
                        "replies, hostNetwork peers) are not captured (stated limit, docs/datapath.md) "
                        "[out_pass_to_node]")
        return Trace(tuple(steps), "none", "direct", "n/a", HOST_NETWORK_LIMIT)
    if ":" in src_ip + dst_ip and meshed:
        step("capture", f"IPv6 TCP of {meshed[0].pod}, an enrolled pod, is dropped on its veth "
                        "[out_drop_ipv6_tcp / in_drop_ipv6_tcp]: ambit captures IPv4 only for now, and an "
                        "enrolled pod's TCP never passes around the mesh in plaintext (docs/datapath.md)")
        return Trace(tuple(steps), "none", "drop", "deny", IPV6_LIMIT)
    if source is not None and source.in_mesh:
        step("capture", f"{src_ip} is {source.pod} on this node: tc ingress of {source.host_veth} "
                        f"(ifindex {source.host_veth_ifindex}) runs ambit_capture_out, which checks that "
                        f"{src_ip} is enrolled for that very veth (from any other veth the packet is dropped "
                        f"[out_drop_spoofed_source]), rewrites the destination MAC and redirects to "
                        f"{c.NODE_LINK}")
        listener, port = "outbound", c.OUTBOUND_PORT
        why = "the source is an enrolled local pod"
    elif target is not None and target.in_mesh:
        step("capture", f"{dst_ip} is {target.pod} on this node: tc egress of {target.host_veth} runs "
                        f"ambit_capture_in; the packet did not come from {c.NODE_LINK} nor from the node, "
                        f"so it is redirected to {c.NODE_LINK} (had its source been a pod enrolled on this "
                        "node, it would be dropped: that pod's TCP is captured on its own veth "
                        "[in_drop_spoofed_source])")
        listener, port = ("hbone", c.HBONE_PORT) if dst_port == c.HBONE_PORT else \
            ("inbound_plaintext", c.INBOUND_PLAINTEXT_PORT)
        why = "destination port 15008" if dst_port == c.HBONE_PORT else "plaintext for an enrolled pod"
    else:
        step("capture", "neither end is an enrolled pod of this node: no ambit program sees it")
        return Trace(tuple(steps), "none", "direct", "n/a", "not captured on this node")
    step("proxy namespace", f"proxy_ingress marks 0x{c.MARK_CAPTURED:x}; ip rule fwmark "
                            f"0x{c.MARK_CAPTURED:x}/0x{c.MARK_CAPTURED:x} lookup {c.ROUTE_TABLE}; table "
                            f"{c.ROUTE_TABLE}: local 0.0.0.0/0 dev lo")
    step("listener", f"the SYN is bpf_sk_assign()ed to {listener} :{port} ({why}); getsockname() = "
                     f"{dst_ip}:{dst_port}")

    if mesh is None:
        step("route", "no discovery: plain TCP relay from the client's IP")
        return Trace(tuple(steps), listener, "direct", "allow", "no discovery: plain relay")
    partial = mesh.pending()
    if partial:
        step("discovery", f"not synced ({partial}): every new connection is refused until it is")
        return Trace(tuple(steps), listener, "refuse", "deny", f"discovery has not synced: {partial}")

    if listener == "outbound":
        plan = mesh.router.plan_for(src_ip, dst_ip, dst_port, dry_run=True)
        if plan.service and plan.route is not Route.WAYPOINT:
            step("service", f"{dst_ip}:{dst_port} is Service {plan.service}: endpoint {plan.dst_ip}:{plan.dst_port} "
                            "(next in the even spread)")
        step("route", f"{plan.route.value}: {plan.reason}")
        if plan.route is Route.WAYPOINT:
            step("hbone", f"pool key ({plan.source_identity}, {src_ip}, {plan.next_hop_ip}:{c.HBONE_PORT}, "
                          f"expects {plan.destination_identity}); CONNECT {plan.authority} (the address as "
                          "dialled) over TLS 1.3 from the client's IP")
            step("policy", f"L7 policy at waypoint {plan.waypoint}; it picks the endpoint and opens its own "
                           "HBONE to it, where the destination node decides on the waypoint's identity")
            return Trace(tuple(steps), listener, plan.route.value, "n/a", plan.reason,
                         {"source_identity": str(plan.source_identity),
                          "waypoint_identity": str(plan.destination_identity)})
        if plan.route is Route.REFUSE:
            return Trace(tuple(steps), listener, plan.route.value, "deny", plan.reason)
        if plan.route is Route.PASSTHROUGH:
            step("upstream", f"plain TCP to {plan.dst_ip}:{plan.dst_port} from {src_ip} (IP_TRANSPARENT, "
                             f"SO_MARK 0x{c.MARK_PROXY:x})")
            return Trace(tuple(steps), listener, plan.route.value, "allow", plan.reason)
        extra = {"source_identity": str(plan.source_identity), "destination_identity": str(plan.destination_identity)}
        if plan.route is Route.HBONE:
            step("hbone", f"pool key ({plan.source_identity}, {src_ip}, {plan.dst_ip}:{c.HBONE_PORT}, "
                          f"expects {plan.destination_identity}); CONNECT {plan.dst_ip}:{plan.dst_port} over "
                          "TLS 1.3 from the client's IP")
        decision = mesh.authorizer.check(source_ip=src_ip, source_identity=plan.source_identity,
                                         dst_ip=plan.dst_ip, dst_port=plan.dst_port)
        where = "decided in-process, same node" if plan.route is Route.LOCAL else \
            f"decided by node {plan.destination.node_name}" if plan.destination else "decided by the destination node"
        step("policy", f"{'allow' if decision.allowed else 'deny'} ({where}): {decision.reason}")
        if decision.allowed:
            step("upstream", f"plain TCP to {plan.dst_ip}:{plan.dst_port} from {src_ip}, bypassed at the "
                             f"destination veth (it arrives from {c.NODE_LINK})" if plan.route is Route.LOCAL
                 else f"the destination's 15008 connects from {src_ip} to {plan.dst_ip}:{plan.dst_port}")
        return Trace(tuple(steps), listener, plan.route.value, "allow" if decision.allowed else "deny",
                     decision.reason, extra)

    if listener == "hbone":
        step("hbone", "TLS with the destination's certificate; the peer's identity comes from its "
                      "certificate, so policy is decided per CONNECT (not knowable in a dry run)")
        return Trace(tuple(steps), listener, "hbone", "n/a", "decided per tunnel from the peer's certificate")
    decision = mesh.authorizer.check(source_ip=src_ip, source_identity=None, dst_ip=dst_ip, dst_port=dst_port)
    step("policy", f"{'allow' if decision.allowed else 'deny'} (plaintext, no identity): {decision.reason}")
    return Trace(tuple(steps), listener, "direct", "allow" if decision.allowed else "deny", decision.reason)
