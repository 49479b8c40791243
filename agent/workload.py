"""What the agent knows of one enrolled pod attachment."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ambit.api.v1 import agent_pb2 as pb


@dataclass(frozen=True)
class PodRef:
    namespace: str = ""
    name: str = ""
    uid: str = ""

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}" if self.name else "-"


@dataclass(frozen=True)
class AttachmentKey:
    """The runtime's unit of ADD/DEL: container id + interface name."""

    container_id: str
    ifname: str

    def __str__(self) -> str:
        return f"{self.container_id[:12]}/{self.ifname}"


# Workload.capture for a pod the CNI told us about that is not in the mesh:
# recorded (so a label change can bring it in live), never touched.
OUTSIDE_MESH = "none"

# Workload.origin: who told the agent about the pod. The runtime's attachment
# keys (container id + ifname) exist only for "cni"; the others carry a key
# of the agent's own (ADOPTED_PREFIX) that no runtime will ever DEL or GC.
FROM_CNI = "cni"          # CNI ADD
ADOPTED = "adopted"       # running before ambit was chained: found from discovery plus the kernel
REBUILT = "rebuilt"       # captured, its record lost: rebuilt from the kernel (plus discovery)
ADOPTED_PREFIX = "ambit-"


@dataclass(frozen=True)
class Workload:
    key: AttachmentKey
    netns: str
    pod: PodRef
    ips: tuple[str, ...]
    network: str
    host_veth: str
    host_veth_ifindex: int
    container_ifindex: int
    enrolled_at: float
    capture: str = "recorded"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    origin: str = FROM_CNI

    @property
    def in_mesh(self) -> bool:
        return self.capture != OUTSIDE_MESH

    @property
    def addresses(self) -> tuple[str, ...]:
        """Bare IPs without prefix length."""
        return tuple(ip.split("/")[0] for ip in self.ips)

    def to_proto(self) -> pb.Workload:
        return pb.Workload(
            attachment=pb.Attachment(container_id=self.key.container_id, ifname=self.key.ifname),
            netns=self.netns, pod=pb.PodRef(namespace=self.pod.namespace, name=self.pod.name, uid=self.pod.uid),
            ips=list(self.ips), network=self.network, host_veth=self.host_veth,
            host_veth_ifindex=self.host_veth_ifindex, container_ifindex=self.container_ifindex,
            enrolled_at=self.enrolled_at, capture=self.capture, origin=self.origin)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["key"] = asdict(self.key)
        data["pod"] = asdict(self.pod)
        data["ips"] = list(self.ips)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Workload":
        return cls(key=AttachmentKey(**data["key"]), netns=data["netns"], pod=PodRef(**data["pod"]),
                   ips=tuple(data["ips"]), network=data["network"], host_veth=data["host_veth"],
                   host_veth_ifindex=int(data["host_veth_ifindex"]),
                   container_ifindex=int(data["container_ifindex"]), enrolled_at=float(data["enrolled_at"]),
                   capture=data.get("capture", "recorded"), extra=dict(data.get("extra", {})),
                   origin=data.get("origin", FROM_CNI))
