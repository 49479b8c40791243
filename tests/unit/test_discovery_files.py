"""FileSource: local YAML/JSON files feed ClusterState, polled for changes."""
from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import structlog
from structlog.testing import CapturingLogger

from ambit.agent.discovery.file_source import BadFile, FileSource, content_revision, parse_documents
from ambit.agent.discovery.report import discovery_report
from ambit.agent.discovery.state import ClusterState
from ambit.agent.policy.authz import PolicyEngine

POLL = 0.02

CLUSTER = """\
apiVersion: v1
kind: Namespace
metadata:
  name: demo
  labels:
    istio.io/dataplane-mode: ambient
---
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  namespace: demo
  labels: {app: web}
  creationTimestamp: 2026-01-01T00:00:00Z
spec:
  nodeName: node-1
  serviceAccountName: web
  containers:
  - name: main
    image: web:1
    ports: [{name: http, containerPort: 8080}]
status:
  podIPs: [{ip: 10.1.0.1}]
---
apiVersion: v1
kind: Pod
metadata:
  name: web-2
  labels: {app: web}
spec:
  nodeName: node-2
  containers: [{name: main, image: web:1, ports: [{name: http, containerPort: 8080}]}]
status:
  podIPs: [{ip: 10.1.0.2}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: ignored, namespace: demo}
"""

POLICIES = {
    "kind": "List",
    "apiVersion": "v1",
    "items": [
        {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
         "metadata": {"name": "allow-demo", "namespace": "demo"},
         "spec": {"action": "ALLOW", "rules": [{"from": [{"source": {"namespaces": ["demo"]}}]}]}},
    ],
}


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(POLL / 2)


def write(path: Path, text: str) -> None:
    """Replace a file's content the way an editor's save does: write aside, rename over."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def test_parse_documents_flattens_lists_and_defaults_namespace() -> None:
    objs = parse_documents(CLUSTER, Path("x.yaml"))
    assert [o["kind"] for o in objs] == ["Namespace", "Pod", "Pod", "Service", "Deployment"]
    assert objs[2]["metadata"]["namespace"] == "default"
    assert objs[1]["metadata"]["creationTimestamp"] == "2026-01-01T00:00:00Z"  # stays a string
    listed = parse_documents(json.dumps(POLICIES) + "\n" + json.dumps(POLICIES["items"][0]), Path("p.json"))
    assert [o["metadata"]["name"] for o in listed] == ["allow-demo", "allow-demo"]
    with pytest.raises(BadFile, match="document 2: kind is missing"):
        parse_documents("kind: Namespace\nmetadata: {name: a}\n---\nmetadata: {name: b}\n", Path("x.yaml"))
    with pytest.raises(BadFile, match=r"document 1 \(Pod\): metadata.name is missing"):
        parse_documents("kind: Pod\nmetadata: {}\n", Path("x.yaml"))
    with pytest.raises(BadFile, match="invalid JSON"):
        parse_documents("{", Path("x.json"))


def test_load_modify_delete_bad_file_and_fix(tmp_path: Path) -> None:
    cluster = tmp_path / "cluster.yaml"
    policies_dir = tmp_path / "policies"
    policies_dir.mkdir()
    cluster.write_text(CLUSTER)
    (policies_dir / "authz.json").write_text(json.dumps(POLICIES))
    engine = PolicyEngine()
    capture = CapturingLogger()
    state = ClusterState(policy_engine=engine)
    events: list[tuple[str, str, str]] = []
    state.subscribe(lambda kind, event, old, new: events.append((kind, event, (new or old).name)))

    async def scenario() -> None:
        source = FileSource([cluster, policies_dir], state, poll_interval=POLL,
                            logger=structlog.wrap_logger(capture, processors=[]))
        await source.start()
        try:
            # Initial load: every kind, List items, namespace defaulted, foreign kinds ignored.
            assert source.loaded.is_set() and source.errors() == {}
            assert state.namespace("demo") is not None
            assert state.pod("demo", "web-1").service_account == "web"
            assert state.pod("default", "web-2") is not None
            assert engine.applicable("demo", {}).allow == ("demo/allow-demo",)
            svc, port = state.service_for("10.96.0.10", 80)
            assert [(e.ip, e.target_port) for e in state.endpoints(svc, port)] == [("10.1.0.1", 8080)]

            # Modify: a label change on a pod arrives as MODIFIED.
            events.clear()
            write(cluster, CLUSTER.replace("labels: {app: web}\n  creationTimestamp",
                                           "labels: {app: web, istio.io/dataplane-mode: none}\n  creationTimestamp"))
            await eventually(lambda: ("Pod", "MODIFIED", "web-1") in events)
            assert state.ambient_decision(state.pod("demo", "web-1"))[0] is False
            assert len(events) == 1

            # Delete an object from the file: DELETED.
            events.clear()
            without_web2 = CLUSTER.split("---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: web-2")[0] + \
                "---\n" + CLUSTER.split("---\n")[3]
            write(cluster, without_web2)
            await eventually(lambda: ("Pod", "DELETED", "web-2") in events)
            assert state.pod("default", "web-2") is None and state.pod("demo", "web-1") is not None

            # Bad YAML: reported, last good state kept, nothing deleted.
            events.clear()
            write(cluster, without_web2 + "---\nkind: Pod\nmetadata: {name: [unclosed\n")
            await eventually(lambda: str(cluster) in source.errors())
            assert "invalid YAML" in source.errors()[str(cluster)]
            errors = [c.kwargs for c in capture.calls if c.method_name == "error"]
            assert errors[-1]["file"] == str(cluster) and "invalid YAML" in errors[-1]["error"]
            for _ in range(3):  # more looks at the same bad bytes: one report, no change
                assert await source.reload() is False
            assert len([c for c in capture.calls if c.method_name == "error"]) == 1
            assert events == [] and state.pod("demo", "web-1") is not None and state.namespace("demo") is not None

            # Fixed again: accepted, and the change it carries applies.
            write(cluster, without_web2.replace("10.1.0.1", "10.1.0.7"))
            await eventually(lambda: source.errors() == {})
            await eventually(lambda: state.pod_by_ip("10.1.0.7") is not None)
            assert state.pod_by_ip("10.1.0.1") is None

            # Removing a file from a watched directory removes its objects.
            (policies_dir / "authz.json").unlink()
            await eventually(lambda: state.authorization_policies() == [])
            assert engine.applicable("demo", {}).allow == ()
        finally:
            await source.stop()

    asyncio.run(scenario())


def test_rewrite_keeping_size_and_mtime_is_seen(tmp_path: Path) -> None:
    """Tools that restore the mtime after writing the same number of bytes."""
    path = tmp_path / "ns.yaml"
    path.write_text("kind: Namespace\nmetadata: {name: aaaa}\n")
    state = ClusterState()

    async def scenario() -> None:
        source = FileSource([path], state, poll_interval=POLL)
        await source.start()
        try:
            stat = path.stat()
            with path.open("r+") as handle:  # same inode, same size
                handle.write("kind: Namespace\nmetadata: {name: bbbb}\n")
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same mtime
            await eventually(lambda: state.namespace("bbbb") is not None)
            assert state.namespace("aaaa") is None
        finally:
            await source.stop()

    asyncio.run(scenario())


def test_bad_file_at_start_is_reported_and_not_ready(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    bad = tmp_path / "bad.json"
    good.write_text("kind: Namespace\nmetadata: {name: demo}\n")
    bad.write_text('{"kind": "Namespace", "metadata": {"name": "x"}')
    missing = tmp_path / "missing.yaml"
    state = ClusterState()

    async def scenario() -> None:
        source = FileSource([good, bad, missing], state, poll_interval=POLL)
        await source.start()
        try:
            assert not source.loaded.is_set()
            assert set(source.errors()) == {str(bad), str(missing)}
            assert source.errors()[str(missing)] == "file not found"
            assert source.pending() == source.errors()  # what AgentStatus reports, and why
            assert state.namespace("demo") is not None  # the good file still counts
            bad.write_text('{"kind": "Namespace", "metadata": {"name": "x"}}')
            missing.write_text("kind: Namespace\nmetadata: {name: y}\n")
            await asyncio.wait_for(source.loaded.wait(), 5)
            assert state.namespace("x") is not None and state.namespace("y") is not None
            assert source.pending() == {}
        finally:
            await source.stop()

    asyncio.run(scenario())


def test_malformed_object_in_a_good_file_is_reported_by_the_state(tmp_path: Path) -> None:
    path = tmp_path / "pods.yaml"
    path.write_text("kind: Pod\nmetadata: {name: p, namespace: demo}\nstatus: {podIP: 10.1.0.1}\n")
    state = ClusterState()

    async def scenario() -> None:
        source = FileSource([path], state, poll_interval=POLL)
        await source.start()
        try:
            path.write_text("kind: Pod\nmetadata: {name: p, namespace: demo}\nstatus: {podIP: nonsense}\n")
            await eventually(lambda: "Pod demo/p" in state.errors())
            assert state.pod("demo", "p").ips == ("10.1.0.1",)
            assert source.errors() == {}
        finally:
            await source.stop()

    asyncio.run(scenario())


def test_unchanged_stat_is_trusted_only_once_the_file_is_older_than_a_tick(tmp_path: Path) -> None:
    """A write in the same timestamp tick as our read leaves the stat as it was:
    until the file is clearly older than our read, its content is compared."""
    path = tmp_path / "ns.yaml"
    path.write_text("kind: Namespace\nmetadata: {name: aaaa}\n")
    source = FileSource([path], ClusterState())
    stat = path.stat()
    signature = (stat.st_mtime_ns, stat.st_size, stat.st_ino, stat.st_ctime_ns)
    stale_digest = b"digest of what we read before"
    racy = source._scan({path: (signature, stale_digest, False)})
    assert [r.objects[0]["metadata"]["name"] for r in racy] == ["aaaa"]
    assert source._scan({path: (signature, stale_digest, True)}) == []


def test_revision_names_the_content_held_and_a_bad_file_keeps_its_last_good_one(tmp_path: Path) -> None:
    cluster, policies = tmp_path / "cluster.yaml", tmp_path / "policies.json"
    cluster.write_text(CLUSTER)
    policies.write_text(json.dumps(POLICIES))
    state = ClusterState()

    async def scenario() -> None:
        source = FileSource([cluster, policies], state, poll_interval=3600)
        assert source.revision() == ""  # nothing read yet
        await source.reload()
        good = content_revision([policies.read_bytes(), cluster.read_bytes()])  # paths and order do not count
        assert source.revision() == good == content_revision([cluster.read_bytes(), policies.read_bytes()])

        write(cluster, CLUSTER.replace("10.1.0.1", "10.1.0.9"))
        await source.reload()
        assert source.revision() == content_revision([cluster.read_bytes(), policies.read_bytes()]) != good
        newer = source.revision()

        write(cluster, "kind: Pod\nmetadata: {name: [unclosed\n")
        await source.reload()
        assert str(cluster) in source.errors() and source.revision() == newer  # still holds the last good one
        report = discovery_report("files", source, True, state)
        assert report.revision == newer and dict(report.errors)[str(cluster)].startswith("invalid YAML")

        policies.unlink()  # a listed file that disappears is an error too: its objects stay
        await source.reload()
        assert source.revision() == newer

    asyncio.run(scenario())


GATEWAY = """apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: demo}
spec: {gatewayClassName: istio-waypoint}
---
apiVersion: v1
kind: Pod
metadata: {name: waypoint-0, namespace: demo, labels: {gateway.networking.k8s.io/gateway-name: waypoint}}
spec: {nodeName: node-2}
status:
  phase: Running
  podIPs: [{ip: 10.1.0.5}]
  conditions: [{type: Ready, status: "READY"}]
"""


@pytest.mark.parametrize("ready, listed", [("True", ("demo/waypoint",)), ("False", ())])
def test_report_counts_objects_and_lists_waypoints_with_a_ready_instance(tmp_path: Path, ready: str,
                                                                        listed: tuple[str, ...]) -> None:
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(CLUSTER + "---\n" + GATEWAY.replace("READY", ready))
    state = ClusterState()

    async def scenario() -> None:
        source = FileSource([cluster], state)
        await source.reload()
        report = discovery_report("files", source, source.loaded.is_set(), state)
        assert report.synced and report.revision == content_revision([cluster.read_bytes()])
        assert report.pods_with_addresses == 3 and report.ready_waypoints == listed
        assert dict(report.objects)["Pod"] == 3 and dict(report.objects)["Gateway"] == 1
        assert report.errors == ()

    asyncio.run(scenario())
