"""The hand-over protocol's messages and the drain deadline: pure logic.
The hand-over itself runs between real agents in tests/kernel/test_lifecycle.py."""
from __future__ import annotations

from dataclasses import replace

import pytest

from ambit.agent.lifecycle.grace import drain_seconds_for_grace
from ambit.agent.lifecycle.messages import (
    ApiTaken,
    Draining,
    Frozen,
    HandoverProtocolError,
    Hello,
    NodeSettings,
    Ready,
    Refuse,
    Welcome,
    decode,
    encode,
    expect,
)

SETTINGS = NodeSettings(node="node1", socket="/var/run/ambit/agent.sock", state_dir="/var/run/ambit/state",
                        proxy_netns="ambit-proxy", bpffs_dir="/sys/fs/bpf/ambit", capture="ebpf", netns_inode=4026531840)


@pytest.mark.parametrize("message", [Hello(42, "0.2.0", SETTINGS), Welcome(7, "0.1.0"), Refuse("draining"),
                                     ApiTaken(), Frozen(("outbound", "hbone", "metrics")), Ready(), Draining(3)])
def test_every_message_survives_the_wire(message) -> None:
    assert decode(encode(message)) == message


@pytest.mark.parametrize("data", [b"", b"not json", b'{"type": "launch"}', b'{"type": "hello", "pid": 1}',
                                  b'{"type": "frozen", "sockets": 3}', b"[]", b"x" * 20000])
def test_anything_else_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(HandoverProtocolError):
        decode(data)


def test_a_message_out_of_turn_is_a_protocol_error() -> None:
    with pytest.raises(HandoverProtocolError, match="expected frozen, got ready"):
        expect(Ready(), Frozen)


def test_a_successor_must_serve_the_same_node_the_same_way() -> None:
    assert SETTINGS.mismatch(SETTINGS) is None
    assert "another network namespace" in SETTINGS.mismatch(replace(SETTINGS, netns_inode=1))
    assert SETTINGS.mismatch(replace(SETTINGS, state_dir="/tmp/state")) == \
        "the successor's state dir is '/tmp/state', this agent's is '/var/run/ambit/state'"
    assert "capture" in SETTINGS.mismatch(replace(SETTINGS, capture="nftables"))
    assert "proxy netns" in SETTINGS.mismatch(replace(SETTINGS, proxy_netns="other"))


@pytest.mark.parametrize("grace, drain", [(None, 25.0), (30, 25.0), (120, 115.0), (5, 1.0), (0, 1.0)])
def test_the_drain_ends_before_the_kubelet_kills(grace, drain) -> None:
    assert drain_seconds_for_grace(grace) == drain
