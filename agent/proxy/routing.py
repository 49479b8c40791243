"""Where a captured connection goes, decided from the cluster state alone.

Pure logic (no sockets), so every rule is unit-tested (tests/unit/test_routing.py,
one table per route):

  outbound (15001), client = an enrolled pod on this node
    - destination is a Service VIP:port -> pick a ready endpoint (even
      spread), map port -> targetPort; none ready -> refuse
    - destination pod unknown or not in the mesh -> passthrough: plain TCP
      from the client's IP, as if there were no mesh; but an address
      enrolled on this node whose pod cannot be attributed
      (agent/discovery/attribution.py) -> refuse: it would bypass the
      destination's policy
    - destination pod on this node -> local: inbound policy in-process, then
      plain TCP from the client's IP (it never leaves the node)
    - destination pod on another node -> HBONE to <pod IP>:15008 with
      CONNECT <pod IP>:<port>, expecting the pod's identity
    - the Service (or, dialled by pod IP, the in-mesh pod) has a waypoint
      (agent/discovery/waypoints.py) -> HBONE to a waypoint instance's
      <IP>:15008 with CONNECT <the address as dialled>, expecting the
      waypoint's identity; the waypoint picks the endpoint. Never when the
      client is an instance of that waypoint (no loop); no ready instance
      -> refuse
  The client is who the enrolment record that owns its address says it is
  (plan_for): the datapath lets an address out of the veth it was enrolled
  for only (docs/datapath.md), so that record is the record of the veth the
  connection came from; the pod object it names (Attributor) gives the
  identity and labels, never discovery's view of the address alone. A
  client without such a record, or whose record and pod object disagree,
  has no identity to present: refuse (fail closed) rather than send it in
  plaintext.
"""
from __future__ import annotations

import enum
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from ..discovery.attribution import Attributor
from ..discovery.balance import EvenSpread
from ..discovery.model import PodInfo
from ..discovery.state import ClusterState
from ..discovery.waypoints import WaypointChoice, WaypointResolver
from ..identity.spiffe import SpiffeId
from ..policy.authz import UNKNOWN_DESTINATION, UNKNOWN_SOURCE

MAX_CACHED_IDENTITIES = 4096  # SPIFFE IDs kept per (namespace, service account); emptied when full
MAX_CACHED_PLANS = 16384  # plans kept per (client, destination, port), a Service's endpoints one each


class Route(enum.Enum):
    LOCAL = "local"              # same node: policy in-process, plain TCP
    HBONE = "hbone"              # other node: mTLS tunnel to the pod's 15008
    PASSTHROUGH = "passthrough"  # not a mesh destination: plain TCP
    REFUSE = "refuse"            # nothing sensible to do: reset the client
    WAYPOINT = "waypoint"        # L7 hand-off: mTLS tunnel to the destination's waypoint


@dataclass(frozen=True)
class OutboundPlan:
    """`dst_ip:dst_port` is where the bytes are for: the endpoint (LOCAL,
    HBONE, PASSTHROUGH) or, for WAYPOINT, the address as dialled, which is
    the CONNECT authority. `destination` is the pod the connection is made
    to: the endpoint, or the waypoint instance."""

    route: Route
    reason: str
    dst_ip: str
    dst_port: int
    source: PodInfo | None = None
    source_identity: SpiffeId | None = None
    destination: PodInfo | None = None
    destination_identity: SpiffeId | None = None
    service: str | None = None   # "namespace/name" when dialled through a Service
    waypoint: str | None = None  # "namespace/name" of the waypoint (WAYPOINT)
    via_ip: str | None = None    # the waypoint instance's IP (WAYPOINT)
    fail_closed: str = ""        # REFUSE because the agent cannot decide (policy.authz.Decision.fail_closed)

    # Made on first use and kept in the plan (a remembered plan serves many
    # connections): after that, each is a plain attribute read.
    @cached_property
    def next_hop_ip(self) -> str:
        """Whose 15008 an HBONE route dials."""
        return self.via_ip or self.dst_ip

    @cached_property
    def authority(self) -> str:
        """The CONNECT authority of an HBONE or WAYPOINT route."""
        return f"[{self.dst_ip}]:{self.dst_port}" if ":" in self.dst_ip else f"{self.dst_ip}:{self.dst_port}"

    @cached_property
    def via(self) -> str:
        """The route's name (the access log's `via`)."""
        return self.route.value

    @cached_property
    def source_uri(self) -> str:
        """The source identity's SPIFFE URI, "" without one."""
        return str(self.source_identity or "")

    @cached_property
    def destination_uri(self) -> str:
        """The expected destination identity's SPIFFE URI, "" without one."""
        return str(self.destination_identity or "")


class OutboundRouter:
    def __init__(self, state: ClusterState, node_name: str, trust_domain: str,
                 attributor: Attributor | None = None) -> None:
        """`attributor`: the agent's, which knows its enrolment records; by default discovery alone."""
        self.state = state
        self.node_name = node_name
        self.trust_domain = trust_domain
        self.attributor = attributor or Attributor(state, node_name)
        self._spread = EvenSpread()
        self.waypoints = WaypointResolver(state)
        self._identities: dict[tuple[str, str], SpiffeId] = {}
        self._plans: dict[tuple[str, str, int], _Choice] = {}
        self.max_cached_plans = MAX_CACHED_PLANS
        self._cached_slots = 0

    def identity(self, pod: PodInfo) -> SpiffeId:
        """The pod's SPIFFE ID, made once per (namespace, service account): a
        SpiffeId checks its three parts (three regular expressions) when it is
        made, and a connection asks for two (the source's and the destination's,
        or the destination agent's own). It is a function of those two fields and
        the trust domain alone, so nothing invalidates it."""
        key = (pod.namespace, pod.service_account)
        identity = self._identities.get(key)
        if identity is None:
            identity = self.state.identity(pod, self.trust_domain)
            if len(self._identities) >= MAX_CACHED_IDENTITIES:
                self._identities.clear()
            self._identities[key] = identity
        return identity

    def plan_for(self, client_ip: str, dst_ip: str, dst_port: int, dry_run: bool = False) -> OutboundPlan:
        """The plan for a captured connection from `client_ip`, speaking for
        the pod this node enrolled with that address (bound to the veth the
        connection arrived on) as its pod object describes it.

        Remembered per (client, destination, port) while the cluster state's
        generation is the one it was made under and the enrolment records it
        read (the client's, the attributed destination's) are the same objects;
        a Service's or waypoint's candidates are remembered, the pick is made
        per connection. A client without a fitting record is never remembered."""
        record = self.attributor.record
        if not dry_run:
            entry = self._plans.get((client_ip, dst_ip, dst_port))
            if entry is not None and entry.generation == self.state.generation \
                    and record(client_ip) is entry.source_record:
                spread = entry.spread  # _pick, inline: this is the per-connection path
                index = 0 if spread is None else spread.pick(entry.key, entry.indices)
                slot = entry.slots[index]
                if slot is None:
                    slot = entry.slots[index] = entry.make(entry.candidates[index])
                plan, address, seen = slot
                if address is None or record(address) is seen:
                    return plan
                # The destination's record changed: made again below (and remembered anew).
        source_record = record(client_ip)
        generation = self.state.generation
        pod = self.attributor.enrolled_pod(client_ip)
        if pod is not None:
            entry = self._resolve(pod, dst_ip, dst_port)
            if not dry_run:
                entry.generation, entry.source_record = generation, source_record
                self._remember((client_ip, dst_ip, dst_port), entry)
            return self._pick(entry, dry_run)[0]
        source = self.attributor.attribute(client_ip)
        if not source.enrolled:
            return OutboundPlan(Route.REFUSE, f"source {client_ip} is not a pod enrolled on this node: no identity "
                                              "to present", dst_ip, dst_port, fail_closed=UNKNOWN_SOURCE)
        return OutboundPlan(Route.REFUSE, f"no identity to present: {source.reason}", dst_ip, dst_port,
                            fail_closed=UNKNOWN_SOURCE)

    def _remember(self, key: tuple[str, str, int], entry: _Choice) -> None:
        """Keep `entry`, the oldest going while more than max_cached_plans
        slots are kept (a Service's endpoints count one each)."""
        plans = self._plans
        old = plans.pop(key, None)
        if old is not None:
            self._cached_slots -= len(old.slots)
        size = len(entry.slots)
        if size > self.max_cached_plans:
            return
        while plans and self._cached_slots + size > self.max_cached_plans:
            self._cached_slots -= len(plans.pop(next(iter(plans))).slots)
        plans[key] = entry
        self._cached_slots += size

    def plan(self, source: PodInfo, dst_ip: str, dst_port: int, dry_run: bool = False) -> OutboundPlan:
        """`source`: the client's pod (plan_for finds it). dry_run: decide
        without advancing the Service spread (ambitctl trace). Not remembered."""
        return self._pick(self._resolve(source, dst_ip, dst_port), dry_run)[0]

    @staticmethod
    def _pick(entry: _Choice, dry_run: bool) -> _Slot:
        """One connection's plan from `entry`: its candidate's, made on first use."""
        if entry.spread is None:
            index = 0
        else:
            index = (entry.spread.peek if dry_run else entry.spread.pick)(entry.key, entry.indices)
        slot = entry.slots[index]
        if slot is None:
            slot = entry.slots[index] = entry.make(entry.candidates[index])
        return slot

    def _resolve(self, source: PodInfo, dst_ip: str, dst_port: int) -> _Choice:
        """Everything of the plan but the per-connection pick."""
        source_identity = self.identity(source)
        found = self.state.service_for(dst_ip, dst_port)
        if found is None:
            return self._to_address(source, source_identity, dst_ip, dst_port, None)
        svc, port = found
        service = f"{svc.namespace}/{svc.name}"
        choice = self.waypoints.for_service(svc)
        if choice.waypoint is not None and not self.waypoints.is_instance(source, choice.waypoint):
            return self._via_waypoint(choice, source, source_identity, dst_ip, dst_port, service, None)
        endpoints = self.state.endpoints(svc, port)
        if not endpoints:
            return _fixed((OutboundPlan(Route.REFUSE, f"service {service} port {dst_port} has no ready endpoint",
                                        dst_ip, dst_port, source, source_identity, service=service), None, None))

        def make(endpoint: Any) -> _Slot:
            fixed = self._to_address(source, source_identity, endpoint.ip, endpoint.target_port, service)
            return self._pick(fixed, True)
        return _Choice(self._spread, (svc.namespace, svc.name, port.port), endpoints, make)

    def _to_address(self, source: PodInfo, source_identity: SpiffeId, dst_ip: str, dst_port: int,
                    service: str | None) -> _Choice:
        """The plan for the endpoint `dst_ip:dst_port` (dialled, or picked for `service`)."""
        seen = self.attributor.record(dst_ip)
        destination = self.attributor.pod(dst_ip)
        if destination is None:
            attributed = self.attributor.attribute(dst_ip)
            if attributed.enrolled:
                return _fixed((OutboundPlan(Route.REFUSE, f"unknown destination: {attributed.reason}", dst_ip,
                                            dst_port, source, source_identity, service=service,
                                            fail_closed=UNKNOWN_DESTINATION), dst_ip, seen))
            return _fixed((OutboundPlan(Route.PASSTHROUGH, "destination is not a known pod", dst_ip, dst_port,
                                        source, source_identity, service=service), dst_ip, seen))
        in_mesh, why = self.state.ambient_decision(destination)
        if not in_mesh:
            return _fixed((OutboundPlan(Route.PASSTHROUGH, f"destination is not in the mesh ({why})", dst_ip,
                                        dst_port, source, source_identity, destination, service=service),
                           dst_ip, seen))
        if service is None:
            choice = self.waypoints.for_workload(destination)
            if choice.waypoint is not None and not self.waypoints.is_instance(source, choice.waypoint):
                return self._via_waypoint(choice, source, source_identity, dst_ip, dst_port, None, seen)
        destination_identity = self.identity(destination)
        if destination.node_name == self.node_name:
            return _fixed((OutboundPlan(Route.LOCAL, "destination is on this node", dst_ip, dst_port, source,
                                        source_identity, destination, destination_identity, service), dst_ip, seen))
        return _fixed((OutboundPlan(Route.HBONE, f"destination is on node {destination.node_name or '?'}", dst_ip,
                                    dst_port, source, source_identity, destination, destination_identity, service),
                       dst_ip, seen))

    def _via_waypoint(self, choice: WaypointChoice, source: PodInfo, source_identity: SpiffeId, dst_ip: str,
                      dst_port: int, service: str | None, seen: Any) -> _Choice:
        """`seen`: the record of `dst_ip` the choice was made with (dialled by
        pod IP; None for a Service, whose waypoint no record decides)."""
        waypoint = choice.waypoint
        assert waypoint is not None
        address = None if service is not None else dst_ip
        key, instances = self.waypoints.candidates(waypoint, self.node_name)
        if not instances:
            return _fixed((OutboundPlan(Route.REFUSE, f"{choice.reason}, which has no ready instance", dst_ip,
                                        dst_port, source, source_identity, service=service, waypoint=waypoint.key),
                           address, seen))
        family = ":" in dst_ip

        def make(instance: PodInfo) -> _Slot:
            via_ip = next((ip for ip in instance.ips if (":" in ip) == family), instance.ips[0])
            return (OutboundPlan(Route.WAYPOINT, f"{choice.reason}: instance {instance} on node "
                                 f"{instance.node_name or '?'}", dst_ip, dst_port, source, source_identity, instance,
                                 self.identity(instance), service, waypoint.key, via_ip), address, seen)
        return _Choice(self.waypoints.spread, key, instances, make)


# A plan, the address whose enrolment record it read (None: none) and that record.
_Slot = tuple[OutboundPlan, "str | None", Any]


class _Choice:
    """What a connection's plan is picked from: one slot, or one per candidate
    (a Service's ready endpoints, a waypoint's instances, in the state's
    order), each made on first pick; `spread` picks per connection under
    `key`, exactly as over the candidates themselves (EvenSpread counts by
    position). `generation`, `source_record`: what a remembered one was made under."""

    __slots__ = ("spread", "key", "candidates", "indices", "make", "slots", "generation", "source_record")

    def __init__(self, spread: EvenSpread | None, key: Hashable, candidates: Sequence[Any],
                 make: Callable[[Any], _Slot] | None, slot: _Slot | None = None) -> None:
        self.spread = spread
        self.key = key
        self.candidates = candidates
        self.indices = range(len(candidates))
        self.make = make
        self.slots: list[_Slot | None] = [slot] if slot is not None else [None] * len(candidates)
        self.generation = -1
        self.source_record: Any = None


def _fixed(slot: _Slot) -> _Choice:
    return _Choice(None, None, (None,), None, slot)
