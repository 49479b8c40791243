"""JSON for the plugin on the C accelerator alone.

`import json` pulls in re, enum, functools and collections: about a third
of the plugin's start-up CPU, paid once per pod per command, twenty at a
time when a node boots (bench/cni_add.py). The parsing and string quoting
are the same C functions json uses (`_json`); only the thin Python layer
around them is ours. Output matches `json.dumps` with its default
separators for the types a CNI result holds (tests/unit/test_cni_jsonlite.py);
loads raises DecodeError, saying what and where as json.JSONDecodeError does.
"""

import _json

_NAN = float("nan")
_CONSTANTS = {"NaN": _NAN, "Infinity": float("inf"), "-Infinity": float("-inf")}
_WHITESPACE = " \t\n\r"
# Deeper than any CNI configuration; the C scanner itself recurses until
# RecursionError (~1000 levels), which carries no position.
MAX_NESTING = 100


class DecodeError(ValueError):
    """A malformed document: what is wrong and where, in json.JSONDecodeError's words."""

    def __init__(self, problem: str, text: str, pos: int) -> None:
        self.problem = problem
        self.pos = pos
        self.lineno = text.count("\n", 0, pos) + 1
        self.colno = pos - text.rfind("\n", 0, pos)
        super().__init__(f"{problem}: line {self.lineno} column {self.colno} (char {pos})")


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
    """Parse one JSON document as json.loads does (duplicate keys: the last
    wins); DecodeError, a ValueError saying what and where, if it is not one.
    Also refused: strings that are not Unicode (a \\u escape of a lone
    surrogate) and nesting deeper than MAX_NESTING."""
    text = _text(data)
    if text.startswith("\ufeff"):
        raise DecodeError("Unexpected UTF-8 BOM", text, 0)
    if text.count("[") + text.count("{") > MAX_NESTING:  # cheap bound before the exact scan
        _check_nesting(text)
    start = _skip(text, 0)
    try:
        value, end = _scan(text, start)
    except StopIteration as exc:
        raise DecodeError("Expecting value", text, exc.value) from None
    except SystemError:
        raise _scanner_error(text, start) from None
    except ValueError as exc:  # json.decoder.JSONDecodeError, once something imported json
        raise DecodeError(exc.msg, text, exc.pos) from None  # type: ignore[attr-defined]
    except RecursionError:
        raise DecodeError("Nested too deeply for the parser", text, start) from None
    end = _skip(text, end)
    if end != len(text):
        raise DecodeError("Extra data", text, end)
    if "\\u" in text:
        _check_surrogates(text)
    return value


def _text(data: bytes | str) -> str:
    if not isinstance(data, (bytes, bytearray)):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = bytes(data[:exc.start]).decode("utf-8")  # valid up to the bad byte
        raise DecodeError(f"Invalid UTF-8 byte 0x{data[exc.start]:02x} at byte {exc.start} ({exc.reason})",
                          before, len(before)) from None


def _scanner_error(text: str, start: int) -> ValueError:
    """The C scanner builds its error from json.decoder.JSONDecodeError, found
    only if json.decoder is already imported, else SystemError; import it
    (on this path alone) and scan again for the message and position."""
    import json.decoder
    try:
        _scan(text, start)
    except json.decoder.JSONDecodeError as exc:
        return DecodeError(exc.msg, text, exc.pos)
    return DecodeError("Malformed JSON", text, start)


def _check_nesting(text: str) -> None:
    depth = 0
    in_string = False
    i = 0
    while i < len(text):
        char = text[i]
        if in_string:
            if char == "\\":
                i += 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > MAX_NESTING:
                raise DecodeError(f"Nested deeper than {MAX_NESTING} levels", text, i)
        elif char in "]}":
            depth -= 1
        i += 1


def _check_surrogates(text: str) -> None:
    """A \\uD800-\\uDFFF escape not part of a pair decodes to no character
    (RFC 8259 8.2); it cannot be sent on as UTF-8, so the document is refused.
    The document parsed, so a backslash is always an escape inside a string."""
    i = text.find("\\")
    while i != -1:
        if text[i + 1] != "u":
            i = text.find("\\", i + 2)
            continue
        code = int(text[i + 2:i + 6], 16)
        if 0xD800 <= code < 0xDC00 and text[i + 6:i + 8] == "\\u" \
                and 0xDC00 <= int(text[i + 8:i + 12], 16) <= 0xDFFF:
            i = text.find("\\", i + 12)
        elif 0xD800 <= code <= 0xDFFF:
            raise DecodeError(f"Lone surrogate {text[i:i + 6]} in a string", text, i)
        else:
            i = text.find("\\", i + 6)


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
