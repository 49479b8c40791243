"""The plugin's json stand-in (cni/jsonlite.py) against the stdlib json."""
from __future__ import annotations

import json
import math
import os
import subprocess

import pytest

from ambit.cni import jsonlite
from tests.support.malformed_cni import MALFORMED_STDIN

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DOCUMENTS = [
    {},
    [],
    {"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "ambit-cni",
     "prevResult": {"interfaces": [{"name": "cni0", "mac": "0a:58:0a:f4:01:01"},
                                   {"name": "eth0", "sandbox": "/var/run/netns/cni-1234"}],
                    "ips": [{"address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 1}],
                    "routes": [{"dst": "0.0.0.0/0"}], "dns": {}}},
    {"unicode": "p\u00f6d \u2603 \U0001f600", "escapes": "tab\tquote\"back\\slash\nnl\x00\x1f",
     "numbers": [0, -1, 2 ** 70, 1.5, -0.0, 1e-7, 1e300], "flags": [True, False, None]},
    [[[]], [{}], [{"a": [1, {"b": None}]}]],
    "just a string",
    12345,
    None,
]


@pytest.mark.parametrize("document", DOCUMENTS)
def test_dumps_is_byte_for_byte_json_dumps(document) -> None:
    assert jsonlite.dumps(document) == json.dumps(document)


@pytest.mark.parametrize("document", DOCUMENTS)
def test_loads_reads_what_json_writes_both_compact_and_indented(document) -> None:
    for text in (json.dumps(document), json.dumps(document, indent=2, ensure_ascii=False),
                 json.dumps(document, separators=(",", ":"))):
        assert jsonlite.loads(text) == document
        assert jsonlite.loads(text.encode("utf-8")) == document
        assert jsonlite.loads(f" \n\t{text}\r\n ") == document


def test_non_finite_numbers_match_json() -> None:
    assert jsonlite.dumps([math.inf, -math.inf]) == json.dumps([math.inf, -math.inf])
    assert jsonlite.dumps(math.nan) == "NaN"
    assert math.isnan(jsonlite.loads("NaN")) and jsonlite.loads("[Infinity, -Infinity]") == [math.inf, -math.inf]


def test_non_string_keys_are_converted_as_json_does() -> None:
    document = {1: "a", 2.5: "b", True: "c", None: "d"}
    assert jsonlite.dumps(document) == json.dumps(document)


def test_tuples_serialise_as_lists() -> None:
    assert jsonlite.dumps({"t": (1, "x")}) == '{"t": [1, "x"]}'


@pytest.mark.parametrize("text", [
    "", "   ", "{", "[1, 2", '{"a" 1}', '{"a": 1,}', "[1,]", "{'a': 1}", '{"a": 1} x', '{"a": 1}{}',
    "tru", "01", '"unterminated', '"bad \\x escape"', '"raw\ncontrol"', "\ufeff{}", "[1 2]",
])
def test_malformed_documents_raise_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        json.loads(text)  # the reference agrees it is malformed
    with pytest.raises(ValueError):
        jsonlite.loads(text)


def test_invalid_utf8_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        jsonlite.loads(b'{"a": "\xff"}')


def test_unserialisable_values_are_type_errors() -> None:
    for value in ({"a": object()}, {"a": {1, 2}}, {(1, 2): "tuple key"}, b"bytes"):
        with pytest.raises(TypeError):
            jsonlite.dumps(value)


# What the plugin sees: `python3 -IS` with nothing imported but the plugin, so
# json.decoder (where the C scanner looks for its error class) is not loaded.
ISOLATED_PROBE = """
import sys
sys.path.insert(0, sys.argv[1])
from ambit.cni import jsonlite
for line in sys.stdin.buffer:
    try:
        jsonlite.loads(bytes.fromhex(line.decode()))
        print("accepted")
    except ValueError as exc:
        print(type(exc).__name__, exc)
"""


@pytest.fixture(scope="module")
def isolated_loads(tmp_path_factory):
    lib = tmp_path_factory.mktemp("cni-lib")
    (lib / "ambit").mkdir()
    (lib / "ambit" / "cni").symlink_to(os.path.join(REPO, "cni"))

    def run(documents: list[bytes]) -> list[str]:
        out = subprocess.run(["/usr/bin/python3", "-I", "-S", "-c", ISOLATED_PROBE, str(lib)],
                             input="".join(d.hex() + "\n" for d in documents), capture_output=True, text=True,
                             check=True, timeout=30)
        return out.stdout.splitlines()
    return run


def test_malformed_documents_say_what_and_where_without_json_imported(isolated_loads) -> None:
    decoding = {k: v for k, v in MALFORMED_STDIN.items() if not k.startswith("top-level")}
    answers = isolated_loads([stdin for stdin, _ in decoding.values()])
    for (case, (_, needle)), answer in zip(decoding.items(), answers):
        assert answer == f"DecodeError {needle}", case


def test_syntax_errors_are_worded_and_placed_as_json_does(isolated_loads) -> None:
    documents = ["{", '{"a" 1}', '{"a": 1,}', "[1,]", "{'a': 1}", '{"a": 1} x', "tru", "01", '"unterminated',
                 '"bad \\x escape"', '"raw\ncontrol"', "[1 2]", "\n\n  [1,\n nul]"]
    answers = isolated_loads([d.encode() for d in documents])
    for document, answer in zip(documents, answers):
        with pytest.raises(json.JSONDecodeError) as reference:
            json.loads(document)
        assert answer == f"DecodeError {reference.value}", document


def test_duplicate_keys_last_one_wins_as_in_json() -> None:
    assert jsonlite.loads('{"a": 1, "b": 2, "a": 3}') == json.loads('{"a": 1, "b": 2, "a": 3}') == {"a": 3, "b": 2}


def test_surrogate_pairs_and_escaped_backslashes_are_not_lone_surrogates() -> None:
    text = '{"pair": "\\ud83d\\ude00", "escaped": "\\\\ud800", "bmp": "\\u00e9"}'
    assert jsonlite.loads(text) == json.loads(text) == {"pair": "\U0001f600", "escaped": "\\ud800", "bmp": "\u00e9"}


@pytest.mark.parametrize("text, position", [('["\\ud800"]', 2), ('["\\udc00\\ud83d"]', 2), ('["ok", "x\\ud83d"]', 9),
                                            ('["\\ud83d\\u0041"]', 2)])
def test_lone_surrogate_escapes_are_refused_with_their_position(text: str, position: int) -> None:
    with pytest.raises(jsonlite.DecodeError) as info:
        jsonlite.loads(text)
    assert info.value.pos == position and "Lone surrogate" in str(info.value)


def test_nesting_is_bounded_exactly_and_brackets_in_strings_do_not_count() -> None:
    limit = jsonlite.MAX_NESTING
    assert jsonlite.loads("[" * limit + "]" * limit) == json.loads("[" * limit + "]" * limit)
    assert jsonlite.loads(json.dumps(["[{" * limit])) == ["[{" * limit]
    with pytest.raises(jsonlite.DecodeError) as info:
        jsonlite.loads("[" * (limit + 1) + "]" * (limit + 1))
    assert info.value.pos == limit
