"""PeerAuthentication: does a workload accept plaintext on a port?

Resolution follows istiod's ambient translation. For one workload the
candidates are: the mesh policy (root namespace, no selector), the namespace
policy (workload namespace, no selector) and the workload policy (workload
namespace, selector matching the workload's labels; selector policies in the
root namespace are ignored, as istiod ignores them for ambient). At each level
the oldest policy wins. The mode is inherited down mesh -> namespace ->
workload -> port wherever a level says UNSET; the default is PERMISSIVE.

At L4 the node proxy cannot "disable" mTLS for a peer that sends it, so
DISABLE behaves like PERMISSIVE: only STRICT changes anything, by refusing
connections that arrive without a peer identity (plaintext on 15006).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone

from ..discovery.model import labels_match
from ..discovery.policy_model import MtlsMode, PeerAuthentication

DEFAULT_ROOT_NAMESPACE = "istio-system"
_CACHE_LIMIT = 4096
_EPOCH = datetime.min.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class MtlsResolution:
    """The effective mode for one port and the policy that decided it (None = default)."""

    mode: MtlsMode
    policy: str | None
    level: str  # "port", "workload", "namespace", "mesh" or "default"

    @property
    def requires_mtls(self) -> bool:
        return self.mode is MtlsMode.STRICT

    @property
    def reason(self) -> str:
        if self.policy is None:
            return f"mTLS {self.mode.value} (default, no PeerAuthentication applies)"
        return f"mTLS {self.mode.value} from {self.level}-level PeerAuthentication {self.policy}"


@dataclass(frozen=True)
class EffectiveMtls:
    """A workload's resolved modes: one for all ports plus per-port exceptions."""

    default: MtlsResolution
    ports: Mapping[int, MtlsResolution]

    def for_port(self, port: int) -> MtlsResolution:
        return self.ports.get(port, self.default)


def _oldest(policies: Iterable[PeerAuthentication]) -> PeerAuthentication | None:
    """Istio keeps the oldest on conflict; a missing timestamp counts as oldest, name breaks ties."""
    return min(policies, key=lambda p: (p.created or _EPOCH, p.name), default=None)


class PeerAuthenticationPolicy:
    """All PeerAuthentication objects the node knows, indexed by namespace."""

    def __init__(self, root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> None:
        self._root_namespace = root_namespace
        self._by_namespace: dict[str, list[PeerAuthentication]] = {}
        self._cache: dict[tuple[str, frozenset[tuple[str, str]]], EffectiveMtls] = {}

    @property
    def root_namespace(self) -> str:
        return self._root_namespace

    def set_root_namespace(self, namespace: str) -> None:
        self._root_namespace = namespace
        self._cache.clear()

    def update(self, policies: Iterable[PeerAuthentication]) -> None:
        """Replace the whole set (state of the world, as a watch resync delivers it)."""
        by_namespace: dict[str, list[PeerAuthentication]] = {}
        for policy in policies:
            by_namespace.setdefault(policy.namespace, []).append(policy)
        self._by_namespace = by_namespace
        self._cache.clear()

    def effective(
        self,
        namespace: str,
        labels: Mapping[str, str],
        cache_key: tuple[str, frozenset[tuple[str, str]]] | None = None,
    ) -> EffectiveMtls:
        """Resolve (and cache) the modes of the workload with these labels.

        `cache_key` is (namespace, frozenset(labels.items())) when the caller
        already has it, to save building it again per connection.
        """
        if cache_key is None:
            cache_key = (namespace, frozenset(labels.items()))
        found = self._cache.get(cache_key)
        if found is None:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            found = self._resolve(namespace, labels)
            self._cache[cache_key] = found
        return found

    def mode_for(self, namespace: str, labels: Mapping[str, str], port: int) -> MtlsResolution:
        return self.effective(namespace, labels).for_port(port)

    def requires_mtls(self, namespace: str, labels: Mapping[str, str], port: int) -> bool:
        """True when plaintext to this workload port must be refused (STRICT)."""
        return self.mode_for(namespace, labels, port).requires_mtls

    def _resolve(self, namespace: str, labels: Mapping[str, str]) -> EffectiveMtls:
        root = self._root_namespace
        mesh = _oldest(p for p in self._by_namespace.get(root, ()) if p.selector is None)
        local = self._by_namespace.get(namespace, ()) if namespace != root else ()
        ns_policy = _oldest(p for p in local if p.selector is None)
        workload = _oldest(p for p in local if p.selector is not None and labels_match(p.selector, labels))

        current = MtlsResolution(MtlsMode.PERMISSIVE, None, "default")
        for level, policy in (("mesh", mesh), ("namespace", ns_policy), ("workload", workload)):
            if policy is not None and policy.mode is not MtlsMode.UNSET:
                current = MtlsResolution(policy.mode, policy.key, level)
        ports: dict[int, MtlsResolution] = {}
        if workload is not None:
            for port, mode in workload.port_level:
                if mode is not MtlsMode.UNSET:
                    ports[port] = MtlsResolution(mode, workload.key, "port")
        return EffectiveMtls(default=current, ports=ports)
