"""Cluster state from local YAML/JSON files (the lab, hosts without an API server).

The files hold the same objects the API server would return (multi-document
YAML, JSON objects or arrays, `kind: List`). Together they are the whole
truth: after every change each kind is handed to the state as a full list, so
an object removed from a file is deleted. A file that cannot be read or
parsed is reported and its last good objects stay; an explicitly listed file
that disappears counts as bad (editors briefly remove files while saving),
while a file removed from a listed directory takes its objects with it.

Changes are found by polling (size, mtime, inode, ctime); a file modified
within a second of being read is re-read and compared by content, because a
second write in the same timestamp tick leaves the stat unchanged.

`revision()` names the content the state holds (`content_revision`), so
whoever writes the files can wait until an agent has applied what it wrote.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import yaml

from .model import ALL_KINDS, is_namespaced
from .state import ClusterState

FILE_SUFFIXES = (".yaml", ".yml", ".json")
_STABLE_AFTER_NS = 1_000_000_000


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """Safe YAML, but timestamps stay strings, as they arrive from the API server."""


_Loader.add_constructor("tag:yaml.org,2002:timestamp", lambda loader, node: loader.construct_scalar(node))


class BadFile(ValueError):
    """The file cannot be used; the message says where and why."""


Signature = tuple[int, int, int, int]


@dataclass(frozen=True)
class _Read:
    """What one poll learned about one file (computed off the event loop)."""

    path: Path
    signature: Signature | None = None
    digest: bytes = b""
    read_at_ns: int = 0
    objects: tuple[Mapping[str, Any], ...] | None = None  # None: content unchanged
    error: str | None = None
    removed: bool = False
    unchanged: bool = False  # same bytes as last time (good or bad): only the stat moved


@dataclass
class _Known:
    signature: Signature
    digest: bytes  # of the bytes last read, good or bad
    read_at_ns: int
    mtime_ns: int
    objects: tuple[Mapping[str, Any], ...] = ()
    applied: bytes = b""  # digest of the bytes `objects` came from (b"": none yet)

    @property
    def stable(self) -> bool:
        return self.read_at_ns - self.mtime_ns > _STABLE_AFTER_NS


def content_revision(contents: Iterable[bytes]) -> str:
    """The revision of a set of discovery files: what FileSource.revision()
    reports once it holds exactly these contents (paths do not count)."""
    return _revision(hashlib.sha256(data).digest() for data in contents)


def _revision(digests: Iterable[bytes]) -> str:
    return "sha256:" + hashlib.sha256(b"".join(sorted(digests))).hexdigest()


def parse_documents(text: str, path: Path) -> list[Mapping[str, Any]]:
    """The objects of one file, flattened (List kinds), namespace defaulted."""
    if path.suffix == ".json":
        documents = _json_documents(text)
    else:
        try:
            documents = list(yaml.load_all(text, Loader=_Loader))
        except yaml.YAMLError as exc:
            raise BadFile(f"invalid YAML: {exc}") from None
    objects: list[Mapping[str, Any]] = []
    for number, document in enumerate(documents, start=1):
        if document is None:
            continue
        items = document if isinstance(document, list) else [document]
        for item in items:
            objects.extend(_flatten(item, f"document {number}"))
    return objects


def _json_documents(text: str) -> list[Any]:
    """One JSON value, or several written one after another."""
    decoder = json.JSONDecoder()
    documents: list[Any] = []
    position = 0
    while True:
        while position < len(text) and text[position].isspace():
            position += 1
        if position >= len(text):
            return documents
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as exc:
            raise BadFile(f"invalid JSON: {exc}") from None
        documents.append(value)


def _flatten(item: Any, where: str) -> list[Mapping[str, Any]]:
    if not isinstance(item, Mapping):
        raise BadFile(f"{where}: expected an object, got {type(item).__name__}")
    kind = item.get("kind")
    if not isinstance(kind, str) or not kind:
        raise BadFile(f"{where}: kind is missing")
    if kind.endswith("List") and "items" in item:
        items = item.get("items") or []
        if not isinstance(items, list):
            raise BadFile(f"{where} ({kind}): items must be a list")
        out: list[Mapping[str, Any]] = []
        for index, entry in enumerate(items):
            out.extend(_flatten(entry, f"{where} ({kind}) item {index}"))
        return out
    metadata = item.get("metadata")
    if not isinstance(metadata, Mapping) or not isinstance(metadata.get("name"), str) or not metadata["name"]:
        raise BadFile(f"{where} ({kind}): metadata.name is missing")
    if kind in ALL_KINDS and is_namespaced(kind) and not metadata.get("namespace"):
        # As kubectl does without --namespace.
        item = {**item, "metadata": {**metadata, "namespace": "default"}}
    return [item]


class FileSource:
    """Feeds ClusterState from files or directories of files, polling for changes."""

    def __init__(self, paths: Sequence[str | os.PathLike[str]], state: ClusterState,
                 poll_interval: float = 1.0, logger: Any = None) -> None:
        self._paths = [Path(p) for p in paths]
        self._state = state
        self._poll_interval = poll_interval
        self._log: Any = logger if logger is not None else structlog.get_logger(__name__)
        self._known: dict[Path, _Known] = {}
        self._errors: dict[Path, str] = {}
        self._task: asyncio.Task[None] | None = None
        self._reload_lock = asyncio.Lock()
        self.loaded = asyncio.Event()  # set once every file has been read without error

    async def start(self) -> None:
        await self.reload()
        self._task = asyncio.create_task(self._poll(), name="discovery-files")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def errors(self) -> dict[str, str]:
        """Files currently rejected, with the reason."""
        return {str(path): message for path, message in sorted(self._errors.items())}

    def pending(self) -> dict[str, str]:
        """Until every file has been read once without error (the view would
        be partial): the files that stop it, with the reason."""
        if self.loaded.is_set():
            return {}
        return self.errors() or {"files": "not read yet"}

    def revision(self) -> str:
        """content_revision() of the files whose objects the state holds (a
        rejected file with its last good content); "" before the first load."""
        applied = [known.applied for known in self._known.values() if known.applied]
        return _revision(applied) if applied or self.loaded.is_set() else ""

    async def reload(self) -> bool:
        """Look at every file now; returns whether the state was updated."""
        async with self._reload_lock:
            snapshot = {path: (k.signature, k.digest, k.stable) for path, k in self._known.items()}
            reads = await asyncio.to_thread(self._scan, snapshot)
            changed = self._merge(reads)
            if changed:
                self._publish()
            if not self._errors:
                self.loaded.set()
            return changed

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval)
            try:
                await self.reload()
            except Exception:  # keep polling: the next change may fix it
                self._log.exception("discovery file poll failed")

    # -- worker thread: stat, read, parse -----------------------------------
    def _candidates(self) -> tuple[list[Path], list[Path]]:
        """(files to read, explicitly listed files that are missing)."""
        files: list[Path] = []
        missing: list[Path] = []
        for path in self._paths:
            if path.is_dir():
                files.extend(sorted(p for p in path.iterdir() if p.suffix in FILE_SUFFIXES and p.is_file()))
            elif path.is_file():
                files.append(path)
            else:
                missing.append(path)
        return list(dict.fromkeys(files)), missing

    def _scan(self, known: Mapping[Path, tuple[Signature, bytes, bool]]) -> list[_Read]:
        files, missing = self._candidates()
        reads = [_Read(path, error="file not found") for path in missing]
        present = set(files) | set(missing)
        reads.extend(_Read(path, removed=True) for path in known if path not in present)
        for path in files:
            previous = known.get(path)
            try:
                stat = path.stat()
                signature = (stat.st_mtime_ns, stat.st_size, stat.st_ino, stat.st_ctime_ns)
                if previous is not None and previous[0] == signature and previous[2]:
                    continue
                read_at = time.time_ns()
                data = path.read_bytes()
            except OSError as exc:
                reads.append(_Read(path, error=f"cannot read: {exc.strerror or exc}"))
                continue
            digest = hashlib.sha256(data).digest()
            if previous is not None and previous[1] == digest:
                reads.append(_Read(path, signature, digest, read_at, unchanged=True))
                continue
            try:
                objects = tuple(parse_documents(data.decode("utf-8"), path))
            except UnicodeDecodeError as exc:
                reads.append(_Read(path, signature, digest, read_at, error=f"not UTF-8: {exc}"))
            except BadFile as exc:
                reads.append(_Read(path, signature, digest, read_at, error=str(exc)))
            else:
                reads.append(_Read(path, signature, digest, read_at, objects=objects))
        return reads

    # -- event loop: remember, report, publish -----------------------------
    def _merge(self, reads: Iterable[_Read]) -> bool:
        changed = False
        for read in reads:
            if read.removed:
                self._log.info("discovery file removed; dropping its objects", file=str(read.path))
                self._known.pop(read.path, None)
                self._errors.pop(read.path, None)
                changed = True
                continue
            if read.error is not None:
                if self._errors.get(read.path) != read.error:
                    self._log.error("discovery file rejected; keeping its last good objects",
                                    file=str(read.path), error=read.error)
                self._errors[read.path] = read.error
                known = self._known.get(read.path)
                if known is not None and read.signature is not None:
                    # Do not re-parse the same bad bytes on every poll.
                    known.signature, known.digest, known.read_at_ns = read.signature, read.digest, read.read_at_ns
                    known.mtime_ns = read.signature[0]
                elif read.signature is not None:
                    self._known[read.path] = _Known(read.signature, read.digest, read.read_at_ns, read.signature[0])
                continue
            assert read.signature is not None
            known = self._known.get(read.path)
            if read.unchanged and known is not None:
                known.signature, known.read_at_ns, known.mtime_ns = read.signature, read.read_at_ns, read.signature[0]
                continue
            if self._errors.pop(read.path, None) is not None:
                self._log.info("discovery file accepted again", file=str(read.path))
            if known is None:
                known = self._known[read.path] = _Known(read.signature, read.digest, read.read_at_ns,
                                                        read.signature[0])
            known.signature, known.digest = read.signature, read.digest
            known.read_at_ns, known.mtime_ns = read.read_at_ns, read.signature[0]
            if read.objects is not None:
                known.objects, known.applied = read.objects, read.digest
                changed = True
                self._log.info("discovery file loaded", file=str(read.path), objects=len(read.objects))
        return changed

    def _publish(self) -> None:
        by_kind: dict[str, dict[tuple[str, str, str], Mapping[str, Any]]] = {kind: {} for kind in ALL_KINDS}
        origin: dict[tuple[str, str, str], Path] = {}
        for path in sorted(self._known):
            for obj in self._known[path].objects:
                kind = obj["kind"]
                if kind not in by_kind:
                    continue  # Deployments and the like: not ours
                metadata = obj["metadata"]
                identity = (kind, metadata.get("namespace") or "", metadata["name"])
                if identity in origin and origin[identity] != path:
                    self._log.warning("object defined in two files; the later file wins", object=str(identity),
                                      first=str(origin[identity]), second=str(path))
                origin[identity] = path
                by_kind[kind][identity] = obj
        for kind, objects in by_kind.items():
            self._state.replace_kind(kind, objects.values())
