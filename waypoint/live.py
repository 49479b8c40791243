"""Keep a running waypoint in step with the cluster (`ambit waypoint --run --watch`).

The waypoint learns the cluster from one of the agent's own discovery
sources, feeding a ClusterState on an event loop of a thread of its own:
FileSource (the files `--discovery files` reads; re-read at each check) or
KubeSource (list/watch). When the state changed, the waypoint is planned
again (on that loop, so it never sees the state half-updated) and its
listeners, clusters and routes are rewritten into the files Envoy watches
(xds_files.py). Envoy keeps what did not change, drains what did, and the
hbone routes change under HBONE connections already up. Bad input (a file
the source rejects, the waypoint's Gateway gone) is logged and the running
configuration stays.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import structlog

from ambit.agent.discovery.file_source import FileSource
from ambit.agent.discovery.state import ClusterState
from .bootstrap import BootstrapOptions, waypoint_resources
from .credentials import SecretFiles
from .destinations import WaypointError, WaypointPlan, plan_waypoint
from .xds_files import XdsFiles, write_resources

log = structlog.get_logger(__name__)
T = TypeVar("T")

def write_configuration(plan: WaypointPlan, secrets: SecretFiles, xds: XdsFiles,
                        options: BootstrapOptions) -> tuple[bool, tuple[str, ...]]:
    """Render and write the plan's resources; (anything written, notes)."""
    resources, notes = waypoint_resources(plan, secrets, xds, options)
    version = hashlib.sha256(json.dumps(asdict(resources), sort_keys=True).encode()).hexdigest()[:12]
    return write_resources(xds, resources, version), notes


class SourceClusterView:
    """The cluster as a discovery source keeps it; see the module doc.

    `start(state)` makes and starts the source on the view's loop and returns
    it once the state holds the cluster; `poll(source)`, if given, is awaited
    at each check (FileSource.reload: the files are looked at then, not on a
    timer of their own)."""

    def __init__(self, start: Callable[[ClusterState], Awaitable[Any]],
                 poll: Callable[[Any], Awaitable[Any]] | None = None, timeout: float = 35.0) -> None:
        self.state = ClusterState()
        self._poll = poll
        self._source: Any = None
        self._dirty = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="waypoint-discovery", daemon=True)
        self._thread.start()

        async def begin() -> None:
            self.state.subscribe(lambda *_: self._dirty.set())
            self._source = await start(self.state)

        try:
            self._run(begin(), timeout)
        except BaseException as exc:
            self.close()
            if isinstance(exc, Exception) and not isinstance(exc, WaypointError):
                raise WaypointError(f"cannot read the cluster: {type(exc).__name__}: {exc}") from None
            raise
        self._dirty.clear()
        self._errors = self._source_errors()

    def _run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def _source_errors(self) -> dict[str, str]:
        """What the source rejects now (FileSource: file -> reason)."""
        errors = getattr(self._source, "errors", None)
        return dict(errors()) if callable(errors) else {}

    def changed(self) -> bool:
        """True (once) when the cluster, or what the source rejects, changed since the last call."""
        if self._poll is not None:
            self._run(self._poll(self._source))
        errors = self._source_errors()
        if errors != self._errors:
            self._errors = errors
            self._dirty.clear()
            return True
        if not self._dirty.is_set():
            return False
        self._dirty.clear()
        return True

    def plan(self, namespace: str, name: str, trust_domain: str, service_account: str | None) -> WaypointPlan:
        """The waypoint as the cluster has it now; WaypointError while the source rejects input."""
        async def make() -> WaypointPlan:
            errors = self._source_errors()
            if errors:
                raise WaypointError("; ".join(f"{where}: {why}" for where, why in errors.items()))
            return plan_waypoint(self.state, namespace, name, trust_domain, service_account)
        return self._run(make())

    def close(self) -> None:
        stop = getattr(self._source, "stop", None)
        if stop is not None:
            self._run(stop(), 15)
            self._source = None
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)


def file_view(paths: Sequence[Path]) -> SourceClusterView:
    """The cluster from YAML/JSON files and directories, as `--discovery files` reads them."""
    async def start(state: ClusterState) -> FileSource:
        source = FileSource(list(paths), state)
        await source.reload()  # no poller of its own: the view reloads at each check
        return source

    return SourceClusterView(start, poll=lambda source: source.reload())


def kube_view(kubeconfig: str | None, sync_timeout: float = 30.0) -> SourceClusterView:
    """The cluster from the API server (in-cluster credentials without a kubeconfig)."""
    from ambit.agent.discovery.kube import KubeSource, api_client_from  # the kubernetes client: only when asked for

    async def start(state: ClusterState) -> KubeSource:
        try:
            api = api_client_from(kubeconfig=kubeconfig, in_cluster=not kubeconfig)
        except Exception as exc:  # e.g. the kubeconfig unusable, or not in a cluster
            raise WaypointError(f"cannot use the Kubernetes API: {type(exc).__name__}: {exc}") from None
        source = KubeSource(api, state, node_name="")
        await source.start()
        try:
            await asyncio.wait_for(source.synced.wait(), sync_timeout)
        except BaseException:
            await source.stop()
            raise WaypointError(f"the API server did not answer every list within {sync_timeout:g}s") from None
        return source

    return SourceClusterView(start, timeout=sync_timeout + 5)


class ConfigWatcher:
    """Re-plans one waypoint when its view of the cluster changed."""

    def __init__(self, view: SourceClusterView, plan: WaypointPlan, secrets: SecretFiles, xds: XdsFiles,
                 options: BootstrapOptions, service_account: str | None = None) -> None:
        self.view = view
        self.plan = plan
        self.secrets = secrets
        self.xds = xds
        self.options = options
        self.service_account = service_account

    def refresh(self) -> bool:
        """Apply the cluster as it is now if it changed; True when Envoy's files were rewritten."""
        if not self.view.changed():
            return False
        waypoint = self.plan.waypoint
        try:
            plan = self.view.plan(waypoint.namespace, waypoint.name, self.plan.identity.trust_domain,
                                  self.service_account)
        except WaypointError as exc:
            log.error("waypoint.config_unusable", waypoint=waypoint.key, error=str(exc),
                      keeping="the running configuration")
            return False
        if plan.identity != self.plan.identity:
            log.error("waypoint.identity_changed", waypoint=waypoint.key, running_as=str(self.plan.identity),
                      wanted=str(plan.identity), keeping="the running configuration (restart to change identity)")
            return False
        written, notes = write_configuration(plan, self.secrets, self.xds, self.options)
        self.plan = plan
        if written:
            log.info("waypoint.config_updated", waypoint=waypoint.key,
                     destinations=[d.authority for d in plan.destinations], notes=list(plan.notes + notes))
        return written
