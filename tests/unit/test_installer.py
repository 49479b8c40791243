"""install-cni on real (temporary) directories: the atomic plugin copy, the
one-directory bundle behind a symbolic link, install/uninstall round trips
of the sample configurations, the watcher re-applying after the primary
rewrites its file, and the `ambit install-cni` command itself."""
from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from ambit.agent.install_cni import installer as inst
from ambit.agent.install_cni.cniconf import BACKUP_SUFFIX, TEMP_MARKER, CniConfError, PluginSettings
from ambit.agent.install_cni.installer import Installer, PluginSource

DATA = Path(__file__).resolve().parents[1] / "data" / "cni"
AMBIT_CLI = Path(sys.executable).parent / "ambit"
SETTINGS = PluginSettings(agent_socket="/var/run/ambit/agent.sock")


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), stat.S_IMODE(p.stat().st_mode)) for p in directory.iterdir() if p.is_file()}


def leftovers(*dirs: Path) -> list[str]:
    return [p.name for d in dirs for p in d.iterdir() if TEMP_MARKER in p.name]


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


@pytest.fixture
def node(tmp_path):
    """A host's CNI directories and an ambit-cni to install."""
    bin_dir, conf_dir, src = tmp_path / "opt-cni-bin", tmp_path / "etc-cni-net.d", tmp_path / "src"
    for d in (bin_dir, conf_dir, src):
        d.mkdir()
    (bin_dir / "bridge").write_bytes(b"\x7fELF reference plugin")
    plugin = src / "ambit-cni"
    plugin.write_bytes(b"#!/bin/sh\necho v1\n")
    plugin.chmod(0o755)
    return bin_dir, conf_dir, plugin


def make_bundle(root: Path, version: str) -> Path:
    """A stand-in for PyInstaller's one-directory build: the executable finds
    its _internal/ through its real path, as the bootloader does."""
    bundle = root / f"bundle-{version}" / "ambit-cni"
    (bundle / "_internal").mkdir(parents=True)
    (bundle / "_internal" / "version").write_text(version)
    exe = bundle / "ambit-cni"
    exe.write_text('#!/bin/sh\ncat "$(dirname "$(readlink -f "$0")")/_internal/version"\n')
    exe.chmod(0o755)
    return bundle


def chained_types(path: Path) -> list[str]:
    return [p["type"] for p in json.loads(path.read_bytes())["plugins"]]


# --- the plugin binary ------------------------------------------------------------------------------------------

def test_atomic_copy_sets_mode_and_content_whatever_the_umask(node):
    bin_dir, _, plugin = node
    old_umask = os.umask(0o077)
    try:
        assert inst.atomic_copy(plugin, bin_dir / "ambit-cni") is True
    finally:
        os.umask(old_umask)
    dest = bin_dir / "ambit-cni"
    assert dest.read_bytes() == plugin.read_bytes()
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755
    assert subprocess.run([dest], capture_output=True).stdout == b"v1\n"
    assert inst.atomic_copy(plugin, dest) is False  # same bytes and mode: untouched
    assert leftovers(bin_dir) == []


def test_atomic_copy_replaces_a_plugin_that_is_open_or_running(node):
    bin_dir, _, plugin = node
    dest = bin_dir / "ambit-cni"
    inst.atomic_copy(plugin, dest)
    old_inode = dest.stat().st_ino
    running = subprocess.Popen(["/bin/sh", "-c", f"exec 3<{dest}; sleep 5"])  # holds the old file open
    try:
        with open(dest, "rb") as reader:
            plugin.write_bytes(b"#!/bin/sh\necho v2\n")
            assert inst.atomic_copy(plugin, dest) is True
            assert reader.read() == b"#!/bin/sh\necho v1\n"  # the old file, intact, for whoever has it open
    finally:
        running.kill()
        running.wait()
    assert dest.stat().st_ino != old_inode  # replaced by rename, not rewritten in place
    assert subprocess.run([dest], capture_output=True).stdout == b"v2\n"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755
    assert leftovers(bin_dir) == []


def test_atomic_copy_fixes_a_wrong_mode(node):
    bin_dir, _, plugin = node
    dest = bin_dir / "ambit-cni"
    shutil.copyfile(plugin, dest)
    dest.chmod(0o644)
    assert inst.atomic_copy(plugin, dest) is True
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755


def test_bundle_is_installed_behind_a_symlink_and_upgraded_atomically(node, tmp_path):
    bin_dir, _, _ = node
    v1, v2, v3 = (make_bundle(tmp_path, v) for v in ("v1", "v2", "v3"))
    dest = bin_dir / "ambit-cni"

    assert inst.install_plugin(PluginSource.locate(v1), bin_dir) is True
    assert dest.is_symlink() and subprocess.run([dest], capture_output=True).stdout == b"v1"
    assert inst.install_plugin(PluginSource.locate(v1 / "ambit-cni"), bin_dir) is False  # exe path: same bundle

    inst.install_plugin(PluginSource.locate(v2), bin_dir)
    assert subprocess.run([dest], capture_output=True).stdout == b"v2"
    bundles = sorted(p.name for p in bin_dir.iterdir() if p.name.startswith(inst.BUNDLE_PREFIX))
    assert len(bundles) == 2  # v1 kept: a plugin started just before the switch may still load from it

    inst.install_plugin(PluginSource.locate(v3), bin_dir)
    assert subprocess.run([dest], capture_output=True).stdout == b"v3"
    bundles = sorted(p.name for p in bin_dir.iterdir() if p.name.startswith(inst.BUNDLE_PREFIX))
    assert len(bundles) == 2 and os.readlink(dest).split("/")[0] in bundles

    removed = inst.uninstall_plugin(bin_dir)
    assert "ambit-cni" in removed
    assert sorted(p.name for p in bin_dir.iterdir()) == ["bridge"]  # only ambit's things went


def test_locate_explains_a_missing_or_wrong_plugin(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PluginSource.locate(tmp_path / "nope")
    (tmp_path / "dir").mkdir()
    with pytest.raises(FileNotFoundError, match="not a one-directory build"):
        PluginSource.locate(tmp_path / "dir")
    (tmp_path / "plain").write_text("x")
    with pytest.raises(PermissionError, match="not executable"):
        PluginSource.locate(tmp_path / "plain")


# --- install / uninstall ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("sample", ["bridge", "ptp", "calico", "cilium", "lone-conf"])
def test_install_uninstall_round_trip(node, sample):
    bin_dir, conf_dir, plugin = node
    shutil.copytree(DATA / sample, conf_dir, dirs_exist_ok=True)
    primary = sorted(p.name for p in conf_dir.iterdir() if p.suffix in (".conf", ".conflist"))[0]
    (conf_dir / primary).chmod(0o600)  # a primary that keeps its file private
    before_conf, before_bin = snapshot(conf_dir), snapshot(bin_dir)
    installer = Installer(bin_dir, conf_dir, PluginSource.locate(plugin), SETTINGS)

    result = installer.install()

    assert result.plugin_changed and result.plan.changes
    chained = conf_dir / result.plan.primary
    assert chained_types(chained)[-1] == "ambit-cni"
    assert stat.S_IMODE(chained.stat().st_mode) == 0o600
    assert (bin_dir / "ambit-cni").read_bytes() == plugin.read_bytes()
    again = installer.install()
    assert not again.changes  # idempotent

    installer.uninstall()

    assert snapshot(conf_dir) == before_conf  # every file, byte for byte, with its mode
    assert snapshot(bin_dir) == before_bin
    assert leftovers(bin_dir, conf_dir) == []


def test_install_refuses_an_unparsable_primary_and_changes_nothing(node):
    bin_dir, conf_dir, plugin = node
    shutil.copytree(DATA / "unparsable", conf_dir, dirs_exist_ok=True)
    before = snapshot(conf_dir)
    with pytest.raises(CniConfError, match="not valid JSON"):
        Installer(bin_dir, conf_dir, PluginSource.locate(plugin), SETTINGS).install()
    assert snapshot(conf_dir) == before


def test_a_symlinked_primary_is_refused(node, tmp_path):
    bin_dir, conf_dir, plugin = node
    real = tmp_path / "elsewhere.conflist"
    shutil.copyfile(DATA / "ptp" / "10-ptp.conflist", real)
    (conf_dir / "10-ptp.conflist").symlink_to(real)
    with pytest.raises(CniConfError, match="symbolic link"):
        Installer(bin_dir, conf_dir, PluginSource.locate(plugin), SETTINGS).install()
    assert real.read_bytes() == (DATA / "ptp" / "10-ptp.conflist").read_bytes()


def test_missing_host_directory_is_explained(node, tmp_path):
    bin_dir, _, plugin = node
    with pytest.raises(FileNotFoundError, match="is the host directory mounted"):
        Installer(bin_dir, tmp_path / "absent", PluginSource.locate(plugin), SETTINGS).install()


# --- watch ------------------------------------------------------------------------------------------------------

class Watcher:
    """installer.watch() on a thread, counting its looks at the directories."""

    def __init__(self, installer: Installer, interval: float = 0.05) -> None:
        self.stop = threading.Event()
        self.passes: list[int] = []
        self.looks = 0
        fingerprint = installer.fingerprint

        def counted() -> tuple:
            try:
                return fingerprint()
            finally:
                self.looks += 1

        installer.fingerprint = counted  # type: ignore[method-assign]
        self.thread = threading.Thread(target=lambda: self.passes.append(installer.watch(self.stop, interval)))

    def looked_again(self) -> None:
        """Until the watcher has taken a look that began after this call and
        acted on it: the one under way may predate a change, the next may not,
        and its pass is over when the one after begins."""
        target = self.looks + 3
        wait_for(lambda: self.looks >= target)

    def __enter__(self) -> "Watcher":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive(), "watch() did not stop"


def primary_rewrites(conf_dir: Path, name: str, data: bytes) -> None:
    """What a primary CNI's installer does: its own temp file, then rename."""
    tmp = conf_dir / f".{name}.calico-tmp"
    tmp.write_bytes(data)
    os.replace(tmp, conf_dir / name)


def test_watch_reapplies_after_the_primary_rewrites_its_file(node):
    bin_dir, conf_dir, plugin = node
    shutil.copytree(DATA / "calico", conf_dir, dirs_exist_ok=True)
    installer = Installer(bin_dir, conf_dir, PluginSource.locate(plugin), SETTINGS)
    conflist = conf_dir / "10-calico.conflist"
    rewritten = (DATA / "calico" / "10-calico.conflist").read_bytes().replace(b'"mtu": 0', b'"mtu": 1440')

    with Watcher(installer) as watcher:
        wait_for(lambda: chained_types(conflist)[-1] == "ambit-cni")
        primary_rewrites(conf_dir, "10-calico.conflist", rewritten)
        wait_for(lambda: chained_types(conflist)[-1] == "ambit-cni")
        assert json.loads(conflist.read_bytes())["plugins"][0]["mtu"] == 1440
        (bin_dir / "ambit-cni").unlink()  # someone removed the plugin
        wait_for(lambda: (bin_dir / "ambit-cni").exists())

        # settled: the watcher does not keep rewriting its own output
        settled = (conflist.stat().st_ino, conflist.stat().st_mtime_ns, (bin_dir / "ambit-cni").stat().st_ino)
        watcher.looked_again()
        watcher.looked_again()  # its own writes cost one pass, a no-op, and nothing more
        assert settled == (conflist.stat().st_ino, conflist.stat().st_mtime_ns,
                           (bin_dir / "ambit-cni").stat().st_ino)
    assert watcher.passes == [3]  # first install, after the rewrite, after the removal
    assert (conf_dir / ("10-calico.conflist" + BACKUP_SUFFIX)).read_bytes() == rewritten
    assert leftovers(bin_dir, conf_dir) == []

    installer.uninstall()
    assert conflist.read_bytes() == rewritten


def test_watch_waits_for_the_primary_and_survives_a_half_written_file(node):
    bin_dir, conf_dir, plugin = node
    installer = Installer(bin_dir, conf_dir, PluginSource.locate(plugin), SETTINGS)
    with Watcher(installer) as watcher:
        watcher.looked_again()
        assert not list(conf_dir.iterdir())
        (conf_dir / "10-ptp.conflist").write_bytes(b'{"cniVersion": "0.4.0", "plugins": [')  # being written
        watcher.looked_again()
        assert watcher.thread.is_alive()
        (conf_dir / "10-ptp.conflist").write_bytes((DATA / "ptp" / "10-ptp.conflist").read_bytes())
        wait_for(lambda: chained_types(conf_dir / "10-ptp.conflist")[-1] == "ambit-cni")
    assert watcher.passes == [2]  # the plugin alone while waiting, then the configuration


# --- the command ------------------------------------------------------------------------------------------------

def run_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(AMBIT_CLI), "install-cni", *args], capture_output=True, text=True, timeout=60,
                          **kwargs)


def test_cli_install_and_uninstall(node):
    bin_dir, conf_dir, plugin = node
    shutil.copytree(DATA / "lone-conf", conf_dir, dirs_exist_ok=True)
    before = snapshot(conf_dir)
    dirs = ["--cni-bin-dir", str(bin_dir), "--cni-conf-dir", str(conf_dir)]

    done = run_cli(*dirs, "--plugin", str(plugin), "--agent-socket", "/run/ambit/a.sock", "--timeout", "750ms",
                   "--cni-log-level", "debug")

    assert done.returncode == 0, done.stderr
    assert "turned 10-bridge.conf into 10-bridge.conflist" in done.stdout
    entry = json.loads((conf_dir / "10-bridge.conflist").read_bytes())["plugins"][-1]
    assert entry == {"type": "ambit-cni", "agentSocket": "/run/ambit/a.sock", "timeout": 0.75, "logLevel": "debug"}

    undone = run_cli(*dirs, "--uninstall")
    assert undone.returncode == 0, undone.stderr
    assert snapshot(conf_dir) == before
    assert not (bin_dir / "ambit-cni").exists()


def test_cli_reports_an_unparsable_config(node):
    bin_dir, conf_dir, plugin = node
    shutil.copytree(DATA / "unparsable", conf_dir, dirs_exist_ok=True)
    failed = run_cli("--cni-bin-dir", str(bin_dir), "--cni-conf-dir", str(conf_dir), "--plugin", str(plugin))
    assert failed.returncode == 1
    assert "10-broken.conflist is not valid JSON" in failed.stderr


def test_cli_settings_come_from_the_environment(node):
    bin_dir, conf_dir, plugin = node
    shutil.copytree(DATA / "ptp", conf_dir, dirs_exist_ok=True)
    env = {**os.environ, "AMBIT_CNI_BIN_DIR": str(bin_dir), "AMBIT_CNI_CONF_DIR": str(conf_dir),
           "AMBIT_CNI_PLUGIN": str(plugin), "AMBIT_AGENT_SOCKET": "/x/agent.sock", "AMBIT_CNI_TIMEOUT": "3"}
    done = run_cli(env=env)
    assert done.returncode == 0, done.stderr
    entry = json.loads((conf_dir / "10-ptp.conflist").read_bytes())["plugins"][-1]
    assert (entry["agentSocket"], entry["timeout"]) == ("/x/agent.sock", 3)


def test_cli_watch_stops_on_sigterm_and_leaves_ambit_chained(node):
    bin_dir, conf_dir, plugin = node
    shutil.copytree(DATA / "bridge", conf_dir, dirs_exist_ok=True)
    proc = subprocess.Popen([str(AMBIT_CLI), "install-cni", "--watch", "--cni-bin-dir", str(bin_dir),
                             "--cni-conf-dir", str(conf_dir), "--plugin", str(plugin)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: chained_types(conf_dir / "10-bridge.conflist")[-1] == "ambit-cni", timeout=20)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert chained_types(conf_dir / "10-bridge.conflist") == ["bridge", "portmap", "ambit-cni"]
    assert '"event": "installed"' in proc.stderr.read()
