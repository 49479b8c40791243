"""JSON-lines logs read while their writer runs (an agent, the CA, Envoy's
access log): only whole lines count, since the last one may be half written."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def json_lines(text: str | bytes, event: str | None = None) -> list[dict[str, Any]]:
    """The JSON objects on the complete lines of `text` (a trailing partial line
    is left for the next read), those of `event` only when given."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    complete = text[: text.rfind("\n") + 1]
    needle = f'"event": "{event}"' if event is not None else None
    return [json.loads(line) for line in complete.splitlines()
            if line.startswith("{") and (needle is None or needle in line)]


def read_json_lines(path: Path, event: str | None = None, since: int = 0) -> list[dict[str, Any]]:
    """json_lines() of the file from byte `since` on; [] while it does not exist."""
    try:
        with open(path, "rb") as f:
            f.seek(since)
            return json_lines(f.read(), event)
    except FileNotFoundError:
        return []
