"""PlainBlockDecoder (agent/proxy/hbone/hpack_decoder.py) against hpack's own
Decoder, in lockstep on the same blocks: the same headers (types included),
the same errors, the same dynamic table after every block."""
from __future__ import annotations

import random

import hpack
import pytest
from hpack import Decoder, Encoder, NeverIndexedHeaderTuple

from ambit.agent.proxy.hbone.hpack_decoder import PlainBlockDecoder


def outcome(decoder: Decoder, block: bytes):
    try:
        headers = decoder.decode(block, raw=True)
    except Exception as exc:  # hpack's errors: the type is the outcome
        return ("error", type(exc))
    return ("ok", [(type(h), tuple(h)) for h in headers])


def table(decoder: Decoder):
    return list(decoder.header_table.dynamic_entries), decoder.header_table.maxsize


def lockstep(blocks: list[bytes], *, max_header_list_size: int = 65536, max_allowed_table_size: int | None = None):
    ours, theirs = PlainBlockDecoder(), Decoder()
    for decoder in (ours, theirs):
        decoder.max_header_list_size = max_header_list_size
        if max_allowed_table_size is not None:
            decoder.max_allowed_table_size = max_allowed_table_size
    results = []
    for block in blocks:
        got, want = outcome(ours, block), outcome(theirs, block)
        assert got == want, block
        assert table(ours) == table(theirs), block
        results.append(got)
    return results


def connect_blocks(huffman: bool) -> list[bytes]:
    encoder = Encoder()
    blocks = []
    for port in (40001, 40002, 40003):
        headers = [(":method", "CONNECT"), (":authority", "10.0.0.7:8080"),
                   NeverIndexedHeaderTuple("forwarded", f'for="10.0.1.9:{port}"')]
        blocks.append(encoder.encode(headers, huffman=huffman))
    blocks.append(encoder.encode([(":status", "200")], huffman=huffman))
    return blocks


@pytest.mark.parametrize("huffman", [False, True])
def test_connects_as_ambit_and_envoy_send_them(huffman):
    results = lockstep(connect_blocks(huffman))
    assert results[1][0] == "ok" and results[1][1][2] == (NeverIndexedHeaderTuple,
                                                             (b"forwarded", b'for="10.0.1.9:40002"'))


def test_the_fast_path_takes_the_repeated_connects():
    blocks = connect_blocks(huffman=False)
    decoder = PlainBlockDecoder()
    assert decoder._decode_plain(blocks[0]) is None  # the first adds to the table: hpack's
    decoder.decode(blocks[0], raw=True)
    assert decoder._decode_plain(blocks[1]) is not None
    assert decoder._decode_plain(blocks[3]) == [(b":status", b"200")]


def test_plain_literals_of_every_kind():
    literal_name = b"\x00\x03abc\x03xyz"  # without indexing, literal name
    never_name = b"\x10\x03abc\x03xyz"  # never indexed, literal name
    static_name = b"\x01\x05a.b:1"  # without indexing, name :authority (static 1)
    never_static = b"\x11\x05a.b:1"
    indexed = b"\x82\x84"  # :method GET, :path /
    empty = b""
    lockstep([literal_name, never_name, static_name, never_static, indexed, empty,
              literal_name + never_static + indexed])


def test_malformed_and_unusual_blocks_get_hpacks_errors():
    blocks = [
        b"\x80",  # index 0
        b"\xff\x80\x01",  # long index, beyond the table
        b"\xbe",  # index 62, empty dynamic table
        b"\x00\x03ab",  # truncated name
        b"\x00\x03abc\x05xy",  # truncated value
        b"\x00",  # literal, nothing after
        b"\x00\x03abc",  # no value
        b"\x0f\x30\x01a",  # name index in the long form
        b"\x00\x7f\x00" + b"a" * 127 + b"\x01b",  # long name length
        b"\x00\x83abc\x01x",  # Huffman name (invalid code)
        b"\x3f\xe1\x1f",  # table size update above the maximum
        b"\x20",  # table size update to 0
        b"\x82\x20",  # size update after a header
        b"\x40\x03abc\x03xyz\xbe",  # literal with indexing, then its index
        b"\xbe",  # after it: in the table now
    ]
    lockstep(blocks)


def test_the_header_list_limit_is_hpacks():
    block = b"\x00\x03abc\x03xyz" * 3  # 3 * (6 + 32) = 114
    assert lockstep([block], max_header_list_size=114)[0][0] == "ok"
    assert lockstep([block], max_header_list_size=113)[0] == ("error", hpack.OversizedHeaderListError)


def test_a_table_larger_than_allowed_is_hpacks_error():
    results = lockstep([b"\x82"], max_allowed_table_size=100)
    assert results[0] == ("error", hpack.InvalidTableSizeError)


def test_random_blocks_agree():
    rng = random.Random(19)
    encoder = Encoder()
    blocks = []
    for _ in range(400):
        kind = rng.random()
        if kind < 0.4:
            headers = [(":method", "CONNECT"), (":authority", f"10.0.0.{rng.randrange(4)}:80"),
                       NeverIndexedHeaderTuple("forwarded", f'for="x:{rng.randrange(9)}"')]
            blocks.append(encoder.encode(headers, huffman=rng.random() < 0.3))
        else:
            blocks.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 12))))
    lockstep(blocks)
