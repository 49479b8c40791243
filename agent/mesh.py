"""The agent's view of the mesh: discovery (Kubernetes or local files),
identities (per-service-account certificates from the CA) and policy, put
together once at start-up and handed to enrolment and the proxy.

Until discovery has synced every kind the agent reads, policies included,
the view is partial: the proxy refuses new connections (`Mesh.pending`), the
agent is not ready, and records are not yet matched against labels. No
timeout ends that: a source that never syncs keeps the agent not ready and
its pods failing closed, with the reason in /healthz/ready and AgentStatus.

Certificates come from a CA speaking Istio's API (`ca` settings: istiod,
istio-csr, `ambit ca`), asked on behalf of each identity with a pod in the
mesh on this node as soon as discovery shows one; without those settings a
local CA on disk signs them (no Kubernetes, tests)."""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from .discovery.attribution import Attributor, EnrolledPod
from .discovery.file_source import FileSource
from .discovery.model import KIND_NAMESPACE, PodInfo
from .discovery.report import DiscoveryReport, discovery_report
from .discovery.selector import AmbientSelector
from .discovery.state import ClusterState
from .enrolment import Enrolment, EnrolmentError
from .identity.credentials_child import ChildProcessCaIssuer
from .identity.istio_ca import CaClientSettings, IstioCaClient
from .identity.rotation import CertificateRotation
from .identity.spiffe import SpiffeId
from .identity.store import CertificateStore
from .identity.validity import DEFAULT_LEAF_TTL
from .policy.authz import PolicyEngine
from .policy.enforce import Authorizer
from .policy.peerauth import PeerAuthenticationPolicy
from .proxy.node_proxy import Mesh
from .proxy.routing import OutboundRouter
from .workload import PodRef, Workload

if TYPE_CHECKING:
    from .identity.issuer import LocalIssuer

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class MeshSettings:
    discovery: str                   # "files" | "kube"
    node_name: str
    trust_domain: str = "cluster.local"
    root_namespace: str = "istio-system"
    files: tuple[str, ...] = ()
    kubeconfig: str | None = None
    ca_dir: str = "/var/run/ambit/ca"
    ca: CaClientSettings | None = None  # a remote CA; None: the local CA in ca_dir
    cert_ttl: timedelta = DEFAULT_LEAF_TTL
    certs_dir: str = "/var/run/ambit/certs"


def local_identities(state: ClusterState, node_name: str, trust_domain: str) -> set[SpiffeId]:
    """The identities of this node's pods in the mesh: the certificates the node needs."""
    return {state.identity(pod, trust_domain) for pod in state.local_pods(node_name)
            if not pod.terminated and pod.deletion is None and state.ambient_decision(pod)[0]}


class MeshRuntime:
    """Owns the discovery source and the live enrolment reactions."""

    def __init__(self, settings: MeshSettings, enrolled: Callable[[str], Workload | None] = lambda ip: None) -> None:
        """`enrolled`: this node's enrolment record for an address (destinations are attributed by it)."""
        self.settings = settings
        self._enrolled = enrolled
        self.peer_authentication = PeerAuthenticationPolicy(settings.root_namespace)
        self.engine = PolicyEngine(settings.root_namespace, peer_authentication=self.peer_authentication)
        self.state = ClusterState(self.engine, self.peer_authentication)
        self.source: Any = None
        self._synced: asyncio.Event | None = None  # the source's: set once every kind is in
        self.settled = False  # synced, and the enrolment records follow the labels
        self.selector: AmbientSelector | None = None
        self.mesh: Mesh | None = None
        self.rotation: CertificateRotation | None = None
        self._ca_client: IstioCaClient | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._unsubscribe: list[Any] = []
        self._unfollow: Any = None
        self.api_client: Any = None  # the Kubernetes API client, with --discovery kube

    async def start(self) -> None:
        s = self.settings
        if s.discovery == "files":
            self.source = FileSource(list(s.files), self.state)
            ready = self.source.loaded
            fetch = None
        elif s.discovery == "kube":
            # Imported here: the Kubernetes client (and pydantic, which it
            # brings) cost ~0.25 s and ~25 MB, and only this mode uses them.
            from .discovery.kube import KubeSource, api_client_from

            api = api_client_from(kubeconfig=s.kubeconfig, in_cluster=not s.kubeconfig)
            self.api_client = api
            self.source = KubeSource(api, self.state, s.node_name)
            ready = self.source.synced
            fetch = self.source.fetch_pod
        else:
            raise ValueError(f"unknown discovery source {s.discovery!r}")
        self._synced = ready
        await self.source.start()
        self.selector = AmbientSelector(self.state, fetch=fetch)
        certificates = CertificateStore(await self._issuer(), Path(s.certs_dir), ttl=s.cert_ttl)
        self.rotation = CertificateRotation(certificates)
        self.rotation.start()
        self._unsubscribe.append(self.state.subscribe(self._on_cluster_change))
        self._want_certificates()
        attributor = Attributor(self.state, s.node_name, self._enrolled_pod)
        self.mesh = Mesh(state=self.state, router=OutboundRouter(self.state, s.node_name, s.trust_domain, attributor),
                         authorizer=Authorizer(self.state, self.engine, attributor), certificates=certificates,
                         pending=self.pending, until_synced=self.until_synced)
        log.info("mesh started", discovery=s.discovery, trust_domain=s.trust_domain, ca=certificates.issuer,
                 synced=self.synced, counts=self.state.counts())

    async def _issuer(self) -> LocalIssuer | ChildProcessCaIssuer:
        """A CA key on this host signs in-process (`cryptography` loaded for it); a remote
        CA's keys, CSRs and answers are handled in a child (credentials_child.py)."""
        s = self.settings
        if s.ca is None:
            from .identity.ca import LocalCA
            from .identity.issuer import LocalIssuer
            return LocalIssuer(await asyncio.to_thread(LocalCA.load_or_create, Path(s.ca_dir), s.trust_domain))
        self._ca_client = IstioCaClient(s.ca)
        return ChildProcessCaIssuer(self._ca_client, s.trust_domain)

    def _on_cluster_change(self, kind: str, event_type: str, old: Any, new: Any) -> None:
        node = self.settings.node_name
        if kind == KIND_NAMESPACE or any(isinstance(p, PodInfo) and p.node_name == node for p in (old, new)):
            self._want_certificates()

    def _want_certificates(self) -> None:
        assert self.rotation is not None
        self.rotation.want(local_identities(self.state, self.settings.node_name, self.settings.trust_domain))

    def _enrolled_pod(self, address: str) -> EnrolledPod | None:
        workload = self._enrolled(address)
        return workload.pod if workload is not None else None

    @property
    def synced(self) -> bool:
        return self._synced is not None and self._synced.is_set()

    def pending(self) -> str:
        """Why the cluster view is partial ("" once discovery has synced)."""
        if self.synced:
            return ""
        pending = self.source.pending() if self.source is not None else {}
        return "; ".join(f"{what}: {why}" for what, why in sorted(pending.items())) or "not started"

    async def until_synced(self) -> None:
        """Returns once discovery has synced every kind (no deadline: callers bound it)."""
        assert self._synced is not None
        await self._synced.wait()

    async def settle(self, enrolment: Enrolment) -> None:
        """Wait for discovery to sync, however long (a timeout would turn a
        partial view into a served one), then let records follow the labels."""
        assert self._synced is not None
        if not self.synced:
            log.warning("discovery has not synced: the proxy refuses new connections and the agent is not ready "
                        "until it has", source=self.settings.discovery, pending=self.pending())
        await self._synced.wait()
        log.info("discovery synced", source=self.settings.discovery, counts=self.state.counts())
        await self.resync(enrolment)
        self.settled = True

    def report(self) -> DiscoveryReport:
        """What discovery has applied (AgentStatus), read on the event loop between updates."""
        return discovery_report(self.settings.discovery, self.source, self.synced, self.state)

    def follow(self, enrolment: Enrolment) -> None:
        """Label changes move this node's pods in or out of the mesh live."""
        enrolment.selector = self.selector

        async def flip(pod: PodInfo, in_mesh: bool, reason: str) -> None:
            try:
                await enrolment.set_membership(PodRef(pod.namespace, pod.name, pod.uid), in_mesh, reason)
            except EnrolmentError as exc:  # frozen for a hand-over: the successor resyncs at its start
                log.info("membership change left to the successor", pod=f"{pod.namespace}/{pod.name}",
                         in_mesh=in_mesh, error=str(exc))

        def on_flip(pod: PodInfo, in_mesh: bool, reason: str) -> None:
            task = asyncio.get_running_loop().create_task(flip(pod, in_mesh, reason))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        self._unfollow = self.state.subscribe_ambient(on_flip, node_name=self.settings.node_name)

    def unfollow(self) -> None:
        """Label changes no longer touch enrolment (the agent is stopping;
        the next one resyncs at its start)."""
        if self._unfollow is not None:
            self._unfollow()
            self._unfollow = None

    async def resync(self, enrolment: Enrolment) -> None:
        """After a restart: records whose membership changed while the agent
        was down follow the current labels."""
        assert self.selector is not None
        for workload in enrolment.workloads():
            in_mesh, reason = self.selector.decide(workload.pod)
            if in_mesh != workload.in_mesh:
                await enrolment.set_membership(workload.pod, in_mesh, reason)

    async def stop(self) -> None:
        self.unfollow()
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        for task in list(self._tasks):
            task.cancel()
        if self.rotation is not None:
            await self.rotation.stop()
        if self._ca_client is not None:
            await self._ca_client.close()
        if self.source is not None:
            await self.source.stop()
