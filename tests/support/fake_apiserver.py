"""A small Kubernetes API server for tests: the real list/watch protocol, in memory.

What it speaks, as kube-apiserver does for these kinds:
- `GET` lists (`kind: XList`, `metadata.resourceVersion`) with `limit` and
  `continue` served from a snapshot, so pages are consistent; an expired
  token is 410 Expired;
- `GET ...?watch=true&resourceVersion=N[&allowWatchBookmarks=true][&timeoutSeconds=T]`:
  HTTP/1.1 chunked, one JSON event per line; events after N in order; an N
  older than the retained history is an ERROR event carrying a 410 Status
  (or, with `gone_as_http_status`, a plain HTTP 410, which newer servers send
  before the stream starts); no resourceVersion (or "0") starts with
  synthetic ADDED events for what exists;
- one global, increasing resourceVersion; `fieldSelector` on
  metadata.name/metadata.namespace/spec.nodeName with `=`, `==`, `!=`, and in
  a watch an object that starts/stops matching arrives as ADDED/DELETED;
- list items of built-in kinds carry no kind/apiVersion, custom resources and
  watch event objects do; single-object GET; 404 Status for unknown objects;
  an optional bearer token (401 without it);
- optional RBAC (`allowed`: the (API group, resource) pairs the caller may
  list and watch, e.g. read from a ClusterRole): anything else is a 403
  Forbidden Status, worded as kube-apiserver words it;
- `POST /apis/authentication.k8s.io/v1/tokenreviews` (create, under the same
  RBAC as ("authentication.k8s.io", "tokenreviews")) for service-account
  tokens minted by `mint_token`: signature, expiry, audiences and pod binding
  as a projected token has them (fake_tokens.py).

Test controls: create/update/delete/apply, compact() (forget history: a
watcher behind the compaction gets 410, a caught-up one carries on),
drop_watches() (cut every stream mid-body), send_bookmarks(), hold() (no
event leaves while held, to make interleavings deterministic), and a log of
requests.
"""
from __future__ import annotations

import base64
import contextlib
import copy
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .fake_tokens import API_AUDIENCE, BoundPod, TokenSigner


@dataclass(frozen=True)
class Resource:
    prefix: str  # "/api/v1" or "/apis/<group>/<version>"
    plural: str
    kind: str
    api_version: str
    namespaced: bool
    custom: bool = False


RESOURCES = (
    Resource("/api/v1", "namespaces", "Namespace", "v1", namespaced=False),
    Resource("/api/v1", "pods", "Pod", "v1", namespaced=True),
    Resource("/api/v1", "services", "Service", "v1", namespaced=True),
    Resource("/apis/discovery.k8s.io/v1", "endpointslices", "EndpointSlice", "discovery.k8s.io/v1", namespaced=True),
    Resource("/apis/security.istio.io/v1", "authorizationpolicies", "AuthorizationPolicy",
             "security.istio.io/v1", namespaced=True, custom=True),
    Resource("/apis/security.istio.io/v1", "peerauthentications", "PeerAuthentication",
             "security.istio.io/v1", namespaced=True, custom=True),
    Resource("/apis/gateway.networking.k8s.io/v1", "gateways", "Gateway", "gateway.networking.k8s.io/v1",
             namespaced=True, custom=True),
)
_BY_KIND = {r.kind: r for r in RESOURCES}
_SELECTABLE_FIELDS = {"metadata.name", "metadata.namespace", "spec.nodeName"}
TOKEN_REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"


@dataclass(frozen=True)
class Event:
    rv: int
    plural: str
    type: str
    obj: dict[str, Any]
    old: dict[str, Any] | None


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]

    @property
    def is_watch(self) -> bool:
        return self.query.get("watch") in ("true", "1")


@dataclass(eq=False)
class _Stream:
    resource: Resource
    namespace: str | None
    selector: list[tuple[str, str, bool]]
    bookmarks: bool
    position: int
    sock: socket.socket
    bookmark_due: bool = False
    gone: bool = False
    dropped: bool = False


class FieldSelectorError(ValueError):
    pass


def parse_field_selector(text: str) -> list[tuple[str, str, bool]]:
    """[(field, value, equal)] for `a=b,c!=d`; unknown fields are refused, as the real server does."""
    terms: list[tuple[str, str, bool]] = []
    for term in filter(None, text.split(",")):
        if "!=" in term:
            name, value = term.split("!=", 1)
            equal = False
        elif "==" in term:
            name, value = term.split("==", 1)
            equal = True
        elif "=" in term:
            name, value = term.split("=", 1)
            equal = True
        else:
            raise FieldSelectorError(f"invalid selector: {term!r}")
        if name not in _SELECTABLE_FIELDS:
            raise FieldSelectorError(f'field label not supported: {name}')
        terms.append((name, value, equal))
    return terms


def _field(obj: Mapping[str, Any], path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value if isinstance(value, str) else ""


def _matches(obj: Mapping[str, Any] | None, namespace: str | None, selector: list[tuple[str, str, bool]]) -> bool:
    if obj is None:
        return False
    if namespace is not None and obj["metadata"].get("namespace") != namespace:
        return False
    return all((_field(obj, name) == value) == equal for name, value, equal in selector)


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


class FakeApiServer:
    """Start with `with FakeApiServer() as server:`; `server.url` is the API base URL."""

    def __init__(self, token: str | None = None, gone_as_http_status: bool = False,
                 allowed: set[tuple[str, str]] | None = None) -> None:
        self.token = token
        self.allowed = allowed  # None: no RBAC; else the (group, plural) pairs the caller may read
        self.gone_as_http_status = gone_as_http_status
        self._cond = threading.Condition()
        self._objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {r.plural: {} for r in RESOURCES}
        self._history: list[Event] = []
        self._rv = 1
        self._oldest = 1  # a watch may start from any RV >= this
        self._snapshots: dict[str, tuple[int, list[dict[str, Any]]]] = {}
        self._streams: set[_Stream] = set()
        self._held = False
        self._closing = False
        self._sockets: set[socket.socket] = set()
        self.requests: list[Request] = []
        self.tokens = TokenSigner()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._http.daemon_threads = True
        self._thread = threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-apiserver", daemon=True)

    # -- lifecycle ------------------------------------------------------------
    @property
    def url(self) -> str:
        host, port = self._http.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeApiServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._http.shutdown()
        for sock in list(self._sockets):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._http.server_close()
        self._thread.join(5)

    def __enter__(self) -> FakeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- objects --------------------------------------------------------------
    @property
    def resource_version(self) -> int:
        with self._cond:
            return self._rv

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        resource, key, stored = self._prepare(obj)
        with self._cond:
            if key in self._objects[resource.plural]:
                raise KeyError(f"{resource.kind} {key} already exists")
            metadata = stored["metadata"]
            metadata.setdefault("uid", str(uuid.uuid4()))
            metadata.setdefault("creationTimestamp", datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
            return self._record(resource, key, "ADDED", stored, None)

    def update(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        resource, key, stored = self._prepare(obj)
        with self._cond:
            old = self._objects[resource.plural].get(key)
            if old is None:
                raise KeyError(f"{resource.kind} {key} does not exist")
            for kept in ("uid", "creationTimestamp"):
                if kept in old["metadata"]:
                    stored["metadata"][kept] = old["metadata"][kept]
            return self._record(resource, key, "MODIFIED", stored, old)

    def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        resource, key, _ = self._prepare(obj)
        with self._cond:
            exists = key in self._objects[resource.plural]
        return self.update(obj) if exists else self.create(obj)

    def delete(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Delete by kind + metadata.namespace/name; returns the deleted object."""
        resource, key, _ = self._prepare(obj)
        with self._cond:
            old = self._objects[resource.plural].get(key)
            if old is None:
                raise KeyError(f"{resource.kind} {key} does not exist")
            return self._record(resource, key, "DELETED", copy.deepcopy(old), old)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self._cond:
            found = self._objects[_BY_KIND[kind].plural].get((namespace, name))
            return copy.deepcopy(found) if found else None

    def mint_token(self, namespace: str, service_account: str, *, audiences: tuple[str, ...] = (API_AUDIENCE,),
                   expires_in: float = 3600.0, pod: str | None = None) -> str:
        """A projected service-account token; bound to `pod` (which must exist
        now, in `namespace`) when given, as the kubelet mints them."""
        bound = None
        if pod is not None:
            obj = self.get("Pod", namespace, pod)
            if obj is None:
                raise KeyError(f"Pod {namespace}/{pod} does not exist")
            bound = BoundPod(pod, obj["metadata"]["uid"], (obj.get("spec") or {}).get("nodeName", ""))
        return self.tokens.mint(namespace, service_account, audiences=audiences, expires_in=expires_in, pod=bound)

    def token_reviews(self) -> list[Request]:
        return [r for r in list(self.requests) if r.method == "POST" and r.path == TOKEN_REVIEWS]

    def _prepare(self, obj: Mapping[str, Any]) -> tuple[Resource, tuple[str, str], dict[str, Any]]:
        resource = _BY_KIND[obj["kind"]]
        stored = copy.deepcopy(dict(obj))
        stored["apiVersion"] = resource.api_version
        metadata = stored.setdefault("metadata", {})
        namespace = metadata.get("namespace", "default") if resource.namespaced else ""
        if resource.namespaced:
            metadata["namespace"] = namespace
        return resource, (namespace, metadata["name"]), stored

    def _record(self, resource: Resource, key: tuple[str, str], event_type: str, obj: dict[str, Any],
                old: dict[str, Any] | None) -> dict[str, Any]:
        """Under the lock: bump the RV, store, append to history, wake watchers."""
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        if event_type == "DELETED":
            del self._objects[resource.plural][key]
        else:
            self._objects[resource.plural][key] = obj
        self._history.append(Event(self._rv, resource.plural, event_type, obj, old))
        self._cond.notify_all()
        return copy.deepcopy(obj)

    # -- test controls --------------------------------------------------------
    def compact(self) -> None:
        """Forget all history, as etcd compaction does: watchers with events
        still to deliver get 410, caught-up ones are unaffected."""
        with self._cond:
            for stream in self._streams:
                if any(e.plural == stream.resource.plural and e.rv > stream.position for e in self._history):
                    stream.gone = True
                else:
                    stream.position = self._rv
            self._history.clear()
            self._oldest = self._rv
            self._snapshots.clear()
            self._cond.notify_all()

    def drop_watches(self) -> int:
        """Cut every open watch stream mid-body (no final chunk); returns how many."""
        with self._cond:
            streams = list(self._streams)
            for stream in streams:
                stream.dropped = True
            self._cond.notify_all()
        for stream in streams:
            with contextlib.suppress(OSError):
                stream.sock.shutdown(socket.SHUT_RDWR)
        return len(streams)

    def send_bookmarks(self) -> None:
        with self._cond:
            for stream in self._streams:
                if stream.bookmarks:
                    stream.bookmark_due = True
            self._cond.notify_all()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """No watch event is sent while held (requests are still answered)."""
        with self._cond:
            self._held = True
        try:
            yield
        finally:
            with self._cond:
                self._held = False
                self._cond.notify_all()

    def open_watches(self, kind: str | None = None) -> int:
        with self._cond:
            return sum(1 for s in self._streams if kind is None or s.resource.kind == kind)

    def watch_requests(self, kind: str) -> list[Request]:
        plural = _BY_KIND[kind].plural
        return [r for r in list(self.requests) if r.is_watch and r.path.endswith("/" + plural)]

    def list_requests(self, kind: str) -> list[Request]:
        plural = _BY_KIND[kind].plural
        return [r for r in list(self.requests) if not r.is_watch and r.path.endswith("/" + plural)]

    # -- HTTP -----------------------------------------------------------------
    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                server._sockets.add(self.connection)

            def finish(self) -> None:
                server._sockets.discard(self.connection)
                with contextlib.suppress(OSError):
                    super().finish()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                server._serve(self)

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                server._serve_post(self)

        return Handler

    def _route(self, path: str) -> tuple[Resource, str | None, str | None] | None:
        """(resource, namespace or None, name or None) for a request path."""
        for resource in RESOURCES:
            if not path.startswith(resource.prefix + "/"):
                continue
            parts = path[len(resource.prefix) + 1:].split("/")
            if parts == [resource.plural]:
                return resource, None, None
            if resource.plural == "namespaces" and len(parts) == 2 and parts[0] == "namespaces":
                return resource, None, parts[1]
            if resource.namespaced and len(parts) in (3, 4) and parts[0] == "namespaces" and parts[2] == resource.plural:
                return resource, parts[1], parts[3] if len(parts) == 4 else None
        return None

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        url = urlsplit(handler.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.requests.append(Request("GET", url.path, query))
        if self.token is not None and handler.headers.get("Authorization") != f"Bearer {self.token}":
            return self._json(handler, 401, _status(401, "Unauthorized", "Unauthorized"))
        route = self._route(url.path)
        if route is None:
            return self._json(handler, 404, _status(404, "NotFound", f"the server could not find {url.path}"))
        resource, namespace, name = route
        group = resource.api_version.rpartition("/")[0]
        if self.allowed is not None and (group, resource.plural) not in self.allowed:
            verb = "get" if name is not None else "watch" if query.get("watch") in ("true", "1") else "list"
            return self._json(handler, 403, self._forbidden(resource.plural, group, verb))
        if "labelSelector" in query:
            return self._json(handler, 400, _status(400, "BadRequest", "labelSelector is not implemented here"))
        try:
            selector = parse_field_selector(query.get("fieldSelector", ""))
        except FieldSelectorError as exc:
            return self._json(handler, 400, _status(400, "BadRequest", str(exc)))
        if name is not None:
            return self._get_one(handler, resource, namespace or "", name)
        if query.get("watch") in ("true", "1"):
            return self._watch(handler, resource, namespace, selector, query)
        return self._list(handler, resource, namespace, selector, query)

    def _forbidden(self, resource: str, group: str, verb: str) -> dict[str, Any]:
        message = (f'{resource}{"." + group if group else ""} is forbidden: User '
                   f'"system:serviceaccount:ambit-system:ambit-node" cannot {verb} resource '
                   f'"{resource}" in API group "{group}" at the cluster scope')
        return _status(403, "Forbidden", message)

    def _serve_post(self, handler: BaseHTTPRequestHandler) -> None:
        """Only TokenReview is created here; anything else is 405, as for a read-only resource."""
        url = urlsplit(handler.path)
        self.requests.append(Request("POST", url.path, {k: v[-1] for k, v in parse_qs(url.query).items()}))
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        if self.token is not None and handler.headers.get("Authorization") != f"Bearer {self.token}":
            return self._json(handler, 401, _status(401, "Unauthorized", "Unauthorized"))
        if url.path != TOKEN_REVIEWS:
            return self._json(handler, 405, _status(405, "MethodNotAllowed", "the server does not allow this "
                                                                             "method on the requested resource"))
        if self.allowed is not None and ("authentication.k8s.io", "tokenreviews") not in self.allowed:
            return self._json(handler, 403, self._forbidden("tokenreviews", "authentication.k8s.io", "create"))
        try:
            body = json.loads(raw)
            spec = body["spec"]
            token = spec["token"]
            audiences = spec.get("audiences") or []
            if body.get("kind") != "TokenReview" or not isinstance(token, str) or not isinstance(audiences, list):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            return self._json(handler, 400, _status(400, "BadRequest", "not a TokenReview"))
        status = self.tokens.review(token, audiences, lambda ns, name: self.get("Pod", ns, name))
        self._json(handler, 201, {"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                                  "metadata": {"creationTimestamp": None},
                                  "spec": {"token": token, "audiences": audiences}, "status": status})

    def _json(self, handler: BaseHTTPRequestHandler, code: int, body: Mapping[str, Any]) -> None:
        data = json.dumps(body).encode()
        handler.send_response(code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _get_one(self, handler: BaseHTTPRequestHandler, resource: Resource, namespace: str, name: str) -> None:
        with self._cond:
            obj = copy.deepcopy(self._objects[resource.plural].get((namespace, name)))
        if obj is None:
            status = _status(404, "NotFound", f'{resource.plural} "{name}" not found')
            status["details"] = {"name": name, "kind": resource.plural}
            return self._json(handler, 404, status)
        obj["kind"] = resource.kind
        return self._json(handler, 200, obj)

    def _list_item(self, resource: Resource, obj: dict[str, Any]) -> dict[str, Any]:
        item = copy.deepcopy(obj)
        if not resource.custom:
            item.pop("kind", None)
            item.pop("apiVersion", None)
        else:
            item["kind"] = resource.kind
        return item

    def _list(self, handler: BaseHTTPRequestHandler, resource: Resource, namespace: str | None,
              selector: list[tuple[str, str, bool]], query: dict[str, str]) -> None:
        token = query.get("continue")
        with self._cond:
            if token:
                snapshot = self._snapshots.get(token)
                if snapshot is None:
                    return self._json(handler, 410, _status(
                        410, "Expired", "The provided continue parameter is too old to display a consistent "
                                        "list result. You can start a new list without the continue parameter."))
                version, items = snapshot
            else:
                version = self._rv
                items = [self._list_item(resource, obj) for key, obj in sorted(self._objects[resource.plural].items())
                         if _matches(obj, namespace, selector)]
        limit = int(query.get("limit") or 0)
        metadata: dict[str, Any] = {"resourceVersion": str(version)}
        if limit and len(items) > limit:
            items, rest = items[:limit], items[limit:]
            next_token = base64.urlsafe_b64encode(json.dumps({"rv": version, "id": uuid.uuid4().hex}).encode()).decode()
            with self._cond:
                self._snapshots[next_token] = (version, rest)
            metadata["continue"] = next_token
            metadata["remainingItemCount"] = len(rest)
        self._json(handler, 200, {"kind": resource.kind + "List", "apiVersion": resource.api_version,
                                  "metadata": metadata, "items": items})

    def _watch(self, handler: BaseHTTPRequestHandler, resource: Resource, namespace: str | None,
               selector: list[tuple[str, str, bool]], query: dict[str, str]) -> None:
        requested = query.get("resourceVersion", "")
        deadline = time.monotonic() + int(query["timeoutSeconds"]) if query.get("timeoutSeconds") else None
        initial: list[dict[str, Any]] = []
        with self._cond:
            if requested in ("", "0"):
                position = self._rv
                initial = [{"type": "ADDED", "object": copy.deepcopy(obj)}
                           for _, obj in sorted(self._objects[resource.plural].items())
                           if _matches(obj, namespace, selector)]
            else:
                position = int(requested)
            too_old = position < self._oldest
            message = f"too old resource version: {requested} ({self._oldest})"
            stream = _Stream(resource, namespace, selector, query.get("allowWatchBookmarks") == "true",
                             position, handler.connection)
            if not too_old:
                self._streams.add(stream)
        if too_old and self.gone_as_http_status:
            return self._json(handler, 410, _status(410, "Expired", message))
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        try:
            if too_old:
                self._send(handler, [{"type": "ERROR", "object": _status(410, "Expired", message)}])
                return self._end(handler)
            self._send(handler, initial)
            while True:
                lines, finished = self._next_batch(stream, deadline)
                if stream.dropped:
                    return  # cut without the final chunk: the client sees a broken body
                self._send(handler, lines)
                if finished:
                    return self._end(handler)
        except OSError:
            return
        finally:
            with self._cond:
                self._streams.discard(stream)
            handler.close_connection = True

    def _next_batch(self, stream: _Stream, deadline: float | None) -> tuple[list[dict[str, Any]], bool]:
        """Wait for something to send; returns (events, stream finished)."""
        with self._cond:
            while True:
                if stream.dropped:
                    return [], True
                if self._closing:
                    return [], True
                if stream.gone and not self._held:
                    return [{"type": "ERROR", "object": _status(410, "Expired", "too old resource version: "
                                                                 f"{stream.position} ({self._oldest})")}], True
                if not self._held:
                    events = [e for e in self._history if e.plural == stream.resource.plural and e.rv > stream.position]
                    if events or stream.bookmark_due:
                        break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return [], True
                self._cond.wait(0.5 if remaining is None else min(remaining, 0.5))
            out: list[dict[str, Any]] = []
            for event in events:
                out.extend(self._translate(stream, event))
                stream.position = event.rv
            if stream.bookmark_due:
                stream.bookmark_due = False
                stream.position = self._rv
                out.append({"type": "BOOKMARK", "object": {
                    "kind": stream.resource.kind, "apiVersion": stream.resource.api_version,
                    "metadata": {"resourceVersion": str(self._rv)}}})
            return out, False

    @staticmethod
    def _translate(stream: _Stream, event: Event) -> list[dict[str, Any]]:
        """An event as this watcher sees it through its namespace/field filter."""
        now = _matches(event.obj, stream.namespace, stream.selector)
        before = _matches(event.old, stream.namespace, stream.selector)
        obj = copy.deepcopy(event.obj)
        obj["kind"] = stream.resource.kind
        if event.type == "ADDED":
            return [{"type": "ADDED", "object": obj}] if now else []
        if event.type == "DELETED":
            return [{"type": "DELETED", "object": obj}] if before else []
        if now and before:
            return [{"type": "MODIFIED", "object": obj}]
        if now:
            return [{"type": "ADDED", "object": obj}]
        if before:
            gone = copy.deepcopy(event.old)
            gone["kind"] = stream.resource.kind
            gone["metadata"]["resourceVersion"] = str(event.rv)
            return [{"type": "DELETED", "object": gone}]
        return []

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, events: list[dict[str, Any]]) -> None:
        for event in events:
            data = json.dumps(event).encode() + b"\n"
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        handler.wfile.flush()

    @staticmethod
    def _end(handler: BaseHTTPRequestHandler) -> None:
        handler.wfile.write(b"0\r\n\r\n")
        handler.wfile.flush()
