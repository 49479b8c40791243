"""The nfnetlink batch of element creates and deletes
(agent/datapath/nft_netlink.py): keys, data and comments spelled as the
kernel stores them, the batch's framing, the reading of acknowledgements,
and which command lists it takes from libnftables."""
from __future__ import annotations

import ipaddress
import socket
import struct

import pytest

from ambit.agent.datapath import nft_netlink as nl
from ambit.agent.datapath import nft_ruleset as rs

IP = ipaddress.IPv4Address("10.9.0.5")
VETH = "vethabcdef12"


def test_keys_are_spelled_as_the_kernel_stores_them():
    assert nl.encode_key("10.9.0.5", "ipv4_addr") == bytes([10, 9, 0, 5])
    assert nl.encode_key("fd00::5", "ipv6_addr") == ipaddress.IPv6Address("fd00::5").packed
    assert nl.encode_key(VETH, "ifname") == VETH.encode() + b"\0" * 4  # IFNAMSIZ, zero-filled
    pair = nl.encode_key({"concat": [VETH, "10.9.0.5"]}, ("ifname", "ipv4_addr"))
    assert pair == VETH.encode().ljust(16, b"\0") + bytes([10, 9, 0, 5])


@pytest.mark.parametrize("value, key_type", [
    ("x" * 16, "ifname"),  # no room for the terminating NUL
    ("", "ifname"),
    ("a\0b", "ifname"),
    (5, "ipv4_addr"),
    ("10.9.0.256", "ipv4_addr"),
    ("10.9.0.5", "ether_addr"),  # a type this module does not spell
    ({"concat": [VETH]}, ("ifname", "ipv4_addr")),
    ("10.9.0.5", ("ifname", "ipv4_addr")),
])
def test_a_key_it_cannot_spell_is_left_to_libnftables(value, key_type):
    with pytest.raises(ValueError):
        nl.encode_key(value, key_type)


def _release_commands() -> list[dict]:
    return (rs.map_remove([IP], VETH) + rs.set_remove("ip", rs.NODE_POD_SET, [IP], present=True)
            + rs.unbind(VETH, [IP], [ipaddress.IPv6Address("fd00::5")], present=True))


NODE_SETS = [(7, "pod_l3mac"), (7, "port_l3mac"), (socket.AF_INET, "pods"), (7, "pod_ports"), (7, "port_sources"),
             (7, "pod_addrs"), (socket.AF_INET, "pod_links"), (socket.AF_INET, "pod_sources"),
             (socket.AF_INET6, "pod_links"), (socket.AF_INET6, "pods6")]
ENTRY = rs.PodEntry(IP, 42, VETH, "02:00:00:00:00:05", "br0")
OWNER = rs.Owner(42, VETH, "br0")


def _enrol_commands() -> list[dict]:
    return (rs.map_add([ENTRY], fresh=True) + rs.set_replace("ip", rs.NODE_POD_SET, [ENTRY], fresh=True)
            + rs.bind(OWNER, [IP], [ipaddress.IPv6Address("fd00::5")], fresh=True))


def test_every_delete_a_release_makes_is_encodable_with_the_rule_sets_types():
    # A set added to nft_ruleset with a type nl cannot spell shows up here,
    # not as a release that quietly always takes the slow path.
    deletes = nl.element_changes(_release_commands(), rs.element_types())
    assert [(family, name) for _, family, _, name, _ in deletes] == NODE_SETS
    assert {kind for kind, *_ in deletes} == {nl.NFT_MSG_DELSETELEM}
    assert all(data is None and comment is None for *_, elements in deletes for _, data, comment in elements)
    proxy = nl.element_changes(rs.set_remove("ip", rs.PROXY_POD_SET, [IP], present=True), rs.element_types())
    assert proxy == [(nl.NFT_MSG_DELSETELEM, socket.AF_INET, rs.TABLE, rs.PROXY_POD_SET, [(IP.packed, None, None)])]


def test_every_create_an_enrol_makes_is_encodable_with_its_data_and_comment():
    creates = nl.element_changes(_enrol_commands(), rs.element_types())
    assert [(family, name) for _, family, _, name, _ in creates] == NODE_SETS
    assert {kind for kind, *_ in creates} == {nl.NFT_MSG_NEWSETELEM}
    mac = bytes([2, 0, 0, 0, 0, 5])
    assert [data for *_, ((_, data, _),) in creates] == [mac, mac] + [None] * 8
    assert {comment for *_, ((_, _, comment),) in creates} == {OWNER.comment}
    proxy = nl.element_changes(rs.set_replace("ip", rs.PROXY_POD_SET, [ENTRY], fresh=True), rs.element_types())
    assert proxy == [(nl.NFT_MSG_NEWSETELEM, socket.AF_INET, rs.TABLE, rs.PROXY_POD_SET,
                      [(IP.packed, None, OWNER.comment)])]


@pytest.mark.parametrize("commands", [
    rs.set_remove("ip", rs.NODE_POD_SET, [IP]),  # add-then-delete: not only creates and deletes
    rs.set_replace("ip", rs.NODE_POD_SET, [ENTRY]),  # add, delete, add
    rs.map_add([ENTRY]),  # add (replaces the same data): not a create
    [{"create": {"element": {"family": "bridge", "table": rs.TABLE, "name": rs.BRIDGE_POD_MAP,
                             "elem": ["10.9.0.5"]}}}],  # a map element without its data
    [{"create": {"element": {"family": "bridge", "table": rs.TABLE, "name": rs.BRIDGE_POD_MAP,
                             "elem": [["10.9.0.5", "02:00:00:00:05"]]}}}],  # not a MAC
    [{"create": {"element": {"family": "ip", "table": rs.TABLE, "name": rs.NODE_POD_SET,
                             "elem": [{"elem": {"val": "10.9.0.5", "comment": "x" * 128}}]}}}],  # too long
    [{"create": {"element": {"family": "ip", "table": rs.TABLE, "name": rs.NODE_POD_SET,
                             "elem": [{"elem": {"val": "10.9.0.5", "timeout": 5}}]}}}],
    [{"delete": {"element": {"family": "ip", "table": rs.TABLE, "name": "no_such_set", "elem": ["10.9.0.5"]}}}],
    [{"delete": {"element": {"family": "ip", "table": rs.TABLE, "name": rs.NODE_POD_SET, "elem": []}}}],
    [{"delete": {"set": {"family": "ip", "table": rs.TABLE, "name": rs.NODE_POD_SET}}}],
    [{"delete": {"element": {"family": "netdev", "table": rs.TABLE, "name": rs.NODE_POD_SET, "elem": ["1.2.3.4"]}}}],
])
def test_anything_but_creates_and_deletes_of_known_sets_stays_with_libnftables(commands):
    with pytest.raises(nl.Unencodable):
        nl.element_changes(commands, rs.element_types())


def _messages(data: bytes) -> list[tuple[int, int, int, int, bytes]]:
    """(type, flags, seq, family, attributes) of each netlink message."""
    out, offset = [], 0
    while offset < len(data):
        size, kind, flags, seq, _ = struct.unpack_from("=IHHII", data, offset)
        family, version, res_id = struct.unpack_from("!BBH", data, offset + 16)
        assert version == 0
        out.append((kind, flags, seq, family, data[offset + 20:offset + size]))
        offset += (size + 3) & ~3
    assert offset == len(data)
    return out


def _attrs(data: bytes) -> list[tuple[int, bytes]]:
    out, offset = [], 0
    while offset < len(data):
        size, kind = struct.unpack_from("=HH", data, offset)
        out.append((kind, data[offset + 4:offset + size]))
        offset += (size + 3) & ~3
    return out


def test_the_batch_is_begin_one_acknowledged_change_per_set_end():
    mac = bytes([2, 0, 0, 0, 0, 5])
    changes = [(nl.NFT_MSG_DELSETELEM, socket.AF_INET, "ambit", "pods",
                [(IP.packed, None, None), (bytes([10, 9, 0, 6]), None, None)]),
               (nl.NFT_MSG_NEWSETELEM, 7, "ambit", "pod_l3mac", [(IP.packed, mac, "veth=a ifindex=3")])]
    messages = _messages(nl.encode_batch(changes, 40))
    ack = nl.NLM_F_REQUEST | nl.NLM_F_ACK
    assert [(kind, flags, seq) for kind, flags, seq, _, _ in messages] == [
        (nl.NFNL_MSG_BATCH_BEGIN, nl.NLM_F_REQUEST, 40),
        ((10 << 8) | 14, ack, 41),
        ((10 << 8) | 12, ack | nl.NLM_F_CREATE | nl.NLM_F_EXCL, 42),  # create: EEXIST if one is there
        (nl.NFNL_MSG_BATCH_END, nl.NLM_F_REQUEST, 43)]
    assert [family for _, _, _, family, _ in messages] == [socket.AF_UNSPEC, socket.AF_INET, 7, socket.AF_UNSPEC]
    for (_, _, _, _, attrs), (_, _, table, name, elements) in zip(messages[1:3], changes):
        (t1, v1), (t2, v2), (t3, v3) = _attrs(attrs)
        assert (t1, v1, t2, v2) == (1, table.encode() + b"\0", 2, name.encode() + b"\0")
        assert t3 == 3 | nl.NLA_F_NESTED
        found = []
        for kind, element in _attrs(v3):
            assert kind == 1 | nl.NLA_F_NESTED
            parts = dict(_attrs(element))
            ((value_kind, key),) = _attrs(parts.pop(1 | nl.NLA_F_NESTED))
            assert value_kind == 1
            data = None
            if 2 | nl.NLA_F_NESTED in parts:
                ((_, data),) = _attrs(parts.pop(2 | nl.NLA_F_NESTED))
            comment = None
            if 6 in parts:  # userdata: TLV type 0 (comment), length, text with its NUL
                udata = parts.pop(6)
                assert udata[0] == 0 and udata[1] == len(udata) - 2 and udata.endswith(b"\0")
                comment = udata[2:-1].decode()
            assert not parts
            found.append((key, data, comment))
        assert found == elements


def _ack(seq: int, code: int = 0) -> bytes:
    return struct.pack("=IHHII", 36, nl.NLMSG_ERROR, 0, seq, 0) + struct.pack("=i", code) + b"\0" * 16


def test_acknowledgements_clear_what_is_pending_and_the_first_error_is_kept():
    pending = {41, 42, 43}
    assert nl.read_answers(_ack(41) + _ack(42, -2) + _ack(43, -17), pending, 40) == 2  # ENOENT, then EEXIST
    assert not pending
    pending = {41, 42}
    assert nl.read_answers(_ack(41), pending, 40) == 0
    assert pending == {42}


def test_an_error_answering_the_batch_itself_ends_the_wait():
    pending = {41, 42}
    assert nl.read_answers(_ack(40, -1), pending, 40) == 1  # EPERM
    assert not pending


def test_a_malformed_answer_is_an_error_not_a_loop():
    with pytest.raises(ValueError):
        nl.read_answers(struct.pack("=IHHII", 4, nl.NLMSG_ERROR, 0, 41, 0), {41}, 40)
