"""The CONNECT header block, encoded as hpack's Encoder encodes it, with the part that repeats kept.

A client connection sends one CONNECT per tunnel: `:method CONNECT`, `:authority <ip:port>`
and a few never-indexed extra headers (`forwarded` names the pod's address and port, so
it differs on every tunnel). Through h2's send_headers that is a header list made
into bytes, its HeaderTuples rebuilt, and each field searched in the HPACK tables and
encoded, ~50 Python calls per tunnel. Here:

- the two pseudo-headers' bytes are kept per authority once encoding them changed
  nothing in the dynamic table (both fields indexed: two bytes, the second CONNECT
  to a destination on); any change to the table (an insertion, a size change)
  drops what was kept, as the indices it names may have moved;
- an extra header whose name is neither in the static table nor a pseudo-header
  (only the pseudo-headers are ever added to this encoder's dynamic table: the
  extras are never indexed) is a literal never-indexed field with a literal name,
  which is what hpack's `add` makes of it; its name part is kept per name.

Every other case is hpack's own code, so the bytes are always the ones h2 would send
through the same encoder (tests/unit/test_connect_block.py compares them, and decodes
them, block after block). The encoder must be this one's alone: the client's CONNECTs
are the only header blocks a client connection encodes.
"""
from __future__ import annotations

from collections.abc import Iterable

import hpack
from hpack.hpack import encode_integer
from hpack.table import HeaderTable

_METHOD = (b":method", b"CONNECT")
_INDEX_NEVER = 0x10  # literal header field never indexed, new name (RFC 7541 §6.2.3)
_MAX_KEPT = 64  # authorities (and extra header names) kept; emptied when full


def _length(size: int) -> bytes:
    """An HPACK string length, 7-bit prefix, no Huffman."""
    return bytes((size,)) if size < 127 else bytes(encode_integer(size, 7))


class ConnectBlockEncoder:
    """Header blocks of CONNECT requests, encoded with (and into) `encoder`'s tables."""

    __slots__ = ("_encoder", "_table", "_prefixes", "_newest", "_names")

    def __init__(self, encoder: hpack.Encoder) -> None:
        self._encoder = encoder
        self._table = encoder.header_table
        # authority (bytes) -> the indexed fields of :method and :authority,
        # valid while the dynamic table's newest entry is still `_newest`.
        self._prefixes: dict[bytes, bytes] = {}
        self._newest: tuple[bytes, bytes] | None = None
        # extra header name -> its literal-field head, or None: hpack's own `add` encodes it.
        self._names: dict[str, bytes | None] = {}

    def encode(self, authority: bytes, extra_headers: Iterable[tuple[str, str]] = ()) -> bytes:
        """The block for CONNECT `authority` with `extra_headers` (vetted, lower-case
        names, never indexed): what hpack's `encode` returns for
        [(":method", "CONNECT"), (":authority", authority), *NeverIndexedHeaderTuple(extras)]
        with huffman=False."""
        table = self._table
        entries = table.dynamic_entries
        resized = table.resized
        if resized or (entries[0] if entries else None) is not self._newest:
            self._prefixes.clear()  # indices named by what was kept may have moved
            self._newest = entries[0] if entries else None
        block = self._prefixes.get(authority)
        if block is None:
            block = self._encoder.encode((_METHOD, (b":authority", authority)), huffman=False)
            newest = entries[0] if entries else None
            if resized or newest is not self._newest:
                self._prefixes.clear()  # the table changed: what was kept may name moved indices
                self._newest = newest
            else:
                if len(self._prefixes) >= _MAX_KEPT:
                    self._prefixes.clear()
                self._prefixes[authority] = block
        parts = [block]
        for name, value in extra_headers:
            head = self._names.get(name, b"")
            if head == b"":
                head = self._literal_head(name)
            raw = value.encode()
            if head is None:
                parts.append(self._encoder.add((name.encode(), raw), True, False))
            else:
                parts.append(head)
                parts.append(_length(len(raw)))
                parts.append(raw)
        return b"".join(parts)

    def _literal_head(self, name: str) -> bytes | None:
        raw = name.encode()
        if raw.startswith(b":") or raw in HeaderTable.STATIC_TABLE_MAPPING:
            head = None  # an indexed name: hpack decides
        else:
            head = bytes((_INDEX_NEVER,)) + _length(len(raw)) + raw
        if len(self._names) >= _MAX_KEPT:
            self._names.clear()
        self._names[name] = head
        return head
