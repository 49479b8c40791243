"""Set-element deletes as one nfnetlink batch, without libnftables.

Why: before every transaction libnftables refreshes its cache, a dump of
the namespace's tables, every chain of every table, every set, flowtable
and named counter, because the previous transaction changed the
ruleset's generation. A pod's release is nothing but deletes of known
keys from known sets, and that refresh was most of its cost (nftables
backend, node transaction: ~90 us as a batch against 300-500 us through
libnftables, measured with the node's own rule set and 10 pods). It also
grows with whatever else the node keeps in nftables (iptables-nft,
kube-proxy), which a batch never reads.

What: the kernel's own transaction, one `sendmsg`: BATCH_BEGIN, one
NFT_MSG_DELSETELEM per set (each acknowledged), BATCH_END. All of it
applies or none does, as with libnftables: one absent key aborts the
batch with ENOENT and nothing is deleted. Only deletes are done here
(a key is all a delete needs, no comment or data); everything else, and
any command whose key this module cannot encode, stays with libnftables
(agent/datapath/nft_session.py decides). pyroute2 0.9.7 has the message
classes but its batch sends without reading the acknowledgements and
sets one address family per socket, so it cannot say whether a delete
applied; hence this thin layer (linux/netfilter/nf_tables.h, nfnetlink.h).
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
NFT_MSG_DELSETELEM = 14
NLA_F_NESTED = 0x8000
NFTA_SET_ELEM_LIST_TABLE = 1
NFTA_SET_ELEM_LIST_SET = 2
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY = 1
NFTA_DATA_VALUE = 1
IFNAMSIZ = 16

# nftables' table families as nfgenmsg spells them (NFPROTO_*).
FAMILIES = {"ip": socket.AF_INET, "ip6": socket.AF_INET6, "bridge": 7, "inet": 1}

_NLMSGHDR = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct("!BBH")  # family, version (NFNETLINK_V0), res_id (big-endian)
_NLA = struct.Struct("=HH")
_ERRNO = struct.Struct("=i")

KeyTypes = Mapping[tuple[str, str], "str | tuple[str, ...]"]


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


def element_deletes(commands: list[dict[str, Any]], key_types: KeyTypes) -> list[tuple[int, str, str, list[bytes]]]:
    """(family, table, set, keys) per command, when every command is a
    `delete element` on a set of known key type; else Unencodable."""
    deletes = []
    for command in commands:
        body = command.get("delete", {}).get("element") if len(command) == 1 else None
        if not isinstance(body, dict):
            raise Unencodable(f"not an element delete: {command!r}")
        family, table, name, elems = body.get("family"), body.get("table"), body.get("name"), body.get("elem")
        key_type = key_types.get((family, name))
        if family not in FAMILIES or not isinstance(table, str) or key_type is None or not elems:
            raise Unencodable(f"no key type known for {family} {table} {name}")
        deletes.append((FAMILIES[family], table, name, [encode_key(e, key_type) for e in elems]))
    return deletes


def _nla(kind: int, payload: bytes) -> bytes:
    size = _NLA.size + len(payload)
    return _NLA.pack(size, kind) + payload + b"\0" * (-size % 4)


def _message(kind: int, flags: int, seq: int, family: int, res_id: int, attrs: bytes = b"") -> bytes:
    body = _NFGENMSG.pack(family, 0, res_id) + attrs
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, seq, 0) + body


def encode_batch(deletes: list[tuple[int, str, str, list[bytes]]], first_seq: int) -> bytes:
    """BATCH_BEGIN (first_seq), one DELSETELEM per entry (first_seq + 1 ...,
    each with NLM_F_ACK), BATCH_END."""
    out = [_message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, first_seq, socket.AF_UNSPEC, NFNL_SUBSYS_NFTABLES)]
    for i, (family, table, name, keys) in enumerate(deletes):
        elems = b"".join(_nla(NFTA_LIST_ELEM | NLA_F_NESTED,
                              _nla(NFTA_SET_ELEM_KEY | NLA_F_NESTED, _nla(NFTA_DATA_VALUE, key))) for key in keys)
        attrs = (_nla(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0")
                 + _nla(NFTA_SET_ELEM_LIST_SET, name.encode() + b"\0")
                 + _nla(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED, elems))
        out.append(_message((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DELSETELEM, NLM_F_REQUEST | NLM_F_ACK,
                            first_seq + 1 + i, family, 0, attrs))
    out.append(_message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, first_seq + 1 + len(deletes), socket.AF_UNSPEC,
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


class ElementDeleter:
    """One NETLINK_NETFILTER socket, opened in the caller's namespace (make it
    where the sets are: nft_session does, on its namespace thread). Not
    thread-safe: the session's lock serialises it."""

    def __init__(self, timeout_s: float = 2.0) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
        self._sock.bind((0, 0))
        self._sock.settimeout(timeout_s)
        self._seq = 1

    def delete(self, deletes: list[tuple[int, str, str, list[bytes]]]) -> int:
        """Apply one batch; returns 0 or the kernel's errno (nothing applied
        then). OSError (a timeout included) means the answer is unknown."""
        first = self._seq
        self._seq += len(deletes) + 2
        self._sock.send(encode_batch(deletes, first))
        pending = set(range(first + 1, first + 1 + len(deletes)))
        error = 0
        while pending:
            error = read_answers(self._sock.recv(65536), pending, first) or error
        return error

    def close(self) -> None:
        self._sock.close()
