"""The plugin's json stand-in (cni/jsonlite.py) against the stdlib json."""
from __future__ import annotations

import json
import math

import pytest

from ambit.cni import jsonlite

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
