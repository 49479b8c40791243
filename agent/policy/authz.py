"""L4 authorization decisions, evaluated the way ztunnel evaluates them.

For a connection to a destination workload the applicable policies are: the
root namespace's policies without selector (mesh-wide), the workload
namespace's policies without selector, and the policies with a selector
matching the workload's labels from the workload namespace or the root
namespace. Then: any matching DENY denies; no ALLOW policy allows; any
matching ALLOW allows; otherwise deny.

A policy matches when any of its rules matches. A rule is a conjunction of
clauses (its `to` entries, its `from` entries, one clause per `when`
condition); a clause matches when any of its entries matches; an entry matches
when all of its fields match, and an entry with no L4 field never matches.
Rules are compiled once per policy update into plain callables; the policies
of a workload are found once per (namespace, labels) and flattened once per
destination port into a list of (remaining check, ready Decision), so a
decision is a few dict/set lookups and allocates nothing.
"""
from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
from structlog.typing import BindableLogger

from ..discovery.model import labels_match
from ..discovery.policy_model import (
    Action,
    AuthorizationPolicy,
    Condition,
    IPNetwork,
    Labels,
    Operation,
    RejectedPolicy,
    Rule,
    Source,
)
from .peerauth import DEFAULT_ROOT_NAMESPACE, PeerAuthenticationPolicy

SPIFFE_PREFIX = "spiffe://"
_CACHE_LIMIT = 4096

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _parse_principal(principal: str) -> tuple[str, tuple[str, str] | None]:
    """Strip spiffe:// (policies are written without it) and pick out (namespace, sa)."""
    bare = principal[len(SPIFFE_PREFIX):] if principal.startswith(SPIFFE_PREFIX) else principal
    parts = bare.split("/")
    if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa":
        return bare, (parts[2], parts[4])
    return bare, None


def _ip_key(address: IPAddress | str) -> tuple[int, int]:
    """(IP version, address as int); inet_pton is several times faster than ipaddress."""
    if isinstance(address, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return address.version, int(address)
    try:
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, address), "big")
    except OSError:
        pass
    try:
        return 6, int.from_bytes(socket.inet_pton(socket.AF_INET6, address), "big")
    except OSError:
        raise ValueError(f"{address!r} is not an IPv4 or IPv6 address") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionAttributes:
    """What the node proxy knows about one inbound connection.

    `source_principal` is the peer's SPIFFE ID from its verified certificate
    (with or without the spiffe:// scheme) and None for plaintext; in that
    case the source namespace is normally None too. If `source_namespace` is
    not given it is taken from the principal, as ztunnel does.
    """

    source_ip: IPAddress | str
    destination_ip: IPAddress | str
    destination_port: int
    destination_namespace: str
    destination_labels: Mapping[str, str] = field(default_factory=dict)
    source_principal: str | None = None
    source_namespace: str | None = None

    # Derived once per connection so the matchers only compare.
    principal: str | None = field(init=False, repr=False, compare=False)
    namespace: str | None = field(init=False, repr=False, compare=False)
    service_account: tuple[str, str] | None = field(init=False, repr=False, compare=False)
    src_key: tuple[int, int] = field(init=False, repr=False, compare=False)
    dst_key: tuple[int, int] = field(init=False, repr=False, compare=False)
    workload_key: tuple[str, frozenset[tuple[str, str]]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        principal: str | None = None
        service_account: tuple[str, str] | None = None
        if self.source_principal:
            principal, service_account = _parse_principal(self.source_principal)
        namespace = self.source_namespace
        if namespace is None and service_account is not None:
            namespace = service_account[0]
        setter = object.__setattr__
        setter(self, "principal", principal)
        setter(self, "namespace", namespace or None)
        setter(self, "service_account", service_account)
        setter(self, "src_key", _ip_key(self.source_ip))
        setter(self, "dst_key", _ip_key(self.destination_ip))
        setter(self, "workload_key", (self.destination_namespace, frozenset(self.destination_labels.items())))


# Why a connection was refused because the agent could not decide for it
# (Decision.fail_closed): the reason label of ambit_connections_failed_closed_total.
UNKNOWN_DESTINATION = "unknown_destination"    # no workload holds the destination address
DISCOVERY_NOT_SYNCED = "discovery_not_synced"  # the cluster view is partial: decide nothing
POLICY_INVALID = "policy_invalid"              # a policy that failed to parse denies its scope
UNKNOWN_SOURCE = "unknown_source"              # an outbound client no enrolment record speaks for
RECORDS_NOT_LOADED = "records_not_loaded"      # a (re)starting agent has not loaded its enrolment records


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict on one connection, with the reason written to the logs.

    `fail_closed` names why a denial was not a policy's verdict but the
    agent failing closed (e.g. UNKNOWN_DESTINATION); empty otherwise.
    """

    allowed: bool
    reason: str
    policy: str | None = None
    fail_closed: str = ""


@dataclass(frozen=True)
class PolicyStatus:
    """What the engine did with one policy: for `ambitctl policies` and status."""

    policy: str
    enforced: bool
    message: str


@dataclass(frozen=True)
class ApplicablePolicies:
    """The policy keys that apply to one workload, DENY and ALLOW in evaluation order."""

    deny: tuple[str, ...]
    allow: tuple[str, ...]


# ---------------------------------------------------------------- matchers

class _StringSet:
    """Istio string matching: exact, "*" (any non-empty), "prefix*" and "*suffix"."""

    __slots__ = ("exact", "prefixes", "suffixes", "presence")

    def __init__(self, patterns: Iterable[str]) -> None:
        exact: set[str] = set()
        prefixes: list[str] = []
        suffixes: list[str] = []
        self.presence = False
        for pattern in patterns:
            if pattern == "*":
                self.presence = True
            elif pattern.startswith("*"):
                suffixes.append(pattern[1:])
            elif pattern.endswith("*"):
                prefixes.append(pattern[:-1])
            else:
                exact.add(pattern)
        self.exact = frozenset(exact)
        self.prefixes = tuple(prefixes)
        self.suffixes = tuple(suffixes)

    def matches(self, value: str | None) -> bool:
        # No identity (plaintext) matches nothing, not even "*".
        if not value:
            return False
        return (
            self.presence
            or value in self.exact
            or (bool(self.prefixes) and value.startswith(self.prefixes))
            or (bool(self.suffixes) and value.endswith(self.suffixes))
        )


class _IpSet:
    """CIDRs as integer (network, mask) pairs per family; host routes in a set."""

    __slots__ = ("hosts", "networks")

    def __init__(self, networks: Iterable[IPNetwork]) -> None:
        hosts: set[tuple[int, int]] = set()
        nets: list[tuple[int, int, int]] = []
        for net in networks:
            if net.prefixlen == net.max_prefixlen:
                hosts.add((net.version, int(net.network_address)))
            else:
                nets.append((net.version, int(net.network_address), int(net.netmask)))
        self.hosts = frozenset(hosts)
        self.networks = tuple(nets)

    def contains(self, key: tuple[int, int]) -> bool:
        """`key` is (version, address as int), as ConnectionAttributes holds it."""
        if key in self.hosts:
            return True
        version, address = key
        for net_version, network, mask in self.networks:
            if net_version == version and address & mask == network:
                return True
        return False


Check = Callable[[ConnectionAttributes], bool]


def _principal_check(patterns: Iterable[str], negate: bool) -> Check:
    matches = _StringSet(patterns).matches
    if negate:
        return lambda c: not matches(c.principal)
    return lambda c: matches(c.principal)


def _namespace_check(patterns: Iterable[str], negate: bool) -> Check:
    matches = _StringSet(patterns).matches
    if negate:
        return lambda c: not matches(c.namespace)
    return lambda c: matches(c.namespace)


def _service_account_check(accounts: Iterable[tuple[str, str]], negate: bool) -> Check:
    wanted = frozenset(accounts)
    if negate:
        return lambda c: c.service_account not in wanted
    return lambda c: c.service_account in wanted


def _source_ip_check(networks: Iterable[IPNetwork], negate: bool) -> Check:
    contains = _IpSet(networks).contains
    if negate:
        return lambda c: not contains(c.src_key)
    return lambda c: contains(c.src_key)


def _destination_ip_check(networks: Iterable[IPNetwork], negate: bool) -> Check:
    contains = _IpSet(networks).contains
    if negate:
        return lambda c: not contains(c.dst_key)
    return lambda c: contains(c.dst_key)


def _port_check(ports: Iterable[int], negate: bool) -> Check:
    wanted = frozenset(ports)
    if negate:
        return lambda c: c.destination_port not in wanted
    return lambda c: c.destination_port in wanted


def _all_of(checks: tuple[Check, ...]) -> Check:
    """One callable for a conjunction, without a loop for the common short cases."""
    if len(checks) == 1:
        return checks[0]
    if len(checks) == 2:
        first, second = checks
        return lambda c: first(c) and second(c)
    return lambda c: all(check(c) for check in checks)


def _any_of(checks: tuple[Check, ...]) -> Check:
    if len(checks) == 1:
        return checks[0]
    if len(checks) == 2:
        first, second = checks
        return lambda c: first(c) or second(c)
    return lambda c: any(check(c) for check in checks)


def _add(checks: list[Check], factory: Callable[[tuple, bool], Check], positive: tuple, negative: tuple) -> None:
    if positive:
        checks.append(factory(positive, False))
    if negative:
        checks.append(factory(negative, True))


def _source_entry(source: Source) -> Check | None:
    """None when the entry has no L4 field: ztunnel skips it, so it never matches."""
    checks: list[Check] = []
    _add(checks, _source_ip_check, source.ip_blocks, source.not_ip_blocks)
    _add(checks, _service_account_check, source.service_accounts, source.not_service_accounts)
    _add(checks, _principal_check, source.principals, source.not_principals)
    _add(checks, _namespace_check, source.namespaces, source.not_namespaces)
    return _all_of(tuple(checks)) if checks else None


def _operation_entry(operation: Operation) -> Check | None:
    checks: list[Check] = []
    _add(checks, _port_check, operation.ports, operation.not_ports)
    return _all_of(tuple(checks)) if checks else None


def _networks(values: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(v, strict=False) for v in values)


def _ports(values: tuple[str, ...]) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def _condition_entry(condition: Condition) -> Check | None:
    """One `when` entry; an L7 key yields no check, so its clause can never match."""
    checks: list[Check] = []
    key, values, not_values = condition.key, condition.values, condition.not_values
    if key == "source.namespace":
        _add(checks, _namespace_check, values, not_values)
    elif key == "source.principal":
        _add(checks, _principal_check, values, not_values)
    elif key == "source.ip":
        _add(checks, _source_ip_check, _networks(values), _networks(not_values))
    elif key == "destination.ip":
        _add(checks, _destination_ip_check, _networks(values), _networks(not_values))
    elif key == "destination.port":
        _add(checks, _port_check, _ports(values), _ports(not_values))
    return _all_of(tuple(checks)) if checks else None


@dataclass(frozen=True, slots=True)
class _CompiledRule:
    """A rule as one callable, plus the ports it can match (None: any port).

    When the `to` clause only lists positive ports, "the port is listed" is
    exactly that clause, so it becomes an index lookup instead of a check.
    `test` is None when nothing is left to check.
    """

    index: int
    ports: frozenset[int] | None
    test: Check | None


def _compile_rule(rule: Rule) -> _CompiledRule | None:
    """None when some clause has only empty entries: the rule can never match."""
    ports: frozenset[int] | None = None
    clauses: list[Check] = []
    operations = rule.operations
    if operations and all(op.ports and not op.not_ports for op in operations):
        ports = frozenset(port for op in operations for port in op.ports)
        operations = ()
    raw_clauses: list[list[Check | None]] = []
    if operations:
        raw_clauses.append([_operation_entry(op) for op in operations])
    if rule.sources:
        raw_clauses.append([_source_entry(src) for src in rule.sources])
    for condition in rule.conditions:
        raw_clauses.append([_condition_entry(condition)])
    for raw in raw_clauses:
        entries = tuple(entry for entry in raw if entry is not None)
        if not entries:
            return None
        clauses.append(_any_of(entries))
    return _CompiledRule(rule.index, ports, _all_of(tuple(clauses)) if clauses else None)


class _CompiledPolicy:
    """`verdict`, when set, is the Decision every rule yields (a rejected
    policy's deny); `order` puts those first among a workload's policies, so
    the decision names the broken policy."""

    __slots__ = ("key", "namespace", "action", "selector", "selects_nothing", "rules", "verdict", "order")

    def __init__(self, policy: AuthorizationPolicy, verdict: Decision | None = None) -> None:
        self.key = verdict.policy if verdict is not None and verdict.policy else policy.key
        self.namespace = policy.namespace
        self.action = policy.action
        self.selector: Labels | None = policy.selector
        self.selects_nothing = policy.selects_nothing
        compiled = (_compile_rule(rule) for rule in policy.rules)
        self.rules = tuple(r for r in compiled if r is not None)
        self.verdict = verdict
        self.order = (verdict is None, self.key)

    @classmethod
    def denying(cls, rejected: RejectedPolicy, reason: str) -> "_CompiledPolicy":
        """A policy that failed to parse, as a DENY of everything in its scope."""
        scope = AuthorizationPolicy(name=rejected.name, namespace=rejected.namespace, action=Action.DENY,
                                    selector=rejected.selector, rules=(Rule(index=0),))
        return cls(scope, Decision(False, reason, rejected.key, fail_closed=POLICY_INVALID))


@dataclass(frozen=True)
class _Applicable:
    deny: tuple[_CompiledPolicy, ...]
    allow: tuple[_CompiledPolicy, ...]


_NO_ALLOW_POLICY = Decision(True, "allowed: no ALLOW policy applies")
_NO_ALLOW_MATCHED = Decision(False, "denied: no ALLOW policy matched")

# The remaining test of a rule (None: nothing left to check) and the ready
# Decision it yields, so a decision allocates nothing.
_PlannedRule = tuple[Check | None, Decision]


@dataclass(frozen=True, slots=True)
class _Plan:
    """Everything one (workload, port) decision needs, in evaluation order."""

    deny: tuple[_PlannedRule, ...]
    allow: tuple[_PlannedRule, ...]
    has_allow_policy: bool


def _planned(policies: tuple[_CompiledPolicy, ...], port: int, allowed: bool) -> tuple[_PlannedRule, ...]:
    verb = "allowed" if allowed else "denied"
    return tuple(
        (rule.test, policy.verdict or Decision(allowed, f"{verb} by {policy.key} rule {rule.index}", policy.key))
        for policy in policies
        for rule in policy.rules
        if rule.ports is None or port in rule.ports
    )


class _WorkloadPlans:
    """The policies of one workload and, lazily, one plan per destination port."""

    __slots__ = ("applicable", "by_port")

    def __init__(self, applicable: _Applicable) -> None:
        self.applicable = applicable
        self.by_port: dict[int, _Plan] = {}

    def for_port(self, port: int) -> _Plan:
        plan = self.by_port.get(port)
        if plan is None:
            if len(self.by_port) >= _CACHE_LIMIT:
                self.by_port.clear()
            plan = _Plan(
                deny=_planned(self.applicable.deny, port, allowed=False),
                allow=_planned(self.applicable.allow, port, allowed=True),
                has_allow_policy=bool(self.applicable.allow),
            )
            self.by_port[port] = plan
        return plan


# ---------------------------------------------------------------- engine

class PolicyEngine:
    """Decides whether a connection may reach a workload.

    `update` replaces the whole policy set (state of the world);
    `upsert`/`remove` apply one watch event. `generation` increases on every
    change so callers can re-check live connections after a policy change.
    If a PeerAuthenticationPolicy is given, STRICT is checked first and
    refuses plaintext peers.
    """

    def __init__(
        self,
        root_namespace: str = DEFAULT_ROOT_NAMESPACE,
        peer_authentication: PeerAuthenticationPolicy | None = None,
        logger: BindableLogger | None = None,
    ) -> None:
        self._log: Any = logger if logger is not None else structlog.get_logger(__name__)
        self._root_namespace = root_namespace
        self._peer_authentication = peer_authentication
        if peer_authentication is not None:
            peer_authentication.set_root_namespace(root_namespace)
        self._policies: dict[str, AuthorizationPolicy] = {}
        self._compiled: dict[str, _CompiledPolicy] = {}
        self._rejected: dict[str, RejectedPolicy] = {}  # by RejectedPolicy.key ("Kind ns/name")
        self._denying: dict[str, _CompiledPolicy] = {}   # the rejected ones that deny, compiled
        self._global: tuple[_CompiledPolicy, ...] = ()
        self._by_namespace: dict[str, tuple[_CompiledPolicy, ...]] = {}
        self._selected_by_namespace: dict[str, tuple[_CompiledPolicy, ...]] = {}
        self._cache: dict[tuple[str, frozenset[tuple[str, str]]], _WorkloadPlans] = {}
        self._generation = 0

    @property
    def root_namespace(self) -> str:
        return self._root_namespace

    @property
    def generation(self) -> int:
        return self._generation

    def set_root_namespace(self, namespace: str) -> None:
        self._root_namespace = namespace
        if self._peer_authentication is not None:
            self._peer_authentication.set_root_namespace(namespace)
        self._compile_rejected()
        self._reindex()

    def set_rejected(self, rejected: Iterable[RejectedPolicy]) -> None:
        """Policies (of either kind) that failed to parse: each denies every
        connection to the workloads it would select, until replaced."""
        found = {policy.key: policy for policy in rejected}
        if found == self._rejected:
            return
        self._rejected = found
        self._compile_rejected()
        self._reindex()

    def rejected(self, key: str) -> RejectedPolicy | None:
        """The rejected policy stored under "Kind namespace/name"."""
        return self._rejected.get(key)

    def rejected_scope(self, policy: RejectedPolicy) -> str:
        """The workloads a rejected policy denies, in words (the root namespace is mesh-wide)."""
        if not policy.denies or policy.namespace != self._root_namespace:
            return policy.scope
        return policy.scope.replace(f"of namespace {policy.namespace}",
                                    f"of every namespace (root namespace {policy.namespace})")

    def _compile_rejected(self) -> None:
        self._denying = {
            key: _CompiledPolicy.denying(policy, f"denied: {key} failed to parse, so it denies every connection "
                                                 f"to {self.rejected_scope(policy)}: {policy.error}")
            for key, policy in self._rejected.items() if policy.denies}

    def update(self, policies: Iterable[AuthorizationPolicy]) -> tuple[PolicyStatus, ...]:
        """Replace every policy; returns the status of each one."""
        self._policies = {}
        self._compiled = {}
        for policy in policies:
            self._store(policy)
        self._reindex()
        return self.statuses()

    def upsert(self, policy: AuthorizationPolicy) -> PolicyStatus:
        self._compiled.pop(policy.key, None)
        self._store(policy)
        self._reindex()
        return self._status(policy)

    def remove(self, namespace: str, name: str) -> None:
        key = f"{namespace}/{name}"
        if self._policies.pop(key, None) is not None:
            self._compiled.pop(key, None)
            self._reindex()
            self._log.info("authorization policy removed", policy=key)

    def policy(self, key: str) -> AuthorizationPolicy | None:
        """The policy stored under "namespace/name", enforced or not."""
        return self._policies.get(key)

    def statuses(self) -> tuple[PolicyStatus, ...]:
        """Every policy held, and every rejected one (keyed "Kind namespace/name")."""
        valid = tuple(self._status(self._policies[key]) for key in sorted(self._policies))
        return valid + tuple(self._rejected_status(self._rejected[key]) for key in sorted(self._rejected))

    def _rejected_status(self, policy: RejectedPolicy) -> PolicyStatus:
        if policy.denies:
            return PolicyStatus(policy.key, True, f"rejected: {policy.error}; denies every connection to "
                                                  f"{self.rejected_scope(policy)}")
        return PolicyStatus(policy.key, False, f"rejected: {policy.error}; denies nothing: {policy.scope}")

    def _store(self, policy: AuthorizationPolicy) -> None:
        self._policies[policy.key] = policy
        log = self._log.bind(policy=policy.key, action=policy.action.value)
        if policy.skip_reason is not None:
            log.info("authorization policy not enforced", reason=policy.skip_reason)
            return
        self._compiled[policy.key] = _CompiledPolicy(policy)
        for warning in policy.warnings:
            log.warning("authorization policy enforced with a warning", warning=warning)

    @staticmethod
    def _status(policy: AuthorizationPolicy) -> PolicyStatus:
        if policy.skip_reason is not None:
            return PolicyStatus(policy.key, False, f"not enforced: {policy.skip_reason}")
        message = "; ".join(policy.warnings) if policy.warnings else "enforced"
        return PolicyStatus(policy.key, True, message)

    def _reindex(self) -> None:
        """Bucket policies by scope; scope depends on the root namespace."""
        global_scope: list[_CompiledPolicy] = []
        by_namespace: dict[str, list[_CompiledPolicy]] = {}
        selected: dict[str, list[_CompiledPolicy]] = {}
        for policy in sorted([*self._compiled.values(), *self._denying.values()], key=lambda p: p.order):
            if policy.selector is not None or policy.selects_nothing:
                if not policy.selects_nothing:
                    selected.setdefault(policy.namespace, []).append(policy)
            elif policy.namespace == self._root_namespace:
                global_scope.append(policy)
            else:
                by_namespace.setdefault(policy.namespace, []).append(policy)
        self._global = tuple(global_scope)
        self._by_namespace = {ns: tuple(p) for ns, p in by_namespace.items()}
        self._selected_by_namespace = {ns: tuple(p) for ns, p in selected.items()}
        self._cache.clear()
        self._generation += 1

    def _applicable(self, namespace: str, labels: Mapping[str, str]) -> _Applicable:
        candidates = list(self._global)
        candidates.extend(self._by_namespace.get(namespace, ()))
        for ns in sorted({namespace, self._root_namespace}):
            for policy in self._selected_by_namespace.get(ns, ()):
                if labels_match(policy.selector or (), labels):
                    candidates.append(policy)
        candidates.sort(key=lambda p: p.order)
        return _Applicable(
            deny=tuple(p for p in candidates if p.action is Action.DENY),
            allow=tuple(p for p in candidates if p.action is Action.ALLOW),
        )

    def _plans_for(self, key: tuple[str, frozenset[tuple[str, str]]], labels: Mapping[str, str]) -> _WorkloadPlans:
        plans = self._cache.get(key)
        if plans is None:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            plans = _WorkloadPlans(self._applicable(key[0], labels))
            self._cache[key] = plans
        return plans

    def applicable(self, namespace: str, labels: Mapping[str, str]) -> ApplicablePolicies:
        """Which enforced policies apply to this workload (for ambitctl and tests)."""
        found = self._plans_for((namespace, frozenset(labels.items())), labels).applicable
        return ApplicablePolicies(deny=tuple(p.key for p in found.deny), allow=tuple(p.key for p in found.allow))

    def allows(self, conn: ConnectionAttributes) -> Decision:
        """Decide and log: denials at info, allows at debug (the hot path)."""
        decision = self._decide(conn)
        self.report(conn, decision)
        return decision

    def report(self, conn: ConnectionAttributes, decision: Decision) -> None:
        """The log line of `allows` (also for a decision the caller remembered)."""
        if decision.allowed:
            self._log.debug("connection allowed", reason=decision.reason, peer=conn.principal,
                            dst_port=conn.destination_port)
        else:
            self._log.info("connection denied", reason=decision.reason, policy=decision.policy,
                           src=str(conn.source_ip), peer=conn.principal,
                           dst=f"{conn.destination_ip}:{conn.destination_port}",
                           dst_namespace=conn.destination_namespace)

    def _decide(self, conn: ConnectionAttributes) -> Decision:
        if conn.principal is None and self._peer_authentication is not None:
            mtls = self._peer_authentication.effective(
                conn.destination_namespace, conn.destination_labels, conn.workload_key
            ).for_port(conn.destination_port)
            if mtls.requires_mtls:
                return Decision(False, f"denied: plaintext refused, {mtls.reason}", mtls.policy)
        plan = self._plans_for(conn.workload_key, conn.destination_labels).for_port(conn.destination_port)
        for test, decision in plan.deny:
            if test is None or test(conn):
                return decision
        if not plan.has_allow_policy:
            return _NO_ALLOW_POLICY
        for test, decision in plan.allow:
            if test is None or test(conn):
                return decision
        return _NO_ALLOW_MATCHED
