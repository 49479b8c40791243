"""A pod's set elements, created or deleted, as one nfnetlink batch,
without libnftables.

Why: before every transaction libnftables refreshes its cache, a dump of
the namespace's tables, every chain of every table, every set, flowtable
and named counter, because the previous transaction changed the
ruleset's generation. A pod's enrol and release are nothing but creates
and deletes of known keys in known sets, and that refresh was most of
their cost (nftables backend, node release transaction: ~90 us as a batch
against 300-500 us through libnftables, measured with the node's own rule
set and 10 pods). It also grows with whatever else the node keeps in
nftables (iptables-nft, kube-proxy), which a batch never reads.

What: the kernel's own transaction, one `sendmsg`: BATCH_BEGIN, one
NFT_MSG_NEWSETELEM (create: NLM_F_CREATE|NLM_F_EXCL) or DELSETELEM per
set, each acknowledged, BATCH_END. All of it applies or none does, as with
libnftables: one key already there aborts a create with EEXIST, one
absent key a delete with ENOENT, and nothing is changed. An element is
written as libnftables writes it (key, the map's data, the comment as
userdata: a NFTNL_UDATA_SET_ELEM_COMMENT TLV), so libnftables lists it
alike (tests/kernel/test_nft_datapath.py compares). Anything else (`add`,
the replace forms, rules, listings), and any element this module cannot
spell, stays with libnftables (agent/datapath/nft_session.py decides).
pyroute2 0.9.7 has the message classes but its batch sends without
reading the acknowledgements and sets one address family per socket, so
it cannot say whether a change applied; hence this thin layer
(linux/netfilter/nf_tables.h, nfnetlink.h, libnftnl's udata.h).
"""
from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Mapping
from typing import Any

NETLINK_NETFILTER = 12
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 0x2
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWSETELEM = 12
NFT_MSG_DELSETELEM = 14
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLA_F_NESTED = 0x8000
NFTA_SET_ELEM_LIST_TABLE = 1
NFTA_SET_ELEM_LIST_SET = 2
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY = 1
NFTA_SET_ELEM_DATA = 2
NFTA_SET_ELEM_USERDATA = 6
NFTA_DATA_VALUE = 1
NFTNL_UDATA_SET_ELEM_COMMENT = 0
IFNAMSIZ = 16
COMMENT_MAX = 128  # NFT_USERDATA_MAXLEN / 2, libnftables' limit for a comment

# nftables' table families as nfgenmsg spells them (NFPROTO_*).
FAMILIES = {"ip": socket.AF_INET, "ip6": socket.AF_INET6, "bridge": 7, "inet": 1}

_NLMSGHDR = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct("!BBH")  # family, version (NFNETLINK_V0), res_id (big-endian)
_NLA = struct.Struct("=HH")
_ERRNO = struct.Struct("=i")

# (family, set name) -> (key type, data type; None for a set): nft_ruleset.element_types().
ElementTypes = Mapping[tuple[str, str], "tuple[str | tuple[str, ...], str | None]"]
# (NFT_MSG_NEWSETELEM or _DELSETELEM, family, table, set, [(key, data, comment)])
Change = tuple[int, int, str, str, list[tuple[bytes, "bytes | None", "str | None"]]]


class Unencodable(ValueError):
    """A command or key this module does not handle: libnftables does."""


def encode_key(value: Any, key_type: str | tuple[str, ...]) -> bytes:
    """A set key as the kernel stores it. key_type: nftables' type name, or
    a tuple of them for a concatenation (each part padded to 4 bytes)."""
    if isinstance(key_type, tuple):
        if not (isinstance(value, dict) and isinstance(value.get("concat"), list)
                and len(value["concat"]) == len(key_type)):
            raise Unencodable(f"{value!r} is not a concatenation of {key_type}")
        parts = [encode_key(v, t) for v, t in zip(value["concat"], key_type)]
        return b"".join(p + b"\0" * (-len(p) % 4) for p in parts)
    if not isinstance(value, str):
        raise Unencodable(f"{value!r} is not a {key_type}")
    if key_type == "ipv4_addr":
        return ipaddress.IPv4Address(value).packed
    if key_type == "ipv6_addr":
        return ipaddress.IPv6Address(value).packed
    if key_type == "ifname":
        name = value.encode()
        if not name or len(name) >= IFNAMSIZ or b"\0" in name:
            raise Unencodable(f"{value!r} is not an interface name")
        return name.ljust(IFNAMSIZ, b"\0")
    raise Unencodable(f"key type {key_type!r}")


def encode_data(value: Any, data_type: str) -> bytes:
    """A map element's data (the only one ambit's maps hold: a MAC)."""
    if data_type == "ether_addr" and isinstance(value, str):
        octets = value.split(":")
        if len(octets) == 6 and all(len(o) == 2 for o in octets):
            try:
                return bytes(int(o, 16) for o in octets)
            except ValueError:
                pass
    raise Unencodable(f"{value!r} is not a {data_type}")


def _element(item: Any, key_type: Any, data_type: str | None, create: bool) -> tuple[bytes, bytes | None, str | None]:
    data = None
    if data_type is not None and create:
        if not (isinstance(item, list) and len(item) == 2):
            raise Unencodable(f"a map element needs key and data: {item!r}")
        item, data = item[0], encode_data(item[1], data_type)
    comment = None
    if isinstance(item, dict) and "elem" in item:
        body = item["elem"]
        if set(body) - {"val", "comment"}:
            raise Unencodable(f"element attributes {sorted(body)}")
        item, comment = body["val"], body.get("comment")
        if comment is not None and (not isinstance(comment, str) or len(comment.encode()) >= COMMENT_MAX
                                    or "\0" in comment or not create):
            raise Unencodable(f"comment {comment!r}")
    return encode_key(item, key_type), data, comment


def element_changes(commands: list[dict[str, Any]], types: ElementTypes) -> list[Change]:
    """One Change per command, when every command is a `create element` or
    a `delete element` on a set or map of known types; else Unencodable."""
    changes: list[Change] = []
    for command in commands:
        verb = next(iter(command)) if len(command) == 1 else None
        body = command[verb].get("element") if verb in ("create", "delete") else None
        if not isinstance(body, dict):
            raise Unencodable(f"not an element create or delete: {command!r}")
        family, table, name, items = body.get("family"), body.get("table"), body.get("name"), body.get("elem")
        known = types.get((family, name))
        if family not in FAMILIES or not isinstance(table, str) or known is None or not items:
            raise Unencodable(f"no element type known for {family} {table} {name}")
        create = verb == "create"
        changes.append((NFT_MSG_NEWSETELEM if create else NFT_MSG_DELSETELEM, FAMILIES[family], table, name,
                        [_element(item, known[0], known[1], create) for item in items]))
    return changes


def _nla(kind: int, payload: bytes) -> bytes:
    size = _NLA.size + len(payload)
    return _NLA.pack(size, kind) + payload + b"\0" * (-size % 4)


def _message(kind: int, flags: int, seq: int, family: int, res_id: int, attrs: bytes = b"") -> bytes:
    body = _NFGENMSG.pack(family, 0, res_id) + attrs
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, seq, 0) + body


def _element_attrs(key: bytes, data: bytes | None, comment: str | None) -> bytes:
    attrs = _nla(NFTA_SET_ELEM_KEY | NLA_F_NESTED, _nla(NFTA_DATA_VALUE, key))
    if data is not None:
        attrs += _nla(NFTA_SET_ELEM_DATA | NLA_F_NESTED, _nla(NFTA_DATA_VALUE, data))
    if comment is not None:
        text = comment.encode() + b"\0"
        attrs += _nla(NFTA_SET_ELEM_USERDATA, bytes([NFTNL_UDATA_SET_ELEM_COMMENT, len(text)]) + text)
    return attrs


def encode_batch(changes: list[Change], first_seq: int) -> bytes:
    """BATCH_BEGIN (first_seq), one acknowledged NEWSETELEM or DELSETELEM per
    change (first_seq + 1 ...), BATCH_END."""
    out = [_message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, first_seq, socket.AF_UNSPEC, NFNL_SUBSYS_NFTABLES)]
    for i, (kind, family, table, name, elements) in enumerate(changes):
        elems = b"".join(_nla(NFTA_LIST_ELEM | NLA_F_NESTED, _element_attrs(*element)) for element in elements)
        attrs = (_nla(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
                 + _nla(NFTA_SET_ELEM_LIST_SET, name.encode() + b"\0")
                 + _nla(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, elems))
        flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE | NLM_F_EXCL if kind == NFT_MSG_NEWSETELEM else 0)
        out.append(_message((NFNL_SUBSYS_NFTABLES << 8) | kind, flags, first_seq + 1 + i, family, 0, attrs))
    out.append(_message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, first_seq + 1 + len(changes), socket.AF_UNSPEC,
                        NFNL_SUBSYS_NFTABLES))
    return b"".join(out)


def read_answers(buffer: bytes, pending: set[int], batch_seq: int) -> int:
    """Take the acknowledgements in `buffer` off `pending`; returns the first
    error (a positive errno) or 0. An error answering the batch itself
    (batch_seq) ends the wait: the kernel refused all of it."""
    first_error = 0
    offset = 0
    while offset + _NLMSGHDR.size <= len(buffer):
        size, kind, _, seq, _ = _NLMSGHDR.unpack_from(buffer, offset)
        if size < _NLMSGHDR.size:
            raise ValueError(f"malformed netlink answer (length {size})")
        if kind == NLMSG_ERROR and offset + _NLMSGHDR.size + _ERRNO.size <= len(buffer):
            (code,) = _ERRNO.unpack_from(buffer, offset + _NLMSGHDR.size)
            if code and not first_error:
                first_error = -code
            if seq == batch_seq:
                pending.clear()
            pending.discard(seq)
        offset += (size + 3) & ~3
    return first_error


class ElementBatcher:
    """One NETLINK_NETFILTER socket, opened in the caller's namespace (make it
    where the sets are: nft_session does, on its namespace thread). Not
    thread-safe: the session's lock serialises it."""

    def __init__(self, timeout_s: float = 2.0) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
        self._sock.bind((0, 0))
        self._sock.settimeout(timeout_s)
        self._seq = 1

    def apply(self, changes: list[Change]) -> int:
        """Apply one batch; returns 0 or the kernel's errno (nothing applied
        then). OSError (a timeout included) means the answer is unknown."""
        first = self._seq
        self._seq += len(changes) + 2
        self._sock.send(encode_batch(changes, first))
        pending = set(range(first + 1, first + 1 + len(changes)))
        error = 0
        while pending:
            error = read_answers(self._sock.recv(65536), pending, first) or error
        return error

    def close(self) -> None:
        self._sock.close()
