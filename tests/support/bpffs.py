"""A lab test's own directory on the real bpffs, for the agents' per-node pins."""
from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

BPFFS = Path("/sys/fs/bpf")


@contextlib.contextmanager
def lab_bpffs_root(prefix: str) -> Iterator[Path]:
    """`<bpffs>/<prefix>tests-<random>`, made empty and removed afterwards.
    `ambit lab down` removes the pins (and usually the directory); only
    empty directories are removed here, so a leaked pin fails the teardown
    instead of disappearing. Skips the test where bpffs is not mounted."""
    if not os.path.ismount(BPFFS):
        pytest.skip(f"bpffs is not mounted at {BPFFS}")
    root = BPFFS / f"{prefix}tests-{uuid.uuid4().hex[:6]}"
    root.mkdir()
    try:
        yield root
    finally:
        if root.exists():
            for child in root.iterdir():
                child.rmdir()
            root.rmdir()
