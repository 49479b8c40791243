"""When the pool reuses an HBONE connection and when it retires one (pool.py's
rules): open tunnels are counted, not tunnels over a connection's life; the
tunnel that reaches the limit is a connection's last; a replaced certificate
retires the connections made with it. Real pool, inbound and TLS on loopback."""
from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from ambit.agent.identity.ca import LocalCA
from ambit.agent.identity.spiffe import SpiffeId
from ambit.agent.identity.store import CertificateStore
from ambit.agent.proxy.hbone.protocol import HboneClientProtocol, HboneServerProtocol
from ambit.agent.proxy.hbone.settings import HboneSettings
from ambit.agent.proxy.hbone.tunnel import Tunnel
from ambit.agent.proxy.inbound import HboneInbound
from ambit.agent.proxy.pool import HboneClientPool, PoolKey
from tests.support.hbone_lab import bound_socket, loopback_hbone
from tests.support.waiting import until

TD = "cluster.local"
CLIENT, SERVER = SpiffeId(TD, "shop", "cart"), SpiffeId(TD, "shop", "payments")
CLIENT_IP, SERVER_IP = "127.0.0.1", "127.0.0.5"
DEADLINE_S = 10.0


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(100):
        writer.write(data)
        await writer.drain()
    writer.close()


@dataclass
class Node:
    """A client pool and an inbound in front of an echo server."""

    store: CertificateStore
    pool: HboneClientPool
    inbound: HboneInbound
    key: PoolKey
    authority: str

    async def open(self) -> tuple[socket.socket, Tunnel]:
        """A tunnel held open: the pod's end of it and the tunnel."""
        pod, agent_side = socket.socketpair()
        pod.setblocking(False)
        tunnel = await self.pool.open_tunnel(self.key, self.authority, agent_side)
        return pod, tunnel

    async def finish(self, pod: socket.socket, tunnel: Tunnel) -> None:
        """connrate's connection: 100 B, half-close, the echo to EOF, close."""
        loop = asyncio.get_running_loop()
        with pod:
            await loop.sock_sendall(pod, b"x" * 100)
            pod.shutdown(socket.SHUT_WR)
            while await asyncio.wait_for(loop.sock_recv(pod, 1024), DEADLINE_S):
                pass
        await asyncio.wait_for(tunnel.done, DEADLINE_S)

    async def short_connection(self) -> HboneClientProtocol:
        pod, tunnel = await self.open()
        await self.finish(pod, tunnel)
        return tunnel.connection  # type: ignore[return-value]


def _run(tmp_path: Path, scenario: Callable[[Node], Awaitable[None]], settings: HboneSettings | None = None) -> None:
    async def body() -> None:
        store = CertificateStore(LocalCA.create(TD), tmp_path / "certs")
        async with loopback_hbone(store, (CLIENT, CLIENT_IP), (SERVER, SERVER_IP), _echo, settings) as hbone:
            node = Node(store, hbone.pool, hbone.inbound, hbone.key, hbone.authority)
            await asyncio.wait_for(scenario(node), 60)

    asyncio.run(body())


def _client_serial(server_side: HboneServerProtocol) -> int:
    """The serial of the certificate the client presented on this connection."""
    der = server_side._transport.get_extra_info("ssl_object").getpeercert(binary_form=True)  # type: ignore[union-attr]
    return x509.load_der_x509_certificate(der).serial_number


def test_connections_made_one_after_another_share_one_tls_connection_past_100(tmp_path: Path) -> None:
    async def scenario(node: Node) -> None:
        used = {await node.short_connection() for _ in range(150)}
        assert len(used) == 1
        assert node.inbound.stats.connections_accepted == 1  # one handshake for 150 connections
        (connection,) = used
        assert connection.can_open_stream and node.pool.connections(node.key) == (connection,)

    _run(tmp_path, scenario)


def test_the_tunnel_that_reaches_the_limit_is_its_connections_last(tmp_path: Path) -> None:
    async def scenario(node: Node) -> None:
        held = await asyncio.gather(*(node.open() for _ in range(3)))
        (first,) = {tunnel.connection for _, tunnel in held}
        assert not first.can_open_stream  # retired by the third tunnel open at once
        pod, tunnel = await node.open()
        second = tunnel.connection
        assert second is not first and node.inbound.stats.connections_accepted == 2
        await node.finish(pod, tunnel)
        await asyncio.gather(*(node.finish(pod, tunnel) for pod, tunnel in held))
        await until(lambda: node.pool.connections(node.key) == (second,), what="the retired connection closed")
        await until(lambda: node.inbound.connection_count == 1, what="the server's side of it closed")
        # It is never taken back: later tunnels, one after another, all go on the second.
        assert {await node.short_connection() for _ in range(5)} == {second}
        assert node.inbound.stats.connections_accepted == 2

    _run(tmp_path, scenario, HboneSettings(pool_max_streams_per_connection=3))


def test_a_replaced_certificate_retires_the_connections_made_with_it(tmp_path: Path) -> None:
    async def scenario(node: Node) -> None:
        pod, tunnel = await node.open()
        old = tunnel.connection
        (old_server_side,) = node.inbound.connections
        old_serial = node.store.current(CLIENT).serial  # type: ignore[union-attr]
        assert _client_serial(old_server_side) == old_serial
        renewed = await node.store.renew(CLIENT)
        assert renewed.serial != old_serial
        assert not old.can_open_stream  # retired on the store's notice; its tunnel carries on
        assert old.tunnel_count == 1
        newer = await node.short_connection()
        assert newer is not old
        (new_server_side,) = [c for c in node.inbound.connections if c is not old_server_side]
        assert _client_serial(new_server_side) == renewed.serial
        await node.finish(pod, tunnel)
        await until(lambda: node.pool.connections(node.key) == (newer,), what="the old connection closed")
        # With no tunnel open, a replacement closes the connection at once.
        await node.store.renew(CLIENT)
        await until(lambda: not node.pool.connections(node.key), what="the idle connection closed on rotation")
        assert await node.short_connection() not in (old, newer)

    _run(tmp_path, scenario)


def test_a_connection_dialled_across_a_replacement_takes_no_tunnel(tmp_path: Path) -> None:
    async def scenario(node: Node) -> None:
        asked, release = asyncio.Event(), asyncio.Event()

        async def held_socket(ip: str) -> socket.socket:
            asked.set()
            await release.wait()
            return bound_socket(ip)

        pool = HboneClientPool(node.store, held_socket)
        try:
            pod, agent_side = socket.socketpair()
            pod.setblocking(False)
            opening = asyncio.get_running_loop().create_task(pool.open_tunnel(node.key, node.authority, agent_side))
            await asyncio.wait_for(asked.wait(), DEADLINE_S)  # the dial holds the old certificate's context
            renewed = await node.store.renew(CLIENT)
            release.set()
            tunnel = await asyncio.wait_for(opening, DEADLINE_S)
            # The first connection was retired as it came up; the opener dialled again.
            assert node.inbound.stats.connections_accepted == 2
            await until(lambda: pool.connections(node.key) == (tunnel.connection,), what="the stale connection closed")
            await until(lambda: node.inbound.connection_count == 1, what="its server side closed")
            (server_side,) = node.inbound.connections
            assert _client_serial(server_side) == renewed.serial
            await node.finish(pod, tunnel)
        finally:
            await pool.aclose()

    _run(tmp_path, scenario)
