"""SPIFFE IDs of Kubernetes workloads: `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.

Parsing is strict on purpose: an identity read from a peer certificate decides
what that peer may reach, so anything that is not exactly the Istio workload
form (query, port, percent-encoding, extra path segments, upper-case trust
domain) is refused rather than normalised.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

SCHEME_PREFIX = "spiffe://"
DEFAULT_TRUST_DOMAIN = "cluster.local"

# Limits and character sets from the SPIFFE-ID specification (sections 2.1-2.3).
MAX_URI_LENGTH = 2048
MAX_TRUST_DOMAIN_LENGTH = 255
_TRUST_DOMAIN_CHARS = re.compile(r"[a-z0-9._-]+")
_PATH_SEGMENT_CHARS = re.compile(r"[A-Za-z0-9._-]+")

_WORKLOAD_FORM = "spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"


def check_trust_domain(trust_domain: str) -> None:
    """Raise ValueError unless `trust_domain` is a valid SPIFFE trust domain name."""
    if not trust_domain:
        raise ValueError("SPIFFE trust domain is empty")
    if len(trust_domain) > MAX_TRUST_DOMAIN_LENGTH:
        raise ValueError(
            f"SPIFFE trust domain is {len(trust_domain)} characters long, "
            f"at most {MAX_TRUST_DOMAIN_LENGTH} are allowed"
        )
    if "@" in trust_domain:
        raise ValueError(f"SPIFFE trust domain {trust_domain!r} must not contain userinfo ('@')")
    if ":" in trust_domain:
        raise ValueError(f"SPIFFE trust domain {trust_domain!r} must not contain a port (':')")
    if not _TRUST_DOMAIN_CHARS.fullmatch(trust_domain):
        raise ValueError(
            f"SPIFFE trust domain {trust_domain!r} may contain only lower-case letters, "
            "digits, '.', '-' and '_'"
        )


def _check_segment(kind: str, value: str) -> None:
    if not value:
        raise ValueError(f"SPIFFE {kind} is empty")
    if value in (".", ".."):
        raise ValueError(f"SPIFFE {kind} must not be {value!r}")
    if not _PATH_SEGMENT_CHARS.fullmatch(value):
        raise ValueError(
            f"SPIFFE {kind} {value!r} may contain only letters, digits, '.', '-' and '_'"
        )


@dataclass(frozen=True)
class SpiffeId:
    """The identity of one Kubernetes service account in one trust domain."""

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        check_trust_domain(self.trust_domain)
        _check_segment("namespace", self.namespace)
        _check_segment("service account", self.service_account)

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """Parse a URI SAN; raises ValueError saying what is wrong with it."""
        if not isinstance(uri, str):
            raise ValueError(f"SPIFFE ID must be a string, not {type(uri).__name__}")
        if len(uri) > MAX_URI_LENGTH:
            raise ValueError(
                f"SPIFFE ID is {len(uri)} characters long, at most {MAX_URI_LENGTH} are allowed"
            )
        if not uri.startswith(SCHEME_PREFIX):
            raise ValueError(f"SPIFFE ID {uri!r} must start with {SCHEME_PREFIX!r}")
        if "?" in uri or "#" in uri:
            raise ValueError(f"SPIFFE ID {uri!r} must not contain a query or fragment")
        trust_domain, slash, path = uri[len(SCHEME_PREFIX):].partition("/")
        check_trust_domain(trust_domain)
        if not slash or not path:
            raise ValueError(f"SPIFFE ID {uri!r} has no path; expected {_WORKLOAD_FORM}")
        parts = path.split("/")
        if len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa":
            raise ValueError(
                f"SPIFFE ID {uri!r} has path '/{path}'; expected {_WORKLOAD_FORM}"
            )
        return cls(trust_domain, parts[1], parts[3])

    @classmethod
    def from_principal(cls, principal: str) -> SpiffeId:
        """Parse the AuthorizationPolicy form `<td>/ns/<ns>/sa/<sa>`."""
        if principal.startswith(SCHEME_PREFIX):
            raise ValueError(
                f"principal {principal!r} must not carry the {SCHEME_PREFIX!r} scheme"
            )
        return cls.parse(SCHEME_PREFIX + principal)

    @property
    def principal(self) -> str:
        """The form AuthorizationPolicy `principals` match against."""
        return f"{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return SCHEME_PREFIX + self.principal
