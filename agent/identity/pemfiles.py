"""Atomic writes of PEM files with exact permissions.

A private key must never exist on disk, even for a moment, with wider
permissions than 0600, and a reader must never see half a file: so every file
is written to a temporary file created 0600 in the same directory, flushed,
given its final mode and renamed over the target.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..atomic_files import atomic_write

PRIVATE_FILE_MODE = 0o600
PUBLIC_FILE_MODE = 0o644
PRIVATE_DIR_MODE = 0o700


def ensure_private_dir(directory: Path) -> None:
    """Create `directory` (and parents) and make it owner-only."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, PRIVATE_DIR_MODE)


def write_atomically(path: Path, data: bytes, mode: int, durable: bool = True) -> None:
    """Replace `path` with `data`; the file has `mode` from its first byte on.
    durable=False skips the fsyncs, for files that are made again after a crash."""
    atomic_write(path, data, mode, durable=durable)


def write_private(path: Path, data: bytes, durable: bool = True) -> None:
    write_atomically(path, data, PRIVATE_FILE_MODE, durable)


def write_public(path: Path, data: bytes, durable: bool = True) -> None:
    write_atomically(path, data, PUBLIC_FILE_MODE, durable)
