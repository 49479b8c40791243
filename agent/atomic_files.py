"""Atomic file writes with exact permissions, for everything the agent and
its install step put on disk (keys, CNI configuration, enrolment records).

A reader never sees half a file and a private file never exists, even for a
moment, with wider permissions than asked: the data goes to a temporary
file created in the same directory with the final mode (not narrowed or
widened by the umask), is fsynced, renamed over the target, and the
directory is fsynced so a crash leaves the old file or the new one.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

TEMP_MARKER = ".ambit-tmp"


def temp_path(path: Path, marker: str = TEMP_MARKER) -> Path:
    """A sibling name no other writer (process or thread) uses at the same time."""
    return path.parent / f".{path.name}{marker}-{os.getpid()}-{threading.get_ident() % 100000}"


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int, marker: str = TEMP_MARKER, durable: bool = True) -> None:
    """Replace `path` with `data`, which has `mode` from its first byte on.
    durable=False skips the fsyncs (state that is rebuilt anyway)."""
    path = Path(path)
    tmp = temp_path(path, marker)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
