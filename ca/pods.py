"""Where pods run, as the CA's node authorisation needs it.

Two questions: the caller's own pod (to learn the caller's node), and the
pods on one node (to learn which identities that node may ask for).

- `KubePods` asks the API server at the moment of the request (GET the pod;
  LIST pods with `fieldSelector=spec.nodeName=<node>`), so a pod scheduled a
  moment ago is already there and a deleted one is already gone. Identical
  questions asked at the same moment share one request.
- `FilePods` reads the cluster's objects from files (the lab's cluster
  file, the agents' --discovery files source), re-read when they change and
  once more before a refusal, so a pod the lab just added is not refused for
  a poll interval.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from kubernetes import client as kube_client
from kubernetes.client.exceptions import ApiException

from ambit.agent.discovery.file_source import FileSource
from ambit.agent.discovery.model import ModelError, PodInfo, parse_pod
from ambit.agent.discovery.state import ClusterState
from ambit.agent.singleflight import SingleFlight


class PodsUnavailable(Exception):
    """The pod source could not answer (UNAVAILABLE: the caller retries)."""


class PodDirectory(Protocol):
    description: str

    async def pod(self, namespace: str, name: str) -> PodInfo | None: ...

    async def on_node(self, node: str) -> Sequence[PodInfo]: ...

    async def refresh(self) -> bool:
        """Look again before refusing; True if anything changed."""
        ...


class KubePods:
    def __init__(self, api: kube_client.ApiClient, timeout: float = 5.0) -> None:
        self._core = kube_client.CoreV1Api(api)
        self._timeout = timeout
        self._pods: SingleFlight[tuple[str, str], PodInfo | None] = SingleFlight()
        self._nodes: SingleFlight[str, list[PodInfo]] = SingleFlight()
        self.description = "the Kubernetes API"

    async def pod(self, namespace: str, name: str) -> PodInfo | None:
        return await self._pods.run((namespace, name), lambda: asyncio.to_thread(self._get, namespace, name))

    async def on_node(self, node: str) -> Sequence[PodInfo]:
        return await self._nodes.run(node, lambda: asyncio.to_thread(self._list, node))

    async def refresh(self) -> bool:
        return False  # every answer is already fresh

    def _get(self, namespace: str, name: str) -> PodInfo | None:
        try:
            body = self._call(lambda: self._core.read_namespaced_pod(
                name, namespace, _preload_content=False, _request_timeout=self._timeout))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise PodsUnavailable(f"GET pod {namespace}/{name}: {exc.status} {exc.reason}") from None
        return _pod(body)

    def _list(self, node: str) -> list[PodInfo]:
        pods: list[PodInfo] = []
        token: str | None = None
        while True:
            try:
                body = self._call(lambda: self._core.list_pod_for_all_namespaces(
                    field_selector=f"spec.nodeName={node}", limit=500, _continue=token,
                    _preload_content=False, _request_timeout=self._timeout))
            except ApiException as exc:
                raise PodsUnavailable(f"LIST pods on node {node}: {exc.status} {exc.reason}") from None
            for item in body.get("items") or ():
                item.setdefault("kind", "Pod")
                pod = _pod(item)
                if pod is not None:
                    pods.append(pod)
            token = (body.get("metadata") or {}).get("continue") or None
            if token is None:
                return pods

    @staticmethod
    def _call(request: Any) -> dict[str, Any]:
        try:
            response = request()
        except ApiException:
            raise
        except Exception as exc:  # refused, timeout, TLS
            raise PodsUnavailable(f"the API server: {type(exc).__name__}: {exc}") from None
        try:
            return json.loads(response.data)
        except ValueError:
            raise PodsUnavailable("the API server's answer is not JSON") from None
        finally:
            response.release_conn()


def _pod(obj: Any) -> PodInfo | None:
    try:
        return parse_pod(obj)
    except ModelError:
        return None  # a pod the model cannot read vouches for nothing


class FilePods:
    """Pods from the cluster files, through the agent's own FileSource and ClusterState."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self._state = ClusterState()  # no policy engine: pods are all the CA reads
        self._source = FileSource([str(p) for p in paths], self._state)
        self.description = "files " + ", ".join(str(p) for p in paths)

    async def start(self) -> None:
        await self._source.start()

    async def stop(self) -> None:
        await self._source.stop()

    def errors(self) -> dict[str, str]:
        return self._source.errors()

    async def pod(self, namespace: str, name: str) -> PodInfo | None:
        return self._state.pod(namespace, name)

    async def on_node(self, node: str) -> Sequence[PodInfo]:
        return self._state.local_pods(node)

    async def refresh(self) -> bool:
        return await self._source.reload()
