"""Chaining ambit-cni into the node's CNI configuration, as pure logic.

The container runtime reads the first file by name among *.conf, *.conflist
and *.json in its configuration directory (libcni's rule). Chaining means
appending ambit's entry to that file's `plugins`, turning a lone .conf into a
.conflist first (and removing the .conf, which would otherwise still be read
first). Uninstalling must leave the directory as the primary CNI wrote it, so
every file is backed up, byte for byte, before ambit first changes it
(`<file>.ambit-orig`, a name the runtime ignores) and the backup is restored
when the file still says what the backup says.

Nothing here touches the disk: `plan_install` and `plan_uninstall` take the
directory's files as name -> bytes and return the writes and removals that
`installer` applies atomically.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Union

from ambit.cni import spec as cnispec

PLUGIN_TYPE = "ambit-cni"
CONFIG_EXTENSIONS = (".conf", ".conflist", ".json")  # what libcni's ConfFiles lists
SINGLE_EXTENSIONS = (".conf", ".json")  # read as one plugin's configuration
BACKUP_SUFFIX = ".ambit-orig"
TEMP_MARKER = ".ambit-tmp"  # in every temporary file name ambit writes
MIN_CHAINING_VERSION = "0.3.0"  # plugin lists and prevResult arrived in CNI 0.3.0


class CniConfError(Exception):
    """A configuration ambit will not edit; the message says which file, why, and what to do."""


class NoPrimaryConfig(CniConfError):
    """The primary CNI has not written its configuration yet."""


@dataclass(frozen=True)
class PluginSettings:
    """ambit-cni's own keys in the conflist (read by cni/spec.py)."""

    agent_socket: str = cnispec.DEFAULT_AGENT_SOCKET
    timeout: float = cnispec.DEFAULT_TIMEOUT_S
    log_level: str = "info"

    def __post_init__(self) -> None:
        # The same rules the plugin applies, so a bad value fails here, at
        # install time, instead of on every pod's ADD.
        if not self.agent_socket.startswith("/"):
            raise ValueError(f"the agent socket must be an absolute path, not {self.agent_socket!r}")
        if len(self.agent_socket.encode()) > cnispec.MAX_SOCKET_PATH:
            raise ValueError(f"the agent socket path is longer than {cnispec.MAX_SOCKET_PATH} bytes")
        try:
            cnispec.parse_timeout(self.timeout)
        except cnispec.CniError as exc:
            raise ValueError(exc.msg) from None
        if self.log_level not in cnispec.LOG_LEVELS:
            raise ValueError(f"logLevel must be one of {', '.join(cnispec.LOG_LEVELS)}, not {self.log_level!r}")

    def entry(self) -> dict[str, Any]:
        timeout: float | int = self.timeout
        if float(timeout).is_integer():
            timeout = int(timeout)
        return {"type": PLUGIN_TYPE, "agentSocket": self.agent_socket, "timeout": timeout,
                "logLevel": self.log_level}


@dataclass(frozen=True)
class WriteFile:
    """Write `data` to `name` (atomically). The file keeps its permissions if
    it exists, else takes those of `mode_from`, else 0644."""

    name: str
    data: bytes
    mode_from: str | None = None


@dataclass(frozen=True)
class RemoveFile:
    name: str


FileOp = Union[WriteFile, RemoveFile]


@dataclass(frozen=True)
class Plan:
    """What to do to the configuration directory, and why."""

    ops: tuple[FileOp, ...]
    summary: str
    primary: str | None = None  # the file the runtime reads once the plan is applied
    notes: tuple[str, ...] = field(default=())

    @property
    def changes(self) -> bool:
        return bool(self.ops)


# --- file names -------------------------------------------------------------------------------------------------

def is_ambit_file(name: str) -> bool:
    """A backup or temporary file of ambit's own."""
    return name.endswith(BACKUP_SUFFIX) or TEMP_MARKER in name


def is_config_name(name: str) -> bool:
    return name.endswith(CONFIG_EXTENSIONS) and not is_ambit_file(name)


def primary_config_name(names: Iterable[str]) -> str | None:
    """The file the runtime reads: the first configuration file by name
    (byte order, as Go sorts; code-point order on str is the same)."""
    candidates = [n for n in names if is_config_name(n)]
    return min(candidates) if candidates else None


def _stem(name: str) -> str:
    return name.rsplit(".", 1)[0]


# --- configuration content --------------------------------------------------------------------------------------

def decode(name: str, data: bytes) -> dict[str, Any]:
    try:
        conf = json.loads(data.decode("utf-8"))  # not json.loads(bytes), which guesses UTF-16/32 too
    except UnicodeDecodeError as exc:
        raise CniConfError(f"{name} is not UTF-8 text ({exc.reason} at byte {exc.start}); ambit-cni was not "
                           f"chained: fix or remove the file") from None
    except json.JSONDecodeError as exc:
        raise CniConfError(f"{name} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
                           f"ambit-cni was not chained: fix or remove the file") from None
    if not isinstance(conf, dict):
        raise CniConfError(f"{name} holds a JSON {type(conf).__name__}, not a CNI network configuration object")
    return conf


def plugins_of(name: str, conf: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The plugin list of a conflist; None for a single-plugin configuration."""
    if name.endswith(".conflist"):
        plugins = conf.get("plugins")
        if not isinstance(plugins, list) or not plugins:
            raise CniConfError(f"{name} has no plugins: a .conflist needs a non-empty \"plugins\" list")
        for index, plugin in enumerate(plugins):
            if not isinstance(plugin, dict) or not isinstance(plugin.get("type"), str) or not plugin["type"]:
                raise CniConfError(f"{name}: plugin #{index + 1} has no \"type\"")
        return plugins
    if "plugins" in conf:
        raise CniConfError(f"{name} holds a plugin list but runtimes read a {name.rsplit('.', 1)[1]} file as a "
                           f"single plugin; unsupported layout: rename it to {_stem(name)}.conflist")
    if not isinstance(conf.get("type"), str) or not conf["type"]:
        raise CniConfError(f"{name} has no \"type\": not a CNI network configuration")
    return None


def check_version(name: str, conf: Mapping[str, Any]) -> str:
    version = conf.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise CniConfError(f"{name} has no cniVersion; ambit-cni needs {MIN_CHAINING_VERSION} or newer to chain")
    if version not in cnispec.SUPPORTED_VERSIONS:
        raise CniConfError(f"{name} uses cniVersion {version}; ambit-cni supports "
                           f"{', '.join(cnispec.SUPPORTED_VERSIONS)}, so it was not chained")
    return version


def ambit_entries(conflist: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [p for p in conflist.get("plugins", []) if isinstance(p, dict) and p.get("type") == PLUGIN_TYPE]


def with_plugin(conflist: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, Any]:
    """The conflist with ambit's entry: in place of an existing one (which
    keeps its position), else appended. Every other key and plugin, and their
    order, stay as they were; so does the primary's cniVersion."""
    plugins: list[Any] = []
    placed = False
    for plugin in conflist["plugins"]:
        if isinstance(plugin, dict) and plugin.get("type") == PLUGIN_TYPE:
            if not placed:
                plugins.append(dict(entry))
                placed = True
            continue
        plugins.append(plugin)
    if not placed:
        plugins.append(dict(entry))
    out = dict(conflist)
    out["plugins"] = plugins
    return out


def without_plugin(conflist: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(conflist)
    out["plugins"] = [p for p in conflist["plugins"] if not (isinstance(p, dict) and p.get("type") == PLUGIN_TYPE)]
    return out


def conflist_from_conf(name: str, conf: Mapping[str, Any]) -> dict[str, Any]:
    """A lone .conf as the one-plugin conflist a runtime would build from it."""
    if not isinstance(conf.get("name"), str) or not conf["name"]:
        raise CniConfError(f"{name} has no network \"name\"")
    if conf.get("type") == PLUGIN_TYPE:
        raise CniConfError(f"{name} uses ambit-cni as the only plugin; ambit-cni is chained after a primary "
                           f"plugin that gives the pod its addresses")
    plugin = {k: v for k, v in conf.items() if k not in ("name", "cniVersion")}
    return {"cniVersion": conf["cniVersion"], "name": conf["name"], "plugins": [plugin]}


def render(conf: Mapping[str, Any]) -> bytes:
    return (json.dumps(conf, indent=2, ensure_ascii=False) + "\n").encode()


def _decode_quiet(name: str, data: bytes) -> dict[str, Any] | None:
    try:
        return decode(name, data)
    except CniConfError:
        return None


# --- plans ------------------------------------------------------------------------------------------------------

def plan_install(files: Mapping[str, bytes], settings: PluginSettings) -> Plan:
    """Chain ambit into the file the runtime reads. Idempotent: an empty plan
    when ambit is already there with these settings."""
    primary = primary_config_name(files)
    if primary is None:
        raise NoPrimaryConfig("no CNI network configuration (*.conf, *.conflist, *.json) yet: the primary CNI "
                              "has not written one; ambit-cni is chained after it")
    data = files[primary]
    conf = decode(primary, data)
    plugins = plugins_of(primary, conf)
    check_version(primary, conf)
    entry = settings.entry()

    if plugins is not None:
        present = ambit_entries(conf)
        if present == [entry]:
            return Plan((), f"ambit-cni is already chained in {primary}", primary)
        ops: list[FileOp] = []
        if not present:  # the primary's own bytes: what uninstall restores
            ops.append(WriteFile(primary + BACKUP_SUFFIX, data, mode_from=primary))
        ops.append(WriteFile(primary, render(with_plugin(conf, entry))))
        verb = "updated ambit-cni's settings in" if present else "appended ambit-cni to"
        return Plan(tuple(ops), f"{verb} {primary}", primary)

    target = _stem(primary) + ".conflist"
    if target in files:
        existing = _decode_quiet(target, files[target])
        if existing is None or not ambit_entries(existing):
            raise CniConfError(f"{primary} would become {target}, but {target} already exists and is not "
                               f"ambit's; unsupported layout: remove one of the two")
    after = (set(n for n in files if is_config_name(n)) - {primary}) | {target}
    if primary_config_name(after) != target:
        raise CniConfError(f"turning {primary} into {target} would let {primary_config_name(after)} be read "
                           f"first; unsupported layout: rename {primary} to a .conflist yourself")
    converted = with_plugin(conflist_from_conf(primary, conf), entry)
    return Plan((WriteFile(primary + BACKUP_SUFFIX, data, mode_from=primary),
                 WriteFile(target, render(converted), mode_from=primary),
                 RemoveFile(primary)),
                f"turned {primary} into {target} and appended ambit-cni", target)


def plan_uninstall(files: Mapping[str, bytes]) -> Plan:
    """Remove ambit from every configuration file (not only the primary: the
    primary may have changed since), restoring the backed-up bytes wherever
    the file without ambit still says what the backup says; then drop the
    backups and any temporary file ambit left behind."""
    backups = {n[:-len(BACKUP_SUFFIX)]: n for n in files if n.endswith(BACKUP_SUFFIX)}
    writes: list[FileOp] = []
    removals: list[FileOp] = []
    done: list[str] = []
    notes: list[str] = []
    for name in sorted(n for n in files if is_config_name(n)):
        conf = _decode_quiet(name, files[name])
        if conf is None:
            notes.append(f"{name} is not valid JSON; left alone")
            continue
        try:
            if plugins_of(name, conf) is None or not ambit_entries(conf):
                continue
        except CniConfError as exc:
            notes.append(f"{exc}; left alone")
            continue
        stripped = without_plugin(conf)
        own = backups.get(name)
        sources = [_stem(name) + ext for ext in SINGLE_EXTENSIONS if _stem(name) + ext in backups]
        if own is not None and _decode_quiet(own, files[own]) == stripped:
            writes.append(WriteFile(name, files[own]))
            done.append(f"restored {name}")
            continue
        source = next((s for s in sources if _converted(s, files[backups[s]]) == stripped), None)
        if source is not None:
            if source not in files:
                writes.append(WriteFile(source, files[backups[source]], mode_from=name))
            removals.append(RemoveFile(name))
            done.append(f"restored {source}" if source not in files else f"removed {name}")
            continue
        if stripped["plugins"]:
            writes.append(WriteFile(name, render(stripped)))
            done.append(f"removed ambit-cni from {name}")
        else:
            removals.append(RemoveFile(name))
            done.append(f"removed {name} (it held only ambit-cni)")
    removals += [RemoveFile(b) for b in sorted(backups.values())]
    removals += [RemoveFile(n) for n in sorted(files) if TEMP_MARKER in n]
    summary = "; ".join(done) if done else "ambit-cni was not chained in any configuration"
    return Plan(tuple(writes + removals), summary, primary_config_name(_names_after(files, writes + removals)),
                tuple(notes))


def _converted(name: str, data: bytes) -> dict[str, Any] | None:
    conf = _decode_quiet(name, data)
    if conf is None:
        return None
    try:
        return conflist_from_conf(name, conf)
    except CniConfError:
        return None


def _names_after(files: Mapping[str, bytes], ops: Iterable[FileOp]) -> set[str]:
    names = set(files)
    for op in ops:
        if isinstance(op, WriteFile):
            names.add(op.name)
        else:
            names.discard(op.name)
    return names
