"""The lab's cluster, described as Kubernetes objects in a local YAML file.

The file uses the same schema as the API server's objects (Namespace,
ServiceAccount, Pod, Service, Node, and pass-through kinds such as
AuthorizationPolicy), so the discovery code can read the very same file and a
user can paste objects from a real cluster. Pods, Services and Namespaces are
read by the agent's own parser (agent/discovery/model.py); this module adds
what only the lab decides (names usable as namespaces, nodes, ClusterIPs, the
built-in workloads) and says which document an error is in.

Lab-specific meaning is carried by one annotation on Pods,
`lab.ambit.dev/workload: http,echo`, which picks the built-in servers the lab
starts inside the pod (see `podapp.py`). `waypoint` runs Envoy as the
waypoint its gateway.networking.k8s.io/gateway-name label names, with the
bootstrap `ambit waypoint` writes (docs/waypoint.md).
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

import yaml

from ambit.agent.datapath.constants import HBONE_PORT
from ambit.agent.discovery.model import (
    ContainerPort,
    ModelError,
    NamespaceInfo,
    PodInfo,
    ServiceInfo,
    ServicePort,
    labels_match,
    parse_namespace,
    parse_pod,
    parse_service,
)
from ambit.agent.discovery.state import DATAPLANE_MODE_LABEL, GATEWAY_NAME_LABEL

WORKLOAD_ANNOTATION = "lab.ambit.dev/workload"
WORKLOAD_KINDS = ("http", "echo", "waypoint")
DEFAULT_WORKLOAD_PORTS = {"http": 8080, "echo": 9000, "waypoint": HBONE_PORT}
SERVICE_CIDR = "10.96.0.0/16"
FIRST_SERVICE_HOST = 10  # leave the first addresses free, as clusters do for kubernetes/kube-dns
DEFAULT_NODE_COUNT = 2
DEFAULT_FILE = "default-lab.yaml"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_NODE_INDEXED = re.compile(r"^node([1-9][0-9]*)$")
_CORE_KINDS = ("Namespace", "ServiceAccount", "Pod", "Service", "Node")


class LabConfigError(ValueError):
    """The lab file is not a cluster the lab can build; says where and why."""


@dataclass(frozen=True)
class ServiceAccount:
    namespace: str
    name: str


@dataclass(frozen=True)
class Pod:
    """A pod of the lab file: the object as the agent's discovery reads it, and
    the built-in servers the lab starts inside it."""

    info: PodInfo
    workloads: tuple[str, ...] = ()  # built-in servers to run: "http", "echo", "waypoint"

    @property
    def namespace(self) -> str:
        return self.info.namespace

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def labels(self) -> Mapping[str, str]:
        return self.info.labels

    @property
    def service_account(self) -> str:
        return self.info.service_account

    @property
    def node_name(self) -> str | None:
        return self.info.node_name or None

    @property
    def ports(self) -> tuple[ContainerPort, ...]:
        return self.info.container_ports

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def waypoint(self) -> str | None:
        """The Gateway this pod serves as a waypoint for (its workload is `waypoint`)."""
        return self.labels.get(GATEWAY_NAME_LABEL) if "waypoint" in self.workloads else None

    def workload_port(self, kind: str) -> int:
        """The port a built-in server listens on: the container port named
        after it, else its default."""
        return self.info.named_port(kind) or DEFAULT_WORKLOAD_PORTS[kind]


@dataclass(frozen=True)
class Service:
    """A Service of the lab file as discovery reads it, with the ClusterIP the lab gave it."""

    info: ServiceInfo

    @property
    def namespace(self) -> str:
        return self.info.namespace

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def cluster_ip(self) -> str | None:
        """None: headless."""
        return self.info.cluster_ips[0] if self.info.cluster_ips else None

    @property
    def ports(self) -> tuple[ServicePort, ...]:
        return self.info.ports

    def selects(self, pod: Pod) -> bool:
        """Kubernetes semantics: a Service without a selector selects nothing."""
        return bool(self.info.selector) and pod.namespace == self.namespace and labels_match(
            self.info.selector.items(), pod.labels)


@dataclass(frozen=True)
class LabConfig:
    namespaces: tuple[NamespaceInfo, ...] = ()
    service_accounts: tuple[ServiceAccount, ...] = ()
    pods: tuple[Pod, ...] = ()
    services: tuple[Service, ...] = ()
    nodes: tuple[str, ...] = ()  # names of declared Node objects, in file order
    passthrough: tuple[Mapping[str, Any], ...] = field(default=(), hash=False)  # policies etc., raw
    documents: tuple[Mapping[str, Any], ...] = field(default=(), hash=False, compare=False)  # the input

    def namespace(self, name: str) -> NamespaceInfo:
        for ns in self.namespaces:
            if ns.name == name:
                return ns
        return NamespaceInfo(name)

    def pod(self, key: str) -> Pod:
        for pod in self.pods:
            if pod.key == key:
                return pod
        raise KeyError(key)

    def ambient(self, pod: Pod) -> bool:
        """Istio's selection: the pod label opts out, else the namespace label opts in."""
        mode = pod.labels.get(DATAPLANE_MODE_LABEL)
        if mode is not None:
            return mode == "ambient"
        return self.namespace(pod.namespace).labels.get(DATAPLANE_MODE_LABEL) == "ambient"

    def endpoints(self, service: Service) -> tuple[Pod, ...]:
        return tuple(p for p in self.pods if service.selects(p))

    def policies(self, kind: str | None = None) -> tuple[Mapping[str, Any], ...]:
        return tuple(o for o in self.passthrough if kind is None or o.get("kind") == kind)

    def node_names(self, count: int | None = None) -> tuple[str, ...]:
        """The lab's nodes: the declared Node objects, else node1..nodeN where
        N is `count`, else the highest `nodeN` a pod names (at least 2)."""
        if self.nodes:
            if count is not None and count != len(self.nodes):
                raise LabConfigError(f"the file declares {len(self.nodes)} Node objects but {count} nodes were "
                                     "asked for")
            names = self.nodes
        else:
            named = [int(m.group(1)) for p in self.pods if p.node_name and (m := _NODE_INDEXED.match(p.node_name))]
            if count is None:
                count = max(named, default=DEFAULT_NODE_COUNT)
            if count < 1:
                raise LabConfigError(f"a lab needs at least one node, not {count}")
            names = tuple(f"node{i}" for i in range(1, count + 1))
        for pod in self.pods:
            if pod.node_name is not None and pod.node_name not in names:
                raise LabConfigError(f"Pod {pod.key}: spec.nodeName: {pod.node_name!r} is not a lab node "
                                     f"(nodes: {', '.join(names)})")
        return names

    def assign_nodes(self, node_names: Sequence[str]) -> dict[str, str]:
        """Pod key -> node: spec.nodeName when given, else round-robin in file
        order over the nodes, as a scheduler spreading evenly would."""
        if not node_names:
            raise LabConfigError("no nodes to place pods on")
        placed: dict[str, str] = {}
        turn = 0
        for pod in self.pods:
            if pod.node_name is not None:
                placed[pod.key] = pod.node_name
            else:
                placed[pod.key] = node_names[turn % len(node_names)]
                turn += 1
        return placed


# --- parsing ---------------------------------------------------------------------------------------------------

_Parsed = TypeVar("_Parsed")


class _Doc:
    """One document being read, for errors that say where."""

    def __init__(self, index: int, obj: Mapping[str, Any]) -> None:
        self.index = index
        self.obj = obj
        meta = obj.get("metadata")
        name = meta.get("name") if isinstance(meta, Mapping) else None
        self.label = f"document {index} ({obj.get('kind')}{' ' + str(name) if name else ''})"

    def error(self, path: str, message: str) -> LabConfigError:
        return LabConfigError(f"{self.label}: {path}: {message}")

    def get(self, path: str, expected: type | tuple[type, ...], default: Any = None, required: bool = False) -> Any:
        node: Any = self.obj
        for part in path.split("."):
            if not isinstance(node, Mapping) or node.get(part) is None:
                if required:
                    raise self.error(path, "is required")
                return default
            node = node[part]
        if not isinstance(node, expected) or (isinstance(node, bool) and bool not in _as_tuple(expected)):
            raise self.error(path, f"must be {_type_names(expected)}, not {type(node).__name__}")
        return node

    def dns_label(self, path: str, value: str) -> str:
        if len(value) > 63 or not _DNS_LABEL.match(value):
            raise self.error(path, f"{value!r} is not a DNS label (lower-case letters, digits and '-', at most 63)")
        return value

    def parsed(self, parse: Callable[[Any], _Parsed], kind: str, namespace: str, name: str) -> _Parsed:
        """The object read by the agent's own parser (discovery/model.py), its
        namespace defaulted as kubectl does; its errors name this document."""
        obj = dict(self.obj)
        if namespace:
            obj["metadata"] = {**self.obj["metadata"], "namespace": namespace}
        try:
            return parse(obj)
        except ModelError as exc:
            message = str(exc)
            where = f"{kind} {namespace}/{name}: " if namespace else f"{kind} {name}: "
            raise LabConfigError(f"{self.label}: {message.removeprefix(where)}") from None


def _as_tuple(t: type | tuple[type, ...]) -> tuple[type, ...]:
    return t if isinstance(t, tuple) else (t,)


def _type_names(t: type | tuple[type, ...]) -> str:
    names = {"Mapping": "a mapping", "list": "a list", "str": "a string", "int": "an integer"}
    return " or ".join(names.get(x.__name__, x.__name__) for x in _as_tuple(t))


def _flatten(documents: Iterable[Any]) -> list[tuple[int, Any]]:
    """(document index, object); `kind: List` documents (kubectl get -o yaml) are expanded."""
    out: list[tuple[int, Any]] = []
    for index, doc in enumerate(documents):
        if doc is None:
            continue
        if isinstance(doc, Mapping) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
            out += [(index, item) for item in doc["items"]]
        else:
            out.append((index, doc))
    return out


def _meta(doc: _Doc, namespaced: bool) -> tuple[str, str]:
    name = doc.dns_label("metadata.name", doc.get("metadata.name", str, required=True))
    namespace = doc.get("metadata.namespace", str, "default") if namespaced else ""
    if namespaced:
        doc.dns_label("metadata.namespace", namespace)
    return namespace, name


def _workloads(doc: _Doc, annotations: Mapping[str, str]) -> tuple[str, ...]:
    raw = annotations.get(WORKLOAD_ANNOTATION, "").strip()
    if raw in ("", "none"):
        return ()
    kinds = tuple(k.strip() for k in raw.split(",") if k.strip())
    for kind in kinds:
        if kind not in WORKLOAD_KINDS:
            raise doc.error(f"metadata.annotations.{WORKLOAD_ANNOTATION}",
                            f"unknown workload {kind!r} (choose from {', '.join(WORKLOAD_KINDS)}, or none)")
    if len(set(kinds)) != len(kinds):
        raise doc.error(f"metadata.annotations.{WORKLOAD_ANNOTATION}", f"{raw!r} names a workload twice")
    if "waypoint" in kinds and len(kinds) > 1:
        raise doc.error(f"metadata.annotations.{WORKLOAD_ANNOTATION}", "a waypoint pod runs only the waypoint")
    return kinds


def _pod(doc: _Doc) -> Pod:
    namespace, name = _meta(doc, namespaced=True)
    info = doc.parsed(parse_pod, "Pod", namespace, name)
    workloads = _workloads(doc, info.annotations)
    pod = Pod(info, workloads)
    listening = [pod.workload_port(kind) for kind in workloads]
    if len(set(listening)) != len(listening):
        raise doc.error(f"metadata.annotations.{WORKLOAD_ANNOTATION}",
                        f"workloads {', '.join(workloads)} would listen on the same port {listening}")
    return pod


def _service(doc: _Doc) -> tuple[ServiceInfo, str | None]:
    """The service and its requested clusterIP (None: allocate; "None": headless)."""
    namespace, name = _meta(doc, namespaced=True)
    info = doc.parsed(parse_service, "Service", namespace, name)
    if len(info.ports) > 1 and any(not p.name for p in info.ports):
        raise doc.error("spec.ports", "every port needs a name when there is more than one")
    requested = "None" if doc.get("spec.clusterIP", str) == "None" else \
        (info.cluster_ips[0] if info.cluster_ips else None)
    return info, requested


def _allocate_cluster_ips(requests: list[tuple[_Doc, ServiceInfo, str | None]], cidr: str) -> list[Service]:
    """Explicit clusterIPs are kept (and must be in the service range and
    unique); the rest get the next free address, in file order."""
    network = ipaddress.ip_network(cidr)
    taken: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for doc, _, requested in requests:
        if requested is None or requested == "None":
            continue
        addr = ipaddress.ip_address(requested)  # discovery's parser checked it
        if addr not in network:
            raise doc.error("spec.clusterIP", f"{addr} is outside the lab's service range {network}")
        if addr in taken:
            raise doc.error("spec.clusterIP", f"{addr} is already used by another Service")
        taken.add(addr)
    free = (a for a in network.hosts() if int(a) - int(network.network_address) >= FIRST_SERVICE_HOST
            and a not in taken)
    out: list[Service] = []
    for doc, service, requested in requests:
        if requested == "None":
            ips: tuple[str, ...] = ()
        elif requested is not None:
            ips = (requested,)
        else:
            try:
                ips = (str(next(free)),)
            except StopIteration:
                raise doc.error("spec.clusterIP", f"the service range {network} is full") from None
        out.append(Service(replace(service, cluster_ips=ips)))
    return out


def parse_documents(documents: Iterable[Any], service_cidr: str = SERVICE_CIDR) -> LabConfig:
    """Kubernetes objects (already loaded from YAML/JSON) -> a checked LabConfig."""
    documents = list(documents)
    namespaces: dict[str, NamespaceInfo] = {}
    accounts: dict[str, tuple[_Doc, ServiceAccount]] = {}
    pods: dict[str, tuple[_Doc, Pod]] = {}
    services: list[tuple[_Doc, ServiceInfo, str | None]] = []
    nodes: list[str] = []
    passthrough: list[Mapping[str, Any]] = []
    seen: set[tuple[str, str, str]] = set()

    for index, obj in _flatten(documents):
        if not isinstance(obj, Mapping):
            raise LabConfigError(f"document {index}: must be a Kubernetes object (a mapping), "
                                 f"not {type(obj).__name__}")
        kind = obj.get("kind")
        if not isinstance(kind, str) or not kind:
            raise LabConfigError(f"document {index}: kind: is required")
        doc = _Doc(index, obj)
        if kind not in _CORE_KINDS:
            namespace, name = _meta(doc, namespaced=True)
            identity = (kind, namespace, name)
            passthrough.append(dict(obj))
        elif kind == "Namespace":
            _, name = _meta(doc, namespaced=False)
            identity = (kind, "", name)
            namespaces[name] = doc.parsed(parse_namespace, kind, "", name)
        elif kind == "Node":
            _, name = _meta(doc, namespaced=False)
            identity = (kind, "", name)
            nodes.append(name)
        elif kind == "ServiceAccount":
            namespace, name = _meta(doc, namespaced=True)
            identity = (kind, namespace, name)
            accounts[f"{namespace}/{name}"] = (doc, ServiceAccount(namespace, name))
        elif kind == "Pod":
            pod = _pod(doc)
            identity = (kind, pod.namespace, pod.name)
            pods[pod.key] = (doc, pod)
        else:  # Service
            service, requested = _service(doc)
            identity = (kind, service.namespace, service.name)
            services.append((doc, service, requested))
        if identity in seen:
            raise doc.error("metadata.name", f"a {kind} named {'/'.join(p for p in identity[1:] if p)} "
                                             "is defined twice")
        seen.add(identity)

    namespaces.setdefault("default", NamespaceInfo("default"))
    for doc, pod in pods.values():
        if "waypoint" in pod.workloads:
            if not pod.labels.get(GATEWAY_NAME_LABEL):
                raise doc.error(f"metadata.labels.{GATEWAY_NAME_LABEL}", "a waypoint pod needs it: the name of "
                                                                         "the Gateway it serves")
            if pod.labels.get(DATAPLANE_MODE_LABEL) != "none":
                raise doc.error(f"metadata.labels.{DATAPLANE_MODE_LABEL}", "a waypoint pod speaks HBONE itself and "
                                "must stay out of the mesh: label it none, as Istio's waypoint template does")
        if pod.namespace not in namespaces:
            raise doc.error("metadata.namespace", f"namespace {pod.namespace!r} is not defined in the file")
        if pod.service_account != "default" and f"{pod.namespace}/{pod.service_account}" not in accounts:
            raise doc.error("spec.serviceAccountName", f"service account {pod.service_account!r} is not defined "
                                                       f"in namespace {pod.namespace!r}")
    for doc, service, _ in services:
        if service.namespace not in namespaces:
            raise doc.error("metadata.namespace", f"namespace {service.namespace!r} is not defined in the file")
    for doc, account in accounts.values():
        if account.namespace not in namespaces:
            raise doc.error("metadata.namespace", f"namespace {account.namespace!r} is not defined in the file")

    return LabConfig(namespaces=tuple(namespaces.values()), service_accounts=tuple(a for _, a in accounts.values()),
                     pods=tuple(p for _, p in pods.values()),
                     services=tuple(_allocate_cluster_ips(services, service_cidr)), nodes=tuple(nodes),
                     passthrough=tuple(passthrough), documents=tuple(d for d in documents if d is not None))


def parse_yaml(text: str, source: str = "<lab file>", service_cidr: str = SERVICE_CIDR) -> LabConfig:
    try:
        documents = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise LabConfigError(f"{source}: not valid YAML: {exc}") from None
    try:
        return parse_documents(documents, service_cidr)
    except LabConfigError as exc:
        raise LabConfigError(f"{source}: {exc}") from None


def load_file(path: str | Path, service_cidr: str = SERVICE_CIDR) -> LabConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise LabConfigError(f"cannot read the lab file {path}: {exc.strerror}") from None
    return parse_yaml(text, str(path), service_cidr)


def default_lab_text() -> str:
    """The packaged default lab (two nodes, an ambient and a legacy namespace)."""
    return resources.files(__package__).joinpath(DEFAULT_FILE).read_text()


def load_default() -> LabConfig:
    return parse_yaml(default_lab_text(), DEFAULT_FILE)


TOUR_WAYPOINT_FILE = "tour-waypoint.yaml"


def load_tour() -> LabConfig:
    """The default lab plus a waypoint (L7 policy), as `ambit lab tour` shows it."""
    extra = resources.files(__package__).joinpath(TOUR_WAYPOINT_FILE).read_text()
    return parse_yaml(default_lab_text() + "\n---\n" + extra, f"{DEFAULT_FILE} + {TOUR_WAYPOINT_FILE}")


def generated_documents(nodes: int, pods_per_node: int) -> list[dict[str, Any]]:
    """`ambit lab up --nodes N --pods-per-node M`: one ambient namespace,
    M pods on every node, each serving HTTP and echo, behind one Service."""
    if nodes < 1 or pods_per_node < 0:
        raise LabConfigError(f"need at least one node and a non-negative pod count, not {nodes}/{pods_per_node}")
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": "lab", "labels": {DATAPLANE_MODE_LABEL: "ambient"}}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "workload", "namespace": "lab"}},
    ]
    for node in range(1, nodes + 1):
        for i in range(pods_per_node):
            docs.append({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": f"node{node}-pod{i}", "namespace": "lab", "labels": {"app": "workload"},
                             "annotations": {WORKLOAD_ANNOTATION: "http,echo"}},
                "spec": {"nodeName": f"node{node}", "serviceAccountName": "workload",
                         "containers": [{"name": "workload", "image": "ambit-lab-workload", "ports": [
                             {"name": "http", "containerPort": DEFAULT_WORKLOAD_PORTS["http"]},
                             {"name": "echo", "containerPort": DEFAULT_WORKLOAD_PORTS["echo"]}]}]}})
    docs.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "workload", "namespace": "lab"},
                 "spec": {"selector": {"app": "workload"}, "ports": [
                     {"name": "http", "port": 80, "targetPort": "http"},
                     {"name": "echo", "port": DEFAULT_WORKLOAD_PORTS["echo"], "targetPort": "echo"}]}})
    return docs


def generated_config(nodes: int, pods_per_node: int) -> LabConfig:
    return parse_documents(generated_documents(nodes, pods_per_node))
