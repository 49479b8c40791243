"""Keep a running waypoint in step with the cluster (`ambit waypoint --run --watch`).

Where the waypoint learns the cluster (a view):
- FileClusterView: the files `--discovery files` reads, checked for changes
  every couple of seconds;
- KubeClusterView: the Kubernetes API, listed and watched by the agent's own
  KubeSource on a thread of its own.
When the view changed, the waypoint is planned again and its listeners,
clusters and routes are rewritten into the files Envoy watches
(xds_files.py). Envoy keeps what did not change, drains what did, and the
hbone routes change under HBONE connections already up. Bad input (a file
that does not parse, the waypoint's Gateway gone) is logged and the running
configuration stays.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import structlog

from ..discovery.files import BadFile, parse_documents
from ..discovery.state import ClusterState
from .bootstrap import BootstrapOptions, waypoint_resources
from .credentials import SecretFiles
from .destinations import WaypointError, WaypointPlan, plan_waypoint, state_from_objects
from .xds_files import XdsFiles, write_resources

log = structlog.get_logger(__name__)

SUFFIXES = (".yaml", ".yml", ".json")


def _files(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        files += sorted(p for p in path.iterdir() if p.suffix in SUFFIXES) if path.is_dir() else [path]
    return files


def read_objects(paths: Sequence[Path]) -> list[Mapping[str, Any]]:
    """The objects of YAML/JSON files, and of the *.yaml/*.yml/*.json files of directories."""
    objects: list[Mapping[str, Any]] = []
    for file in _files(paths):
        try:
            objects += parse_documents(file.read_text(), file)
        except BadFile as exc:
            raise WaypointError(f"{file}: {exc}") from None
        except OSError as exc:
            raise WaypointError(f"cannot read {file}: {exc.strerror}") from None
    return objects


def signature(paths: Sequence[Path]) -> tuple[Any, ...]:
    """What changes when any of the files does (names, inode, size, mtime, ctime)."""
    marks: list[Any] = []
    try:
        files = _files(paths)
    except OSError as exc:
        return (("unreadable", str(exc)),)
    for file in files:
        try:
            st = os.stat(file)
        except OSError:
            marks.append((str(file), None))
            continue
        marks.append((str(file), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(marks)


def write_configuration(plan: WaypointPlan, secrets: SecretFiles, xds: XdsFiles,
                        options: BootstrapOptions) -> tuple[bool, tuple[str, ...]]:
    """Render and write the plan's resources; (anything written, notes)."""
    resources, notes = waypoint_resources(plan, secrets, xds, options)
    version = hashlib.sha256(json.dumps(asdict(resources), sort_keys=True).encode()).hexdigest()[:12]
    return write_resources(xds, resources, version), notes


class ClusterView(Protocol):
    def changed(self) -> bool:
        """True (once) when the cluster may have changed since the last call."""

    def plan(self, namespace: str, name: str, trust_domain: str, service_account: str | None) -> WaypointPlan:
        """The waypoint as the cluster has it now; raises WaypointError."""


class FileClusterView:
    """The cluster as YAML/JSON files; a change is a change of any file's stat."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)
        self._signature = signature(self.paths)

    def changed(self) -> bool:
        current = signature(self.paths)
        if current == self._signature:
            return False
        self._signature = current
        return True

    def plan(self, namespace: str, name: str, trust_domain: str, service_account: str | None) -> WaypointPlan:
        return plan_waypoint(state_from_objects(read_objects(self.paths)), namespace, name, trust_domain,
                             service_account)


class KubeClusterView:
    """The cluster from the API server: the agent's KubeSource feeds a ClusterState
    on an event loop of its own; plans are made on that loop, so they never see
    the state half-updated."""

    def __init__(self, kubeconfig: str | None, sync_timeout: float = 30.0) -> None:
        from ..discovery.kube import KubeSource, api_client_from

        self.state = ClusterState()
        self._dirty = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="waypoint-kube", daemon=True)
        self._thread.start()
        self._source: Any = None

        async def start() -> None:
            api = api_client_from(kubeconfig=kubeconfig, in_cluster=not kubeconfig)
            self._source = KubeSource(api, self.state, node_name="")
            self.state.subscribe(lambda *_: self._dirty.set())
            await self._source.start()
            await asyncio.wait_for(self._source.synced.wait(), sync_timeout)

        try:
            asyncio.run_coroutine_threadsafe(start(), self._loop).result(sync_timeout + 5)
        except BaseException as exc:
            self.close()
            if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
                raise WaypointError(f"the API server did not answer every list within {sync_timeout:g}s") from None
            if isinstance(exc, Exception):  # e.g. the kubeconfig unusable, or not in a cluster
                raise WaypointError(f"cannot use the Kubernetes API: {type(exc).__name__}: {exc}") from None
            raise
        self._dirty.clear()

    def changed(self) -> bool:
        if not self._dirty.is_set():
            return False
        self._dirty.clear()
        return True

    def plan(self, namespace: str, name: str, trust_domain: str, service_account: str | None) -> WaypointPlan:
        async def make() -> WaypointPlan:
            return plan_waypoint(self.state, namespace, name, trust_domain, service_account)
        return asyncio.run_coroutine_threadsafe(make(), self._loop).result(30)

    def close(self) -> None:
        if self._source is not None:
            asyncio.run_coroutine_threadsafe(self._source.stop(), self._loop).result(15)
            self._source = None
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)


class ConfigWatcher:
    """Re-plans one waypoint when its view of the cluster changed."""

    def __init__(self, view: ClusterView, plan: WaypointPlan, secrets: SecretFiles, xds: XdsFiles,
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
