"""A closed HBONE connection is freed when it closes, by reference counting, on both
sides: its TLS stream, SSL object and buffers do not wait for the cyclic garbage
collector, which in a long-lived agent runs a full collection only every few minutes
(bench/memory.py (d) grew by the garbage held meanwhile). Real TLS over loopback."""
from __future__ import annotations

import asyncio
import gc
import socket
from pathlib import Path

from ambit.agent.identity.ca import LocalCA
from ambit.agent.identity.spiffe import SpiffeId
from ambit.agent.identity.store import CertificateStore
from ambit.agent.proxy.hbone.protocol import HboneClientProtocol, HboneServerProtocol
from ambit.agent.proxy.hbone.settings import HboneSettings
from ambit.agent.proxy.tls_stream import TlsStream
from tests.support.hbone_lab import loopback_hbone

TD = "cluster.local"
CLIENT, SERVER = SpiffeId(TD, "shop", "cart"), SpiffeId(TD, "shop", "payments")
CLIENT_IP, SERVER_IP = "127.0.0.1", "127.0.0.3"
DEADLINE_S = 10.0
TUNNELS = 6
KINDS = (HboneClientProtocol, HboneServerProtocol, TlsStream)


def _instances() -> dict[str, int]:
    """Instances of KINDS the collector tracks, reachable or not (garbage not yet collected)."""
    found = {kind.__name__: 0 for kind in KINDS}
    for obj in gc.get_objects():
        if type(obj) in KINDS:
            found[type(obj).__name__] += 1
    return found


async def _scenario(store: CertificateStore) -> dict[str, int]:
    loop = asyncio.get_running_loop()
    settings = HboneSettings(pool_max_streams_per_connection=1)  # every tunnel retires its connection

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read(100))
        await writer.drain()
        writer.close()

    async with loopback_hbone(store, (CLIENT, CLIENT_IP), (SERVER, SERVER_IP), echo, settings) as hbone:
        pool, inbound = hbone.pool, hbone.inbound
        for _ in range(TUNNELS):
            pod, agent_side = socket.socketpair()
            with pod:
                pod.setblocking(False)
                tunnel = await pool.open_tunnel(hbone.key, hbone.authority, agent_side)
                await loop.sock_sendall(pod, b"x" * 100)
                pod.shutdown(socket.SHUT_WR)
                while await loop.sock_recv(pod, 1024):
                    pass
            await asyncio.wait_for(tunnel.done, DEADLINE_S)
            del tunnel  # the test's own reference to the last connection
        async with asyncio.timeout(DEADLINE_S):  # observed: both sides report no open connection
            while pool.stats().connections or inbound.connections:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0)  # the streams' connection_lost callbacks have run
        return _instances()


def test_closed_hbone_connections_are_freed_without_the_cyclic_collector(tmp_path: Path) -> None:
    store = CertificateStore(LocalCA.create(TD), tmp_path / "certs")
    gc.collect()
    before = _instances()
    gc.disable()
    try:
        after = asyncio.run(_scenario(store))
    finally:
        gc.enable()
    assert after == before, f"closed connections still held until a collection: {before} -> {after}"
