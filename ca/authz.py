"""Which identity a caller may have certified: Kubernetes node authorisation, for a CA.

The rules (istiod's with CA_TRUSTED_NODE_ACCOUNTS, and istio-csr's):

- A caller asking for no one else gets its own identity: the SPIFFE ID of
  the service account its token belongs to (a waypoint, any workload).
- A caller asking for someone else (metadata["ImpersonatedIdentity"]) must
  be a trusted node proxy (its service account is listed), and a pod with
  the requested identity must be scheduled on the caller's node.
- The caller's node is read from the caller's own pod, which the token
  names; the pod must still exist with that uid and service account. When
  the token also names a node (Kubernetes >= 1.30, or a static token), the
  two must agree. Nothing the request says is trusted for this.

Everything here is pure: lookups are done by the service and passed in.
Refusals carry a gRPC status name, a short reason (a metric label) and a
sentence for the log.
"""
from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from ambit.agent.discovery.model import PodInfo
from ambit.agent.identity.spiffe import SpiffeId

from .authn import Caller

UNAUTHENTICATED = "UNAUTHENTICATED"
PERMISSION_DENIED = "PERMISSION_DENIED"
INVALID_ARGUMENT = "INVALID_ARGUMENT"
UNAVAILABLE = "UNAVAILABLE"


class Refused(Exception):
    def __init__(self, code: str, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Wanted:
    """The identity to certify and whether the caller asked on someone's behalf."""

    identity: SpiffeId
    impersonating: bool


def parse_accounts(text: str) -> frozenset[str]:
    """CA_TRUSTED_NODE_ACCOUNTS' form, `ns/sa,ns/sa`; ValueError on a malformed entry."""
    accounts = set()
    for entry in filter(None, (part.strip() for part in text.split(","))):
        namespace, slash, name = entry.partition("/")
        if not slash or not namespace or not name or "/" in name:
            raise ValueError(f"trusted node account {entry!r} is not NAMESPACE/SERVICEACCOUNT")
        accounts.add(entry)
    return frozenset(accounts)


def wanted_identity(caller: Caller, impersonated: str, trust_domain: str,
                    trusted_node_accounts: Collection[str]) -> Wanted:
    """The identity to certify for `caller`, before the node check."""
    if not impersonated:
        return Wanted(caller.identity(trust_domain), impersonating=False)
    if caller.account not in trusted_node_accounts:
        raise Refused(PERMISSION_DENIED, "not-a-node-proxy",
                      f"{caller.account} may not ask for other identities (it is not a trusted node account)")
    try:
        identity = SpiffeId.parse(impersonated)
    except ValueError as exc:
        raise Refused(INVALID_ARGUMENT, "bad-identity", f"ImpersonatedIdentity: {exc}") from None
    if identity.trust_domain != trust_domain:
        raise Refused(PERMISSION_DENIED, "foreign-trust-domain",
                      f"{identity} is not in this CA's trust domain {trust_domain}")
    return Wanted(identity, impersonating=True)


def caller_node(caller: Caller, caller_pod: PodInfo | None) -> str:
    """The node the caller runs on, from its own pod (or its node-bound token)."""
    if caller.pod_name:
        if caller_pod is None:
            raise Refused(PERMISSION_DENIED, "caller-pod-unknown",
                          f"the caller's pod {caller.namespace}/{caller.pod_name} does not exist")
        if caller.pod_uid and caller_pod.uid != caller.pod_uid:
            raise Refused(PERMISSION_DENIED, "caller-pod-replaced",
                          f"the caller's pod {caller_pod} has uid {caller_pod.uid}, the token was for {caller.pod_uid}")
        if caller_pod.service_account != caller.service_account:
            raise Refused(PERMISSION_DENIED, "caller-pod-account",
                          f"the caller's pod {caller_pod} runs as {caller_pod.service_account}, "
                          f"not {caller.service_account}")
        if not caller_pod.node_name:
            raise Refused(PERMISSION_DENIED, "caller-pod-unscheduled", f"the caller's pod {caller_pod} has no node")
        if caller.node_name and caller.node_name != caller_pod.node_name:
            raise Refused(PERMISSION_DENIED, "caller-node-mismatch",
                          f"the token says node {caller.node_name}, the caller's pod {caller_pod} is on "
                          f"{caller_pod.node_name}")
        return caller_pod.node_name
    if caller.node_name and caller.source == "token-file":
        return caller.node_name  # the operator's file binds the token to the node
    raise Refused(PERMISSION_DENIED, "token-not-bound-to-a-pod",
                  f"{caller.account}'s token is bound to no pod, so it says nothing about a node")


def check_scheduled_on(identity: SpiffeId, node: str, pods: Iterable[PodInfo]) -> PodInfo:
    """A running pod with `identity` on `node`; Refused when there is none."""
    for pod in pods:
        if (pod.node_name == node and pod.namespace == identity.namespace
                and pod.service_account == identity.service_account and not pod.terminated):
            return pod
    raise Refused(PERMISSION_DENIED, "identity-not-on-node",
                  f"no pod of {identity.namespace}/{identity.service_account} runs on node {node}")


def check_csr_identity(requested: SpiffeId, wanted: SpiffeId) -> None:
    """The CSR must name exactly the identity being certified."""
    if requested != wanted:
        raise Refused(INVALID_ARGUMENT, "csr-identity-mismatch",
                      f"the CSR asks for {requested}, the request is for {wanted}")
