"""The code a shortcut stands in for, pinned by a digest of its source.

agent/proxy/hbone/h2_connection.py and connect_block.py reproduce pieces of
h2 and hpack; tests compare `source_digest` of each piece with the digest it
had when the shortcut was checked against it, so a library upgrade that
changes one fails a test naming the shortcut to re-check."""
from __future__ import annotations

import hashlib
import importlib
import inspect
from typing import Any


def resolve(dotted: str) -> Any:
    """The object a dotted path names: the longest importable module prefix,
    then attributes (classes, methods)."""
    parts = dotted.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            target: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for name in parts[split:]:
            target = getattr(target, name)
        return target
    raise ImportError(dotted)


def source_digest(dotted: str) -> str:
    """sha256 (hex) of inspect.getsource() of what `dotted` names."""
    return hashlib.sha256(inspect.getsource(resolve(dotted)).encode()).hexdigest()
