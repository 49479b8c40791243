"""The agent's view of the mesh: discovery (Kubernetes or local files),
identities (the CA and per-service-account certificates) and policy, put
together once at start-up and handed to enrolment and the proxy."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from .discovery.file_source import FileSource
from .discovery.kube import KubeSource, api_client_from
from .discovery.model import PodInfo
from .discovery.report import DiscoveryReport, discovery_report
from .discovery.selector import AmbientSelector
from .discovery.state import ClusterState
from .enrolment import Enrolment
from .identity.ca import LocalCA
from .identity.store import CertificateStore
from .policy.authz import PolicyEngine
from .policy.enforce import Authorizer
from .policy.peerauth import PeerAuthenticationPolicy
from .proxy.node_proxy import Mesh
from .proxy.routing import OutboundRouter
from .workload import PodRef

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
    certs_dir: str = "/var/run/ambit/certs"
    sync_timeout: float = 30.0


class MeshRuntime:
    """Owns the discovery source and the live enrolment reactions."""

    def __init__(self, settings: MeshSettings) -> None:
        self.settings = settings
        self.peer_authentication = PeerAuthenticationPolicy(settings.root_namespace)
        self.engine = PolicyEngine(settings.root_namespace, peer_authentication=self.peer_authentication)
        self.state = ClusterState(self.engine, self.peer_authentication)
        self.source: Any = None
        self.selector: AmbientSelector | None = None
        self.mesh: Mesh | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._unsubscribe: list[Any] = []

    async def start(self) -> None:
        s = self.settings
        if s.discovery == "files":
            self.source = FileSource(list(s.files), self.state)
            ready = self.source.loaded
            fetch = None
        elif s.discovery == "kube":
            api = api_client_from(kubeconfig=s.kubeconfig, in_cluster=not s.kubeconfig)
            self.source = KubeSource(api, self.state, s.node_name)
            ready = self.source.synced
            fetch = self.source.fetch_pod
        else:
            raise ValueError(f"unknown discovery source {s.discovery!r}")
        await self.source.start()
        try:
            await asyncio.wait_for(ready.wait(), s.sync_timeout)
        except TimeoutError:
            log.warning("discovery not synced yet; the agent stays not ready until it is",
                        source=s.discovery, waited_s=s.sync_timeout)
        self.selector = AmbientSelector(self.state, fetch=fetch)
        ca = await asyncio.to_thread(LocalCA.load_or_create, Path(s.ca_dir), s.trust_domain)
        certificates = CertificateStore(ca, Path(s.certs_dir))
        self.mesh = Mesh(state=self.state, router=OutboundRouter(self.state, s.node_name, s.trust_domain),
                         authorizer=Authorizer(self.state, self.engine), certificates=certificates)
        log.info("mesh view ready", discovery=s.discovery, trust_domain=s.trust_domain, counts=self.state.counts())

    @property
    def synced(self) -> bool:
        event = getattr(self.source, "loaded", None) or getattr(self.source, "synced", None)
        return bool(event and event.is_set())

    def report(self) -> DiscoveryReport:
        """What discovery has applied (AgentStatus), read on the event loop between updates."""
        return discovery_report(self.settings.discovery, self.source, self.synced, self.state)

    def follow(self, enrolment: Enrolment) -> None:
        """Label changes move this node's pods in or out of the mesh live."""
        enrolment.selector = self.selector

        def on_flip(pod: PodInfo, in_mesh: bool, reason: str) -> None:
            task = asyncio.get_running_loop().create_task(
                enrolment.set_membership(PodRef(pod.namespace, pod.name, pod.uid), in_mesh, reason))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        self._unsubscribe.append(self.state.subscribe_ambient(on_flip, node_name=self.settings.node_name))

    async def resync(self, enrolment: Enrolment) -> None:
        """After a restart: records whose membership changed while the agent
        was down follow the current labels."""
        assert self.selector is not None
        for workload in enrolment.workloads():
            in_mesh, reason = self.selector.decide(workload.pod)
            if in_mesh != workload.in_mesh:
                await enrolment.set_membership(workload.pod, in_mesh, reason)

    async def stop(self) -> None:
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        for task in list(self._tasks):
            task.cancel()
        if self.source is not None:
            await self.source.stop()
