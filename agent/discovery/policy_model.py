"""AuthorizationPolicy and PeerAuthentication as the node proxy sees them.

Objects arrive as Kubernetes-style dicts (from the API server or from local
YAML/JSON files). They are validated the way Istio's admission webhook would,
then translated the way istiod translates them for ztunnel, once, at parse
time, so the per-connection engine only ever sees L4 data:

- L7 attributes (operation hosts/methods/paths and their negations, source
  requestPrincipals/remoteIpBlocks and their negations, `when` keys other than
  source.ip, source.namespace, source.principal, destination.ip and
  destination.port) cannot be seen by a node proxy. An ALLOW rule naming any
  of them is dropped, because allowing on a partial match would be too
  permissive. In a DENY rule they are removed from each entry; an entry left
  with no L4 field can never match, because denying on a partial match of
  nothing would deny everything.
- Policies with targetRef(s) belong to waypoints, AUDIT/CUSTOM actions are not
  implemented by ztunnel, and dry-run policies are not enforced: all of these
  parse fine but carry a `skip_reason`.

A waypoint sees L7, so the HTTP fields of operations are kept (`Operation`
hosts/methods/paths) and a policy with targetRef(s) also keeps every rule as
written (`waypoint_rules`) with its `target_refs`; the node proxy's engine
reads neither.

Anything Istio would refuse raises PolicyError naming the policy.
"""
from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TypeAlias

API_GROUP = "security.istio.io"
ACCEPTED_API_VERSIONS = frozenset({f"{API_GROUP}/v1", f"{API_GROUP}/v1beta1"})
KIND_AUTHORIZATION_POLICY = "AuthorizationPolicy"
KIND_PEER_AUTHENTICATION = "PeerAuthentication"
DRY_RUN_ANNOTATION = "istio.io/dry-run"

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

# The `when` keys a node proxy can evaluate (istiod's l4WhenAttributes).
L4_CONDITION_KEYS = frozenset(
    {"source.ip", "source.namespace", "source.principal", "destination.ip", "destination.port"}
)
# Other keys Istio accepts; a node proxy treats all of them as L7.
_OTHER_EXACT_CONDITION_KEYS = frozenset(
    {
        "remote.ip",
        "source.serviceAccount",
        "source.trustDomain",
        "request.auth.principal",
        "request.auth.audiences",
        "request.auth.presenter",
        "connection.sni",
    }
)
_MAP_CONDITION_PREFIXES = ("request.headers", "request.auth.claims", "experimental.envoy.filters.")
_REPLACED_CONDITION_KEYS = {
    "destination.namespace": "it is replaced by metadata.namespace",
    "destination.name": "it was only supported in v1alpha1",
    "destination.user": "it was only supported in v1alpha1",
}

_SOURCE_L4_FIELDS = (
    "principals", "notPrincipals", "namespaces", "notNamespaces",
    "serviceAccounts", "notServiceAccounts", "ipBlocks", "notIpBlocks",
)
_SOURCE_L7_FIELDS = ("requestPrincipals", "notRequestPrincipals", "remoteIpBlocks", "notRemoteIpBlocks")
# Accepted by Istio's API but not translated for ztunnel by istiod: ignored at L4.
_SOURCE_UNTRANSLATED_FIELDS = ("trustDomains", "notTrustDomains")
_OPERATION_L4_FIELDS = ("ports", "notPorts")
_OPERATION_L7_FIELDS = ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths")

_AUTHZ_SPEC_FIELDS = frozenset({"selector", "targetRef", "targetRefs", "rules", "action", "provider"})
_RULE_FIELDS = frozenset({"from", "to", "when"})
_CONDITION_FIELDS = frozenset({"key", "values", "notValues"})
_PEERAUTH_SPEC_FIELDS = frozenset({"selector", "mtls", "portLevelMtls"})

# Go's strconv.ParseBool, which istiod uses for the dry-run annotation.
_TRUE_STRINGS = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE_STRINGS = frozenset({"0", "f", "F", "FALSE", "false", "False"})


class PolicyError(ValueError):
    """A policy Istio would refuse; the message names the policy and the field."""


class Action(enum.Enum):
    ALLOW = "ALLOW"
    DENY = "DENY"
    AUDIT = "AUDIT"
    CUSTOM = "CUSTOM"


class MtlsMode(enum.Enum):
    UNSET = "UNSET"
    DISABLE = "DISABLE"
    PERMISSIVE = "PERMISSIVE"
    STRICT = "STRICT"


Labels: TypeAlias = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Source:
    """One `from[].source` entry, reduced to what a node proxy can check.

    `service_accounts` are (namespace, name) pairs with the policy namespace
    filled in. `dropped` names the L7 fields that were removed and
    `ignored` the fields istiod does not translate for ztunnel.
    """

    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    service_accounts: tuple[tuple[str, str], ...] = ()
    not_service_accounts: tuple[tuple[str, str], ...] = ()
    ip_blocks: tuple[IPNetwork, ...] = ()
    not_ip_blocks: tuple[IPNetwork, ...] = ()
    dropped: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()

    @property
    def has_l4_fields(self) -> bool:
        """An entry without any L4 field never matches (ztunnel skips empty matches)."""
        return bool(
            self.principals or self.not_principals or self.namespaces or self.not_namespaces
            or self.service_accounts or self.not_service_accounts
            or self.ip_blocks or self.not_ip_blocks
        )


@dataclass(frozen=True)
class Operation:
    """One `to[].operation` entry. Only ports count at L4; the HTTP fields are
    kept for a waypoint (`dropped` names the ones present)."""

    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()
    dropped: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()

    @property
    def has_l4_fields(self) -> bool:
        return bool(self.ports or self.not_ports)


@dataclass(frozen=True)
class Condition:
    """One `when` entry. Values stay strings; the engine compiles them by key."""

    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()

    @property
    def is_l4(self) -> bool:
        return self.key in L4_CONDITION_KEYS


@dataclass(frozen=True)
class Rule:
    """One enforced rule; `index` is its position in the policy as written."""

    index: int
    sources: tuple[Source, ...] = ()
    operations: tuple[Operation, ...] = ()
    conditions: tuple[Condition, ...] = ()
    l7_attributes: tuple[str, ...] = ()


@dataclass(frozen=True)
class TargetRef:
    """One `targetRef(s)` entry: what a waypoint-enforced policy attaches to
    (a waypoint's Gateway, or a Service behind a waypoint)."""

    kind: str
    name: str
    group: str = ""
    namespace: str = ""  # empty: the policy's own namespace


@dataclass(frozen=True)
class AuthorizationPolicy:
    """A parsed AuthorizationPolicy, already translated for the node proxy.

    `rules` are the rules the node proxy enforces; `dropped_rules` are the
    indexes of ALLOW rules removed for naming L7 attributes. `selector` is
    None for namespace-wide (or, in the root namespace, mesh-wide) policies.
    `selects_nothing` marks a `selector` without `matchLabels`, which istiod
    attaches to no workload at all.
    """

    name: str
    namespace: str
    action: Action
    selector: Labels | None = None
    selects_nothing: bool = False
    rules: tuple[Rule, ...] = ()
    dropped_rules: tuple[int, ...] = ()
    skip_reason: str | None = None
    warnings: tuple[str, ...] = ()
    target_refs: tuple[TargetRef, ...] = ()
    waypoint_rules: tuple[Rule, ...] = ()  # with target_refs: every rule as written, L7 fields kept
    dry_run: bool = False

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def enforced(self) -> bool:
        return self.skip_reason is None


@dataclass(frozen=True)
class PeerAuthentication:
    """A parsed PeerAuthentication. `selector` is None for namespace/mesh level."""

    name: str
    namespace: str
    mode: MtlsMode = MtlsMode.UNSET
    selector: Labels | None = None
    port_level: tuple[tuple[int, MtlsMode], ...] = ()
    created: datetime | None = None
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class _Context:
    """Carries the policy's name into every error message."""

    def __init__(self, kind: str, namespace: str, name: str) -> None:
        self.label = f"{kind} {namespace}/{name}"

    def error(self, where: str, problem: str) -> PolicyError:
        location = f" {where}:" if where else ":"
        return PolicyError(f"{self.label}{location} {problem}")


def _metadata(obj: Any, kind: str) -> tuple[_Context, Mapping[str, Any], Mapping[str, Any]]:
    """Check envelope fields; return the error context, metadata and spec."""
    if not isinstance(obj, Mapping):
        raise PolicyError(f"{kind}: expected an object, got {type(obj).__name__}")
    metadata = obj.get("metadata")
    if not isinstance(metadata, Mapping):
        raise PolicyError(f"{kind}: metadata is missing or not an object")
    name = metadata.get("name")
    namespace = metadata.get("namespace")
    if not isinstance(name, str) or not name:
        raise PolicyError(f"{kind} in namespace {namespace!r}: metadata.name is required")
    if not isinstance(namespace, str) or not namespace:
        raise PolicyError(f"{kind} {name}: metadata.namespace is required")
    ctx = _Context(kind, namespace, name)
    api_version = obj.get("apiVersion")
    if api_version not in ACCEPTED_API_VERSIONS:
        raise ctx.error(
            "apiVersion", f"{api_version!r} is not supported, use one of {sorted(ACCEPTED_API_VERSIONS)}"
        )
    if obj.get("kind") != kind:
        raise ctx.error("kind", f"expected {kind!r}, got {obj.get('kind')!r}")
    spec = obj.get("spec", {})
    if spec is None:
        spec = {}
    if not isinstance(spec, Mapping):
        raise ctx.error("spec", "must be an object")
    return ctx, metadata, spec


def _check_fields(ctx: _Context, where: str, obj: Mapping[str, Any], known: Iterable[str]) -> None:
    unknown = sorted(set(obj) - set(known))
    if unknown:
        raise ctx.error(where, f"unknown field(s) {', '.join(unknown)}")


def _object(ctx: _Context, where: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ctx.error(where, "must be an object")
    return value


def _strings(ctx: _Context, where: str, value: Any, *, allow_int: bool = False) -> tuple[str, ...]:
    """A list of non-empty strings (ports may be written as integers)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ctx.error(where, f"must be a list, got {type(value).__name__}")
    out: list[str] = []
    for item in value:
        if allow_int and isinstance(item, int) and not isinstance(item, bool):
            item = str(item)
        if not isinstance(item, str):
            raise ctx.error(where, f"values must be strings, got {item!r}")
        if item == "":
            raise ctx.error(where, "empty value not allowed")
        out.append(item)
    return tuple(out)


def _ports(ctx: _Context, where: str, value: Any) -> tuple[int, ...]:
    ports: list[int] = []
    for text in _strings(ctx, where, value, allow_int=True):
        if not text.isdigit() or int(text) > 65535:
            raise ctx.error(where, f"bad port {text!r}, expected an integer in 0..65535")
        ports.append(int(text))
    return tuple(ports)


def _networks(ctx: _Context, where: str, values: Iterable[str]) -> tuple[IPNetwork, ...]:
    """CIDRs or single addresses (a single address is a host-length prefix)."""
    nets: list[IPNetwork] = []
    for text in values:
        try:
            if "/" in text:
                nets.append(ipaddress.ip_network(text, strict=False))
            else:
                nets.append(ipaddress.ip_network(ipaddress.ip_address(text)))
        except ValueError:
            kind = "CIDR range" if "/" in text else "IP address"
            raise ctx.error(where, f"bad {kind} {text!r}") from None
    return tuple(nets)


def _service_accounts(
    ctx: _Context, where: str, values: tuple[str, ...], namespace: str
) -> tuple[tuple[str, str], ...]:
    """`sa` or `ns/sa`; a bare name is in the policy's own namespace (as istiod)."""
    if len(values) > 16:
        raise ctx.error(where, "may not have more than 16 values")
    out: list[tuple[str, str]] = []
    for value in values:
        if "*" in value:
            raise ctx.error(where, f"wildcard not allowed in {value!r}")
        parts = value.split("/")
        if len(parts) > 2 or not all(parts):
            raise ctx.error(where, f"expected 'serviceAccount' or 'namespace/serviceAccount', found {value!r}")
        out.append((parts[0], parts[1]) if len(parts) == 2 else (namespace, parts[0]))
    return tuple(out)


def _selector(ctx: _Context, value: Any) -> tuple[Labels | None, bool, tuple[str, ...]]:
    """Return (labels, labels-were-given, warnings) of a WorkloadSelector."""
    selector = _object(ctx, "selector", value)
    _check_fields(ctx, "selector", selector, ("matchLabels",))
    if "matchLabels" not in selector or selector["matchLabels"] is None:
        return (), False, ("workload selector specified without labels",)
    match_labels = _object(ctx, "selector.matchLabels", selector["matchLabels"])
    pairs: list[tuple[str, str]] = []
    for key, label_value in match_labels.items():
        if not isinstance(key, str) or not key:
            raise ctx.error("selector.matchLabels", "empty key is not supported")
        if not isinstance(label_value, str):
            raise ctx.error("selector.matchLabels", f"value of {key!r} must be a string")
        if "*" in key or "*" in label_value:
            raise ctx.error("selector.matchLabels", f"wildcard is not supported in {key}={label_value}")
        pairs.append((key, label_value))
    warnings = () if pairs else ("workload selector specified without labels",)
    return tuple(sorted(pairs)), True, warnings


def _parse_source(ctx: _Context, where: str, raw: Any, namespace: str) -> Source:
    source = _object(ctx, where, raw)
    _check_fields(ctx, where, source, _SOURCE_L4_FIELDS + _SOURCE_L7_FIELDS + _SOURCE_UNTRANSLATED_FIELDS)
    values = {name: _strings(ctx, f"{where}.{name}", source.get(name)) for name in source}
    if not any(values.values()):
        raise ctx.error(where, "must not be empty")
    sa = values.get("serviceAccounts", ()) + values.get("notServiceAccounts", ())
    identity = (values.get(n, ()) for n in ("principals", "notPrincipals", "namespaces", "notNamespaces"))
    if sa and any(identity):
        raise ctx.error(where, "cannot set serviceAccounts with namespaces or principals")
    for name in ("remoteIpBlocks", "notRemoteIpBlocks"):
        _networks(ctx, f"{where}.{name}", values.get(name, ()))  # validated, then dropped as L7
    return Source(
        principals=values.get("principals", ()),
        not_principals=values.get("notPrincipals", ()),
        namespaces=values.get("namespaces", ()),
        not_namespaces=values.get("notNamespaces", ()),
        service_accounts=_service_accounts(
            ctx, f"{where}.serviceAccounts", values.get("serviceAccounts", ()), namespace
        ),
        not_service_accounts=_service_accounts(
            ctx, f"{where}.notServiceAccounts", values.get("notServiceAccounts", ()), namespace
        ),
        ip_blocks=_networks(ctx, f"{where}.ipBlocks", values.get("ipBlocks", ())),
        not_ip_blocks=_networks(ctx, f"{where}.notIpBlocks", values.get("notIpBlocks", ())),
        dropped=tuple(n for n in _SOURCE_L7_FIELDS if values.get(n)),
        ignored=tuple(n for n in _SOURCE_UNTRANSLATED_FIELDS if values.get(n)),
    )


def _parse_operation(ctx: _Context, where: str, raw: Any) -> Operation:
    operation = _object(ctx, where, raw)
    _check_fields(ctx, where, operation, _OPERATION_L4_FIELDS + _OPERATION_L7_FIELDS)
    l7 = {name: _strings(ctx, f"{where}.{name}", operation.get(name)) for name in _OPERATION_L7_FIELDS}
    ports = _ports(ctx, f"{where}.ports", operation.get("ports"))
    not_ports = _ports(ctx, f"{where}.notPorts", operation.get("notPorts"))
    if not (ports or not_ports or any(l7.values())):
        raise ctx.error(where, "must not be empty")
    return Operation(ports=ports, not_ports=not_ports, dropped=tuple(n for n in _OPERATION_L7_FIELDS if l7[n]),
                     hosts=l7["hosts"], not_hosts=l7["notHosts"], methods=l7["methods"],
                     not_methods=l7["notMethods"], paths=l7["paths"], not_paths=l7["notPaths"])


def _check_condition_key(ctx: _Context, where: str, key: str) -> None:
    if key in L4_CONDITION_KEYS or key in _OTHER_EXACT_CONDITION_KEYS:
        return
    if key in _REPLACED_CONDITION_KEYS:
        raise ctx.error(where, f"attribute {key} is not supported: {_REPLACED_CONDITION_KEYS[key]}")
    if key.startswith("destination.labels"):
        raise ctx.error(where, f"attribute {key} is replaced by the workload selector")
    if key.startswith(_MAP_CONDITION_PREFIXES):
        open_at = key.find("[")
        if not (key.endswith("]") and 0 < open_at < len(key) - 2):
            raise ctx.error(where, f"bad key {key!r}, expected the form name[entry]")
        return
    raise ctx.error(where, f"unknown attribute {key!r}")


def _parse_condition(ctx: _Context, where: str, raw: Any) -> Condition:
    condition = _object(ctx, where, raw)
    _check_fields(ctx, where, condition, _CONDITION_FIELDS)
    key = condition.get("key")
    if not isinstance(key, str) or not key:
        raise ctx.error(where, "`key` must not be empty")
    _check_condition_key(ctx, where, key)
    allow_int = key == "destination.port"
    values = _strings(ctx, f"{where}.values", condition.get("values"), allow_int=allow_int)
    not_values = _strings(ctx, f"{where}.notValues", condition.get("notValues"), allow_int=allow_int)
    if not values and not not_values:
        raise ctx.error(where, f"at least one of `values` or `notValues` must be set for key {key}")
    if key in ("source.ip", "destination.ip", "remote.ip"):
        _networks(ctx, where, values + not_values)
    elif key == "destination.port":
        _ports(ctx, where, list(values + not_values))
    return Condition(key=key, values=values, not_values=not_values)


def _parse_rule(ctx: _Context, index: int, raw: Any, namespace: str) -> Rule:
    where = f"rules[{index}]"
    if raw is None:
        raise ctx.error(where, "rule must not be null")
    rule = _object(ctx, where, raw)
    _check_fields(ctx, where, rule, _RULE_FIELDS)
    sources: list[Source] = []
    operations: list[Operation] = []
    conditions: list[Condition] = []
    for name in ("from", "to", "when"):
        if name in rule and not isinstance(rule[name], list):
            raise ctx.error(f"{where}.{name}", "must be a list")
        if name in ("from", "to") and rule.get(name) == []:
            raise ctx.error(f"{where}.{name}", "must not be empty")
    for i, entry in enumerate(rule.get("from") or []):
        entry_where = f"{where}.from[{i}]"
        entry = _object(ctx, entry_where, entry)
        _check_fields(ctx, entry_where, entry, ("source",))
        if entry.get("source") is None:
            raise ctx.error(f"{entry_where}.source", "must not be null")
        sources.append(_parse_source(ctx, f"{entry_where}.source", entry["source"], namespace))
    for i, entry in enumerate(rule.get("to") or []):
        entry_where = f"{where}.to[{i}]"
        entry = _object(ctx, entry_where, entry)
        _check_fields(ctx, entry_where, entry, ("operation",))
        if entry.get("operation") is None:
            raise ctx.error(f"{entry_where}.operation", "must not be null")
        operations.append(_parse_operation(ctx, f"{entry_where}.operation", entry["operation"]))
    for i, entry in enumerate(rule.get("when") or []):
        conditions.append(_parse_condition(ctx, f"{where}.when[{i}]", entry))
    l7: set[str] = set()
    for source in sources:
        l7.update(source.dropped)
    for operation in operations:
        l7.update(operation.dropped)
    l7.update(c.key for c in conditions if not c.is_l4)
    return Rule(
        index=index,
        sources=tuple(sources),
        operations=tuple(operations),
        conditions=tuple(conditions),
        l7_attributes=tuple(sorted(l7)),
    )


def _target_refs(ctx: _Context, spec: Mapping[str, Any]) -> tuple[TargetRef, ...]:
    """`targetRef` or `targetRefs`: kind and name are required (as Istio's CRD says)."""
    raw = [("spec.targetRef", spec["targetRef"])] if spec.get("targetRef") is not None else \
        [(f"spec.targetRefs[{i}]", ref) for i, ref in enumerate(spec.get("targetRefs") or [])]
    refs: list[TargetRef] = []
    for where, value in raw:
        ref = _object(ctx, where, value)
        _check_fields(ctx, where, ref, ("group", "kind", "name", "namespace"))
        fields = {}
        for name in ("group", "kind", "name", "namespace"):
            item = ref.get(name) or ""
            if not isinstance(item, str):
                raise ctx.error(f"{where}.{name}", "must be a string")
            fields[name] = item
        if not fields["kind"] or not fields["name"]:
            raise ctx.error(where, "kind and name are required")
        refs.append(TargetRef(kind=fields["kind"], name=fields["name"], group=fields["group"],
                              namespace=fields["namespace"]))
    return tuple(refs)


def _dry_run(ctx: _Context, metadata: Mapping[str, Any], action: Action) -> bool:
    annotations = metadata.get("annotations") or {}
    if not isinstance(annotations, Mapping):
        raise ctx.error("metadata.annotations", "must be an object")
    if DRY_RUN_ANNOTATION not in annotations:
        return False
    value = annotations[DRY_RUN_ANNOTATION]
    if action not in (Action.ALLOW, Action.DENY):
        raise ctx.error(
            f"annotation {DRY_RUN_ANNOTATION}", f"only supported with ALLOW/DENY, found action {action.value}"
        )
    if value in _TRUE_STRINGS:
        return True
    if value in _FALSE_STRINGS:
        return False
    raise ctx.error(f"annotation {DRY_RUN_ANNOTATION}", f"invalid boolean {value!r}")


def parse_authorization_policy(obj: Any) -> AuthorizationPolicy:
    """Validate and translate one AuthorizationPolicy object for the node proxy."""
    ctx, metadata, spec = _metadata(obj, KIND_AUTHORIZATION_POLICY)
    name, namespace = metadata["name"], metadata["namespace"]
    _check_fields(ctx, "spec", spec, _AUTHZ_SPEC_FIELDS)

    raw_action = spec.get("action") or "ALLOW"
    try:
        action = Action(raw_action)
    except ValueError:
        raise ctx.error(
            "spec.action", f"unknown action {raw_action!r}, expected one of ALLOW, DENY, AUDIT, CUSTOM"
        ) from None
    if spec.get("provider") is not None and action is not Action.CUSTOM:
        raise ctx.error("spec.provider", f"must only be set with the CUSTOM action, found {action.value}")

    raw_target_refs = spec.get("targetRefs") or []
    if not isinstance(raw_target_refs, list):
        raise ctx.error("spec.targetRefs", "must be a list")
    has_target = spec.get("targetRef") is not None or bool(raw_target_refs)
    kinds_set = (spec.get("selector") is not None) + (spec.get("targetRef") is not None) + bool(raw_target_refs)
    if kinds_set > 1:
        raise ctx.error("spec", "only one of selector, targetRef or targetRefs can be set")

    warnings: list[str] = []
    selector: Labels | None = None
    selects_nothing = False
    if spec.get("selector") is not None:
        selector, labels_given, selector_warnings = _selector(ctx, spec["selector"])
        warnings.extend(selector_warnings)
        if not labels_given:
            selects_nothing = True
            warnings.append("a selector without matchLabels attaches to no workload in ambient mode")

    raw_rules = spec.get("rules")
    if raw_rules is not None and not isinstance(raw_rules, list):
        raise ctx.error("spec.rules", "must be a list")
    if action is Action.DENY and raw_rules is None:
        raise ctx.error(
            "spec.rules",
            "DENY without `rules` would never match; add an empty rule `{}` to deny every connection",
        )
    parsed = [_parse_rule(ctx, i, raw, namespace) for i, raw in enumerate(raw_rules or [])]
    target_refs = _target_refs(ctx, spec) if has_target else ()

    skip_reason: str | None = None
    dry_run = _dry_run(ctx, metadata, action)
    if dry_run:
        skip_reason = "dry-run policies are not enforced by the node proxy"
    elif has_target:
        skip_reason = "policies with targetRef(s) are enforced by a waypoint, not the node proxy"
    elif action in (Action.AUDIT, Action.CUSTOM):
        skip_reason = f"the node proxy does not support the {action.value} action"

    rules: list[Rule] = []
    dropped_rules: list[int] = []
    l7_seen: set[str] = set()
    for rule in parsed:
        l7_seen.update(rule.l7_attributes)
        if action is Action.ALLOW and rule.l7_attributes:
            dropped_rules.append(rule.index)
        else:
            rules.append(rule)
        for source in rule.sources:
            if source.ignored:
                warnings.append(
                    f"rules[{rule.index}]: {', '.join(source.ignored)} not enforced by the node proxy"
                )
            for principal in source.principals + source.not_principals:
                if principal.startswith("spiffe://"):
                    warnings.append(
                        f"rules[{rule.index}]: principal {principal!r} is written with spiffe:// "
                        "and can never match; write it as <trust-domain>/ns/<ns>/sa/<sa>"
                    )
    if l7_seen and action in (Action.ALLOW, Action.DENY):
        found = ", ".join(sorted(l7_seen))
        if action is Action.ALLOW:
            consequence = f"ALLOW rules {dropped_rules} naming them are omitted and match nothing"
        else:
            consequence = "DENY entries are enforced without them; entries with only HTTP attributes never match"
        warnings.append(f"HTTP attributes need a waypoint (found: {found}); {consequence}")

    return AuthorizationPolicy(
        name=name,
        namespace=namespace,
        action=action,
        selector=selector,
        selects_nothing=selects_nothing,
        rules=tuple(rules),
        dropped_rules=tuple(dropped_rules),
        skip_reason=skip_reason,
        warnings=tuple(warnings),
        target_refs=target_refs,
        waypoint_rules=tuple(parsed) if has_target else (),
        dry_run=dry_run,
    )


def _mtls_mode(ctx: _Context, where: str, raw: Any) -> MtlsMode:
    if raw is None:
        return MtlsMode.UNSET
    mtls = _object(ctx, where, raw)
    _check_fields(ctx, where, mtls, ("mode",))
    mode = mtls.get("mode") or "UNSET"
    try:
        return MtlsMode(mode)
    except ValueError:
        raise ctx.error(
            f"{where}.mode", f"unknown mode {mode!r}, expected one of UNSET, DISABLE, PERMISSIVE, STRICT"
        ) from None


def _timestamp(ctx: _Context, raw: Any) -> datetime | None:
    if raw is None:
        return None
    if isinstance(raw, datetime):
        return raw if raw.tzinfo else raw.replace(tzinfo=timezone.utc)
    if not isinstance(raw, str):
        raise ctx.error("metadata.creationTimestamp", "must be an RFC 3339 string")
    try:
        parsed = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise ctx.error("metadata.creationTimestamp", f"bad timestamp {raw!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def parse_peer_authentication(obj: Any) -> PeerAuthentication:
    """Validate one PeerAuthentication object as Istio's webhook would."""
    ctx, metadata, spec = _metadata(obj, KIND_PEER_AUTHENTICATION)
    _check_fields(ctx, "spec", spec, _PEERAUTH_SPEC_FIELDS)
    selector: Labels | None = None
    warnings: tuple[str, ...] = ()
    if spec.get("selector") is not None:
        labels, _, warnings = _selector(ctx, spec["selector"])
        selector = labels or None  # no labels: namespace or mesh level, as Istio treats it
    raw_ports = spec.get("portLevelMtls")
    port_level: list[tuple[int, MtlsMode]] = []
    if raw_ports is not None:
        ports = _object(ctx, "spec.portLevelMtls", raw_ports)
        if not ports:
            raise ctx.error("spec.portLevelMtls", "if defined, must have at least one element")
        if selector is None:
            raise ctx.error("spec.portLevelMtls", "mesh/namespace peer authentication cannot have port level mTLS")
        for key, value in ports.items():
            text = str(key)
            if not text.isdigit() or not 1 <= int(text) <= 65535:
                raise ctx.error("spec.portLevelMtls", f"port {key!r} must be in range 1..65535")
            port_level.append((int(text), _mtls_mode(ctx, f"spec.portLevelMtls[{text}]", value)))
    return PeerAuthentication(
        name=metadata["name"],
        namespace=metadata["namespace"],
        mode=_mtls_mode(ctx, "spec.mtls", spec.get("mtls")),
        selector=selector,
        port_level=tuple(sorted(port_level)),
        created=_timestamp(ctx, metadata.get("creationTimestamp")),
        warnings=warnings,
    )


def parse_policy(obj: Any) -> AuthorizationPolicy | PeerAuthentication:
    """Dispatch on `kind`; raises PolicyError for any other kind."""
    kind = obj.get("kind") if isinstance(obj, Mapping) else None
    if kind == KIND_AUTHORIZATION_POLICY:
        return parse_authorization_policy(obj)
    if kind == KIND_PEER_AUTHENTICATION:
        return parse_peer_authentication(obj)
    raise PolicyError(
        f"unsupported kind {kind!r}, expected {KIND_AUTHORIZATION_POLICY} or {KIND_PEER_AUTHENTICATION}"
    )


@dataclass(frozen=True)
class RejectedPolicy:
    """A policy that failed to parse: rather than not exist, it denies every
    connection to the workloads it would select (fail closed).

    Its scope is read from what did parse. `selector` None means every
    workload of `namespace` (in the root namespace: of the mesh), as a policy
    without selector; when the selector itself is what failed, that is the
    scope too, since it could have selected any of them. `denies` is False
    for what the node proxy would not enforce even when valid (a waypoint's
    targetRef policy, a dry-run one, AUDIT/CUSTOM, a selector without
    labels): those are reported, and deny nothing here.
    """

    kind: str
    namespace: str
    name: str
    error: str
    selector: Labels | None = None
    denies: bool = True
    scope: str = ""  # the workloads it denies, in words (for ambitctl policies and the decision's reason)

    @property
    def key(self) -> str:
        """As ClusterState.errors() names it: "Kind namespace/name"."""
        return f"{self.kind} {self.namespace}/{self.name}"


def rejected_policy(kind: str, namespace: str, name: str, obj: Any, error: str) -> RejectedPolicy:
    """What a policy the parser rejected (`error`) would have selected.

    `namespace`/`name` are the object's (the API server always has them;
    local files default the namespace)."""
    ctx = _Context(kind, namespace, name)
    spec = obj.get("spec") if isinstance(obj, Mapping) else None
    spec = spec if isinstance(spec, Mapping) else {}
    metadata = obj.get("metadata") if isinstance(obj, Mapping) else None
    every = f"every workload of namespace {namespace} (its selector did not parse)"
    whole = f"every workload of namespace {namespace}"

    def rejected(selector: Labels | None, scope: str, denies: bool = True) -> RejectedPolicy:
        return RejectedPolicy(kind, namespace, name, error, selector, denies, scope)

    if kind == KIND_AUTHORIZATION_POLICY:
        if spec.get("selector") is None and (spec.get("targetRef") is not None or spec.get("targetRefs")):
            return rejected(None, "none here: a waypoint's policy (targetRef)", denies=False)
        if _annotated_dry_run(metadata):
            return rejected(None, "none: a dry-run policy", denies=False)
        if spec.get("action") in (Action.AUDIT.value, Action.CUSTOM.value):
            return rejected(None, f"none: the node proxy does not enforce {spec['action']}", denies=False)
    if spec.get("selector") is None:
        return rejected(None, whole)
    try:
        labels, _, _ = _selector(ctx, spec["selector"])
    except PolicyError:
        return rejected(None, every)
    if not labels:
        if kind == KIND_AUTHORIZATION_POLICY:  # istiod attaches it to no workload
            return rejected(None, "none: its selector has no labels", denies=False)
        return rejected(None, whole)  # PeerAuthentication: namespace level, as Istio reads it
    shown = ",".join(f"{k}={v}" for k, v in labels)
    return rejected(labels, f"workloads of namespace {namespace} labelled {shown}")


def _annotated_dry_run(metadata: Any) -> bool:
    annotations = metadata.get("annotations") if isinstance(metadata, Mapping) else None
    return isinstance(annotations, Mapping) and annotations.get(DRY_RUN_ANNOTATION) in _TRUE_STRINGS
