"""An in-memory wire between sans-I/O HBONE endpoints (or a raw h2 peer), for tests of the core.

`hbone_link()` connects a client and a server core and settles their
SETTINGS; `Link.pump()` moves bytes until both are quiet; `open_tunnel()` and
`transfer()` drive a CONNECT and a flow-controlled transfer; `raw_h2()` is a
plain h2 peer with h2's defaults, like Envoy.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection

from ambit.agent.proxy.hbone.client import HboneClientConnection
from ambit.agent.proxy.hbone.events import DataReceived, TunnelAccepted, TunnelRequested, WindowOpened
from ambit.agent.proxy.hbone.server import HboneServerConnection
from ambit.agent.proxy.hbone.settings import HboneSettings, KiB

DEST = "10.1.2.3:8080"


@dataclass
class Link:
    """An in-memory wire between two endpoints that speak bytes like h2 (ours or raw h2)."""

    client: Any
    server: Any
    client_events: list[Any] = field(default_factory=list)
    server_events: list[Any] = field(default_factory=list)

    def pump(self) -> None:
        for _ in range(100_000):
            to_server = self.client.data_to_send()
            to_client = self.server.data_to_send()
            for side in (self.client, self.server):  # the wire took everything: tell our cores
                if isinstance(side, (HboneClientConnection, HboneServerConnection)):
                    side.control_replies_written(side.queued_control_replies)
            if not to_server and not to_client:
                return
            if to_server:
                self.server_events += self.server.receive_data(to_server)
            if to_client:
                self.client_events += self.client.receive_data(to_client)
        raise AssertionError("link never went quiet")

    def take_client(self) -> list[Any]:
        events, self.client_events = self.client_events, []
        return events

    def take_server(self) -> list[Any]:
        events, self.server_events = self.server_events, []
        return events


def of_type(events: list[Any], kind: type) -> list[Any]:
    return [e for e in events if isinstance(e, kind)]


def hbone_link(
    client_settings: HboneSettings | None = None,
    server_settings: HboneSettings | None = None,
    server_clock: Callable[[], float] | None = None,
) -> Link:
    client = HboneClientConnection(client_settings)
    server = HboneServerConnection(server_settings, **({"clock": server_clock} if server_clock else {}))
    client.initiate_connection()
    server.initiate_connection()
    link = Link(client, server)
    link.pump()
    link.take_client()
    link.take_server()
    return link


def open_tunnel(link: Link, authority: str = DEST) -> int:
    stream_id = link.client.open_stream(authority)
    link.pump()
    requests = of_type(link.take_server(), TunnelRequested)
    assert [r.stream_id for r in requests] == [stream_id]
    assert link.server.accept(stream_id)
    link.pump()
    assert of_type(link.take_client(), TunnelAccepted) == [TunnelAccepted(stream_id)]
    return stream_id


@dataclass
class TransferStats:
    received: bytes
    short_sends: int
    windows_opened: int


def transfer(link: Link, stream_id: int, payload: bytes, *, client_to_server: bool) -> TransferStats:
    """Move payload as fast as windows allow; the receiver acknowledges as it consumes."""
    sender = link.client if client_to_server else link.server
    receiver = link.server if client_to_server else link.client
    take_sender = link.take_client if client_to_server else link.take_server
    take_receiver = link.take_server if client_to_server else link.take_client
    view = memoryview(payload)
    sent, short_sends, windows_opened = 0, 0, 0
    received = bytearray()
    blocked = False
    for _ in range(10_000):
        if not blocked:
            while sent < len(payload):
                offered = view[sent : sent + 256 * KiB]
                taken = sender.send_data(stream_id, offered)
                sent += taken
                if taken < len(offered):
                    short_sends += 1
                    blocked = True
                    break
        link.pump()
        for event in take_receiver():
            if isinstance(event, DataReceived) and event.stream_id == stream_id:
                received += event.data
                receiver.acknowledge(stream_id, event.flow_controlled_length)
        link.pump()
        opened = of_type(take_sender(), WindowOpened)
        windows_opened += len(opened)
        if opened:
            blocked = False
        if len(received) >= len(payload):
            break
    return TransferStats(bytes(received), short_sends, windows_opened)


def raw_h2(client_side: bool, **config: Any) -> h2.connection.H2Connection:
    """A plain h2 peer with h2's defaults (16 KiB frames, 64 KiB windows), like Envoy."""
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=client_side, **config))
    connection.initiate_connection()
    return connection


def raw_client_link(**config: Any) -> Link:
    server = HboneServerConnection()
    server.initiate_connection()
    link = Link(raw_h2(True, **config), server)
    link.pump()
    link.take_client()
    link.take_server()
    return link


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now
