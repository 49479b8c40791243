"""The real `kubernetes` client, driven by KubeSource, against the in-repo API server.

Every test runs the official client over HTTP/1.1 against tests/support/fake_apiserver.py,
which speaks list/watch as kube-apiserver does (resourceVersions, chunked watch streams,
bookmarks, 410 Gone, field selectors); hold() freezes event delivery so the interleavings
that matter (changes while disconnected, compaction while behind) happen every time.
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import structlog.testing
import yaml

from ambit.agent.discovery.kube import Backoff, KubeSource, api_client_from
from ambit.agent.discovery.model import ALL_KINDS
from ambit.agent.discovery.selector import AmbientSelector
from ambit.agent.discovery.state import ClusterState
from ambit.agent.policy.authz import PolicyEngine
from ambit.agent.discovery.policy_model import MtlsMode
from ambit.agent.policy.peerauth import PeerAuthenticationPolicy
from ambit.agent.workload import PodRef
from tests.support.fake_apiserver import FakeApiServer

pytestmark = pytest.mark.timeout(30)

TOKEN = "test-token"
FAST = Backoff(initial=0.02, maximum=0.2)
AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def namespace(name: str, **labels: str) -> dict[str, Any]:
    return {"kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def pod(name: str, ns: str = "demo", node: str | None = "node-1", ip: str = "10.1.0.1", **labels: str) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "main", "image": "app:1"}]}
    if node:
        spec["nodeName"] = node
    return {"kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels}, "spec": spec,
            "status": {"phase": "Running", "podIPs": [{"ip": ip}],
                       "conditions": [{"type": "Ready", "status": "True"}]}}


def service(name: str, vip: str = "10.96.0.10", target: int = 8080) -> dict[str, Any]:
    return {"kind": "Service", "metadata": {"name": name, "namespace": "demo"},
            "spec": {"clusterIP": vip, "clusterIPs": [vip], "selector": {"app": name},
                     "ports": [{"name": "http", "port": 80, "targetPort": target}]}}


def endpoint_slice(name: str, service_name: str, *ips: str) -> dict[str, Any]:
    return {"kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": name, "namespace": "demo", "labels": {"kubernetes.io/service-name": service_name}},
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}, "nodeName": "node-1"} for ip in ips],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}


def authz(name: str, action: str = "ALLOW") -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": "demo"},
            "spec": {"action": action, "rules": [{"from": [{"source": {"namespaces": ["demo"]}}]}]}}


def peer_auth(name: str, mode: str) -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": name, "namespace": "demo"}, "spec": {"mtls": {"mode": mode}}}


async def eventually(check: Callable[[], Any], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


@pytest.fixture
def server() -> Iterator[FakeApiServer]:
    with FakeApiServer(token=TOKEN) as fake:
        yield fake


@contextlib.asynccontextmanager
async def running(server: FakeApiServer, state: ClusterState, **options: Any) -> AsyncIterator[KubeSource]:
    api = api_client_from(host=server.url, token=TOKEN)
    source = KubeSource(api, state, "node-1", backoff=FAST, **options)
    await source.start()
    try:
        await asyncio.wait_for(source.synced.wait(), 5)
        # Synced means listed; the tests below also need every watch stream open.
        await eventually(lambda: server.open_watches() == len(options.get("kinds", ALL_KINDS)))
        yield source
    finally:
        await source.stop()
        api.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("ambit-watch-")], "watch threads left"


class Recorder:
    """Every change notification, as (kind, event, name)."""

    def __init__(self, state: ClusterState) -> None:
        self.events: list[tuple[str, str, str]] = []
        state.subscribe(lambda kind, event, old, new: self.events.append((kind, event, (new or old).name)))

    def of(self, name: str) -> list[tuple[str, str]]:
        return [(kind, event) for kind, event, n in self.events if n == name]


def test_every_kind_added_modified_deleted_reaches_the_state(server: FakeApiServer) -> None:
    for i in range(5):  # more than one page of pods at page_size=2
        server.create(pod(f"pre-{i}", ip=f"10.1.1.{i}"))
    server.create(namespace("demo"))
    peer = PeerAuthenticationPolicy()
    engine = PolicyEngine(peer_authentication=peer)
    state = ClusterState(policy_engine=engine, peer_authentication=peer)
    recorder = Recorder(state)

    async def scenario() -> None:
        async with running(server, state, page_size=2):
            assert len(state.pods()) == 5
            pages = [r.query.get("continue") for r in server.list_requests("Pod")]
            assert len(pages) == 3 and pages[0] is None and all(pages[1:])

            steps: list[tuple[dict[str, Any], dict[str, Any], Callable[[], bool], Callable[[], bool]]] = [
                (namespace("team"), namespace("team", **AMBIENT),
                 lambda: state.namespace("team") is not None and state.namespace("team").labels.get(
                     "istio.io/dataplane-mode") == "ambient",
                 lambda: state.namespace("team") is None),
                (pod("web-1"), pod("web-1", ip="10.1.0.9", app="web"),
                 lambda: state.pod_by_ip("10.1.0.9") is not None and state.pod_by_ip("10.1.0.1") is None,
                 lambda: state.pod("demo", "web-1") is None),
                (service("web"), service("web", target=9090),
                 lambda: state.service_for("10.96.0.10", 80) is not None
                 and state.service_for("10.96.0.10", 80)[1].target_port == 9090,
                 lambda: state.service_for("10.96.0.10", 80) is None),
                (endpoint_slice("web-x", "web", "10.1.0.1"), endpoint_slice("web-x", "web", "10.1.0.1", "10.1.0.2"),
                 lambda: len(state.endpoint_slices()) == 1 and len(state.endpoint_slices()[0].endpoints) == 2,
                 lambda: state.endpoint_slices() == []),
                (authz("policy"), authz("policy", action="DENY"),
                 lambda: engine.applicable("demo", {}).deny == ("demo/policy",),
                 lambda: engine.applicable("demo", {}) == engine.applicable("other", {})),
                (peer_auth("mtls", "PERMISSIVE"), peer_auth("mtls", "STRICT"),
                 lambda: peer.mode_for("demo", {}, 80).mode is MtlsMode.STRICT,
                 lambda: peer.mode_for("demo", {}, 80).policy is None),
            ]
            for created, modified, is_modified, is_deleted in steps:
                name, kind = created["metadata"]["name"], created["kind"]
                server.create(created)
                await eventually(lambda: (kind, "ADDED") in recorder.of(name))
                server.update(modified)
                await eventually(is_modified)
                server.delete(created)
                await eventually(is_deleted)
                assert recorder.of(name) == [(kind, "ADDED"), (kind, "MODIFIED"), (kind, "DELETED")], name

    asyncio.run(scenario())


@pytest.mark.parametrize("gone_as_http_status", [False, True], ids=["error-event", "http-410"])
def test_410_while_disconnected_relists_without_losing_events(gone_as_http_status: bool) -> None:
    with FakeApiServer(token=TOKEN, gone_as_http_status=gone_as_http_status) as server:
        server.create(namespace("demo"))
        server.create(pod("kept", ip="10.1.0.1"))
        server.create(pod("changed", ip="10.1.0.2"))
        server.create(pod("removed", ip="10.1.0.3"))
        state = ClusterState()
        recorder = Recorder(state)

        async def scenario() -> None:
            async with running(server, state) as source:
                lists_before = len(server.list_requests("Pod"))
                recorder.events.clear()
                with server.hold():
                    server.create(pod("new", ip="10.1.0.4"))
                    server.update(pod("changed", ip="10.1.0.2", app="v2"))
                    server.delete(pod("removed"))
                    server.compact()  # the events above are gone from the server's history
                    server.drop_watches()
                await eventually(lambda: state.pod("demo", "new") is not None and state.pod("demo", "removed") is None
                                 and state.pod("demo", "changed").labels.get("app") == "v2")
                assert source.stats()["Pod"].gone >= 1
                assert len(server.list_requests("Pod")) > lists_before
                assert sorted(recorder.events) == [("Pod", "ADDED", "new"), ("Pod", "DELETED", "removed"),
                                                   ("Pod", "MODIFIED", "changed")]
                assert state.pod("demo", "kept") is not None
                # And it watches on from the relist: later events still arrive.
                server.create(pod("after", ip="10.1.0.5"))
                await eventually(lambda: state.pod("demo", "after") is not None)

        asyncio.run(scenario())


def test_410_error_event_in_the_middle_of_a_watch_relists(server: FakeApiServer) -> None:
    server.create(namespace("demo"))
    state = ClusterState()
    recorder = Recorder(state)

    async def scenario() -> None:
        async with running(server, state) as source:
            with server.hold():  # the stream stays open but falls behind ...
                for i in range(3):
                    server.create(pod(f"p{i}", ip=f"10.1.0.{i + 1}"))
                server.delete(pod("p1"))
                server.compact()  # ... and its missing history is compacted: ERROR 410 on the open stream
            await eventually(lambda: source.stats()["Pod"].gone >= 1)
            await eventually(lambda: {p.name for p in state.pods()} == {"p0", "p2"})
            assert sorted(recorder.of("p0") + recorder.of("p2")) == [("Pod", "ADDED"), ("Pod", "ADDED")]
            assert recorder.of("p1") == []  # created and deleted while we were behind: never seen
            assert source.stats()["Namespace"].gone == 0  # caught-up watchers are not affected

    asyncio.run(scenario())


def test_dropped_watch_resumes_from_the_last_resource_version(server: FakeApiServer) -> None:
    server.create(namespace("demo"))
    state = ClusterState()
    recorder = Recorder(state)

    async def scenario() -> None:
        async with running(server, state) as source:
            server.create(pod("x", ip="10.1.0.1"))
            await eventually(lambda: state.pod("demo", "x") is not None)
            last_seen = server.resource_version
            assert source.resource_version("Pod") == str(last_seen)
            lists_before = len(server.list_requests("Pod"))
            watches_before = len(server.watch_requests("Pod"))
            with server.hold():
                assert server.drop_watches() == len(ALL_KINDS)
                server.create(pod("y", ip="10.1.0.2"))
                server.update(pod("x", ip="10.1.0.1", app="v2"))
            await eventually(lambda: state.pod("demo", "y") is not None
                             and state.pod("demo", "x").labels.get("app") == "v2")
            rewatch = server.watch_requests("Pod")[watches_before]
            assert rewatch.query["resourceVersion"] == str(last_seen)
            assert len(server.list_requests("Pod")) == lists_before  # no relist needed
            assert source.stats()["Pod"].events == 3  # x, then y and x again: nothing twice
            assert recorder.of("x") == [("Pod", "ADDED"), ("Pod", "MODIFIED")]
            assert recorder.of("y") == [("Pod", "ADDED")]
            assert source.stats()["Pod"].failures == 1

    asyncio.run(scenario())


def test_bookmarks_advance_the_resource_version(server: FakeApiServer) -> None:
    state = ClusterState()

    async def scenario() -> None:
        async with running(server, state) as source:
            for i in range(3):  # other kinds move the global resourceVersion on
                server.create(namespace(f"ns-{i}"))
            await eventually(lambda: len(state.namespaces()) == 3)
            pod_version = source.resource_version("Pod")
            assert int(pod_version) < server.resource_version
            server.send_bookmarks()
            await eventually(lambda: source.resource_version("Pod") == str(server.resource_version))
            assert source.stats()["Pod"].bookmarks == 1
            watches_before = len(server.watch_requests("Pod"))
            server.drop_watches()
            await eventually(lambda: len(server.watch_requests("Pod")) > watches_before)
            assert server.watch_requests("Pod")[-1].query["resourceVersion"] == str(server.resource_version)
            assert all(r.query.get("allowWatchBookmarks") == "true" for r in server.watch_requests("Pod"))

    asyncio.run(scenario())


def test_node_scope_uses_a_field_selector(server: FakeApiServer) -> None:
    server.create(pod("local", node="node-1", ip="10.1.0.1"))
    server.create(pod("remote", node="node-2", ip="10.2.0.1"))
    state = ClusterState()

    async def scenario() -> None:
        async with running(server, state, pod_scope="node", kinds=("Pod",)):
            assert [p.name for p in state.pods()] == ["local"]
            assert {r.query.get("fieldSelector") for r in server.list_requests("Pod") + server.watch_requests("Pod")} \
                == {"spec.nodeName=node-1"}
            server.create(pod("pending", node=None, ip="10.1.0.2"))
            server.create(pod("elsewhere", node="node-2", ip="10.2.0.2"))
            server.update(pod("pending", node="node-1", ip="10.1.0.2"))  # scheduled here: appears as ADDED
            await eventually(lambda: state.pod("demo", "pending") is not None)
            assert state.pod("demo", "elsewhere") is None
            server.delete(pod("local"))
            await eventually(lambda: state.pod("demo", "local") is None)
            assert [p.name for p in state.local_pods("node-1")] == ["pending"]

    asyncio.run(scenario())


def test_selector_fetches_a_pod_the_watch_has_not_delivered(server: FakeApiServer) -> None:
    server.create(namespace("demo", **AMBIENT))
    state = ClusterState()

    async def scenario() -> None:
        async with running(server, state) as source:
            selector = AmbientSelector(state, fetch=source.fetch_pod)
            with server.hold():  # the CNI ADD overtakes the watch
                server.create(pod("fresh", ip="10.1.0.7"))
                created = server.create(pod("opted-out", ip="10.1.0.8", **{"istio.io/dataplane-mode": "none"}))
                assert state.pod("demo", "fresh") is None
                assert selector.decide(PodRef("demo", "fresh")) == (
                    True, "namespace demo is labelled istio.io/dataplane-mode=ambient")
                await selector.ensure_known(PodRef("demo", "opted-out", created["metadata"]["uid"]))
                assert state.pod("demo", "opted-out") is not None
                assert selector.decide(PodRef("demo", "opted-out"))[0] is False
                in_mesh, reason = selector.decide(PodRef("demo", "ghost"))
                assert in_mesh and "not found on the API server" in reason
            gets = [r.path for r in server.requests if r.path.startswith("/api/v1/namespaces/demo/pods/")]
            assert gets == ["/api/v1/namespaces/demo/pods/fresh", "/api/v1/namespaces/demo/pods/opted-out",
                            "/api/v1/namespaces/demo/pods/ghost"]
            await eventually(lambda: source.stats()["Pod"].events == 2)  # the watch then agrees
            assert state.ambient_decision(state.pod("demo", "fresh"))[0] is True

    asyncio.run(scenario())


def test_label_flip_on_a_running_pod_is_reported_live(server: FakeApiServer) -> None:
    server.create(namespace("demo", **AMBIENT))
    server.create(pod("web-1"))
    state = ClusterState()
    flips: list[tuple[str, bool]] = []
    state.subscribe_ambient(lambda p, in_mesh, reason: flips.append((p.name, in_mesh)), node_name="node-1")

    async def scenario() -> None:
        async with running(server, state):
            await eventually(lambda: flips == [("web-1", True)])
            server.update(pod("web-1", **{"istio.io/dataplane-mode": "none"}))
            await eventually(lambda: flips[-1] == ("web-1", False))
            server.update(namespace("demo"))
            # Kinds are separate watches with no order between them (as in Kubernetes): wait for it.
            await eventually(lambda: not state.namespace("demo").labels)
            server.update(pod("web-1"))  # back to the namespace's say, which is now "no": no flip
            server.update(pod("web-1", **AMBIENT))
            await eventually(lambda: flips[-1] == ("web-1", True))
            assert flips == [("web-1", True), ("web-1", False), ("web-1", True)]

    asyncio.run(scenario())


def test_wrong_token_is_retried_with_backoff_and_never_syncs(server: FakeApiServer) -> None:
    state = ClusterState()

    async def scenario() -> None:
        api = api_client_from(host=server.url, token="wrong")
        source = KubeSource(api, state, "node-1", kinds=("Namespace",), backoff=FAST)
        await source.start()
        try:
            await eventually(lambda: source.stats()["Namespace"].failures >= 2)
            assert not source.synced.is_set()
            assert source.pending() == {"Namespace": "HTTP 401 Unauthorized"}
        finally:
            await source.stop()
            api.close()

    asyncio.run(scenario())


def test_kubeconfig_file_configures_the_client(server: FakeApiServer, tmp_path: Any) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(f"""\
apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: "{server.url}"}}}}]
users: [{{name: agent, user: {{token: {TOKEN}}}}}]
contexts: [{{name: fake, context: {{cluster: fake, user: agent}}}}]
current-context: fake
""")
    server.create(namespace("demo", **AMBIENT))
    state = ClusterState()

    async def scenario() -> None:
        api = api_client_from(kubeconfig=str(kubeconfig))
        source = KubeSource(api, state, "node-1", kinds=("Namespace",), backoff=FAST)
        await source.start()
        try:
            await asyncio.wait_for(source.synced.wait(), 5)
            assert state.namespace("demo") is not None
        finally:
            await source.stop()
            api.close()

    asyncio.run(scenario())


# --- RBAC: the agent under exactly the ClusterRole the DaemonSet gets ------------------------------------------

def _cluster_role_grants() -> set[tuple[str, str]]:
    """(group, resource) pairs install/kubernetes/ambit.yaml lets the agent list and watch."""
    manifest = Path(__file__).resolve().parents[2] / "install" / "kubernetes" / "ambit.yaml"
    (role,) = [d for d in yaml.safe_load_all(manifest.read_text())
               if d and d["kind"] == "ClusterRole" and d["metadata"]["name"] == "ambit-node"]
    return {(group, resource) for rule in role["rules"] if {"list", "watch"} <= set(rule["verbs"])
            for group in rule["apiGroups"] for resource in rule["resources"]}


def test_the_agent_syncs_under_the_manifests_cluster_role() -> None:
    state = ClusterState()

    async def scenario(server: FakeApiServer) -> None:
        server.create(namespace("demo", **AMBIENT))
        async with running(server, state):
            assert state.namespace("demo") is not None

    with FakeApiServer(token=TOKEN, allowed=_cluster_role_grants()) as server:
        asyncio.run(scenario(server))


def test_a_kind_the_role_does_not_grant_says_so_and_syncs_once_granted() -> None:
    """What a ClusterRole without gateways did on a real cluster: never synced."""
    grants = _cluster_role_grants() - {("gateway.networking.k8s.io", "gateways")}
    state = ClusterState()

    async def scenario(server: FakeApiServer) -> None:
        api = api_client_from(host=server.url, token=TOKEN)
        source = KubeSource(api, state, "node-1", backoff=FAST)
        with structlog.testing.capture_logs() as logs:
            await source.start()
            try:
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(source.synced.wait()), 1.0)
                forbidden = [e for e in logs if e["event"].startswith("forbidden to list/watch this kind")]
                assert forbidden and "grant it in the agent's ClusterRole" in forbidden[0]["event"]
                assert forbidden[0]["log_level"] == "error"
                assert source.pending() == {"Gateway": "HTTP 403 Forbidden"}  # what AgentStatus reports
                server.allowed = grants | {("gateway.networking.k8s.io", "gateways")}  # RBAC fixed live
                await asyncio.wait_for(source.synced.wait(), 5)
                assert source.pending() == {}
            finally:
                await source.stop()
                api.close()

    with FakeApiServer(token=TOKEN, allowed=grants) as server:
        asyncio.run(scenario(server))
