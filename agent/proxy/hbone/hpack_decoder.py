"""HPACK decoding of the header blocks HBONE peers send, without hpack's per-field calls.

A CONNECT from ambit's client (and Envoy's) after the first on a connection
is a few indexed fields (:method, :authority, from the dynamic table) and
one literal that is never indexed (`forwarded`, it names the client's port);
the 200 is one indexed field. hpack decodes each field through ~6 Python
calls (integer decoding, table lookup, tuple classes, UTF-8 check, logging):
~30 us per CONNECT. `PlainBlockDecoder.decode(data, raw=True)` (what h2
calls) reads such blocks in one loop and returns what hpack would: the same
HeaderTuple / NeverIndexedHeaderTuple of bytes, in order.

It takes only representations that leave the dynamic table as it is:
indexed fields and literals without indexing or never indexed, with every
integer inside its prefix (index < 15 or 127, string length < 127) and no
Huffman coding. Anything else (a literal with incremental indexing, a table
size update, Huffman strings, long integers, an index out of range, a
truncated block, a header list over the limit, a table larger than allowed)
goes to hpack's own `decode` from the start, which raises its own errors, so
state and errors are hpack's whenever the fast loop is not sure.
tests/unit/test_hpack_decoder.py checks both against each other.
"""
from __future__ import annotations

from collections.abc import Iterable

from hpack import Decoder
from hpack.struct import HeaderTuple, NeverIndexedHeaderTuple
from hpack.table import HeaderTable

_STATIC = HeaderTable.STATIC_TABLE
_STATIC_LENGTH = HeaderTable.STATIC_TABLE_LENGTH
_ENTRY_OVERHEAD = 32  # RFC 7541 §4.1


class PlainBlockDecoder(Decoder):
    """hpack's Decoder with a fast path for blocks that do not touch the table (see the module doc)."""

    def decode(self, data: bytes, raw: bool = False) -> Iterable[HeaderTuple]:  # type: ignore[override]
        if raw:
            headers = self._decode_plain(data if type(data) is bytes else bytes(data))
            if headers is not None:
                return headers
        return super().decode(data, raw)

    def _decode_plain(self, data: bytes) -> list[HeaderTuple] | None:
        """The block's headers, or None if any part needs hpack itself."""
        if self.header_table.maxsize > self.max_allowed_table_size:
            return None  # hpack raises InvalidTableSizeError
        dynamic = self.header_table.dynamic_entries
        dynamic_length = len(dynamic)
        limit = self.max_header_list_size
        headers: list[HeaderTuple] = []
        size = 0
        pos = 0
        end = len(data)
        while pos < end:
            first = data[pos]
            pos += 1
            if first & 0x80:  # indexed field
                index = first & 0x7F
                if index == 0x7F or index == 0:
                    return None
                if index <= _STATIC_LENGTH:
                    name, value = _STATIC[index - 1]
                elif index - _STATIC_LENGTH <= dynamic_length:
                    name, value = dynamic[index - _STATIC_LENGTH - 1]
                else:
                    return None
                header = HeaderTuple(name, value)
            elif first & 0xE0 == 0:  # literal without indexing (0000) or never indexed (0001)
                index = first & 0x0F
                if index == 0x0F:
                    return None
                if index:
                    if index <= _STATIC_LENGTH:
                        name = _STATIC[index - 1][0]
                    elif index - _STATIC_LENGTH <= dynamic_length:
                        name = dynamic[index - _STATIC_LENGTH - 1][0]
                    else:
                        return None
                else:
                    if pos >= end:
                        return None
                    length = data[pos]
                    if length >= 0x7F:  # Huffman-coded (high bit) or a longer integer
                        return None
                    pos += 1
                    name = data[pos : pos + length]
                    if len(name) != length:
                        return None
                    pos += length
                if pos >= end:
                    return None
                length = data[pos]
                if length >= 0x7F:
                    return None
                pos += 1
                value = data[pos : pos + length]
                if len(value) != length:
                    return None
                pos += length
                header = NeverIndexedHeaderTuple(name, value) if first & 0x10 else HeaderTuple(name, value)
            else:  # literal with incremental indexing, or a table size update: they change the table
                return None
            size += len(name) + len(value) + _ENTRY_OVERHEAD
            if size > limit:
                return None
            headers.append(header)
        return headers
