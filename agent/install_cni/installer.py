"""install-cni's I/O: put the plugin into the host's CNI bin directory, apply
`cniconf`'s plans to the configuration directory, and keep watching.

Every write goes to a temporary file in the same directory (a name the
runtime never reads: it holds ".ambit-tmp"), is fsync'd and renamed over the
target, so a runtime starting a pod at the same moment reads either the old
file or the new one, never half of one.

The plugin comes in two shapes. A single file (the staged launcher, a
one-file build) is copied over `ambit-cni`. A PyInstaller one-directory
build needs its `_internal/` beside the executable, so it is copied whole to
`.ambit-cni-<digest>/` and `ambit-cni` becomes a symbolic link into it,
switched atomically; the previous bundle is kept, because a plugin started a
moment before the switch may still be loading from it.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from .. import atomic_files
from ..atomic_files import fsync_dir, temp_path
from . import cniconf
from .cniconf import CniConfError, NoPrimaryConfig, Plan, PluginSettings, RemoveFile, WriteFile

PLUGIN_NAME = cniconf.PLUGIN_TYPE  # the runtime runs <bin dir>/<type>
BUNDLE_PREFIX = f".{PLUGIN_NAME}-"
BUNDLE_RUNTIME_DIR = "_internal"  # PyInstaller's one-directory layout
PLUGIN_MODE = 0o755
CONFIG_MODE = 0o644

_log = structlog.get_logger(__name__)


# --- atomic file primitives -------------------------------------------------------------------------------------

def _temp_path(path: Path) -> Path:
    return temp_path(path, cniconf.TEMP_MARKER)


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` with `data`: temp file in the same directory (named so
    cniconf never mistakes it for a configuration), fsync, rename."""
    atomic_files.atomic_write(path, data, mode, marker=cniconf.TEMP_MARKER)


def atomic_copy(source: Path, dest: Path, mode: int = PLUGIN_MODE) -> bool:
    """Copy `source` over `dest` atomically unless `dest` already is a regular
    file with the same bytes and mode; returns whether it copied."""
    data = source.read_bytes()
    try:
        st = dest.lstat()
        if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == mode and st.st_size == len(data) \
                and dest.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    atomic_write(dest, data, mode)
    return True


def atomic_symlink(target: str, link: Path) -> bool:
    """Point `link` at `target` (relative), switching an existing link or file
    atomically; returns whether it changed anything."""
    if link.is_symlink() and os.readlink(link) == target:
        return False
    tmp = _temp_path(link)
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(link.parent)
    return True


def tree_digest(root: Path) -> str:
    """Content digest of a directory tree: relative paths, modes, bytes, links."""
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            digest.update(f"{rel}\0{stat.S_IMODE(st.st_mode):o}\0".encode())
            if stat.S_ISLNK(st.st_mode):
                digest.update(b"link\0" + os.readlink(path).encode())
            else:
                with open(path, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        digest.update(chunk)
            digest.update(b"\0")
    return digest.hexdigest()


# --- the plugin -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PluginSource:
    """Where the plugin to install is: one executable file, or a one-directory
    build (`bundle`) whose `executable` needs the rest of the directory."""

    executable: Path
    bundle: Path | None = None

    @classmethod
    def locate(cls, path: str | os.PathLike) -> "PluginSource":
        """`path`: the executable, or the one-directory build holding it."""
        path = Path(path)
        if path.is_dir():
            exe = path / PLUGIN_NAME
            if not (exe.is_file() and (path / BUNDLE_RUNTIME_DIR).is_dir()):
                raise FileNotFoundError(f"{path} is a directory but not a one-directory build of {PLUGIN_NAME} "
                                        f"(expected {PLUGIN_NAME} and {BUNDLE_RUNTIME_DIR}/ in it)")
            return cls(exe, path)
        if not path.is_file():
            raise FileNotFoundError(f"plugin {path} does not exist")
        if not os.access(path, os.X_OK):
            raise PermissionError(f"plugin {path} is not executable")
        if (path.parent / BUNDLE_RUNTIME_DIR).is_dir():
            return cls(path, path.parent)
        return cls(path)


def install_plugin(source: PluginSource, bin_dir: Path) -> bool:
    """Put the plugin at <bin_dir>/ambit-cni; returns whether anything changed."""
    dest = bin_dir / PLUGIN_NAME
    previous = os.readlink(dest).split("/", 1)[0] if dest.is_symlink() else ""
    if source.bundle is None:
        changed = atomic_copy(source.executable, dest)
        _remove_bundles(bin_dir, keep={previous})
        return changed
    bundle_dir = bin_dir / f"{BUNDLE_PREFIX}{tree_digest(source.bundle)[:16]}"
    changed = False
    if not bundle_dir.is_dir():
        tmp = _temp_path(bundle_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            shutil.copytree(source.bundle, tmp, symlinks=True)
            _fsync_tree(tmp)
            os.rename(tmp, bundle_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        changed = True
    changed |= atomic_symlink(f"{bundle_dir.name}/{source.executable.relative_to(source.bundle)}", dest)
    _remove_bundles(bin_dir, keep={bundle_dir.name, previous})
    return changed


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(Path(dirpath))


def _remove_bundles(bin_dir: Path, keep: set[str]) -> list[str]:
    removed = []
    for entry in os.scandir(bin_dir):
        if entry.name.startswith(BUNDLE_PREFIX) and entry.name not in keep and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.name)
    return removed


def uninstall_plugin(bin_dir: Path) -> list[str]:
    """Remove ambit-cni, its bundles and any temporary file of ours from the
    bin directory; nothing else. Returns the names removed."""
    removed = []
    dest = bin_dir / PLUGIN_NAME
    if dest.is_symlink() or dest.exists():
        dest.unlink()
        removed.append(PLUGIN_NAME)
    for entry in os.scandir(bin_dir):
        if entry.name.startswith(f".{PLUGIN_NAME}") and cniconf.TEMP_MARKER in entry.name:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
            removed.append(entry.name)
    removed += _remove_bundles(bin_dir, keep=set())
    if removed:
        fsync_dir(bin_dir)
    return removed


# --- the configuration directory --------------------------------------------------------------------------------

def read_config_dir(conf_dir: Path) -> tuple[dict[str, bytes], set[str]]:
    """The files `cniconf` plans with (configurations, backups, temporaries),
    and which of them are symbolic links (ambit never replaces those)."""
    files: dict[str, bytes] = {}
    links: set[str] = set()
    for entry in os.scandir(conf_dir):
        if not (cniconf.is_config_name(entry.name) or cniconf.is_ambit_file(entry.name)):
            continue
        if entry.is_symlink():
            links.add(entry.name)
        if cniconf.TEMP_MARKER in entry.name:
            files[entry.name] = b""
        elif entry.is_file():
            with open(entry.path, "rb") as f:
                files[entry.name] = f.read()
    return files, links


def apply_plan(conf_dir: Path, plan: Plan, links: set[str] = frozenset()) -> None:
    for op in plan.ops:
        if op.name in links:
            raise CniConfError(f"{op.name} is a symbolic link; ambit edits only regular files: replace the link "
                               f"with the file it points to")
    for op in plan.ops:
        path = conf_dir / op.name
        if isinstance(op, WriteFile):
            atomic_write(path, op.data, _mode_for(conf_dir, op))
        else:
            path.unlink(missing_ok=True)
    if any(isinstance(op, RemoveFile) for op in plan.ops):
        fsync_dir(conf_dir)


def _mode_for(conf_dir: Path, op: WriteFile) -> int:
    for name in (op.name, op.mode_from):
        if name is None:
            continue
        try:
            return stat.S_IMODE((conf_dir / name).stat().st_mode)
        except FileNotFoundError:
            continue
    return CONFIG_MODE


def directory_fingerprint(conf_dir: Path, bin_dir: Path) -> tuple:
    """What the watcher compares between polls: every configuration file's
    identity and content digest, and whether the plugin is still in place."""
    seen = []
    for entry in sorted(os.scandir(conf_dir), key=lambda e: e.name):
        try:
            st = entry.stat(follow_symlinks=False)
            digest = ""
            if cniconf.is_config_name(entry.name) and entry.is_file():
                with open(entry.path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
        except FileNotFoundError:
            continue  # removed between the listing and the stat
        seen.append((entry.name, st.st_ino, st.st_mtime_ns, st.st_size, digest))
    plugin = bin_dir / PLUGIN_NAME
    try:
        st = plugin.lstat()
        plugin_state: tuple = (st.st_ino, st.st_mtime_ns, st.st_size, plugin.exists())
    except FileNotFoundError:
        plugin_state = ()
    return tuple(seen), plugin_state


# --- install / uninstall / watch --------------------------------------------------------------------------------

@dataclass(frozen=True)
class InstallResult:
    plugin_changed: bool
    plan: Plan

    @property
    def changes(self) -> bool:
        return self.plugin_changed or self.plan.changes


@dataclass(frozen=True)
class UninstallResult:
    removed_from_bin: tuple[str, ...]
    plan: Plan


class Installer:
    """install-cni for one node: the plugin into `cni_bin_dir`, ambit chained
    into the primary configuration in `cni_conf_dir`."""

    def __init__(self, cni_bin_dir: str | os.PathLike, cni_conf_dir: str | os.PathLike,
                 plugin: PluginSource | None, settings: PluginSettings) -> None:
        """`plugin` None: uninstall only."""
        self.cni_bin_dir = Path(cni_bin_dir)
        self.cni_conf_dir = Path(cni_conf_dir)
        self.plugin = plugin
        self.settings = settings
        self.log = _log.bind(conf_dir=str(self.cni_conf_dir), bin_dir=str(self.cni_bin_dir))

    def _check_dirs(self) -> None:
        for directory in (self.cni_bin_dir, self.cni_conf_dir):
            if not directory.is_dir():
                raise FileNotFoundError(f"{directory} does not exist (is the host directory mounted?)")

    def install_plugin(self) -> bool:
        if self.plugin is None:
            raise ValueError("no plugin to install")
        self._check_dirs()
        return install_plugin(self.plugin, self.cni_bin_dir)

    def install_config(self) -> Plan:
        self._check_dirs()
        files, links = read_config_dir(self.cni_conf_dir)
        plan = cniconf.plan_install(files, self.settings)
        apply_plan(self.cni_conf_dir, plan, links)
        return plan

    def install(self) -> InstallResult:
        """Plugin first, then the configuration: the runtime must never read a
        chain naming a plugin that is not there yet."""
        plugin_changed = self.install_plugin()
        plan = self.install_config()
        result = InstallResult(plugin_changed, plan)
        if result.changes:
            self.log.info("installed", plugin_changed=plugin_changed, config=plan.summary, primary=plan.primary)
        return result

    def uninstall(self) -> UninstallResult:
        """Configuration first, then the plugin (the reverse of install)."""
        self._check_dirs()
        files, links = read_config_dir(self.cni_conf_dir)
        plan = cniconf.plan_uninstall(files)
        apply_plan(self.cni_conf_dir, plan, links)
        removed = tuple(uninstall_plugin(self.cni_bin_dir))
        self.log.info("uninstalled", config=plan.summary, removed_from_bin=list(removed), notes=list(plan.notes))
        return UninstallResult(removed, plan)

    def fingerprint(self) -> tuple:
        return directory_fingerprint(self.cni_conf_dir, self.cni_bin_dir)

    def _fingerprint_or_none(self) -> tuple | None:
        try:
            return self.fingerprint()
        except OSError as exc:
            self.log.error("cannot read the CNI directories", error=str(exc))
            return None

    def watch(self, stop: threading.Event, interval: float = 1.0, resync: float = 60.0) -> int:
        """Install, then re-install whenever the directories change (the
        primary CNI rewrote its file, someone removed the plugin), until
        `stop` is set. Polls every `interval` seconds and re-checks every
        `resync` seconds regardless. Its own writes cost one more pass, which
        changes nothing (install is idempotent), so it never loops on them.
        Returns how many passes changed something."""
        passes_with_changes = 0
        last: tuple | None = None
        last_error = ""
        next_resync = 0.0
        while not stop.is_set():
            now = time.monotonic()
            current = self._fingerprint_or_none()
            if current is not None and (current != last or now >= next_resync):
                error, level, changed = "", "info", False
                try:
                    changed = self.install_plugin()  # counted even when the configuration cannot be chained yet
                    plan = self.install_config()
                    changed |= plan.changes
                    if changed:
                        self.log.info("installed" if last is None else "re-applied after a change in the CNI "
                                      "directories", config=plan.summary, primary=plan.primary)
                except NoPrimaryConfig as exc:  # normal while the node boots
                    error = str(exc)
                except (CniConfError, OSError) as exc:
                    error = str(exc)
                    level = "error"
                passes_with_changes += changed
                if error and error != last_error:
                    getattr(self.log, level)("cannot chain ambit-cni yet; retrying on the next change",
                                             error=error)
                last_error = error
                # What was seen before this pass: if the pass wrote, the next
                # poll differs and makes one more pass, a no-op unless someone
                # else changed something meanwhile (taking the fingerprint
                # after the pass would hide such a change).
                last = current
                next_resync = now + resync
            stop.wait(interval)
        return passes_with_changes
