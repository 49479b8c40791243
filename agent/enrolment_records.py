"""Enrolment records on disk, one JSON file per attachment.

They live under /var/run (tmpfs): they must survive an agent restart, so a
restarted agent knows which pods it enrolled and can reconcile them against
the kernel, but not a node reboot, after which every pod is new.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import structlog

from .atomic_files import TEMP_MARKER, atomic_write
from .workload import AttachmentKey, Workload

log = structlog.get_logger(__name__)
_SAFE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


class StateStore:
    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _path(self, key: AttachmentKey) -> Path:
        name = f"{key.container_id}.{key.ifname}"
        if not _SAFE.match(name) or name.startswith("."):
            # Container ids are hex for every runtime we know; anything else
            # is hashed so it can never escape the directory.
            name = "h-" + hashlib.sha256(f"{key.container_id}\0{key.ifname}".encode()).hexdigest()
        return self.directory / f"{name}.json"

    def save(self, workload: Workload) -> None:
        # Not fsynced: /var/run is tmpfs, and a lost record is rebuilt from
        # the runtime's next CHECK/GC.
        atomic_write(self._path(workload.key), json.dumps(workload.to_json()).encode(), 0o600, durable=False)

    def delete(self, key: AttachmentKey) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass

    def load_all(self) -> list[Workload]:
        """Every readable record; unreadable ones are logged and removed so
        they cannot block enrolment forever."""
        out = []
        if not self.directory.is_dir():
            return out
        for path in sorted(self.directory.glob("*.json")):
            try:
                out.append(Workload.from_json(json.loads(path.read_text())))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("dropping unreadable enrolment record", path=str(path), error=str(exc))
                path.unlink(missing_ok=True)
        for stale in self.directory.glob(f".*{TEMP_MARKER}-*"):
            stale.unlink(missing_ok=True)
        return out
