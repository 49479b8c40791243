"""JSON for the plugin on the C accelerator alone.

`import json` pulls in re, enum, functools and collections: about a third
of the plugin's start-up CPU, paid once per pod per command, twenty at a
time when a node boots (bench/cni_add.py). The parsing and string quoting
are the same C functions json uses (`_json`); only the thin Python layer
around them is ours. Output matches `json.dumps` with its default
separators for the types a CNI result holds (tests/unit/test_cni_jsonlite.py).
"""

import _json

_NAN = float("nan")
_CONSTANTS = {"NaN": _NAN, "Infinity": float("inf"), "-Infinity": float("-inf")}
_WHITESPACE = " \t\n\r"


class _Context:
    """The attributes `_json.make_scanner` reads (as json.JSONDecoder has them)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = staticmethod(_CONSTANTS.__getitem__)
    memo: dict = {}


_scan = _json.make_scanner(_Context())


def loads(data: bytes | str):
    """Parse one JSON document; ValueError (UnicodeDecodeError included) if it is not one."""
    text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    if text.startswith("\ufeff"):
        raise ValueError("unexpected UTF-8 BOM")
    start = _skip(text, 0)
    try:
        value, end = _scan(text, start)
    except StopIteration as exc:
        raise ValueError(f"expecting value at character {exc.value}") from None
    end = _skip(text, end)
    if end != len(text):
        raise ValueError(f"extra data at character {end}")
    return value


def _skip(text: str, index: int) -> int:
    while index < len(text) and text[index] in _WHITESPACE:
        index += 1
    return index


def dumps(value) -> str:
    """Serialise dicts, lists, tuples, strings, numbers, booleans and None."""
    out: list[str] = []
    _encode(value, out)
    return "".join(out)


def _encode(value, out: list[str]) -> None:
    if isinstance(value, str):
        out.append(_json.encode_basestring_ascii(value))
    elif value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        out.append(int.__repr__(value))
    elif isinstance(value, float):
        out.append(_float(value))
    elif isinstance(value, dict):
        if not value:
            out.append("{}")
            return
        out.append("{")
        first = True
        for key, item in value.items():
            if not first:
                out.append(", ")
            first = False
            out.append(_json.encode_basestring_ascii(_key(key)))
            out.append(": ")
            _encode(item, out)
        out.append("}")
    elif isinstance(value, (list, tuple)):
        if not value:
            out.append("[]")
            return
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(", ")
            _encode(item, out)
        out.append("]")
    else:
        raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _float(value: float) -> str:
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "Infinity" if value > 0 else "-Infinity"
    return float.__repr__(value)


def _key(key) -> str:
    if isinstance(key, str):
        return key
    if key is True:
        return "true"
    if key is False:
        return "false"
    if key is None:
        return "null"
    if isinstance(key, int):
        return int.__repr__(key)
    if isinstance(key, float):
        return _float(key)
    raise TypeError(f"keys must be str, int, float, bool or None, not {type(key).__name__}")
