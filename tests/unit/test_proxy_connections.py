"""The live-connection registry behind `ambitctl connections`."""
from __future__ import annotations

import dataclasses

import pytest

from ambit.agent.proxy.connections import (
    ConnectionInfo,
    ConnectionRegistry,
    ConnectionState,
)
from ambit.agent.proxy.listeners import AcceptedConnection, ListenerKind, SocketAddress


def accepted(client_port: int, dst: str = "10.252.0.2:80",
             kind: ListenerKind = ListenerKind.OUTBOUND, at: float = 100.0) -> AcceptedConnection:
    ip, port = dst.split(":")
    return AcceptedConnection(SocketAddress("10.252.0.130", client_port),
                              SocketAddress(ip, int(port)), kind, at)


def test_new_connection_is_connecting_with_no_bytes() -> None:
    registry = ConnectionRegistry()
    tracked = registry.add(accepted(40000))
    assert registry.snapshot() == (ConnectionInfo(
        id=tracked.id,
        client=SocketAddress("10.252.0.130", 40000),
        original_dst=SocketAddress("10.252.0.2", 80),
        listener=ListenerKind.OUTBOUND,
        started_at=100.0,
        state=ConnectionState.CONNECTING,
        bytes_to_upstream=0,
        bytes_to_client=0,
    ),)


def test_snapshot_reflects_progress_but_does_not_change_with_it() -> None:
    registry = ConnectionRegistry()
    tracked = registry.add(accepted(40000))
    tracked.progress.state = ConnectionState.ESTABLISHED
    tracked.progress.bytes_to_upstream += 10
    tracked.progress.bytes_to_client += 2048
    before = registry.snapshot()
    tracked.progress.bytes_to_client += 1
    after = registry.snapshot()
    assert (before[0].state, before[0].bytes_to_upstream, before[0].bytes_to_client) == (
        ConnectionState.ESTABLISHED, 10, 2048)
    assert after[0].bytes_to_client == 2049
    with pytest.raises(dataclasses.FrozenInstanceError):
        before[0].bytes_to_client = 0  # type: ignore[misc]


def test_ids_are_unique_and_not_reused_after_removal() -> None:
    registry = ConnectionRegistry()
    first = registry.add(accepted(40000))
    second = registry.add(accepted(40001))
    registry.remove(first.id)
    third = registry.add(accepted(40002))
    assert len({first.id, second.id, third.id}) == 3
    assert [info.id for info in registry.snapshot()] == [second.id, third.id]


def test_remove_returns_the_final_state_once() -> None:
    registry = ConnectionRegistry()
    tracked = registry.add(accepted(40000, kind=ListenerKind.INBOUND_PLAINTEXT))
    tracked.progress.bytes_to_upstream = 5
    tracked.progress.state = ConnectionState.CLOSED
    final = registry.remove(tracked.id)
    assert final is not None
    assert (final.listener, final.state, final.bytes_to_upstream) == (
        ListenerKind.INBOUND_PLAINTEXT, ConnectionState.CLOSED, 5)
    assert registry.remove(tracked.id) is None
    assert len(registry) == 0
    assert registry.get(tracked.id) is None


def test_iterating_tolerates_removal_meanwhile() -> None:
    registry = ConnectionRegistry()
    for port in range(40000, 40005):
        registry.add(accepted(port))
    for tracked in registry:  # e.g. closing connections a new policy denies
        registry.remove(tracked.id)
    assert registry.snapshot() == ()


def test_socket_address_formats_ipv4_and_ipv6() -> None:
    assert str(SocketAddress("10.252.0.2", 80)) == "10.252.0.2:80"
    assert str(SocketAddress("fd00::2", 80)) == "[fd00::2]:80"
