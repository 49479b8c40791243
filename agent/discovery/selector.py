"""Which pods the node proxy captures, asked on CNI ADD/CHECK.

A CNI ADD can arrive before the watch has delivered the pod (the runtime
creates the sandbox right after the scheduler binds it). With an API server
the selector then reads the pod and its namespace directly, once, and puts
them into the state so the decision and the later watch events agree. With
local files there is nothing to ask: the namespace label decides alone.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

import structlog

from ..workload import PodRef
from .model import KIND_NAMESPACE, KIND_POD, PodInfo
from .state import EVENT_MODIFIED, ClusterState

# fetch(namespace, name) -> (pod object or None if absent, namespace object or None)
PodFetcher: TypeAlias = Callable[[str, str], tuple[Mapping[str, Any] | None, Mapping[str, Any] | None]]


class AmbientSelector:
    """The enrolment Selector backed by ClusterState (Istio's ambient rules)."""

    def __init__(self, state: ClusterState, fetch: PodFetcher | None = None, logger: Any = None) -> None:
        self._state = state
        self._fetch = fetch
        self._log: Any = logger if logger is not None else structlog.get_logger(__name__)

    def decide(self, pod: PodRef) -> tuple[bool, str]:
        """Synchronous, as the Selector protocol wants. When the pod is unknown
        and a fetcher is set this blocks for one API round trip; call
        `ensure_known` first from async code to keep that off the event loop."""
        known = self._known(pod)
        if known is not None:
            return self._state.ambient_decision(known)
        if self._fetch is None:
            return self._namespace_only(pod, "not in the local files")
        try:
            fetched = self._fetch(pod.namespace, pod.name)
        except Exception as exc:  # the API server is down: decide on what we have
            self._log.warning("pod fetch failed", pod=str(pod), error=str(exc))
            return self._namespace_only(pod, f"unknown, and fetching it failed ({exc})")
        return self._decide_fetched(pod, fetched)

    async def ensure_known(self, pod: PodRef) -> None:
        """Fetch an unknown pod on a worker thread, apply it on the loop."""
        if self._fetch is None or self._known(pod) is not None:
            return
        try:
            fetched = await asyncio.to_thread(self._fetch, pod.namespace, pod.name)
        except Exception as exc:
            self._log.warning("pod fetch failed", pod=str(pod), error=str(exc))
            return
        self._apply(fetched)

    def _known(self, pod: PodRef) -> PodInfo | None:
        """The state's pod, unless it is an older pod of the same name."""
        info = self._state.pod(pod.namespace, pod.name)
        if info is None and pod.uid:
            info = self._state.pod_by_uid(pod.uid)
        if info is None or (pod.uid and info.uid and info.uid != pod.uid):
            return None
        return info

    def _apply(self, fetched: tuple[Mapping[str, Any] | None, Mapping[str, Any] | None]) -> None:
        pod_obj, namespace_obj = fetched
        if namespace_obj is not None:
            self._state.apply(EVENT_MODIFIED, namespace_obj, kind=KIND_NAMESPACE)
        if pod_obj is not None:
            self._state.apply(EVENT_MODIFIED, pod_obj, kind=KIND_POD)

    def _decide_fetched(self, pod: PodRef, fetched: tuple[Mapping[str, Any] | None, Mapping[str, Any] | None]) -> tuple[bool, str]:
        self._apply(fetched)
        known = self._known(pod)
        if known is not None:
            in_mesh, reason = self._state.ambient_decision(known)
            self._log.info("pod fetched from the API server for its enrolment decision", pod=str(pod),
                           in_mesh=in_mesh)
            return in_mesh, reason
        return self._namespace_only(pod, "not found on the API server")

    def _namespace_only(self, pod: PodRef, why: str) -> tuple[bool, str]:
        namespace = self._state.namespace(pod.namespace)
        in_mesh, reason = ClusterState.namespace_decision(namespace, pod.namespace)
        return in_mesh, f"pod {pod} is {why}; decided by the namespace label only: {reason}"
