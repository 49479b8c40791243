"""The lab's settings and its plan (pure): which nodes and pods, with which names, addresses,
directories and agent options, derived from the objects and the settings alone.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ambit.agent.datapath.constants import BPFFS_ROOT, METRICS_PORT, READINESS_PORT

from .errors import LabError
from .labconfig import SERVICE_CIDR, LabConfig, Pod
from .node import bridge_conflist


PREFIX = "ambitlab-"
STATE_DIR = Path("/var/run/ambit-lab")
UNIX_PATH_MAX = 107
CAPTURE_MODES = ("none", "ebpf", "nftables")
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9-]{0,8}-$")  # short: link names are prefix + "n<N>", at most 15


@dataclass(frozen=True)
class LabSettings:
    """Names, address ranges and places of one lab. Tests use another prefix,
    state dir and ranges so they never touch a user's lab."""

    prefix: str = PREFIX
    state_dir: Path = STATE_DIR
    underlay_cidr: str = "10.100.0.0/24"  # node N is host N
    pod_supernet: str = "10.244.0.0/16"   # node N gets the Nth /24
    service_cidr: str = SERVICE_CIDR
    bpffs_root: Path = Path(BPFFS_ROOT)
    capture: str = "ebpf"                 # the agents' --capture: "ebpf"/"nftables" capture enrolled pods, "none" only records them
    agent_args: tuple[str, ...] = ()      # extra options for every agent
    ready_timeout: float = 30.0

    def __post_init__(self) -> None:
        if not _PREFIX_RE.match(self.prefix):
            raise LabError(f"lab prefix {self.prefix!r} must be 2-10 characters of a-z, 0-9 and '-', "
                           "starting with a letter and ending with '-'")
        if self.capture not in CAPTURE_MODES:
            raise LabError(f"capture mode {self.capture!r} is not one of {', '.join(CAPTURE_MODES)}")
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        object.__setattr__(self, "bpffs_root", Path(self.bpffs_root))
        for cidr in (self.underlay_cidr, self.pod_supernet, self.service_cidr):
            try:
                ipaddress.IPv4Network(cidr)
            except ValueError as exc:
                raise LabError(f"bad address range {cidr!r}: {exc}") from None

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def cluster_file(self) -> Path:
        """The lab's objects with addresses filled in, as an API server would
        return them: what file-based discovery reads."""
        return self.state_dir / "cluster.yaml"

    @property
    def nodes_dir(self) -> Path:
        return self.state_dir / "nodes"

    @property
    def ca_dir(self) -> Path:
        """What everyone may read of the lab's CA: its certificate (the mesh root) and its log."""
        return self.state_dir / "ca"

    @property
    def ca_key_dir(self) -> Path:
        """Where the CA's key and token file are: a tmpfs in the CA's own mount
        namespace; for every other process an empty directory (labca.py)."""
        return self.state_dir / "ca-key"

    @property
    def underlay_netns(self) -> str:
        return f"{self.prefix}underlay"

    @property
    def underlay_bridge(self) -> str:
        return f"{self.prefix}ul0"

    @property
    def network_name(self) -> str:
        return self.prefix.rstrip("-")

    def pod_netns(self, namespace: str, name: str) -> str:
        return f"{self.prefix}{namespace}-{name}"

    def to_json(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "state_dir": str(self.state_dir), "underlay_cidr": self.underlay_cidr,
                "pod_supernet": self.pod_supernet, "service_cidr": self.service_cidr,
                "bpffs_root": str(self.bpffs_root), "capture": self.capture, "agent_args": list(self.agent_args)}


CA_PORT = 15012  # istiod's
CA_SERVER_NAME = "ambit-ca.ambit-system.svc"  # what the CA's serving certificate names, as in a cluster
NODE_AGENT_ACCOUNT = "ambit-system/ambit-node"


@dataclass(frozen=True)
class LabCaPlan:
    """The lab's CA service: where it listens (the underlay's last address, in
    the underlay namespace) and the files its clients and it use."""

    address: str
    root_cert: Path   # public: what clients verify the CA (and peers) against
    key_dir: Path     # private to the CA
    log: Path

    @property
    def target(self) -> str:
        return f"{self.address}:{CA_PORT}"

    @property
    def tokens_file(self) -> Path:
        return self.key_dir / "tokens.csv"

    def client_args(self, token_file: Path) -> tuple[str, ...]:
        """`ambit-agent` / `ambit waypoint` options to get certificates from it."""
        return ("--ca-address", self.target, "--ca-server-name", CA_SERVER_NAME, "--ca-token-file", str(token_file),
                "--ca-root-cert", str(self.root_cert))


def lab_ca_plan(settings: LabSettings) -> LabCaPlan:
    underlay = ipaddress.IPv4Network(settings.underlay_cidr)
    return LabCaPlan(address=str(underlay.broadcast_address - 1), root_cert=settings.ca_dir / "root-cert.pem",
                     key_dir=settings.ca_key_dir, log=settings.ca_dir / "ca.log")


@dataclass(frozen=True)
class NodePlan:
    name: str            # the Kubernetes node name: the agent's --node-name, pods' spec.nodeName
    index: int
    netns: str
    underlay_ip: str
    underlay_prefixlen: int
    underlay_port: str   # the node's port on the underlay bridge
    pod_cidr: str
    workdir: Path
    bpffs_dir: Path
    proxy_netns: str
    agent_args: tuple[str, ...]

    @property
    def socket(self) -> Path:
        return self.workdir / "agent.sock"

    @property
    def ipam_dir(self) -> Path:
        return self.workdir / "ipam"

    @property
    def pods_dir(self) -> Path:
        return self.workdir / "pods"

    @property
    def ca_token(self) -> Path:
        """The agent's token for the CA (its projected service-account token, in a cluster)."""
        return self.workdir / "ca-token"


@dataclass(frozen=True)
class PodPlan:
    pod: Pod
    node: str
    netns: str
    log: Path

    @property
    def ca_token(self) -> Path:
        """A waypoint pod's own token for the CA."""
        return self.log.with_name(self.log.stem + ".ca-token")


@dataclass(frozen=True)
class LabPlan:
    settings: LabSettings
    config: LabConfig
    nodes: tuple[NodePlan, ...]
    pods: tuple[PodPlan, ...]
    ca: LabCaPlan

    def node(self, name: str) -> NodePlan:
        return next(n for n in self.nodes if n.name == name)


# How long a stopped or replaced lab agent relays what it has (its own
# --drain-seconds; `settings.agent_args` may say otherwise).
AGENT_DRAIN_SECONDS = 10


def node_agent_args(settings: LabSettings, bpffs_dir: Path, proxy_netns: str, ca_token: Path) -> tuple[str, ...]:
    """Every per-node agent option, in one place. The proxy namespace and the
    pin directory carry the lab prefix, so `down` finds them even after a crash.
    Discovery reads the lab's cluster file, as agents in a cluster would watch
    the API server, and certificates come from the lab's CA service with the
    node's own token: no agent holds a CA key."""
    return ("--capture", settings.capture, "--proxy-netns", proxy_netns, "--bpffs-dir", str(bpffs_dir),
            "--discovery", "files", "--config-file", str(settings.cluster_file),
            *lab_ca_plan(settings).client_args(ca_token),
            "--metrics-port", str(METRICS_PORT), "--readiness-port", str(READINESS_PORT),
            "--drain-seconds", str(AGENT_DRAIN_SECONDS), *settings.agent_args)


def lab_conflist(settings: LabSettings, node: NodePlan) -> dict[str, Any]:
    """The node's chain: bridge + host-local + portmap + ambit-cni, with a
    default route in every pod via the bridge (what kubenet-style set-ups
    configure), so pods reach other nodes' pods through their node."""
    conflist = bridge_conflist(settings.network_name, node.pod_cidr, str(node.socket), ipam_dir=node.ipam_dir)
    conflist["plugins"][0]["ipam"]["routes"] = [{"dst": "0.0.0.0/0"}]
    return conflist


def plan_lab(config: LabConfig, settings: LabSettings, node_count: int | None = None) -> LabPlan:
    """Names and addresses for every node and pod; pure, so a bad config
    is refused before anything is created."""
    names = config.node_names(node_count)
    placement = config.assign_nodes(names)
    underlay = ipaddress.IPv4Network(settings.underlay_cidr)
    supernet = ipaddress.IPv4Network(settings.pod_supernet)
    if supernet.prefixlen > 24:
        raise LabError(f"the pod range {supernet} must be /24 or larger: each node gets a /24")
    capacity = min(underlay.num_addresses - 3, 2 ** (24 - supernet.prefixlen) - 1, 999)  # the last: the CA
    if len(names) > capacity:
        raise LabError(f"{len(names)} nodes do not fit: underlay {underlay} and pod range {supernet} "
                       f"leave room for {capacity}")
    nodes = []
    for index, name in enumerate(names, start=1):
        pod_cidr = ipaddress.IPv4Network((int(supernet.network_address) + index * 256, 24))
        netns = f"{settings.prefix}node{index}"
        workdir = settings.nodes_dir / name
        bpffs_dir = settings.bpffs_root / netns
        proxy_netns = f"{netns}-proxy"
        node = NodePlan(
            name=name, index=index, netns=netns, underlay_ip=str(underlay.network_address + index),
            underlay_prefixlen=underlay.prefixlen, underlay_port=f"{settings.prefix}n{index}",
            pod_cidr=str(pod_cidr), workdir=workdir, bpffs_dir=bpffs_dir, proxy_netns=proxy_netns, agent_args=())
        nodes.append(replace(node, agent_args=node_agent_args(settings, bpffs_dir, proxy_netns, node.ca_token)))
        if len(str(workdir / "agent.sock")) > UNIX_PATH_MAX:
            raise LabError(f"the agent socket path under {settings.state_dir} is too long for a Unix socket")
    pods = []
    netns_owner: dict[str, str] = {}
    for pod in config.pods:
        netns = settings.pod_netns(pod.namespace, pod.name)
        if netns in netns_owner:
            raise LabError(f"pods {netns_owner[netns]} and {pod.key} would share the namespace name {netns}")
        netns_owner[netns] = pod.key
        node = next(n for n in nodes if n.name == placement[pod.key])
        pods.append(PodPlan(pod, node.name, netns, node.pods_dir / f"{pod.namespace}-{pod.name}.log"))
    return LabPlan(settings, config, tuple(nodes), tuple(pods), lab_ca_plan(settings))
