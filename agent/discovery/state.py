"""ClusterState: the one in-memory index of the cluster the agent reads.

Sources (the Kubernetes watch, local files, a direct fetch on CNI ADD) feed it
watch-style events (`apply`) or whole lists (`replace_kind`, a relist); the
proxy, enrolment and ambitctl read it. It is pure: no I/O, no threads. The
owner calls it from one thread only (the agent's event loop).

Rules kept here because every source must agree on them:
- a malformed object is reported (`errors()`, `policy_errors()`, a log line)
  and never replaces the last good version of the same object;
- a malformed policy also denies its scope: it is held as a RejectedPolicy
  (`rejected_policies()`) that the engine turns into a deny of every
  connection to the workloads it would select, until it parses again or is
  deleted (fail closed: a policy never silently stops existing);
- subscribers hear only real changes (an update that changes nothing the
  agent keeps is not an event), after the policy engine has been updated;
- Istio's ambient enrolment rules (`ambient_decision`).
"""
from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple, Protocol, TypeAlias

import structlog

from ..identity.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeId
from .policy_model import (
    AuthorizationPolicy,
    PeerAuthentication,
    PolicyError,
    RejectedPolicy,
    parse_policy,
    rejected_policy,
)
from .model import (
    ALL_KINDS,
    API_VERSIONS,
    KIND_AUTHORIZATION_POLICY,
    KIND_ENDPOINT_SLICE,
    KIND_GATEWAY,
    KIND_NAMESPACE,
    KIND_PEER_AUTHENTICATION,
    KIND_POD,
    KIND_SERVICE,
    POLICY_KINDS,
    WORKLOAD_PARSERS,
    EndpointSliceInfo,
    GatewayInfo,
    ModelError,
    NamespaceInfo,
    PodInfo,
    ServiceInfo,
    ServicePort,
    canonical_ip,
    is_namespaced,
    labels_match,
    object_key,
)

DATAPLANE_MODE_LABEL = "istio.io/dataplane-mode"
DATAPLANE_MODE_AMBIENT = "ambient"
DATAPLANE_MODE_NONE = "none"
SIDECAR_STATUS_ANNOTATION = "sidecar.istio.io/status"
# On a waypoint's pods (and its Service's selector): which Gateway they serve.
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"

EVENT_ADDED = "ADDED"
EVENT_MODIFIED = "MODIFIED"
EVENT_DELETED = "DELETED"
# A policy kind's object started or stopped failing to parse (old/new: the
# RejectedPolicy before and after, None when there is none).
EVENT_REJECTED = "REJECTED"
_REJECTED = "rejected"  # _policy_dirty marker: the rejected policies changed
_UPSERT_EVENTS = frozenset({EVENT_ADDED, EVENT_MODIFIED})

Key: TypeAlias = tuple[str, str]
StoredObject: TypeAlias = (NamespaceInfo | PodInfo | ServiceInfo | EndpointSliceInfo | GatewayInfo | AuthorizationPolicy
                           | PeerAuthentication)
ChangeCallback: TypeAlias = Callable[[str, str, Any, Any], None]
AmbientCallback: TypeAlias = Callable[[PodInfo, bool, str], None]


class AuthorizationPolicySink(Protocol):
    """Where the state pushes AuthorizationPolicies (the policy engine), before subscribers hear of
    a change. Discovery defines what it needs; the policy package, which reads the state, provides it."""

    def update(self, policies: Iterable[AuthorizationPolicy]) -> object: ...
    def upsert(self, policy: AuthorizationPolicy) -> object: ...
    def remove(self, namespace: str, name: str) -> object: ...
    def set_rejected(self, rejected: Iterable[RejectedPolicy]) -> object: ...


class PeerAuthenticationSink(Protocol):
    """Where the state pushes PeerAuthentications (the policy package's PeerAuthenticationPolicy)."""

    def update(self, policies: Iterable[PeerAuthentication]) -> object: ...


class Endpoint(NamedTuple):
    """Where a service connection goes: pod IP, the port the pod listens on, its node."""

    ip: str
    target_port: int
    node_name: str


def _family(ip: str) -> int:
    return 6 if ":" in ip else 4


def _serving(pod: PodInfo) -> bool:
    """May this pod take service traffic when no EndpointSlice says so?

    A pod object without any status exists only in local files (the API
    server always sets a phase): no kubelet reports on it, so take it as up.
    """
    if pod.deletion is not None:
        return False
    if pod.phase == "":
        return True
    return pod.phase == "Running" and pod.ready


def _label(kind: str, key: Key) -> str:
    namespace, name = key
    name = name or "<no name>"
    return f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"


def _ip_rank(pod: PodInfo) -> int:
    """Several pods can claim one IP for a while (a finished pod keeps its
    record): prefer the live one."""
    if pod.terminated:
        return 2
    return 1 if pod.deletion is not None else 0


class ClusterState:
    """Namespaces, pods, services, endpoint slices, gateways and mesh policies, indexed."""

    def __init__(
        self,
        policy_engine: AuthorizationPolicySink | None = None,
        peer_authentication: PeerAuthenticationSink | None = None,
        logger: Any = None,
    ) -> None:
        self._log: Any = logger if logger is not None else structlog.get_logger(__name__)
        self._engine = policy_engine
        self._peer_authentication = peer_authentication
        self._stores: dict[str, dict[Key, Any]] = {kind: {} for kind in ALL_KINDS}
        self._pods_by_uid: dict[str, Key] = {}
        self._pods_by_ip: dict[str, tuple[Key, ...]] = {}
        self._pods_by_node: dict[str, set[Key]] = {}
        self._pods_by_namespace: dict[str, set[Key]] = {}
        self._pods_by_gateway: dict[Key, set[Key]] = {}  # (namespace, gateway-name label) -> pods
        self._service_by_vip: dict[str, Key] = {}
        self._slices_by_service: dict[Key, set[str]] = {}
        self._errors: dict[tuple[str, Key], str] = {}
        self._rejected: dict[tuple[str, Key], RejectedPolicy] = {}
        self._subscribers: list[ChangeCallback] = []
        self._ambient_subscribers: list[tuple[AmbientCallback, str | None]] = []
        self._pending: list[tuple[str, str, Any, Any]] = []
        self._policy_dirty: set[str] = set()
        self._batch = False
        # Bumped on every change to a stored object (of any kind): what read it
        # may keep an answer while this is unchanged (routing.OutboundRouter's plans).
        self.generation = 0

    # -- subscriptions ------------------------------------------------------
    def subscribe(self, callback: ChangeCallback) -> Callable[[], None]:
        """callback(kind, event_type, old, new) after each real change; returns an unsubscribe."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    def subscribe_ambient(self, callback: AmbientCallback, node_name: str | None = None) -> Callable[[], None]:
        """callback(pod, in_mesh, reason) whenever a pod's enrolment decision flips.

        Flips come from pod labels, namespace labels and pods appearing
        (already in the mesh). A pod or namespace object being deleted is no
        flip: it is not an opt-out, and a sandbox still running (a force
        delete, a view that lost the object) must stay captured, failing
        closed, until CNI DEL releases it. `node_name` limits it to one node.
        """
        entry = (callback, node_name)
        self._ambient_subscribers.append(entry)
        return lambda: self._ambient_subscribers.remove(entry)

    # -- feeding ------------------------------------------------------------
    def apply(self, event_type: str, obj: Mapping[str, Any], kind: str | None = None) -> bool:
        """One watch event. Returns whether anything the agent keeps changed."""
        kind = kind or (obj.get("kind") if isinstance(obj, Mapping) else None) or ""
        if kind not in self._stores:
            raise ValueError(f"unsupported kind {kind!r}, expected one of {', '.join(ALL_KINDS)}")
        key = self._key(kind, obj)
        if event_type == EVENT_DELETED:
            changed = self._delete(kind, key)
        elif event_type in _UPSERT_EVENTS:
            parsed = self._parse(kind, key, obj)
            changed = parsed is not None and self._put(kind, key, parsed)
        else:
            raise ValueError(f"unsupported event type {event_type!r}")
        self._flush()
        return changed

    def replace_kind(self, kind: str, objs: Iterable[Mapping[str, Any]]) -> int:
        """The full current list of one kind (a relist or a file reload).

        Objects that vanished are deleted, new and changed ones applied;
        returns the number of changes. A malformed object keeps its last good
        version (it is not deleted either).
        """
        if kind not in self._stores:
            raise ValueError(f"unsupported kind {kind!r}, expected one of {', '.join(ALL_KINDS)}")
        parsed: dict[Key, Any] = {}
        rejected: set[Key] = set()
        for obj in objs:
            key = self._key(kind, obj)
            info = self._parse(kind, key, obj)
            if info is None:
                rejected.add(key)
                parsed.pop(key, None)
            else:
                parsed[key] = info
                rejected.discard(key)
        changes = 0
        self._batch = True
        try:
            for key in [k for k in self._stores[kind] if k not in parsed and k not in rejected]:
                changes += self._delete(kind, key)
            for (error_kind, key) in [e for e in self._errors if e[0] == kind]:
                if key not in rejected:
                    del self._errors[(error_kind, key)]
                    self._reject(kind, key, None)
            for key, info in parsed.items():
                changes += self._put(kind, key, info)
        finally:
            self._batch = False
        self._flush()
        return changes

    # -- reading: workloads -------------------------------------------------
    def namespace(self, name: str) -> NamespaceInfo | None:
        return self._stores[KIND_NAMESPACE].get(("", name))

    def pod(self, namespace: str, name: str) -> PodInfo | None:
        return self._stores[KIND_POD].get((namespace, name))

    def pod_by_uid(self, uid: str) -> PodInfo | None:
        key = self._pods_by_uid.get(uid)
        return self._stores[KIND_POD].get(key) if key else None

    def pod_by_ip(self, ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> PodInfo | None:
        """The live pod that owns this IP (host-network pods own none)."""
        # Addresses from sockets are already canonical: skip parsing them
        # (it was ~40% of a policy decision); parse only on a miss.
        keys = self._pods_by_ip.get(ip) if isinstance(ip, str) else None
        if keys is None:
            try:
                keys = self._pods_by_ip.get(canonical_ip(str(ip)))
            except ValueError:
                return None
        if not keys:
            return None
        pods = self._stores[KIND_POD]
        return min((pods[key] for key in keys), key=_ip_rank)

    def local_pods(self, node_name: str) -> list[PodInfo]:
        pods = self._stores[KIND_POD]
        return [pods[key] for key in sorted(self._pods_by_node.get(node_name, ()))]

    def pods(self) -> list[PodInfo]:
        return [self._stores[KIND_POD][key] for key in sorted(self._stores[KIND_POD])]

    def namespaces(self) -> list[NamespaceInfo]:
        return [self._stores[KIND_NAMESPACE][key] for key in sorted(self._stores[KIND_NAMESPACE])]

    def service(self, namespace: str, name: str) -> ServiceInfo | None:
        return self._stores[KIND_SERVICE].get((namespace, name))

    def services(self) -> list[ServiceInfo]:
        return [self._stores[KIND_SERVICE][key] for key in sorted(self._stores[KIND_SERVICE])]

    def gateway(self, namespace: str, name: str) -> GatewayInfo | None:
        return self._stores[KIND_GATEWAY].get((namespace, name))

    def gateways(self) -> list[GatewayInfo]:
        return [self._stores[KIND_GATEWAY][key] for key in sorted(self._stores[KIND_GATEWAY])]

    def gateway_pods(self, namespace: str, gateway_name: str) -> list[PodInfo]:
        """Pods of `namespace` labelled gateway.networking.k8s.io/gateway-name=`gateway_name`
        (what the waypoint's Service selects), in a stable order."""
        pods = self._stores[KIND_POD]
        return [pods[key] for key in sorted(self._pods_by_gateway.get((namespace, gateway_name), ()))]

    def endpoint_slices(self) -> list[EndpointSliceInfo]:
        return [self._stores[KIND_ENDPOINT_SLICE][key] for key in sorted(self._stores[KIND_ENDPOINT_SLICE])]

    def counts(self) -> dict[str, int]:
        return {kind: len(store) for kind, store in self._stores.items()}

    # -- reading: services --------------------------------------------------
    def service_for(self, vip: str | ipaddress.IPv4Address | ipaddress.IPv6Address, port: int,
                    protocol: str = "TCP") -> tuple[ServiceInfo, ServicePort] | None:
        """The service whose cluster IP and port this connection was sent to."""
        try:
            key = self._service_by_vip.get(canonical_ip(str(vip)))
        except ValueError:
            return None
        service = self._stores[KIND_SERVICE].get(key) if key else None
        if service is None:
            return None
        service_port = service.port(port, protocol)
        return (service, service_port) if service_port is not None else None

    def endpoints(self, service: ServiceInfo, port: ServicePort, family: int | None = None) -> list[Endpoint]:
        """Ready endpoints for one service port, in a stable order.

        From the service's EndpointSlices when it has any. A service without
        slices (local files, or slices not seen yet) falls back to the ready
        pods its selector matches, resolving a named targetPort from each
        pod's container ports as the endpoints controller does. `family` (4
        or 6) keeps only addresses a connection to a VIP of that family can use.
        """
        slice_names = self._slices_by_service.get(service.key)
        if slice_names:
            return self._slice_endpoints(service, port, slice_names, family)
        if not service.selector:
            return []
        pods = self._stores[KIND_POD]
        found: dict[tuple[str, int], Endpoint] = {}
        for key in sorted(self._pods_by_namespace.get(service.namespace, ())):
            pod = pods[key]
            if not _serving(pod) or not labels_match(service.selector.items(), pod.labels):
                continue
            target = port.target_port
            if isinstance(target, str):
                named = pod.named_port(target, port.protocol)
                if named is None:
                    continue  # this pod does not expose that port name
                target = named
            for ip in pod.ips:
                if family is None or _family(ip) == family:
                    found.setdefault((ip, target), Endpoint(ip, target, pod.node_name))
        return list(found.values())

    def _slice_endpoints(self, service: ServiceInfo, port: ServicePort, slice_names: set[str],
                         family: int | None) -> list[Endpoint]:
        slices = self._stores[KIND_ENDPOINT_SLICE]
        found: dict[tuple[str, int], Endpoint] = {}
        for name in sorted(slice_names):
            endpoint_slice: EndpointSliceInfo = slices[(service.namespace, name)]
            if endpoint_slice.address_type == "FQDN":
                continue
            # A slice names its ports after the service ports; the number is the resolved targetPort.
            slice_port = next((p for p in endpoint_slice.ports
                               if p.name == port.name and p.protocol == port.protocol), None)
            if slice_port is None:
                continue
            for endpoint in endpoint_slice.endpoints:
                ip = endpoint.addresses[0]
                if not endpoint.ready or (family is not None and _family(ip) != family):
                    continue
                found.setdefault((ip, slice_port.port), Endpoint(ip, slice_port.port, endpoint.node_name))
        return list(found.values())

    # -- reading: mesh ------------------------------------------------------
    def ambient_decision(self, pod: PodInfo) -> tuple[bool, str]:
        """Istio's rule: is this pod's traffic captured by the node proxy?"""
        return self._decide(pod, self.namespace(pod.namespace))

    @staticmethod
    def namespace_decision(namespace: NamespaceInfo | None, namespace_name: str) -> tuple[bool, str]:
        """What the namespace label alone says (for pods not known yet)."""
        if namespace is None:
            return False, f"namespace {namespace_name} is unknown"
        if namespace.labels.get(DATAPLANE_MODE_LABEL) == DATAPLANE_MODE_AMBIENT:
            return True, f"namespace {namespace_name} is labelled {DATAPLANE_MODE_LABEL}=ambient"
        return False, f"namespace {namespace_name} is not labelled {DATAPLANE_MODE_LABEL}=ambient"

    @classmethod
    def _decide(cls, pod: PodInfo, namespace: NamespaceInfo | None) -> tuple[bool, str]:
        if pod.host_network:
            return False, "host-network pod: capturing it would capture the node"
        if SIDECAR_STATUS_ANNOTATION in pod.annotations:
            return False, f"pod has an Istio sidecar ({SIDECAR_STATUS_ANNOTATION} annotation)"
        mode = pod.labels.get(DATAPLANE_MODE_LABEL)
        if mode == DATAPLANE_MODE_AMBIENT:
            return True, f"pod label {DATAPLANE_MODE_LABEL}=ambient"
        if mode is not None:
            # An explicit pod label other than ambient opts the pod out, whatever its namespace says.
            return False, f"pod label {DATAPLANE_MODE_LABEL}={mode}"
        in_mesh, reason = cls.namespace_decision(namespace, pod.namespace)
        if not in_mesh:
            reason = f"pod has no {DATAPLANE_MODE_LABEL} label and {reason}"
        return in_mesh, reason

    @staticmethod
    def identity(pod: PodInfo, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> SpiffeId:
        return SpiffeId(trust_domain, pod.namespace, pod.service_account or "default")

    def authorization_policies(self) -> list[AuthorizationPolicy]:
        store = self._stores[KIND_AUTHORIZATION_POLICY]
        return [store[key] for key in sorted(store)]

    def peer_authentications(self) -> list[PeerAuthentication]:
        store = self._stores[KIND_PEER_AUTHENTICATION]
        return [store[key] for key in sorted(store)]

    def errors(self) -> dict[str, str]:
        """Objects rejected as malformed, by "Kind namespace/name"."""
        return {_label(kind, key): message for (kind, key), message in sorted(self._errors.items())}

    def rejected_policies(self) -> list[RejectedPolicy]:
        """Policies that failed to parse, each denying its scope, by key."""
        return sorted(self._rejected.values(), key=lambda p: p.key)

    def policy_errors(self) -> dict[str, str]:
        return {_label(kind, key): message for (kind, key), message in sorted(self._errors.items())
                if kind in POLICY_KINDS}

    # -- internals: parsing -------------------------------------------------
    @staticmethod
    def _key(kind: str, obj: Any) -> Key:
        namespace, name = object_key(obj)
        return (namespace, name) if is_namespaced(kind) else ("", name)

    def _parse(self, kind: str, key: Key, obj: Any) -> Any:
        """The parsed object, or None after recording why it was rejected."""
        try:
            if kind in POLICY_KINDS:
                if isinstance(obj, Mapping) and ("kind" not in obj or "apiVersion" not in obj):
                    # List items of the API carry no kind/apiVersion; the list said what they are.
                    obj = {"kind": kind, "apiVersion": API_VERSIONS[kind], **obj}
                parsed = parse_policy(obj)
            else:
                parsed = WORKLOAD_PARSERS[kind](obj)
        except (ModelError, PolicyError) as exc:
            message = str(exc)
            if kind in POLICY_KINDS:
                rejected = rejected_policy(kind, key[0], key[1], obj, message)
                if self._errors.get((kind, key)) != message:
                    self._log.error("policy rejected; it denies every connection to the workloads it would select",
                                    kind=kind, object=_label(kind, key), error=message, scope=rejected.scope,
                                    denies=rejected.denies)
                self._reject(kind, key, rejected)
            elif self._errors.get((kind, key)) != message:
                self._log.error("object rejected; keeping its last good version", kind=kind,
                                object=_label(kind, key), error=message)
            self._errors[(kind, key)] = message
            return None
        if self._errors.pop((kind, key), None) is not None:
            self._log.info("object accepted again", kind=kind, object=_label(kind, key))
            self._reject(kind, key, None)
        return parsed

    def _reject(self, kind: str, key: Key, rejected: RejectedPolicy | None) -> None:
        """Hold (or, with None, drop) the RejectedPolicy of one policy object."""
        old = self._rejected.get((kind, key))
        if old == rejected:
            return
        if rejected is None:
            del self._rejected[(kind, key)]
        else:
            self._rejected[(kind, key)] = rejected
        self._policy_dirty.add(_REJECTED)
        self._pending.append((kind, EVENT_REJECTED, old, rejected))

    # -- internals: storing -------------------------------------------------
    def _put(self, kind: str, key: Key, new: Any) -> bool:
        store = self._stores[kind]
        old = store.get(key)
        if old == new:
            return False
        store[key] = new
        if old is not None:
            self._unindex(kind, key, old)
        self._index(kind, key, new)
        self._changed(kind, EVENT_MODIFIED if old is not None else EVENT_ADDED, old, new)
        return True

    def _delete(self, kind: str, key: Key) -> bool:
        if self._errors.pop((kind, key), None) is not None and kind in POLICY_KINDS:
            self._reject(kind, key, None)
        old = self._stores[kind].pop(key, None)
        if old is None:
            return False
        self._unindex(kind, key, old)
        self._changed(kind, EVENT_DELETED, old, None)
        return True

    def _changed(self, kind: str, event: str, old: Any, new: Any) -> None:
        self.generation += 1
        if kind in POLICY_KINDS:
            self._policy_dirty.add(kind)
            if kind == KIND_AUTHORIZATION_POLICY and not self._batch and self._engine is not None:
                # One event: update the engine incrementally instead of recompiling all.
                if new is not None:
                    self._engine.upsert(new)
                else:
                    self._engine.remove(old.namespace, old.name)
                self._policy_dirty.discard(kind)
        self._pending.append((kind, event, old, new))
        if kind == KIND_POD:
            self._pod_flip(old, new)
        elif kind == KIND_NAMESPACE:
            self._namespace_flip((new or old).name, old, new)

    def _pod_flip(self, old: PodInfo | None, new: PodInfo | None) -> None:
        # A deleted object is not an opt-out (see subscribe_ambient): no flip.
        if not self._ambient_subscribers or new is None:
            return
        namespace = self.namespace(new.namespace)
        before = self._decide(old, namespace)[0] if old is not None else False
        after = self._decide(new, namespace)
        if after[0] != before:
            self._pending.append(("ambient", "", new, after))

    def _namespace_flip(self, name: str, before: NamespaceInfo | None, after: NamespaceInfo | None) -> None:
        if not self._ambient_subscribers or after is None:
            return
        pods = self._stores[KIND_POD]
        for key in sorted(self._pods_by_namespace.get(name, ())):
            pod = pods[key]
            was = self._decide(pod, before)[0]
            now = self._decide(pod, after)
            if was != now[0]:
                self._pending.append(("ambient", "", pod, now))

    def _index(self, kind: str, key: Key, info: Any) -> None:
        if kind == KIND_POD:
            if info.uid:
                self._pods_by_uid[info.uid] = key
            if not info.host_network:
                for ip in info.ips:
                    self._pods_by_ip[ip] = self._pods_by_ip.get(ip, ()) + (key,)
            if info.node_name:
                self._pods_by_node.setdefault(info.node_name, set()).add(key)
            self._pods_by_namespace.setdefault(info.namespace, set()).add(key)
            gateway = info.labels.get(GATEWAY_NAME_LABEL)
            if gateway:
                self._pods_by_gateway.setdefault((info.namespace, gateway), set()).add(key)
        elif kind == KIND_SERVICE:
            for ip in info.cluster_ips:
                self._service_by_vip[ip] = key
        elif kind == KIND_ENDPOINT_SLICE and info.service:
            self._slices_by_service.setdefault((info.namespace, info.service), set()).add(info.name)

    def _unindex(self, kind: str, key: Key, info: Any) -> None:
        if kind == KIND_POD:
            if info.uid and self._pods_by_uid.get(info.uid) == key:
                del self._pods_by_uid[info.uid]
            if not info.host_network:
                for ip in info.ips:
                    remaining = tuple(k for k in self._pods_by_ip.get(ip, ()) if k != key)
                    if remaining:
                        self._pods_by_ip[ip] = remaining
                    else:
                        self._pods_by_ip.pop(ip, None)
            _discard(self._pods_by_node, info.node_name, key)
            _discard(self._pods_by_namespace, info.namespace, key)
            gateway = info.labels.get(GATEWAY_NAME_LABEL)
            if gateway:
                _discard(self._pods_by_gateway, (info.namespace, gateway), key)
        elif kind == KIND_SERVICE:
            for ip in info.cluster_ips:
                if self._service_by_vip.get(ip) == key:
                    del self._service_by_vip[ip]
        elif kind == KIND_ENDPOINT_SLICE and info.service:
            _discard(self._slices_by_service, (info.namespace, info.service), info.name)

    # -- internals: telling others ------------------------------------------
    def _flush(self) -> None:
        """Push policies into the engine, then tell subscribers, in event order."""
        if KIND_AUTHORIZATION_POLICY in self._policy_dirty and self._engine is not None:
            self._engine.update(self._stores[KIND_AUTHORIZATION_POLICY].values())
        if KIND_PEER_AUTHENTICATION in self._policy_dirty and self._peer_authentication is not None:
            self._peer_authentication.update(self._stores[KIND_PEER_AUTHENTICATION].values())
        if _REJECTED in self._policy_dirty and self._engine is not None:
            self._engine.set_rejected(self._rejected.values())
        self._policy_dirty.clear()
        pending, self._pending = self._pending, []
        for kind, event, old, new in pending:
            if kind == "ambient":
                in_mesh, reason = new
                for callback, node in list(self._ambient_subscribers):
                    if node is None or node == old.node_name:
                        self._call(callback, old, in_mesh, reason)
            else:
                for subscriber in list(self._subscribers):
                    self._call(subscriber, kind, event, old, new)

    def _call(self, callback: Callable[..., None], *args: Any) -> None:
        try:
            callback(*args)
        except Exception:  # a broken subscriber must not break the state or other subscribers
            self._log.exception("discovery subscriber failed", subscriber=getattr(callback, "__qualname__", repr(callback)))


def _discard(index: dict[Any, set[Any]], bucket: Any, member: Any) -> None:
    members = index.get(bucket)
    if members is not None:
        members.discard(member)
        if not members:
            del index[bucket]
