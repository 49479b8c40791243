"""Who is calling: the bearer token of a CSR, turned into a service account and its pod.

Two authenticators answer the same question:

- `TokenReviewAuthenticator` (in a cluster) asks the API server: a
  TokenReview of the caller's projected service-account token, for the
  audiences the CA accepts (`istio-ca`, as istiod). The review says which
  service account the token belongs to and, for a pod-bound token, which
  pod (name and uid) and, on Kubernetes >= 1.30, which node.
- `StaticTokenAuthenticator` (the lab, which has no API server) reads a
  token file the lab writes, in the spirit of kube-apiserver's
  --token-auth-file: one line per token, `token,namespace/serviceaccount,node`.
  The node is the file's statement, as a node-bound token's would be.

Neither trusts anything the request says about itself: the service account,
pod and node all come from the API server or the file.
"""
from __future__ import annotations

import asyncio
import csv
import hmac
import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog
from kubernetes import client as kube_client
from kubernetes.client.exceptions import ApiException

from ambit.agent.identity.spiffe import SpiffeId
from ambit.agent.singleflight import SingleFlight

DEFAULT_AUDIENCES = ("istio-ca",)  # istiod's TOKEN_AUDIENCES default
EXTRA_POD_NAME = "authentication.kubernetes.io/pod-name"
EXTRA_POD_UID = "authentication.kubernetes.io/pod-uid"
EXTRA_NODE_NAME = "authentication.kubernetes.io/node-name"
SERVICE_ACCOUNTS_GROUP = "system:serviceaccounts"
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"
MAX_TOKEN_BYTES = 16 * 1024

_log = structlog.get_logger(__name__)


class Unauthenticated(Exception):
    """The token proves nothing (UNAUTHENTICATED); the message says why, for the log."""


class AuthenticatorUnavailable(Exception):
    """The authenticator could not decide (the API server is away): UNAVAILABLE, try again."""


@dataclass(frozen=True)
class Caller:
    """A service account, and where the token says its holder runs."""

    namespace: str
    service_account: str
    pod_name: str = ""
    pod_uid: str = ""
    node_name: str = ""
    source: str = ""  # which authenticator vouched for it

    @property
    def account(self) -> str:
        """`namespace/name`, the form of CA_TRUSTED_NODE_ACCOUNTS."""
        return f"{self.namespace}/{self.service_account}"

    def identity(self, trust_domain: str) -> SpiffeId:
        return SpiffeId(trust_domain, self.namespace, self.service_account)

    def __str__(self) -> str:
        where = f" pod {self.namespace}/{self.pod_name}" if self.pod_name else ""
        where += f" node {self.node_name}" if self.node_name else ""
        return f"{self.account}{where}"


class Authenticator(Protocol):
    description: str

    async def authenticate(self, token: str) -> Caller: ...


def bearer_token(metadata: Sequence[tuple[str, str | bytes]]) -> str:
    """The token of the one `authorization: Bearer ...` header; Unauthenticated otherwise."""
    values = [v for k, v in metadata if k.lower() == "authorization"]
    if not values:
        raise Unauthenticated("no authorization header")
    if len(values) > 1:
        raise Unauthenticated("more than one authorization header")
    value = values[0]
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    scheme, _, token = value.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("the authorization header is not a bearer token")
    if len(token) > MAX_TOKEN_BYTES:
        raise Unauthenticated(f"bearer token longer than {MAX_TOKEN_BYTES} bytes")
    return token


def caller_from_review(review: Mapping[str, Any]) -> Caller:
    """The Caller in a TokenReview answer (pure); Unauthenticated unless it
    authenticated a service account."""
    status = review.get("status") or {}
    if not isinstance(status, Mapping):
        raise Unauthenticated("the TokenReview has no status")
    if status.get("error"):
        raise Unauthenticated(f"the API server refused the token: {status['error']}")
    if status.get("authenticated") is not True:
        raise Unauthenticated("the API server did not authenticate the token")
    user = status.get("user") or {}
    if SERVICE_ACCOUNTS_GROUP not in (user.get("groups") or ()):
        raise Unauthenticated("the token is not a service account's")
    username = user.get("username") or ""
    if not username.startswith(SERVICE_ACCOUNT_PREFIX):
        raise Unauthenticated(f"the token's user {username!r} is not a service account")
    parts = username[len(SERVICE_ACCOUNT_PREFIX):].split(":")
    if len(parts) != 2 or not all(parts):
        raise Unauthenticated(f"the token's user {username!r} is not system:serviceaccount:NAMESPACE:NAME")
    extra = user.get("extra") or {}

    def first(key: str) -> str:
        values = extra.get(key) or []
        return values[0] if len(values) == 1 and isinstance(values[0], str) else ""

    return Caller(parts[0], parts[1], pod_name=first(EXTRA_POD_NAME), pod_uid=first(EXTRA_POD_UID),
                  node_name=first(EXTRA_NODE_NAME), source="tokenreview")


class TokenReviewAuthenticator:
    """Asks the API server (TokenReview, authentication.k8s.io/v1) about each token."""

    def __init__(self, api: kube_client.ApiClient, audiences: Sequence[str] = DEFAULT_AUDIENCES,
                 timeout: float = 5.0) -> None:
        self._reviewer = kube_client.AuthenticationV1Api(api)
        self._audiences = list(audiences)
        self._timeout = timeout
        # Identical tokens reviewed at the same moment (one node agent asking
        # for a hundred pods) share one review; nothing is kept afterwards.
        self._reviews: SingleFlight[str, Caller] = SingleFlight()
        self.description = f"TokenReview (audiences {','.join(self._audiences)})"

    async def authenticate(self, token: str) -> Caller:
        return await self._reviews.run(token, lambda: asyncio.to_thread(self._review, token))

    def _review(self, token: str) -> Caller:
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "spec": {"token": token, "audiences": self._audiences}}
        try:
            response = self._reviewer.create_token_review(body, _preload_content=False,
                                                          _request_timeout=self._timeout)
        except ApiException as exc:
            # 401/403: the CA's own credentials or RBAC are wrong; nobody can be authenticated.
            raise AuthenticatorUnavailable(f"TokenReview failed: {exc.status} {exc.reason}") from None
        except Exception as exc:  # connection refused, timeout, TLS
            raise AuthenticatorUnavailable(f"TokenReview failed: {type(exc).__name__}: {exc}") from None
        try:
            review = json.loads(response.data)
        except ValueError:
            raise AuthenticatorUnavailable("TokenReview answer is not JSON") from None
        finally:
            response.release_conn()
        return caller_from_review(review)


@dataclass(frozen=True)
class _TokenFile:
    signature: tuple[int, int, int]
    callers: Mapping[str, Caller]


def parse_token_file(text: str, source: str = "token file") -> dict[str, Caller]:
    """`token,namespace/serviceaccount,node` lines (pure); '#' starts a comment line."""
    callers: dict[str, Caller] = {}
    rows = csv.reader(io.StringIO(text))
    for number, row in enumerate(rows, start=1):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        if len(row) != 3:
            raise ValueError(f"{source}:{number}: expected token,namespace/serviceaccount,node")
        token, account, node = (field.strip() for field in row)
        namespace, slash, name = account.partition("/")
        if not token or not slash or not namespace or not name or not node:
            raise ValueError(f"{source}:{number}: expected token,namespace/serviceaccount,node")
        if token in callers:
            raise ValueError(f"{source}:{number}: the token is listed twice")
        callers[token] = Caller(namespace, name, node_name=node, source="token-file")
    return callers


class StaticTokenAuthenticator:
    """Tokens from a file (re-read when it changes), for clusters without an API server."""

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._file: _TokenFile | None = None
        self.description = f"token file {self._path}"
        self._load()  # a missing or malformed file is an error at start-up, not on the first CSR

    def _load(self) -> Mapping[str, Caller]:
        st = os.stat(self._path)
        signature = (st.st_mtime_ns, st.st_size, st.st_ino)
        if self._file is None or self._file.signature != signature:
            if st.st_mode & 0o077:
                _log.warning("ca.token_file_readable_by_others", path=str(self._path), mode=oct(st.st_mode & 0o777))
            callers = parse_token_file(self._path.read_text(), str(self._path))
            self._file = _TokenFile(signature, callers)
        return self._file.callers

    async def authenticate(self, token: str) -> Caller:
        try:
            callers = self._load()
        except (OSError, ValueError) as exc:
            raise AuthenticatorUnavailable(f"cannot read {self._path}: {exc}") from None
        # Compare every entry in constant time: no token is found faster than another.
        found = None
        for known, caller in callers.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                found = caller
        if found is None:
            raise Unauthenticated("unknown token")
        return found
