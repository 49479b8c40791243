"""`--watch`: the waypoint is planned again when its cluster files change (waypoint/live.py)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import structlog
import structlog.testing
import yaml

from ambit.agent.identity.ca import LocalCA
from ambit.waypoint.bootstrap import BootstrapOptions
from ambit.waypoint.cli import generate
from ambit.waypoint.destinations import WaypointError
from ambit.waypoint.live import ConfigWatcher, file_view, kube_view
from ambit.waypoint.xds_files import write_resources
from tests.support.fake_apiserver import FakeApiServer
from tests.unit.test_waypoint_bootstrap import VIP, objects


def write(path: Path, content: list | str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(content if isinstance(content, str) else yaml.safe_dump_all(content))
    os.replace(tmp, path)


@pytest.fixture(autouse=True)
def logs():
    """The watcher's log lines, captured (and never written to a stream an earlier test closed)."""
    with structlog.testing.capture_logs() as captured:
        yield captured


@pytest.fixture
def watched(tmp_path: Path):
    cluster = tmp_path / "cluster.yaml"
    without_web = [o for o in objects() if o["kind"] != "Service" or o["metadata"]["name"] != "web"]
    write(cluster, without_web)
    options = BootstrapOptions(access_log="/dev/null")
    generated = generate(yaml.safe_load_all(cluster.read_text()), "shop", "waypoint", tmp_path / "out",
                         LocalCA.create("cluster.local"), options)
    view = file_view([cluster])
    try:
        yield cluster, generated, ConfigWatcher(view, generated.plan, generated.secrets, generated.xds, options)
    finally:
        view.close()


def routed(generated) -> set[str]:
    (routes,) = generated.xds.read().routes
    return {vh["name"] for vh in routes["virtual_hosts"]}


def test_nothing_is_rewritten_while_the_files_are_unchanged(watched) -> None:
    _, generated, watcher = watched
    before = generated.xds.lds.stat().st_ino
    assert not watcher.refresh()
    assert generated.xds.lds.stat().st_ino == before


def test_a_changed_file_is_planned_again_and_written(watched) -> None:
    cluster, generated, watcher = watched
    assert f"{VIP}:80" not in routed(generated)
    write(cluster, objects())  # the web Service (use-waypoint) appears
    assert watcher.refresh()
    assert {f"{VIP}:80", f"{VIP}:9000"} <= routed(generated)
    assert {d.authority for d in watcher.plan.destinations} >= {f"{VIP}:80"}


def test_a_touch_without_a_change_in_what_envoy_gets_writes_nothing(watched) -> None:
    cluster, generated, watcher = watched
    write(cluster, cluster.read_text() + "\n")  # new inode and mtime, same objects
    before = generated.xds.cds.stat().st_ino
    assert not watcher.refresh()
    assert generated.xds.cds.stat().st_ino == before


@pytest.mark.parametrize("bad", ["kind: [unclosed\n", "gone"])
def test_bad_input_keeps_the_running_configuration(watched, logs, bad: str) -> None:
    cluster, generated, watcher = watched
    before = generated.xds.read()
    if bad == "gone":  # the Gateway removed: the waypoint does not exist any more
        write(cluster, [o for o in objects() if o["kind"] != "Gateway"])
    else:
        write(cluster, bad)
    assert not watcher.refresh()
    assert generated.xds.read() == before
    (entry,) = [e for e in logs if e["event"] == "waypoint.config_unusable"]
    assert entry["log_level"] == "error" and entry["keeping"] == "the running configuration"


def test_a_different_identity_needs_a_restart(watched, logs) -> None:
    cluster, generated, watcher = watched
    changed = objects()
    for o in changed:
        if o["kind"] == "Pod" and o["metadata"]["name"] == "waypoint-0":
            o["spec"]["serviceAccountName"] = "another"  # the waypoint's pods now run as another SA
    before = generated.xds.read()
    write(cluster, changed)
    assert not watcher.refresh()
    assert generated.xds.read() == before
    (entry,) = [e for e in logs if e["event"] == "waypoint.identity_changed"]
    assert entry["wanted"] == "spiffe://cluster.local/ns/shop/sa/another"


def test_write_resources_skips_identical_content(tmp_path: Path, watched) -> None:
    _, generated, _ = watched
    assert not write_resources(generated.xds, generated.xds.read(), "again")


# --- the Kubernetes API as the view (the agent's own KubeSource, against the in-repo API server) ----------

def _kubeconfig(path: Path, url: str, token: str) -> str:
    path.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: "{url}"}}}}]
users: [{{name: waypoint, user: {{token: {token}}}}}]
contexts: [{{name: fake, context: {{cluster: fake, user: waypoint}}}}]
current-context: fake
""")
    return str(path)


def _eventually(check, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def test_the_kubernetes_view_follows_the_api_server(tmp_path: Path) -> None:
    by_kind = {}
    for o in objects():
        by_kind.setdefault(o["kind"], []).append(o)
    with FakeApiServer(token="t0ken") as server:
        for o in by_kind["Namespace"] + by_kind["Gateway"]:
            server.create(o)
        view = kube_view(_kubeconfig(tmp_path / "kubeconfig", server.url, "t0ken"), sync_timeout=10)
        try:
            plan = view.plan("shop", "waypoint", "cluster.local", None)
            assert plan.destinations == ()
            assert not view.changed()
            web = [o for o in by_kind["Pod"] if o["metadata"]["name"] in ("web-0", "web-1")]
            for o in web + [o for o in by_kind["Service"] if o["metadata"]["name"] == "web"]:
                server.create(o)
            assert _eventually(view.changed), "no change seen after the Service and its pods were created"

            def backends() -> set[str] | None:
                found = [d for d in view.plan("shop", "waypoint", "cluster.local", None).destinations
                         if d.authority == f"{VIP}:80"]
                return {b.authority for b in found[0].backends} if found else None
            # Pods and Services come on separate watches: the Service may be
            # seen before the second pod, so wait for the whole expected view.
            expected = {"10.1.1.3:8080", "10.1.2.3:8080"}
            assert _eventually(lambda: backends() == expected), f"{VIP}:80 backends {backends()}, not {expected}"
        finally:
            view.close()


def test_an_unusable_kubeconfig_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "kubeconfig").write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\n")
    with pytest.raises(WaypointError, match="cannot use the Kubernetes API"):
        kube_view(str(tmp_path / "kubeconfig"), sync_timeout=2)
