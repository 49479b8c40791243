"""Which workload holds an address: destination attribution, fail closed.

The node proxy acts for a destination only once it can say which workload
the address belongs to; like ztunnel, it denies an unknown destination
rather than evaluate policy for nobody (which would skip every namespace and
selector policy, STRICT included).

For an address this node enrolled, the kernel's word wins: the enrolment
record (made on CNI ADD from CNI_ARGS, bound to the pod's veth) names the
pod, and discovery adds what only the pod object has (labels, service
account), found by that name. The API server has the pod object from its
creation, well before its status carries the address, so a pod enrolled
before discovery has seen its address is still attributed, and a stale
object that still lists the address (a finished pod whose IP was reused) is
not taken for it. Any other address is the pod discovery says holds it.

Nothing else attributes: an enrolled address whose pod object discovery does
not have, or whose pod object contradicts the record (another uid, another
node, other addresses), is unattributed, and the caller denies with the
reason given here.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .model import PodInfo
from .state import ClusterState


class EnrolledPod(Protocol):
    """What an enrolment record says of the pod holding an address."""

    @property
    def namespace(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def uid(self) -> str: ...


EnrolledLookup = Callable[[str], EnrolledPod | None]
"""address -> the pod this node enrolled with it, or None."""


@dataclass(frozen=True, slots=True)
class Attribution:
    """The workload at one address, or why there is none.

    `enrolled`: the address belongs to a pod this node enrolled (so traffic
    to it must get a destination decision here, never a passthrough).
    """

    address: str
    pod: PodInfo | None
    enrolled: bool
    reason: str  # why no pod; for a pod, which source said so ("enrolment record" / "discovery")

    @property
    def known(self) -> bool:
        return self.pod is not None


def _no_records(address: str) -> EnrolledPod | None:
    return None


class Attributor:
    """Attributes addresses from the enrolment records and the cluster state.

    `node_name` is this node's (empty: do not check placement); `enrolled`
    looks up this node's enrolment records (none: discovery alone decides).
    """

    def __init__(self, state: ClusterState, node_name: str = "", enrolled: EnrolledLookup = _no_records) -> None:
        self.state = state
        self.node_name = node_name
        self._enrolled = enrolled
        # The record of an address, as attribution reads it first: a memo of an
        # answer (routing's plan cache) holds while this returns the same object.
        self.record = enrolled

    def pod(self, address: str) -> PodInfo | None:
        """The pod at `address`, None when unattributed (`attribute` says why).
        The per-connection call: it allocates and formats nothing."""
        record = self._enrolled(address)
        if record is None:
            return self.state.pod_by_ip(address)
        return self._recorded(address, record)[0]

    def enrolled_pod(self, address: str) -> PodInfo | None:
        """The pod this node enrolled with `address`, as its pod object
        describes it; None when there is no such record or it does not fit
        (`attribute` says why). Per connection, for a client's identity."""
        record = self._enrolled(address)
        return None if record is None else self._recorded(address, record)[0]

    def attribute(self, address: str) -> Attribution:
        """The pod at `address` with where that came from, or why there is none."""
        record = self._enrolled(address)
        if record is not None:
            pod, why = self._recorded(address, record)
            return Attribution(address, pod, True, why or "enrolment record")
        pod = self.state.pod_by_ip(address)
        if pod is None:
            return Attribution(address, None, False,
                               f"no pod holds {address}: not enrolled on this node, unknown to discovery")
        return Attribution(address, pod, False, "discovery")

    def _recorded(self, address: str, record: EnrolledPod) -> tuple[PodInfo | None, str]:
        """(the record's pod object, "") or (None, why it does not fit the record)."""
        pod = self.state.pod(record.namespace, record.name)
        if pod is not None and (not record.uid or not pod.uid or pod.uid == record.uid) \
                and (not self.node_name or not pod.node_name or pod.node_name == self.node_name) \
                and (not pod.ips or address in pod.ips):
            return pod, ""
        enrolled_as = f"{address} is enrolled on this node as {record.namespace}/{record.name}"
        if pod is None:
            return None, f"{enrolled_as}, a pod discovery does not know"
        if record.uid and pod.uid and pod.uid != record.uid:
            return None, f"{enrolled_as} (uid {record.uid}), but discovery's {pod} is uid {pod.uid}"
        if self.node_name and pod.node_name and pod.node_name != self.node_name:
            return None, f"{enrolled_as}, but discovery places {pod} on node {pod.node_name}"
        return None, f"{enrolled_as}, but discovery gives {pod} the address(es) {', '.join(pod.ips)}"
