"""Service-account tokens as the fake API server mints and reviews them.

Projected service-account tokens are JWTs the API server signs; a TokenReview
asks the server to check one. What is modelled here is what a CA relies on:

- the signature (a token edited by hand, or signed by someone else, is not
  authenticated);
- `exp` (an expired token is not authenticated) and `nbf`;
- the audiences: a review that names audiences authenticates the token only
  if it carries one of them, and reports the ones in common; a review that
  names none checks against the API server's own audience;
- the pod binding: a token bound to a pod is valid only while that pod
  exists with the same uid; the review reports the pod's name and uid and,
  as Kubernetes >= 1.30 does, the node it was on when the token was minted
  (`status.user.extra["authentication.kubernetes.io/..."]`).

Tokens are HS256 JWTs under a key only the fake server holds; nobody outside
verifies them, so the algorithm does not matter, only that forging fails.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ISSUER = "https://kubernetes.default.svc.cluster.local"
API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"
EXTRA_POD_NAME = "authentication.kubernetes.io/pod-name"
EXTRA_POD_UID = "authentication.kubernetes.io/pod-uid"
EXTRA_NODE_NAME = "authentication.kubernetes.io/node-name"
EXTRA_NODE_UID = "authentication.kubernetes.io/node-uid"
EXTRA_CREDENTIAL_ID = "authentication.kubernetes.io/credential-id"

# Looks a pod up by (namespace, name): the object as stored, or None.
PodLookup = Callable[[str, str], "Mapping[str, Any] | None"]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class BoundPod:
    name: str
    uid: str
    node: str = ""


class TokenSigner:
    """Mints tokens and answers TokenReviews for them."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._key = secrets.token_bytes(32)
        self._clock = clock

    def mint(self, namespace: str, service_account: str, *, audiences: Sequence[str] = (API_AUDIENCE,),
             expires_in: float = 3600.0, pod: BoundPod | None = None, not_before: float | None = None) -> str:
        now = int(self._clock())
        claims: dict[str, Any] = {
            "iss": ISSUER, "sub": f"system:serviceaccount:{namespace}:{service_account}", "aud": list(audiences),
            "iat": now, "nbf": int(not_before) if not_before is not None else now, "exp": int(now + expires_in),
            "jti": secrets.token_hex(8),
            "kubernetes.io": {"namespace": namespace,
                              "serviceaccount": {"name": service_account, "uid": f"sa-{namespace}-{service_account}"}},
        }
        if pod is not None:
            claims["kubernetes.io"]["pod"] = {"name": pod.name, "uid": pod.uid}
            if pod.node:
                claims["kubernetes.io"]["node"] = {"name": pod.node, "uid": f"node-{pod.node}"}
        header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        return f"{header}.{payload}.{self._sign(f'{header}.{payload}')}"

    def _sign(self, signing_input: str) -> str:
        return _b64(hmac.new(self._key, signing_input.encode(), hashlib.sha256).digest())

    def review(self, token: str, audiences: Sequence[str], pods: PodLookup) -> dict[str, Any]:
        """The `status` of a TokenReview of `token` for `audiences` (empty: the API server's own)."""
        try:
            claims = self._verified_claims(token)
        except ValueError as exc:
            return {"authenticated": False, "error": f"[invalid bearer token, {exc}]"}
        now = self._clock()
        if now >= claims["exp"]:
            return {"authenticated": False, "error": "[invalid bearer token, square/go-jose/jwt: validation failed, "
                                                     "token is expired (exp)]"}
        if now < claims.get("nbf", 0):
            return {"authenticated": False, "error": "[invalid bearer token, token not valid yet (nbf)]"}
        wanted = list(audiences) or [API_AUDIENCE]
        common = [a for a in wanted if a in claims["aud"]]
        if not common:
            return {"authenticated": False, "error": "[invalid bearer token, token audiences "
                                                     f"{claims['aud']} is invalid for the target audiences {wanted}]"}
        k8s = claims["kubernetes.io"]
        namespace, sa = k8s["namespace"], k8s["serviceaccount"]["name"]
        extra: dict[str, list[str]] = {EXTRA_CREDENTIAL_ID: [f"JTI={claims['jti']}"]}
        bound = k8s.get("pod")
        if bound is not None:
            live = pods(namespace, bound["name"])
            if live is None:
                return {"authenticated": False, "error": f'[invalid bearer token, pods "{bound["name"]}" not found]'}
            if live["metadata"].get("uid") != bound["uid"]:
                return {"authenticated": False, "error": "[invalid bearer token, pod UID "
                        f"({live['metadata'].get('uid')}) does not match claim ({bound['uid']})]"}
            extra[EXTRA_POD_NAME] = [bound["name"]]
            extra[EXTRA_POD_UID] = [bound["uid"]]
            if "node" in k8s:
                extra[EXTRA_NODE_NAME] = [k8s["node"]["name"]]
                extra[EXTRA_NODE_UID] = [k8s["node"]["uid"]]
        return {"authenticated": True, "audiences": common, "user": {
            "username": f"system:serviceaccount:{namespace}:{sa}", "uid": k8s["serviceaccount"]["uid"],
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"],
            "extra": extra}}

    def _verified_claims(self, token: str) -> dict[str, Any]:
        parts = token.split(".")
        if len(parts) != 3:
            raise ValueError("not a JWT")
        header, payload, signature = parts
        if not hmac.compare_digest(signature, self._sign(f"{header}.{payload}")):
            raise ValueError("square/go-jose: error in cryptographic primitive")
        try:
            claims = json.loads(_unb64(payload))
        except ValueError:
            raise ValueError("malformed claims") from None
        if not isinstance(claims, dict) or "kubernetes.io" not in claims:
            raise ValueError("not a service account token")
        return claims
