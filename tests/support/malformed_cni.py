"""Malformed network configurations and what ambit-cni must say about each:
code 6 (failed to decode content) with the problem and its position. Shared
by the staged plugin's tests (tests/kernel/test_cni_errors.py), the frozen
build's (tests/kernel/test_frozen_cni.py) and the parser's own
(tests/unit/test_cni_jsonlite.py)."""
from __future__ import annotations

# id -> (stdin, what the error message must contain)
MALFORMED_STDIN: dict[str, tuple[bytes, str]] = {
    "truncated": (b'{"cniVersion": "1.0.0", "name": ', "Expecting value: line 1 column 33 (char 32)"),
    "truncated-object": (b'{"cniVersion": "1.0.0"', "Expecting ',' delimiter: line 1 column 23 (char 22)"),
    "invalid-literal": (b'{"cniVersion": "1.0.0", "name": tru}', "Expecting value: line 1 column 33 (char 32)"),
    "not-json": (b"cniVersion=1.0.0", "Expecting value: line 1 column 1 (char 0)"),
    "unquoted-key": (b'{cniVersion: "1.0.0"}',
                     "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
    "bad-escape": (b'{"cniVersion": "1.0.0", "name": "a\\qb"}', "Invalid \\escape: line 1 column 35 (char 34)"),
    "control-character": (b'{"cniVersion": "1.0.0",\n "name": "a\tb"}',
                          "Invalid control character at: line 2 column 12 (char 35)"),
    "lone-surrogate": (b'{"cniVersion": "1.0.0", "name": "net\\ud800"}',
                       "Lone surrogate \\ud800 in a string: line 1 column 37 (char 36)"),
    "non-utf8": (b'{"cniVersion": "1.0.0",\n "name": "n\xff"}',
                 "Invalid UTF-8 byte 0xff at byte 35 (invalid start byte): line 2 column 12 (char 35)"),
    "deep-nesting": (b'{"cniVersion": "1.0.0", "args": ' + b"[" * 1000 + b"]" * 1000 + b"}",
                     "Nested deeper than 100 levels: line 1 column 132 (char 131)"),
    "extra-data": (b'{"cniVersion": "1.0.0"} {}', "Extra data: line 1 column 25 (char 24)"),
    "top-level-array": (b'["ambit-cni"]', "must be a JSON object, not an array: line 1 column 1 (char 0)"),
    "top-level-number": (b" 42", "must be a JSON object, not a number: line 1 column 2 (char 1)"),
}

# Duplicate keys are not malformed: as with json.loads, the last one wins.
DUPLICATE_VERSION = b'{"cniVersion": "1.0.0", "name": "n", "cniVersion": "0.2.0"}'
