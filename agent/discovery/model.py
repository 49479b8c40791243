"""Kubernetes objects reduced to what the node proxy needs.

The input is the JSON the API server sends (or the same objects written in a
local file). Only the fields the agent reads are kept, in frozen slotted
dataclasses with interned strings, because the agent holds every pod of the
cluster in memory. Missing optional fields get Kubernetes' defaults; a
malformed field raises ModelError naming the object and the field.
"""
from __future__ import annotations

import ipaddress
import socket
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from types import MappingProxyType
from typing import Any, Final

KIND_NAMESPACE: Final = "Namespace"
KIND_POD: Final = "Pod"
KIND_SERVICE: Final = "Service"
KIND_ENDPOINT_SLICE: Final = "EndpointSlice"
KIND_AUTHORIZATION_POLICY: Final = "AuthorizationPolicy"
KIND_PEER_AUTHENTICATION: Final = "PeerAuthentication"
KIND_GATEWAY: Final = "Gateway"  # Gateway API; the ones of class istio-waypoint are waypoints
WORKLOAD_KINDS: Final = (KIND_NAMESPACE, KIND_POD, KIND_SERVICE, KIND_ENDPOINT_SLICE, KIND_GATEWAY)
POLICY_KINDS: Final = (KIND_AUTHORIZATION_POLICY, KIND_PEER_AUTHENTICATION)
ALL_KINDS: Final = WORKLOAD_KINDS + POLICY_KINDS
API_VERSIONS: Final[Mapping[str, str]] = MappingProxyType({
    KIND_NAMESPACE: "v1",
    KIND_POD: "v1",
    KIND_SERVICE: "v1",
    KIND_ENDPOINT_SLICE: "discovery.k8s.io/v1",
    KIND_AUTHORIZATION_POLICY: "security.istio.io/v1",
    KIND_PEER_AUTHENTICATION: "security.istio.io/v1",
    KIND_GATEWAY: "gateway.networking.k8s.io/v1",
})

SERVICE_NAME_LABEL: Final = "kubernetes.io/service-name"
# Written by `kubectl apply` and often several kB: never worth keeping.
_DROPPED_ANNOTATIONS: Final = frozenset({"kubectl.kubernetes.io/last-applied-configuration"})
_EMPTY: Final[Mapping[str, str]] = MappingProxyType({})


def _empty_map() -> Mapping[str, str]:
    return _EMPTY


class ModelError(ValueError):
    """A malformed object; the message names kind, namespace/name and field."""


def labels_match(selector: Iterable[tuple[str, str]], labels: Mapping[str, str]) -> bool:
    """Kubernetes matchLabels: every (key, value) of the selector is among `labels`
    (a Mapping selector: pass its .items())."""
    return all(labels.get(key) == value for key, value in selector)


def is_namespaced(kind: str) -> bool:
    return kind != KIND_NAMESPACE


def object_key(obj: Any) -> tuple[str, str]:
    """(namespace, name) from metadata, without validating anything else."""
    metadata = obj.get("metadata") if isinstance(obj, Mapping) else None
    if not isinstance(metadata, Mapping):
        return "", ""
    namespace, name = metadata.get("namespace"), metadata.get("name")
    return (namespace if isinstance(namespace, str) else ""), (name if isinstance(name, str) else "")


def canonical_ip(text: str) -> str:
    """One spelling per address, so IPv6 lookups match however it was written.

    IPv4 goes through inet_pton/inet_ntop, in C: they accept and refuse the
    same strings as ipaddress (four decimal octets, no leading zeros) and spell
    the address the same way, where ipaddress parses in Python (~10 calls an
    address, per connection for a destination that is not a Service's address).
    IPv6 keeps ipaddress's spelling (inet_ntop writes IPv4-mapped addresses
    differently)."""
    if ":" not in text:
        try:
            return sys.intern(socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, text)))
        except (OSError, ValueError):
            raise ValueError(f"{text!r} does not appear to be an IPv4 or IPv6 address") from None
    return sys.intern(str(ipaddress.ip_address(text)))


class _Where:
    """Names the object in every error message."""

    __slots__ = ("label",)

    def __init__(self, kind: str, namespace: str, name: str) -> None:
        self.label = f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"

    def error(self, field: str, problem: str) -> ModelError:
        return ModelError(f"{self.label}: {field}: {problem}")

    def mapping(self, field: str, value: Any) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.error(field, f"expected an object, got {type(value).__name__}")
        return value

    def sequence(self, field: str, value: Any) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(field, f"expected a list, got {type(value).__name__}")
        return value

    def string(self, field: str, value: Any, default: str = "") -> str:
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.error(field, f"expected a string, got {value!r}")
        return sys.intern(value)

    def boolean(self, field: str, value: Any, default: bool) -> bool:
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(field, f"expected true or false, got {value!r}")
        return value

    def port(self, field: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            raise self.error(field, f"expected a port number 1..65535, got {value!r}")
        return value

    def ip(self, field: str, value: Any) -> str:
        try:
            return canonical_ip(value)
        except (TypeError, ValueError):
            raise self.error(field, f"not an IP address: {value!r}") from None

    def string_map(self, field: str, value: Any, drop: frozenset[str] = frozenset()) -> Mapping[str, str]:
        """Labels, annotations, selectors: string to string, interned."""
        raw = self.mapping(field, value)
        if not raw:
            return _EMPTY
        out: dict[str, str] = {}
        for key, item in raw.items():
            if not isinstance(key, str) or not key:
                raise self.error(field, f"keys must be non-empty strings, got {key!r}")
            if key in drop:
                continue
            out[sys.intern(key)] = self.string(f"{field}.{key}", item)
        return MappingProxyType(out)


def _envelope(obj: Any, kind: str) -> tuple[_Where, Mapping[str, Any], str, str]:
    """Check metadata.name (and namespace for namespaced kinds)."""
    if not isinstance(obj, Mapping):
        raise ModelError(f"{kind}: expected an object, got {type(obj).__name__}")
    metadata = obj.get("metadata")
    if not isinstance(metadata, Mapping):
        raise ModelError(f"{kind}: metadata is missing or not an object")
    name, namespace = metadata.get("name"), metadata.get("namespace")
    if not isinstance(name, str) or not name:
        where = f" in namespace {namespace}" if isinstance(namespace, str) and namespace else ""
        raise ModelError(f"{kind}{where}: metadata.name: required, got {name!r}")
    if not is_namespaced(kind):
        return _Where(kind, "", name), metadata, "", sys.intern(name)
    if not isinstance(namespace, str) or not namespace:
        raise ModelError(f"{kind} {name}: metadata.namespace: required, got {namespace!r}")
    return _Where(kind, namespace, name), metadata, sys.intern(namespace), sys.intern(name)


@dataclass(frozen=True, slots=True)
class NamespaceInfo:
    name: str
    labels: Mapping[str, str] = dataclass_field(default_factory=_empty_map)


@dataclass(frozen=True, slots=True)
class ContainerPort:
    name: str
    port: int
    protocol: str = "TCP"


@dataclass(frozen=True, slots=True)
class PodInfo:
    """A pod as the agent sees it. `deletion` is metadata.deletionTimestamp."""

    namespace: str
    name: str
    uid: str = ""
    labels: Mapping[str, str] = dataclass_field(default_factory=_empty_map)
    annotations: Mapping[str, str] = dataclass_field(default_factory=_empty_map)
    service_account: str = "default"
    node_name: str = ""
    host_network: bool = False
    ips: tuple[str, ...] = ()
    phase: str = ""
    ready: bool = False
    deletion: str | None = None
    container_ports: tuple[ContainerPort, ...] = ()

    @property
    def key(self) -> tuple[str, str]:
        return self.namespace, self.name

    @property
    def terminated(self) -> bool:
        """Succeeded/Failed pods keep their record but no longer own their IP."""
        return self.phase in ("Succeeded", "Failed")

    def named_port(self, name: str, protocol: str = "TCP") -> int | None:
        for port in self.container_ports:
            if port.name == name and port.protocol == protocol:
                return port.port
        return None

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class ServicePort:
    """`target_port` is a number or a container port name (as in the Service)."""

    name: str
    port: int
    target_port: int | str
    protocol: str = "TCP"


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    """`selector` is None for services without one (their endpoints are managed by hand)."""

    namespace: str
    name: str
    labels: Mapping[str, str] = dataclass_field(default_factory=_empty_map)
    cluster_ips: tuple[str, ...] = ()
    ports: tuple[ServicePort, ...] = ()
    selector: Mapping[str, str] | None = None
    type: str = "ClusterIP"

    @property
    def key(self) -> tuple[str, str]:
        return self.namespace, self.name

    def port(self, port: int, protocol: str = "TCP") -> ServicePort | None:
        for candidate in self.ports:
            if candidate.port == port and candidate.protocol == protocol:
                return candidate
        return None

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class ObjectRef:
    kind: str
    namespace: str
    name: str
    uid: str = ""


@dataclass(frozen=True, slots=True)
class EndpointInfo:
    """One endpoint of a slice; only the first address counts (the API says so)."""

    addresses: tuple[str, ...]
    ready: bool = True
    node_name: str = ""
    target: ObjectRef | None = None


@dataclass(frozen=True, slots=True)
class EndpointPort:
    name: str
    port: int
    protocol: str = "TCP"


@dataclass(frozen=True, slots=True)
class EndpointSliceInfo:
    """`service` comes from the kubernetes.io/service-name label ("" if absent)."""

    namespace: str
    name: str
    service: str
    address_type: str
    endpoints: tuple[EndpointInfo, ...] = ()
    ports: tuple[EndpointPort, ...] = ()

    @property
    def key(self) -> tuple[str, str]:
        return self.namespace, self.name


@dataclass(frozen=True, slots=True)
class GatewayInfo:
    """A Gateway API Gateway; only its class and labels matter to the node
    proxy (a waypoint is class istio-waypoint, labelled istio.io/waypoint-for)."""

    namespace: str
    name: str
    gateway_class: str
    labels: Mapping[str, str] = dataclass_field(default_factory=_empty_map)

    @property
    def key(self) -> tuple[str, str]:
        return self.namespace, self.name

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


WorkloadObject = NamespaceInfo | PodInfo | ServiceInfo | EndpointSliceInfo | GatewayInfo


def parse_namespace(obj: Any) -> NamespaceInfo:
    where, metadata, _, name = _envelope(obj, KIND_NAMESPACE)
    return NamespaceInfo(name=name, labels=where.string_map("metadata.labels", metadata.get("labels")))


def _pod_ips(where: _Where, status: Mapping[str, Any]) -> tuple[str, ...]:
    entries = where.sequence("status.podIPs", status.get("podIPs"))
    if entries:
        ips: list[str] = []
        for index, entry in enumerate(entries):
            field = f"status.podIPs[{index}]"
            ips.append(where.ip(f"{field}.ip", where.mapping(field, entry).get("ip")))
        return tuple(dict.fromkeys(ips))
    single = status.get("podIP")
    return (where.ip("status.podIP", single),) if single else ()


def _container_ports(where: _Where, spec: Mapping[str, Any]) -> tuple[ContainerPort, ...]:
    ports: list[ContainerPort] = []
    for c_index, container in enumerate(where.sequence("spec.containers", spec.get("containers"))):
        c_field = f"spec.containers[{c_index}]"
        container = where.mapping(c_field, container)
        for p_index, raw in enumerate(where.sequence(f"{c_field}.ports", container.get("ports"))):
            field = f"{c_field}.ports[{p_index}]"
            raw = where.mapping(field, raw)
            ports.append(ContainerPort(
                name=where.string(f"{field}.name", raw.get("name")),
                port=where.port(f"{field}.containerPort", raw.get("containerPort")),
                protocol=where.string(f"{field}.protocol", raw.get("protocol"), "TCP"),
            ))
    return tuple(ports)


def _pod_ready(where: _Where, status: Mapping[str, Any]) -> bool:
    for index, condition in enumerate(where.sequence("status.conditions", status.get("conditions"))):
        condition = where.mapping(f"status.conditions[{index}]", condition)
        if condition.get("type") == "Ready":
            return condition.get("status") == "True"
    return False


def parse_pod(obj: Any) -> PodInfo:
    where, metadata, namespace, name = _envelope(obj, KIND_POD)
    spec = where.mapping("spec", obj.get("spec"))
    status = where.mapping("status", obj.get("status"))
    service_account = spec.get("serviceAccountName") or spec.get("serviceAccount")
    deletion = metadata.get("deletionTimestamp")
    return PodInfo(
        namespace=namespace,
        name=name,
        uid=where.string("metadata.uid", metadata.get("uid")),
        labels=where.string_map("metadata.labels", metadata.get("labels")),
        annotations=where.string_map("metadata.annotations", metadata.get("annotations"), _DROPPED_ANNOTATIONS),
        service_account=where.string("spec.serviceAccountName", service_account, "default"),
        node_name=where.string("spec.nodeName", spec.get("nodeName")),
        host_network=where.boolean("spec.hostNetwork", spec.get("hostNetwork"), False),
        ips=_pod_ips(where, status),
        phase=where.string("status.phase", status.get("phase")),
        ready=_pod_ready(where, status),
        deletion=where.string("metadata.deletionTimestamp", deletion) if deletion is not None else None,
        container_ports=_container_ports(where, spec),
    )


def _service_ports(where: _Where, spec: Mapping[str, Any]) -> tuple[ServicePort, ...]:
    ports: list[ServicePort] = []
    for index, raw in enumerate(where.sequence("spec.ports", spec.get("ports"))):
        field = f"spec.ports[{index}]"
        raw = where.mapping(field, raw)
        port = where.port(f"{field}.port", raw.get("port"))
        target: int | str = port
        raw_target = raw.get("targetPort")
        if isinstance(raw_target, str) and raw_target.isdigit():
            raw_target = int(raw_target)  # an IntOrString written as a quoted number
        if isinstance(raw_target, str) and raw_target:
            target = sys.intern(raw_target)
        elif raw_target is not None:
            target = where.port(f"{field}.targetPort", raw_target)
        ports.append(ServicePort(
            name=where.string(f"{field}.name", raw.get("name")),
            port=port,
            target_port=target,
            protocol=where.string(f"{field}.protocol", raw.get("protocol"), "TCP"),
        ))
    return tuple(ports)


def _cluster_ips(where: _Where, spec: Mapping[str, Any]) -> tuple[str, ...]:
    """clusterIPs wins over clusterIP; "None" (headless) and "" mean no VIP."""
    raw = where.sequence("spec.clusterIPs", spec.get("clusterIPs"))
    if not raw and spec.get("clusterIP") is not None:
        raw = [spec.get("clusterIP")]
    ips: list[str] = []
    for index, value in enumerate(raw):
        if value in ("None", ""):
            continue
        ips.append(where.ip(f"spec.clusterIPs[{index}]", value))
    return tuple(ips)


def parse_service(obj: Any) -> ServiceInfo:
    where, metadata, namespace, name = _envelope(obj, KIND_SERVICE)
    spec = where.mapping("spec", obj.get("spec"))
    service_type = where.string("spec.type", spec.get("type"), "ClusterIP")
    selector = spec.get("selector")
    return ServiceInfo(
        namespace=namespace,
        name=name,
        labels=where.string_map("metadata.labels", metadata.get("labels")),
        cluster_ips=() if service_type == "ExternalName" else _cluster_ips(where, spec),
        ports=_service_ports(where, spec),
        selector=where.string_map("spec.selector", selector) if selector else None,
        type=service_type,
    )


def _target_ref(where: _Where, field: str, raw: Any) -> ObjectRef | None:
    if raw is None:
        return None
    raw = where.mapping(field, raw)
    return ObjectRef(
        kind=where.string(f"{field}.kind", raw.get("kind")),
        namespace=where.string(f"{field}.namespace", raw.get("namespace")),
        name=where.string(f"{field}.name", raw.get("name")),
        uid=where.string(f"{field}.uid", raw.get("uid")),
    )


def _endpoints(where: _Where, obj: Mapping[str, Any], address_type: str) -> tuple[EndpointInfo, ...]:
    endpoints: list[EndpointInfo] = []
    for index, raw in enumerate(where.sequence("endpoints", obj.get("endpoints"))):
        field = f"endpoints[{index}]"
        raw = where.mapping(field, raw)
        addresses = where.sequence(f"{field}.addresses", raw.get("addresses"))
        if not addresses:
            raise where.error(f"{field}.addresses", "at least one address is required")
        if address_type == "FQDN":
            parsed = tuple(where.string(f"{field}.addresses[{i}]", a) for i, a in enumerate(addresses))
        else:
            parsed = tuple(where.ip(f"{field}.addresses[{i}]", a) for i, a in enumerate(addresses))
        conditions = where.mapping(f"{field}.conditions", raw.get("conditions"))
        endpoints.append(EndpointInfo(
            addresses=parsed,
            # The API: a nil `ready` is to be read as ready.
            ready=where.boolean(f"{field}.conditions.ready", conditions.get("ready"), True),
            node_name=where.string(f"{field}.nodeName", raw.get("nodeName")),
            target=_target_ref(where, f"{field}.targetRef", raw.get("targetRef")),
        ))
    return tuple(endpoints)


def _endpoint_ports(where: _Where, obj: Mapping[str, Any]) -> tuple[EndpointPort, ...]:
    ports: list[EndpointPort] = []
    for index, raw in enumerate(where.sequence("ports", obj.get("ports"))):
        field = f"ports[{index}]"
        raw = where.mapping(field, raw)
        if raw.get("port") is None:
            continue  # "not restricted": nothing a TCP proxy can connect to
        ports.append(EndpointPort(
            name=where.string(f"{field}.name", raw.get("name")),
            port=where.port(f"{field}.port", raw.get("port")),
            protocol=where.string(f"{field}.protocol", raw.get("protocol"), "TCP"),
        ))
    return tuple(ports)


def parse_endpoint_slice(obj: Any) -> EndpointSliceInfo:
    where, metadata, namespace, name = _envelope(obj, KIND_ENDPOINT_SLICE)
    address_type = obj.get("addressType")
    if address_type not in ("IPv4", "IPv6", "FQDN"):
        raise where.error("addressType", f"expected IPv4, IPv6 or FQDN, got {address_type!r}")
    labels = where.string_map("metadata.labels", metadata.get("labels"))
    return EndpointSliceInfo(
        namespace=namespace,
        name=name,
        service=labels.get(SERVICE_NAME_LABEL, ""),
        address_type=sys.intern(address_type),
        endpoints=_endpoints(where, obj, address_type),
        ports=_endpoint_ports(where, obj),
    )


def parse_gateway(obj: Any) -> GatewayInfo:
    where, metadata, namespace, name = _envelope(obj, KIND_GATEWAY)
    spec = where.mapping("spec", obj.get("spec"))
    return GatewayInfo(
        namespace=namespace,
        name=name,
        gateway_class=where.string("spec.gatewayClassName", spec.get("gatewayClassName")),
        labels=where.string_map("metadata.labels", metadata.get("labels")),
    )


WORKLOAD_PARSERS: Final[Mapping[str, Any]] = MappingProxyType({
    KIND_NAMESPACE: parse_namespace,
    KIND_POD: parse_pod,
    KIND_SERVICE: parse_service,
    KIND_ENDPOINT_SLICE: parse_endpoint_slice,
    KIND_GATEWAY: parse_gateway,
})
