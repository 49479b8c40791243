"""An HBONE connection tells its TlsStream when several writes may come in one
loop round: always, except while it carries a single tunnel whose messages are
a conversation (one at a time). Then a write books no round's end
(tls_stream's module doc). Real pool, inbound and TLS on loopback."""
from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from ambit.agent.identity.ca import LocalCA
from ambit.agent.identity.spiffe import SpiffeId
from ambit.agent.identity.store import CertificateStore
from ambit.agent.proxy.hbone.protocol import HboneConnection
from ambit.agent.proxy.hbone.tunnel import Tunnel
from ambit.agent.proxy.inbound import HboneInbound
from ambit.agent.proxy.pool import HboneClientPool, PoolKey
from tests.support.hbone_lab import bound_socket

TD = "cluster.local"
CLIENT, SERVER = SpiffeId(TD, "shop", "cart"), SpiffeId(TD, "shop", "payments")
CLIENT_IP, SERVER_IP = "127.0.0.1", "127.0.0.4"
DEADLINE_S = 10.0


def _hints(conn: HboneConnection, inbound: HboneInbound) -> tuple[bool, bool]:
    """The burst hint the client's and the server's TLS stream hold."""
    (server,) = inbound.connections
    return conn._transport._may_burst, server._transport._may_burst  # type: ignore[union-attr]


async def _until(what: str, check, expected) -> None:  # type: ignore[no-untyped-def]
    try:
        async with asyncio.timeout(DEADLINE_S):
            while check() != expected:
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"{what}: {check()}, expected {expected}") from None


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers each message, until the client's FIN."""
    while data := await reader.read(100):
        writer.write(data)
        await writer.drain()
    writer.close()


async def _exchange(pod: socket.socket, message: bytes) -> None:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(pod, message)
    got = b""
    while len(got) < len(message):
        got += await asyncio.wait_for(loop.sock_recv(pod, 100), DEADLINE_S)


async def _finish(pod: socket.socket, tunnel: Tunnel) -> None:
    loop = asyncio.get_running_loop()
    pod.shutdown(socket.SHUT_WR)
    while await asyncio.wait_for(loop.sock_recv(pod, 100), DEADLINE_S):
        pass
    await asyncio.wait_for(tunnel.done, DEADLINE_S)


async def _scenario(store: CertificateStore) -> None:
    loop = asyncio.get_running_loop()
    upstream = await asyncio.start_server(_echo, SERVER_IP, 0)
    port = upstream.sockets[0].getsockname()[1]
    inbound = HboneInbound(store, identity_for_local_ip=lambda ip: SERVER, is_local_workload=lambda ip: True,
                           upstream_socket_factory=lambda ip: bound_socket(SERVER_IP))
    listener = socket.create_server((SERVER_IP, 0))
    serving = loop.create_task(inbound.serve_socket(listener))
    pool = HboneClientPool(store, bound_socket)
    key = PoolKey(CLIENT, CLIENT_IP, SERVER_IP, frozenset({SERVER}), listener.getsockname()[1])
    pods: list[socket.socket] = []

    async def open_tunnel() -> tuple[socket.socket, Tunnel]:
        pod, agent_side = socket.socketpair()
        pod.setblocking(False)
        pods.append(pod)
        return pod, await pool.open_tunnel(key, f"{SERVER_IP}:{port}", agent_side)

    try:
        pod1, first = await open_tunnel()
        conn = first.connection
        await _exchange(pod1, b"hello")
        assert _hints(conn, inbound) == (True, True), "a new tunnel's first messages may still be a short exchange"
        for _ in range(3):  # no FIN after the first short reads: a conversation on both sides
            await _exchange(pod1, b"ping")
        await _until("one tunnel in conversation (client, server)", lambda: _hints(conn, inbound), (False, False))

        pod2, second = await open_tunnel()
        assert second.connection is conn, "the pool opened a second connection"
        await _until("a second tunnel (client, server)", lambda: _hints(conn, inbound), (True, True))
        await _exchange(pod2, b"x" * 100)
        await _finish(pod2, second)
        await _until("the conversation alone again (client, server)", lambda: _hints(conn, inbound), (False, False))

        await _finish(pod1, first)
        pod3, third = await open_tunnel()
        assert third.connection is conn
        await _until("a new tunnel after the conversation (client, server)", lambda: _hints(conn, inbound), (True, True))
        await _finish(pod3, third)
    finally:
        for pod in pods:
            pod.close()
        await pool.aclose()
        serving.cancel()
        listener.close()
        upstream.close()


def test_a_connection_expects_bursts_unless_its_one_tunnel_is_a_conversation(tmp_path: Path) -> None:
    asyncio.run(_scenario(CertificateStore(LocalCA.create(TD), tmp_path / "certs")))
