"""Cluster state from the Kubernetes API: list, then watch, with the official client.

Per kind (Namespaces, Pods, Services, EndpointSlices, the two Istio
security CRDs and Gateway API Gateways, for waypoints) one worker thread runs the reflector loop client-go made
standard:

1. LIST in pages (`limit`/`continue`), take the list's resourceVersion and
   hand the full set to `ClusterState.replace_kind` (so objects deleted while
   we were not watching disappear);
2. WATCH from that resourceVersion with bookmarks; every event and bookmark
   moves our resourceVersion forward;
3. the stream ends (server timeout, dropped connection, error): watch again
   from the last resourceVersion, after a capped, jittered exponential
   backoff when it failed;
4. 410 Gone (as an HTTP status or as a watch ERROR event, also on an
   expired `continue` token): the history we need is compacted, so go to 1.

The client is synchronous, so the threads only do HTTP and JSON; events are
handed to the event loop with `call_soon_threadsafe` and ClusterState is
only ever touched on the loop thread, in the order each watch delivered them.
We read raw JSON (`_preload_content=False`) instead of the client's models:
the state parses the same dicts from files and from the API.

Pod scope: ambient needs pods on other nodes too (is the destination
captured, what identity does a source IP have), so by default pods are
watched cluster-wide and only `ClusterState.local_pods(node)` drive
enrolment. `pod_scope="node"` adds `fieldSelector=spec.nodeName=<node>` for
clusters where a cluster-wide pod watch per node is too much; remote lookups
then find nothing. Either way `fetch_pod` reads one pod directly when a CNI
ADD overtakes the watch.
"""
from __future__ import annotations

import asyncio
import functools
import json
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import structlog
import urllib3
from kubernetes import client as kube_client
from kubernetes import config as kube_config
from kubernetes.client.exceptions import ApiException

from ..backoff import Backoff
from .model import (
    ALL_KINDS,
    KIND_AUTHORIZATION_POLICY,
    KIND_ENDPOINT_SLICE,
    KIND_GATEWAY,
    KIND_NAMESPACE,
    KIND_PEER_AUTHENTICATION,
    KIND_POD,
    KIND_SERVICE,
)
from .state import ClusterState

ISTIO_SECURITY_GROUP = "security.istio.io"
ISTIO_SECURITY_VERSION = "v1"
GATEWAY_API_GROUP = "gateway.networking.k8s.io"
GATEWAY_API_VERSION = "v1"
_WATCH_EVENTS = frozenset({"ADDED", "MODIFIED", "DELETED"})


@dataclass
class WatchStats:
    """Per-kind counters (for ambitctl status and the tests)."""

    lists: int = 0
    watches: int = 0
    events: int = 0
    bookmarks: int = 0
    gone: int = 0
    failures: int = 0


class _Gone(Exception):
    """410: the resourceVersion (or continue token) is older than the server's history."""


class _NotServed(Exception):
    """404 on a list: the API server does not serve this kind (e.g. Istio CRDs absent)."""


def api_client_from(*, kubeconfig: str | None = None, context: str | None = None, in_cluster: bool = False,
                    host: str | None = None, token: str | None = None, ca_file: str | None = None,
                    pool_size: int = 16) -> kube_client.ApiClient:
    """An ApiClient from in-cluster config, a kubeconfig file, or host/token/CA."""
    configuration = kube_client.Configuration()
    if in_cluster:
        kube_config.load_incluster_config(client_configuration=configuration)
    elif kubeconfig:
        kube_config.load_kube_config(config_file=kubeconfig, context=context,
                                     client_configuration=configuration, persist_config=False)
    elif host:
        configuration.host = host
        if token:
            configuration.api_key["BearerToken"] = f"Bearer {token}"
        if ca_file:
            configuration.ssl_ca_cert = ca_file
    else:
        raise ValueError("no API server: give in_cluster, kubeconfig or host")
    # One long-lived connection per watched kind plus direct fetches.
    configuration.connection_pool_maxsize = max(configuration.connection_pool_maxsize or 0, pool_size)
    return kube_client.ApiClient(configuration)


def _lines(response: Any) -> Iterator[bytes]:
    """Newline-delimited JSON events from a chunked watch response."""
    buffer = b""
    for chunk in response.stream(amt=None, decode_content=False):
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        for line in complete:
            if line.strip():
                yield line
    if buffer.strip():
        yield buffer


def _resource_version(obj: Any) -> str | None:
    metadata = obj.get("metadata") if isinstance(obj, Mapping) else None
    version = metadata.get("resourceVersion") if isinstance(metadata, Mapping) else None
    return version if isinstance(version, str) and version else None


class KubeSource:
    """Keeps a ClusterState in step with the API server; start/stop on the event loop."""

    def __init__(
        self,
        api_client: kube_client.ApiClient,
        state: ClusterState,
        node_name: str,
        kinds: Sequence[str] = ALL_KINDS,
        *,
        pod_scope: Literal["cluster", "node"] = "cluster",
        page_size: int = 500,
        watch_timeout: int = 300,
        connect_timeout: float = 5.0,
        list_timeout: float = 60.0,
        fetch_timeout: float = 5.0,
        backoff: Backoff = Backoff(),
        logger: Any = None,
    ) -> None:
        unknown = sorted(set(kinds) - set(ALL_KINDS))
        if unknown:
            raise ValueError(f"unsupported kinds {unknown}, expected some of {list(ALL_KINDS)}")
        self._state = state
        self._node_name = node_name
        self._kinds = tuple(kinds)
        self._pod_scope = pod_scope
        self._page_size = page_size
        self._watch_timeout = watch_timeout
        self._connect_timeout = connect_timeout
        self._list_timeout = list_timeout
        self._fetch_timeout = fetch_timeout
        self._backoff = backoff
        self._log: Any = (logger if logger is not None else structlog.get_logger(__name__)).bind(node=node_name)
        self._core = kube_client.CoreV1Api(api_client)
        custom = kube_client.CustomObjectsApi(api_client)
        list_istio = functools.partial(custom.list_cluster_custom_object, ISTIO_SECURITY_GROUP, ISTIO_SECURITY_VERSION)
        self._list_calls: dict[str, Callable[..., Any]] = {
            KIND_NAMESPACE: self._core.list_namespace,
            KIND_POD: self._core.list_pod_for_all_namespaces,
            KIND_SERVICE: self._core.list_service_for_all_namespaces,
            KIND_ENDPOINT_SLICE: kube_client.DiscoveryV1Api(api_client).list_endpoint_slice_for_all_namespaces,
            KIND_AUTHORIZATION_POLICY: functools.partial(list_istio, "authorizationpolicies"),
            KIND_PEER_AUTHENTICATION: functools.partial(list_istio, "peerauthentications"),
            # A cluster without the Gateway API CRDs answers 404: no waypoints (see _NotServed).
            KIND_GATEWAY: functools.partial(custom.list_cluster_custom_object, GATEWAY_API_GROUP,
                                            GATEWAY_API_VERSION, "gateways"),
        }
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._responses: dict[str, Any] = {}
        self._responses_lock = threading.Lock()
        self._versions: dict[str, str | None] = {kind: None for kind in self._kinds}
        self._stats: dict[str, WatchStats] = {kind: WatchStats() for kind in self._kinds}
        self._unsynced: set[str] = set(self._kinds)
        self._failures: dict[str, str] = {}  # kind -> its last list/watch failure (worker threads write)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.synced = asyncio.Event()  # every kind listed once and applied: ready to serve

    # -- lifecycle (event loop) ---------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping.clear()
        for kind in self._kinds:
            thread = threading.Thread(target=self._run, args=(kind,), name=f"ambit-watch-{kind}", daemon=True)
            self._threads.append(thread)
            thread.start()

    async def stop(self, timeout: float = 10.0) -> None:
        """Close every open response and join the threads."""
        self._stopping.set()
        with self._responses_lock:
            responses = list(self._responses.values())
        for response in responses:
            _shutdown(response)
        threads, self._threads = self._threads, []
        deadline = time.monotonic() + timeout

        def join() -> None:
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))

        await asyncio.to_thread(join)
        alive = [t.name for t in threads if t.is_alive()]
        if alive:
            self._log.warning("watch threads did not stop in time", threads=alive)

    def pending(self) -> dict[str, str]:
        """The kinds not listed yet, each with its last failure: while any is
        left the view is partial and the agent is not ready (a 404 kind, one
        the API server does not serve, counts as listed, empty)."""
        failures = dict(self._failures)
        return {kind: failures.get(kind, "not listed yet") for kind in self._kinds if kind in self._unsynced}

    def resource_version(self, kind: str) -> str | None:
        """The last resourceVersion seen for a kind (from a list, an event or a bookmark)."""
        return self._versions.get(kind)

    def stats(self) -> dict[str, WatchStats]:
        return {kind: WatchStats(**vars(stats)) for kind, stats in self._stats.items()}

    # -- direct reads (any thread) ------------------------------------------
    def fetch_pod(self, namespace: str, name: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """Read one pod and its namespace now (the AmbientSelector's fetcher).

        Blocking, bounded by fetch_timeout; (None, ...) when the pod does not exist.
        """
        timeout = (self._connect_timeout, self._fetch_timeout)
        pod = self._read_one(lambda: self._core.read_namespaced_pod(
            name, namespace, _preload_content=False, _request_timeout=timeout))
        namespace_obj = self._read_one(lambda: self._core.read_namespace(
            namespace, _preload_content=False, _request_timeout=timeout))
        return pod, namespace_obj

    @staticmethod
    def _read_one(call: Callable[[], Any]) -> dict[str, Any] | None:
        try:
            response = call()
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        try:
            return json.loads(response.data)
        finally:
            response.release_conn()

    # -- worker threads ------------------------------------------------------
    def _selector(self, kind: str) -> str | None:
        if kind == KIND_POD and self._pod_scope == "node":
            return f"spec.nodeName={self._node_name}"
        return None

    def _run(self, kind: str) -> None:
        """The reflector loop of one kind; `self._versions[kind]` is where to resume
        (None: list first), updated as each event or bookmark is handed over."""
        log = self._log.bind(kind=kind)
        rng = random.Random()
        stats = self._stats[kind]
        attempt = 0
        while not self._stopping.is_set():
            try:
                version = self._versions[kind]
                if version is None:
                    version = self._list(kind)
                healthy = self._watch(kind, version)
                attempt = 0 if healthy else attempt + 1
                if not healthy:
                    self._stopping.wait(self._backoff.delay(attempt, rng))
            except _Gone as exc:
                stats.gone += 1
                log.info("resource version expired; relisting", reason=str(exc),
                         resource_version=self._versions[kind])
                self._versions[kind] = None
                attempt += 1
                if attempt > 1:  # a 410 again right after a fresh list: do not spin
                    self._stopping.wait(self._backoff.delay(attempt, rng))
            except _NotServed:
                log.warning("the API server does not serve this kind; treating it as empty")
                self._post(self._apply_list, kind, [])
                self._versions[kind] = None
                self._stopping.wait(self._backoff.maximum)
            except (ApiException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
                if self._stopping.is_set():
                    break
                stats.failures += 1
                self._failures[kind] = _describe(exc)
                delay = self._backoff.delay(attempt, rng)
                attempt += 1
                if isinstance(exc, ApiException) and exc.status == 403:
                    # Not transient: discovery cannot sync (and the agent cannot turn
                    # ready) until RBAC changes; retried in case it does.
                    log.error("forbidden to list/watch this kind: grant it in the agent's ClusterRole "
                              "(install/kubernetes/ambit.yaml)", error=_describe(exc), retry_in=round(delay, 3))
                else:
                    log.warning("list/watch failed; retrying", error=_describe(exc), retry_in=round(delay, 3),
                                resource_version=self._versions[kind])
                self._stopping.wait(delay)
            except Exception as exc:  # a bug must not silently end this kind's sync
                stats.failures += 1
                self._failures[kind] = _describe(exc)
                log.exception("list/watch crashed; retrying")
                self._stopping.wait(self._backoff.maximum)
        log.debug("watch thread stopped")

    def _call(self, kind: str, **kwargs: Any) -> Any:
        selector = self._selector(kind)
        if selector:
            kwargs["field_selector"] = selector
        try:
            return self._list_calls[kind](_preload_content=False, **kwargs)
        except ApiException as exc:
            if exc.status == 410:
                raise _Gone(exc.reason or "410 Gone") from None
            if exc.status == 404 and not kwargs.get("watch"):
                raise _NotServed() from None
            raise

    def _track(self, kind: str, response: Any | None) -> None:
        with self._responses_lock:
            if response is None:
                self._responses.pop(kind, None)
            else:
                self._responses[kind] = response
        if response is not None and self._stopping.is_set():
            _shutdown(response)

    def _list(self, kind: str) -> str:
        items: list[dict[str, Any]] = []
        token: str | None = None
        version: str | None = None
        while True:
            response = self._call(kind, limit=self._page_size, _continue=token,
                                  _request_timeout=(self._connect_timeout, self._list_timeout))
            self._track(kind, response)
            try:
                body = json.loads(response.data)
            finally:
                self._track(kind, None)
                response.release_conn()
            items.extend(body.get("items") or [])
            metadata = body.get("metadata") or {}
            version = metadata.get("resourceVersion") or version
            token = metadata.get("continue") or None
            if token is None:
                break
        if not version:
            raise ValueError(f"{kind} list carried no resourceVersion")
        self._stats[kind].lists += 1
        self._post(self._apply_list, kind, items)
        self._versions[kind] = version
        return version

    def _watch(self, kind: str, version: str) -> bool:
        """Follow one watch stream to its end; returns whether it was healthy
        (delivered something or lasted), so a server that closes at once backs off."""
        stats = self._stats[kind]
        started = time.monotonic()
        response = self._call(kind, watch=True, resource_version=version, allow_watch_bookmarks=True,
                              timeout_seconds=self._watch_timeout,
                              _request_timeout=(self._connect_timeout, self._watch_timeout + 30))
        stats.watches += 1
        self._track(kind, response)
        received = False
        try:
            for line in _lines(response):
                received = True
                event = json.loads(line)
                event_type, obj = event.get("type"), event.get("object")
                if event_type == "ERROR":
                    status = obj if isinstance(obj, Mapping) else {}
                    if status.get("code") == 410:
                        raise _Gone(str(status.get("message") or "410 Gone"))
                    raise ApiException(status=status.get("code") or 0,
                                       reason=f"{status.get('reason')}: {status.get('message')}")
                if event_type == "BOOKMARK":
                    stats.bookmarks += 1
                elif event_type in _WATCH_EVENTS and isinstance(obj, Mapping):
                    stats.events += 1
                    self._post(self._apply_event, kind, event_type, obj)
                else:
                    self._log.warning("unexpected watch event", kind=kind, event_type=event_type)
                    continue
                version = _resource_version(obj) or version
                self._versions[kind] = version
        finally:
            self._track(kind, None)
            response.close()
            response.release_conn()
        return received or time.monotonic() - started > 1.0

    # -- event loop side -----------------------------------------------------
    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: we are shutting down
            pass

    def _apply_list(self, kind: str, items: list[dict[str, Any]]) -> None:
        changes = self._state.replace_kind(kind, items)
        self._log.debug("listed", kind=kind, objects=len(items), changes=changes)
        if kind in self._unsynced:
            self._unsynced.discard(kind)
            if not self._unsynced:
                self._log.info("discovery synced", kinds=list(self._kinds))
                self.synced.set()

    def _apply_event(self, kind: str, event_type: str, obj: Mapping[str, Any]) -> None:
        try:
            self._state.apply(event_type, obj, kind=kind)
        except ValueError as exc:
            self._log.warning("watch event not applied", kind=kind, error=str(exc))


def _shutdown(response: Any) -> None:
    """Unblock a thread reading this response (close alone would wait for the read)."""
    try:
        response.shutdown()
    except Exception:  # already released or closed: nothing is blocked on it
        pass


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status} {exc.reason}"
    return f"{type(exc).__name__}: {exc}"
