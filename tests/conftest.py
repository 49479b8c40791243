"""Shared pytest set-up: kernel tests need root; structlog goes to stderr."""
from __future__ import annotations

import os

import pytest

from ambit.agent import log as logconf


def pytest_configure(config):
    logconf.configure("warn")


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="kernel tests need root (network namespaces, eBPF)")
    for item in items:
        if "tests/kernel/" in str(item.fspath):
            item.add_marker(skip)
