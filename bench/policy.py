#!/usr/bin/env python3
"""What L4 policy costs per new connection, and what the policy state weighs.

A cluster of 1,000 pods (20 namespaces, 10 nodes, 100 apps with two
versions, one Service per app) and 200 AuthorizationPolicies of the shapes
platform teams write (mesh-wide DENYs and selector ALLOWs in the root
namespace; namespace-wide ALLOWs from a list of namespaces; per-app ALLOWs on
principals and ports, some with `when` conditions or an L7 rule that the node
proxy drops; DENYs on ipBlocks, notNamespaces and ports) plus a few
PeerAuthentications (mesh PERMISSIVE, some namespaces STRICT, a port-level
exception) are fed to a ClusterState + PolicyEngine exactly as discovery
does. Then `Authorizer.check` - the call the proxy makes for every new
connection at the destination - is timed one by one for a stream of
connections with varied sources (mesh identities, 10% plaintext),
destinations and ports, after a warm-up so the engine's per-workload plans
are cached as in a running agent. The same stream against an engine with no
policy at all is the baseline.

Memory: tracemalloc of what building that state keeps (the parsed objects,
indexes and compiled policies; the input documents are freed), again after
the warm-up (plans cached), and the process RSS delta.

Target: decision p99 <= 50 us; state <= 20 MB. Logging is filtered at
"error" (decisions log at info/debug only, so this is what `--log-level warn`
does on the decision path; at "info" every denial also writes a log line).
Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import time
import tracemalloc
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ambit.agent import log as logconf  # noqa: E402
from ambit.agent.discovery.model import (KIND_AUTHORIZATION_POLICY, KIND_NAMESPACE, KIND_PEER_AUTHENTICATION,  # noqa: E402
                                         KIND_POD, KIND_SERVICE)
from ambit.agent.discovery.state import ClusterState  # noqa: E402
from ambit.agent.identity.spiffe import SpiffeId  # noqa: E402
from ambit.agent.policy.authz import PolicyEngine  # noqa: E402
from ambit.agent.policy.enforce import Authorizer  # noqa: E402
from ambit.agent.policy.peerauth import PeerAuthenticationPolicy  # noqa: E402
from stats import percentile  # noqa: E402  (bench/stats.py)

TARGET_P99_US = 50.0
TARGET_STATE_MB = 20.0
ROOT = "istio-system"
NAMESPACES = 20
NODES = 10
APPS = 100
PORTS = (8080, 9000, 5432, 443, 15090)


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# --- the cluster -------------------------------------------------------------------------------------------------

def _meta(name: str, namespace: str | None = None, **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, **extra}
    if namespace is not None:
        meta["namespace"] = namespace
    return meta


def cluster_objects(pods: int, policies: int, rng: random.Random) -> dict[str, list[dict[str, Any]]]:
    """Kubernetes-shaped objects by kind, as a watch or the cluster file delivers them."""
    namespaces = [f"team-{i:02d}" for i in range(NAMESPACES)]
    objects: dict[str, list[dict[str, Any]]] = {kind: [] for kind in (KIND_NAMESPACE, KIND_POD, KIND_SERVICE,
                                                                       KIND_AUTHORIZATION_POLICY,
                                                                       KIND_PEER_AUTHENTICATION)}
    for name in [ROOT, *namespaces]:
        labels = {"istio.io/dataplane-mode": "ambient"} if name != ROOT else {}
        objects[KIND_NAMESPACE].append({"kind": KIND_NAMESPACE, "apiVersion": "v1",
                                        "metadata": _meta(name, labels=labels)})
    app_namespace = {f"app-{a:03d}": namespaces[a % NAMESPACES] for a in range(APPS)}
    template_hash = {(a, v): f"{rng.getrandbits(32):08x}" for a in range(APPS) for v in (1, 2)}
    for i in range(pods):
        a, version = i % APPS, 1 + (i // APPS) % 2
        app = f"app-{a:03d}"
        namespace = app_namespace[app]
        # Replicas of one Deployment version share their labels (pod-template-hash included).
        labels = {"app": app, "version": f"v{version}", "tier": ("web", "api", "db")[a % 3],
                  "pod-template-hash": template_hash[(a, version)]}
        ip = f"10.{20 + i // 65000}.{(i // 250) % 256}.{2 + i % 250}"
        objects[KIND_POD].append({
            "kind": KIND_POD, "apiVersion": "v1",
            "metadata": _meta(f"{app}-{i:04d}", namespace, uid=f"uid-{i:06d}", labels=labels),
            "spec": {"nodeName": f"node-{i % NODES}", "serviceAccountName": app,
                     "containers": [{"name": "main", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                       "conditions": [{"type": "Ready", "status": "True"}]}})
    for a, (app, namespace) in enumerate(app_namespace.items()):
        objects[KIND_SERVICE].append({
            "kind": KIND_SERVICE, "apiVersion": "v1", "metadata": _meta(app, namespace),
            "spec": {"clusterIP": f"10.96.{a // 250}.{1 + a % 250}", "selector": {"app": app},
                     "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})

    def policy(name: str, namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
        return {"kind": KIND_AUTHORIZATION_POLICY, "apiVersion": "security.istio.io/v1",
                "metadata": _meta(name, namespace), "spec": spec}

    def principal(app: str) -> str:
        return f"cluster.local/ns/{app_namespace[app]}/sa/{app}"

    made = objects[KIND_AUTHORIZATION_POLICY]
    # Mesh-wide (root namespace): quarantine and an outside range denied, a selector ALLOW for all "db" tiers.
    made.append(policy("deny-quarantine", ROOT, {"action": "DENY", "rules": [
        {"from": [{"source": {"namespaces": ["quarantine", "sandbox-*"]}}]}]}))
    made.append(policy("deny-outside", ROOT, {"action": "DENY", "rules": [
        {"from": [{"source": {"ipBlocks": ["192.168.0.0/16", "172.16.0.0/12"]}}]}]}))
    made.append(policy("db-from-api", ROOT, {"selector": {"matchLabels": {"tier": "db"}}, "action": "ALLOW",
                                             "rules": [{"from": [{"source": {"principals": ["*/sa/app-0*"]}}],
                                                        "to": [{"operation": {"ports": ["5432"]}}]}]}))
    made.append(policy("deny-admin-port", ROOT, {"action": "DENY", "rules": [
        {"from": [{"source": {"notNamespaces": [ROOT]}}], "to": [{"operation": {"ports": ["15000"]}}]}]}))
    i = 0
    while len(made) < policies:
        shape = i % 5
        namespace = namespaces[i % NAMESPACES]
        app = f"app-{(i * 7) % APPS:03d}"
        peers = rng.sample(sorted(app_namespace), 4)
        if shape == 0:    # namespace-wide ALLOW from a few namespaces
            made.append(policy(f"ns-allow-{i}", namespace, {"action": "ALLOW", "rules": [
                {"from": [{"source": {"namespaces": [namespace, *rng.sample(namespaces, 3), ROOT]}}]}]}))
        elif shape == 1:  # per-app ALLOW on principals and ports
            made.append(policy(f"{app}-allow-{i}", app_namespace[app], {
                "selector": {"matchLabels": {"app": app}}, "action": "ALLOW", "rules": [
                    {"from": [{"source": {"principals": [principal(p) for p in peers]}}],
                     "to": [{"operation": {"ports": ["8080", "9000"]}}]},
                    {"from": [{"source": {"namespaces": [ROOT]}}], "to": [{"operation": {"ports": ["15090"]}}]}]}))
        elif shape == 2:  # per-app ALLOW with `when` conditions, plus an L7 rule the node proxy drops
            made.append(policy(f"{app}-when-{i}", app_namespace[app], {
                "selector": {"matchLabels": {"app": app, "version": "v2"}}, "action": "ALLOW", "rules": [
                    {"from": [{"source": {"namespaces": rng.sample(namespaces, 2)}}],
                     "when": [{"key": "source.ip", "values": ["10.20.0.0/16"]},
                              {"key": "destination.port", "values": ["8080", "443"]}]},
                    {"to": [{"operation": {"methods": ["GET"], "paths": ["/healthz"]}}]}]}))
        elif shape == 3:  # per-app DENY on ipBlocks and notNamespaces
            made.append(policy(f"{app}-deny-{i}", app_namespace[app], {
                "selector": {"matchLabels": {"app": app}}, "action": "DENY", "rules": [
                    {"from": [{"source": {"ipBlocks": [f"10.20.{rng.randrange(4)}.0/24"]}}],
                     "to": [{"operation": {"ports": ["5432"]}}]},
                    {"from": [{"source": {"notNamespaces": [app_namespace[app], ROOT]}}],
                     "to": [{"operation": {"notPorts": ["8080", "9000", "443"]}}]}]}))
        else:             # tier-wide ALLOW in a namespace, principals by service account
            made.append(policy(f"tier-{i}", namespace, {
                "selector": {"matchLabels": {"tier": ("web", "api")[i % 2]}}, "action": "ALLOW", "rules": [
                    {"from": [{"source": {"serviceAccounts": [p for p in peers if app_namespace[p] == namespace]
                                          or ["default"]}},
                              {"source": {"principals": [principal(peers[0])], "ipBlocks": ["10.20.0.0/14"]}}],
                     "to": [{"operation": {"ports": [str(p) for p in PORTS[:3]]}}]}]}))
        i += 1

    def peer_authentication(name: str, namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
        return {"kind": KIND_PEER_AUTHENTICATION, "apiVersion": "security.istio.io/v1",
                "metadata": _meta(name, namespace), "spec": spec}

    objects[KIND_PEER_AUTHENTICATION] += [
        peer_authentication("default", ROOT, {"mtls": {"mode": "PERMISSIVE"}}),
        *(peer_authentication("strict", ns, {"mtls": {"mode": "STRICT"}}) for ns in namespaces[::4]),
        peer_authentication("metrics-plaintext", namespaces[0], {
            "selector": {"matchLabels": {"tier": "web"}}, "portLevelMtls": {"15090": {"mode": "PERMISSIVE"}}}),
    ]
    return objects


def build(documents: str, with_policies: bool) -> tuple[ClusterState, PolicyEngine, Authorizer]:
    """What the agent builds from discovery: the state, its engine, the proxy's authorizer."""
    objects = json.loads(documents)
    peer_authentication = PeerAuthenticationPolicy(ROOT)
    engine = PolicyEngine(ROOT, peer_authentication=peer_authentication)
    state = ClusterState(engine, peer_authentication)
    for kind, items in objects.items():
        if with_policies or kind not in (KIND_AUTHORIZATION_POLICY, KIND_PEER_AUTHENTICATION):
            state.replace_kind(kind, items)
    return state, engine, Authorizer(state, engine)


# --- the traffic -------------------------------------------------------------------------------------------------

Connection = tuple[str, SpiffeId | None, str, int]


def connection_stream(state: ClusterState, count: int, rng: random.Random) -> list[Connection]:
    """(source IP, identity or None, destination IP, port): mesh peers mostly,
    10% plaintext, now and then a source outside the cluster."""
    pods = state.pods()
    out: list[Connection] = []
    for _ in range(count):
        source = rng.choice(pods)
        destination = rng.choice(pods)
        port = rng.choice(PORTS)
        roll = rng.random()
        if roll < 0.10:
            out.append((source.ips[0], None, destination.ips[0], port))
        elif roll < 0.12:
            out.append((f"192.168.{rng.randrange(256)}.{rng.randrange(1, 255)}", None, destination.ips[0], port))
        else:
            out.append((source.ips[0], state.identity(source), destination.ips[0], port))
    return out


def time_decisions(authorizer: Authorizer, stream: list[Connection]) -> tuple[list[float], int]:
    """Microseconds per `check`, one call at a time; and how many were denied."""
    check = authorizer.check
    clock = time.perf_counter_ns
    samples: list[float] = []
    denied = 0
    for source_ip, identity, dst_ip, dst_port in stream:
        started = clock()
        decision = check(source_ip=source_ip, source_identity=identity, dst_ip=dst_ip, dst_port=dst_port)
        samples.append((clock() - started) / 1000)
        denied += not decision.allowed
    return samples, denied


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer decisions (under a minute)")
    parser.add_argument("--pods", type=int, default=1000)
    parser.add_argument("--policies", type=int, default=200)
    parser.add_argument("--decisions", type=int, default=None, help="timed decisions (default 100k, 30k quick)")
    args = parser.parse_args()
    decisions = args.decisions or (30_000 if args.quick else 100_000)
    logconf.configure("error")  # as the agent configures it (cached loggers), errors only
    rng = random.Random(6)
    documents = json.dumps(cluster_objects(args.pods, args.policies, rng))

    # Memory: what building the state keeps, and what the warm-up's cached plans add.
    gc.collect()
    rss_before = rss_bytes()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    started = time.perf_counter()
    state, engine, authorizer = build(documents, with_policies=True)
    build_s = time.perf_counter() - started
    gc.collect()
    built = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    rss_delta = rss_bytes() - rss_before
    stream = connection_stream(state, decisions, rng)
    warmup = connection_stream(state, max(20_000, decisions // 2), rng)
    gc.collect()
    rss_before = rss_bytes()
    tracemalloc.start()
    base_warm = tracemalloc.get_traced_memory()[0]
    time_decisions(authorizer, warmup)  # its samples are freed before measuring
    gc.collect()
    cached = tracemalloc.get_traced_memory()[0] - base_warm
    tracemalloc.stop()
    gc.collect()
    rss_delta += rss_bytes() - rss_before
    state_mb = (built + cached) / 2**20
    counts = state.counts()
    enforced = sum(1 for s in engine.statuses() if s.enforced)

    # Time: the same stream with these policies and with none.
    samples, denied = time_decisions(authorizer, stream)
    _, _, empty = build(documents, with_policies=False)
    time_decisions(empty, warmup)
    baseline, baseline_denied = time_decisions(empty, stream)

    p50, p99 = percentile(samples, 50), percentile(samples, 99)
    b50, b99 = percentile(baseline, 50), percentile(baseline, 99)
    print(f"{counts[KIND_POD]} pods in {NAMESPACES} namespaces, {counts[KIND_SERVICE]} services, "
          f"{counts[KIND_AUTHORIZATION_POLICY]} AuthorizationPolicies ({enforced} enforced), "
          f"{counts[KIND_PEER_AUTHENTICATION]} PeerAuthentications; built in {build_s * 1000:.0f} ms")
    print(f"{len(stream)} decisions after {len(warmup)} warm-up, {denied / len(stream):.0%} denied")
    print(f"  with policies   p50 {p50:6.2f} us   p99 {p99:6.2f} us   max {max(samples):8.1f} us")
    print(f"  no policy       p50 {b50:6.2f} us   p99 {b99:6.2f} us   ({baseline_denied} denied)")
    print(f"  state: {built / 2**20:.2f} MB built + {cached / 2**20:.2f} MB cached plans = {state_mb:.2f} MB "
          f"(tracemalloc); RSS delta {rss_delta / 2**20:.1f} MB")
    met = p99 <= TARGET_P99_US and state_mb <= TARGET_STATE_MB
    print(json.dumps({
        "bench": "policy", "pods": counts[KIND_POD], "policies": counts[KIND_AUTHORIZATION_POLICY],
        "decisions": len(stream), "denied_share": round(denied / len(stream), 3),
        "decision_p50_us": round(p50, 2), "decision_p99_us": round(p99, 2),
        "baseline_p50_us": round(b50, 2), "baseline_p99_us": round(b99, 2),
        "state_mb": round(state_mb, 2), "state_built_mb": round(built / 2**20, 2),
        "state_cached_mb": round(cached / 2**20, 2), "rss_delta_mb": round(rss_delta / 2**20, 1),
        "targets": {"decision_p99_us": TARGET_P99_US, "state_mb": TARGET_STATE_MB}, "met": met}))


if __name__ == "__main__":
    main()
