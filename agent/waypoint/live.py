"""Keep a running waypoint in step with the cluster (`ambit waypoint --run --watch`).

The cluster files (the objects `--discovery files` reads) are checked every
couple of seconds; when one changed, the waypoint is planned again and its
listeners, clusters and routes are rewritten into the files Envoy watches
(xds_files.py). Envoy keeps what did not change, drains what did, and the
hbone routes change under HBONE connections already up. Bad input (a file
that does not parse, the waypoint's Gateway gone) is logged and the running
configuration stays.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import structlog

from ..discovery.files import BadFile, parse_documents
from .bootstrap import BootstrapOptions, waypoint_resources
from .credentials import SecretFiles
from .destinations import WaypointError, WaypointPlan, plan_waypoint, state_from_objects
from .xds_files import XdsFiles, write_resources

log = structlog.get_logger(__name__)

SUFFIXES = (".yaml", ".yml", ".json")


def _files(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        files += sorted(p for p in path.iterdir() if p.suffix in SUFFIXES) if path.is_dir() else [path]
    return files


def read_objects(paths: Sequence[Path]) -> list[Mapping[str, Any]]:
    """The objects of YAML/JSON files, and of the *.yaml/*.yml/*.json files of directories."""
    objects: list[Mapping[str, Any]] = []
    for file in _files(paths):
        try:
            objects += parse_documents(file.read_text(), file)
        except BadFile as exc:
            raise WaypointError(f"{file}: {exc}") from None
        except OSError as exc:
            raise WaypointError(f"cannot read {file}: {exc.strerror}") from None
    return objects


def signature(paths: Sequence[Path]) -> tuple[Any, ...]:
    """What changes when any of the files does (names, inode, size, mtime, ctime)."""
    marks: list[Any] = []
    try:
        files = _files(paths)
    except OSError as exc:
        return (("unreadable", str(exc)),)
    for file in files:
        try:
            st = os.stat(file)
        except OSError:
            marks.append((str(file), None))
            continue
        marks.append((str(file), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(marks)


def write_configuration(plan: WaypointPlan, secrets: SecretFiles, xds: XdsFiles,
                        options: BootstrapOptions) -> tuple[bool, tuple[str, ...]]:
    """Render and write the plan's resources; (anything written, notes)."""
    resources, notes = waypoint_resources(plan, secrets, xds, options)
    version = hashlib.sha256(json.dumps(asdict(resources), sort_keys=True).encode()).hexdigest()[:12]
    return write_resources(xds, resources, version), notes


class ConfigWatcher:
    """Re-plans one waypoint when its cluster files change."""

    def __init__(self, paths: Sequence[Path], plan: WaypointPlan, secrets: SecretFiles, xds: XdsFiles,
                 options: BootstrapOptions, service_account: str | None = None) -> None:
        self.paths = list(paths)
        self.plan = plan
        self.secrets = secrets
        self.xds = xds
        self.options = options
        self.service_account = service_account
        self._signature = signature(self.paths)

    def refresh(self) -> bool:
        """Apply the files as they are now if they changed; True when Envoy's files were rewritten."""
        current = signature(self.paths)
        if current == self._signature:
            return False
        self._signature = current
        waypoint = self.plan.waypoint
        try:
            plan = plan_waypoint(state_from_objects(read_objects(self.paths)), waypoint.namespace, waypoint.name,
                                 self.plan.identity.trust_domain, self.service_account)
        except WaypointError as exc:
            log.error("waypoint.config_unusable", waypoint=waypoint.key, error=str(exc),
                      keeping="the running configuration")
            return False
        if plan.identity != self.plan.identity:
            log.error("waypoint.identity_changed", waypoint=waypoint.key, running_as=str(self.plan.identity),
                      wanted=str(plan.identity), keeping="the running configuration (restart to change identity)")
            return False
        written, notes = write_configuration(plan, self.secrets, self.xds, self.options)
        self.plan = plan
        if written:
            log.info("waypoint.config_updated", waypoint=waypoint.key,
                     destinations=[d.authority for d in plan.destinations], notes=list(plan.notes + notes))
        return written
