"""AuthorizationPolicies as Envoy RBAC rules for one waypoint destination (pure).

Istio's semantics, as at a sidecar: any matching DENY policy denies (403);
then, if any ALLOW policy is attached, the request must match one of them
(an ALLOW policy whose rules all drop out allows nothing); otherwise it
passes. A policy matches when one of its rules does; a rule is its `from`,
`to` and `when` clauses together; a clause matches when one of its entries
does; an entry when all its fields do. Each Istio rule becomes one Envoy
policy (permissions = the request side, principals = the client side).

Where the inputs come from in the waypoint's Envoy (waypoint/bootstrap.py):
- the client's identity: the HBONE listener copies the mTLS peer's URI SAN
  into the filter-state string PEER_PRINCIPAL_KEY (the L7 listener behind
  it has no TLS of its own): principals, namespaces, serviceAccounts and
  the `when` keys source.principal / source.namespace;
- the client's address: restored as the inner connection's remote address
  (the node proxy connected from the client pod's own IP): ipBlocks and the
  `when` keys source.ip / remote.ip;
- HTTP: methods (:method), paths (the path without its query), hosts
  (:authority, case-insensitive, with or without a port) and `when`
  request.headers[...];
- ports, notPorts and the `when` keys destination.port / destination.ip are
  settled when the configuration is made: every destination has its own
  listener, with one address and port.
Not supported: requestPrincipals, remoteIpBlocks, trustDomains and the
`when` keys request.auth.*, source.serviceAccount, source.trustDomain,
connection.sni, experimental.*; and, for a TCP destination, every HTTP
field. A rule naming one is dropped from an ALLOW policy (it matches
nothing) and, in a DENY policy, the field is taken as matching, so it denies
more and never less. Each such case is noted.
"""
from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from ambit.agent.discovery.policy_model import Action, AuthorizationPolicy, Condition, Operation, Rule, Source

PEER_PRINCIPAL_KEY = "ambit.peer_principal"

# A matcher is True (matches everything), False (matches nothing) or an
# Envoy Permission/Principal message as a dict.
Matcher: TypeAlias = bool | dict[str, Any]
Side = Literal["permission", "principal"]
_COMBINE = {"permission": ("and_rules", "or_rules", "rules", "not_rule"),
            "principal": ("and_ids", "or_ids", "ids", "not_id")}


def _all(side: Side, items: Iterable[Matcher]) -> Matcher:
    kept: list[dict[str, Any]] = []
    for item in items:
        if item is False:
            return False
        if item is not True:
            kept.append(item)
    if not kept:
        return True
    if len(kept) == 1:
        return kept[0]
    and_key, _, list_key, _ = _COMBINE[side]
    return {and_key: {list_key: kept}}


def _any(side: Side, items: Iterable[Matcher]) -> Matcher:
    kept: list[dict[str, Any]] = []
    for item in items:
        if item is True:
            return True
        if item is not False:
            kept.append(item)
    if not kept:
        return False
    if len(kept) == 1:
        return kept[0]
    _, or_key, list_key, _ = _COMBINE[side]
    return {or_key: {list_key: kept}}


def _not(side: Side, item: Matcher) -> Matcher:
    if isinstance(item, bool):
        return not item
    return {_COMBINE[side][3]: item}


def _message(matcher: Matcher) -> dict[str, Any]:
    assert matcher is not False
    return {"any": True} if matcher is True else matcher


# --- Istio's string forms: "*", "prefix*", "*suffix", "exact" ------------------------------------

def string_match(pattern: str, *, prepend: str = "", ignore_case: bool = False) -> dict[str, Any]:
    """An Envoy StringMatcher for one Istio value; `prepend` goes before
    exact and prefix values (e.g. the spiffe:// a principal is written without)."""
    extra = {"ignore_case": True} if ignore_case else {}
    if pattern == "*":
        return {"safe_regex": {"regex": ".+" if not prepend else re.escape(prepend) + ".*"}}
    if pattern.endswith("*"):
        return {"prefix": prepend + pattern[:-1], **extra}
    if pattern.startswith("*"):
        return {"suffix": pattern[1:], **extra}
    return {"exact": prepend + pattern, **extra}


def _segment(pattern: str) -> str:
    """One path segment of a SPIFFE ID as a regular expression."""
    if pattern == "*":
        return "[^/]+"
    if pattern.endswith("*"):
        return re.escape(pattern[:-1]) + "[^/]*"
    if pattern.startswith("*"):
        return "[^/]*" + re.escape(pattern[1:])
    return re.escape(pattern)


def _peer(matcher: dict[str, Any]) -> dict[str, Any]:
    return {"filter_state": {"key": PEER_PRINCIPAL_KEY, "string_match": matcher}}


def _principal(pattern: str) -> Matcher:
    return _peer(string_match(pattern, prepend="spiffe://"))


def _namespace(pattern: str) -> Matcher:
    return _peer({"safe_regex": {"regex": f"spiffe://[^/]+/ns/{_segment(pattern)}/sa/[^/]+"}})


def _service_account(namespace: str, name: str) -> Matcher:
    return _peer({"safe_regex": {"regex": f"spiffe://[^/]+/ns/{re.escape(namespace)}/sa/{re.escape(name)}"}})


def _remote_ip(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> Matcher:
    return {"remote_ip": {"address_prefix": str(network.network_address), "prefix_len": network.prefixlen}}


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text if "/" in text else ipaddress.ip_address(text), strict=False)


def _header(name: str, pattern: str, ignore_case: bool = False) -> Matcher:
    if pattern == "*":
        return {"header": {"name": name, "present_match": True}}
    return {"header": {"name": name, "string_match": string_match(pattern, ignore_case=ignore_case)}}


def _host(pattern: str) -> Matcher:
    """Istio matches hosts with or without a port."""
    if pattern == "*":
        return True
    if pattern.startswith("*"):
        port = {"header": {"name": ":authority", "string_match": {
            "safe_regex": {"regex": "(?i).*" + re.escape(pattern[1:]) + ":[0-9]+"}}}}
        return _any("permission", [_header(":authority", pattern, True), port])
    if pattern.endswith("*"):
        return _header(":authority", pattern, True)
    return _any("permission", [_header(":authority", pattern, True), _header(":authority", pattern + ":*", True)])


def _path(pattern: str) -> Matcher:
    if pattern == "*":
        return True
    return {"url_path": {"path": string_match(pattern)}}


@dataclass(frozen=True)
class RbacRules:
    """Envoy RBAC `rules` messages for one destination: `deny` (None: no DENY
    policy attached) is checked first, then `allow` (None: no ALLOW policy,
    so what is not denied passes)."""

    deny: dict[str, Any] | None
    allow: dict[str, Any] | None
    notes: tuple[str, ...] = ()


class _Rule:
    """Translates one rule for one destination, collecting what it cannot."""

    def __init__(self, policy: AuthorizationPolicy, rule: Rule, dst_ip: str, dst_port: int, http: bool) -> None:
        self.policy = policy
        self.rule = rule
        self.dst_ip = dst_ip
        self.dst_port = dst_port
        self.http = http
        self.unsupported: set[str] = set()

    def _skip(self, name: str) -> Matcher:
        """An attribute we cannot check: matches (the ALLOW caller drops the whole rule)."""
        self.unsupported.add(name)
        return True

    def _http(self, name: str, matcher: Matcher) -> Matcher:
        return matcher if self.http else self._skip(name)

    def principal(self) -> Matcher:
        clauses: list[Matcher] = []
        if self.rule.sources:
            clauses.append(_any("principal", (self._source(s) for s in self.rule.sources)))
        clauses += [self._condition(c, "principal") for c in self.rule.conditions]
        return _all("principal", clauses)

    def permission(self) -> Matcher:
        clauses: list[Matcher] = []
        if self.rule.operations:
            clauses.append(_any("permission", (self._operation(o) for o in self.rule.operations)))
        clauses += [self._condition(c, "permission") for c in self.rule.conditions]
        return _all("permission", clauses)

    def _source(self, source: Source) -> Matcher:
        fields: list[Matcher] = []
        pairs = ((source.principals, source.not_principals, _principal),
                 (source.namespaces, source.not_namespaces, _namespace))
        for positive, negative, make in pairs:
            if positive:
                fields.append(_any("principal", (make(v) for v in positive)))
            if negative:
                fields.append(_not("principal", _any("principal", (make(v) for v in negative))))
        if source.service_accounts:
            fields.append(_any("principal", (_service_account(*a) for a in source.service_accounts)))
        if source.not_service_accounts:
            fields.append(_not("principal", _any("principal",
                                                 (_service_account(*a) for a in source.not_service_accounts))))
        if source.ip_blocks:
            fields.append(_any("principal", (_remote_ip(n) for n in source.ip_blocks)))
        if source.not_ip_blocks:
            fields.append(_not("principal", _any("principal", (_remote_ip(n) for n in source.not_ip_blocks))))
        for name in source.dropped + source.ignored:
            fields.append(self._skip(f"source.{name}"))
        return _all("principal", fields)

    def _operation(self, operation: Operation) -> Matcher:
        fields: list[Matcher] = []
        if operation.ports:
            fields.append(self.dst_port in operation.ports)
        if operation.not_ports:
            fields.append(self.dst_port not in operation.not_ports)
        http_fields = (
            ("methods", operation.methods, lambda v: _header(":method", v), False),
            ("notMethods", operation.not_methods, lambda v: _header(":method", v), True),
            ("paths", operation.paths, _path, False),
            ("notPaths", operation.not_paths, _path, True),
            ("hosts", operation.hosts, _host, False),
            ("notHosts", operation.not_hosts, _host, True),
        )
        for name, values, make, negate in http_fields:
            if not values:
                continue
            matcher = _any("permission", (make(v) for v in values))
            fields.append(self._http(f"operation.{name}", _not("permission", matcher) if negate else matcher))
        return _all("permission", fields)

    def _condition(self, condition: Condition, side: Side) -> Matcher:
        """The part of one `when` entry that belongs on `side` (True for the other side)."""
        key = condition.key
        principal_keys = {"source.ip": None, "remote.ip": None, "source.namespace": _namespace,
                          "source.principal": _principal}
        if key in principal_keys:
            if side != "principal":
                return True
            make = principal_keys[key]
            build = (lambda v: _remote_ip(_network(v))) if make is None else make
            return self._values("principal", condition, build)
        if side != "permission":
            return True
        if key == "destination.port":
            return self._static(condition, lambda v: int(v) == self.dst_port)
        if key == "destination.ip":
            address = ipaddress.ip_address(self.dst_ip)
            return self._static(condition, lambda v: address in _network(v))
        if key.startswith("request.headers[") and key.endswith("]"):
            name = key[len("request.headers["):-1].lower()
            return self._http(f"when {key}", self._values("permission", condition, lambda v: _header(name, v)))
        return self._skip(f"when {key}")

    @staticmethod
    def _values(side: Side, condition: Condition, make: Any) -> Matcher:
        parts: list[Matcher] = []
        if condition.values:
            parts.append(_any(side, (make(v) for v in condition.values)))
        if condition.not_values:
            parts.append(_not(side, _any(side, (make(v) for v in condition.not_values))))
        return _all(side, parts)

    @staticmethod
    def _static(condition: Condition, test: Any) -> bool:
        if condition.values and not any(test(v) for v in condition.values):
            return False
        return not any(test(v) for v in condition.not_values)


def rbac_rules(policies: Iterable[AuthorizationPolicy], dst_ip: str, dst_port: int, http: bool) -> RbacRules:
    """The RBAC rules of one destination (`dst_ip:dst_port` as dialled)."""
    deny: dict[str, Any] = {}
    allow: dict[str, Any] = {}
    has_deny = has_allow = False
    notes: list[str] = []
    for policy in policies:
        if policy.action is Action.DENY:
            has_deny = True
        elif policy.action is Action.ALLOW:
            has_allow = True
        else:
            continue
        for rule in policy.waypoint_rules:
            translator = _Rule(policy, rule, dst_ip, dst_port, http)
            permission, principal = translator.permission(), translator.principal()
            where = f"policy {policy.key} rules[{rule.index}]"
            if translator.unsupported:
                names = ", ".join(sorted(translator.unsupported))
                if policy.action is Action.ALLOW:
                    notes.append(f"{where}: {names} not supported here; the rule matches nothing")
                    continue
                notes.append(f"{where}: {names} not supported here; taken as matching (denies more)")
            if permission is False or principal is False:
                continue  # cannot match this destination (its ports, its address)
            target = deny if policy.action is Action.DENY else allow
            target[f"{where}"] = {"permissions": [_message(permission)], "principals": [_message(principal)]}
    return RbacRules(deny={"action": "DENY", "policies": deny} if has_deny else None,
                     allow={"action": "ALLOW", "policies": allow} if has_allow else None,
                     notes=tuple(notes))
