"""HBONE interop with real Envoy (1.40, BoringSSL), both directions, Envoy's default settings.

    (a) pod A -> Envoy tcp_proxy tunnel (HBONE client) ==mTLS/h2 CONNECT==> ambit HboneInbound -> pod B
    (b) pod A -> ambit pool (HBONE client) ==mTLS/h2 CONNECT==> Envoy HCM CONNECT terminator -> pod B

Envoy keeps 16 KiB frames and its own windows, so these paths carry many
more, smaller frames than ambit-to-ambit. Everything lives in one namespace of
ours (`hbt-*`, 10.253.0.0/16 on its loopback); Envoy is started from the
namespace thread so it inherits it, has no admin interface, and is killed in
a finalizer.
"""
from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ambit.agent.identity.spiffe import SpiffeId
from ambit.agent.proxy.hbone.outcomes import TunnelEnd, TunnelRefused
from ambit.agent.proxy.hbone.settings import KiB, MiB
from ambit.agent.proxy.inbound import HboneInbound
from ambit.agent.proxy.listeners import ListenerKind, TransparentListener
from ambit.agent.proxy.pool import HboneClientPool, PoolKey
from tests.support import envoy
from tests.support.waiting import until
from tests.support.hbone_lab import (
    CART,
    CLIENT_IP,
    PAYMENTS,
    SERVER_IP,
    TRUST_DOMAIN,
    Identities,
    bound_socket,
    digest,
    make_identities,
    namespace,
    read_exactly,
    read_to_eof,
    run_in_netns,
    send_all_then_eof,
    start_app_server,
    tcp_pair,
)

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(240)]

TD = TRUST_DOMAIN
ENVOY_ENTRY_PORT = 15001
ENVOY_HBONE_PORT = 15108
AMBIT_HBONE_PORT = 15008


@dataclass
class Lab:
    ns: str
    ids: Identities
    workdir: Path
    loop: str  # ambit's side runs on asyncio and on uvloop (the agent's default)

    def run(self, scenario: Callable[[], Awaitable[None]], timeout: float = 120) -> None:
        run_in_netns(self.ns, scenario, timeout, self.loop)


@pytest.fixture(params=["asyncio", "uvloop"])
def lab(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Lab]:
    try:
        envoy.envoy_binary()
    except FileNotFoundError:
        pytest.skip("envoy binary not installed")
    ids = make_identities(tmp_path / "pki")
    with namespace("hbt", (CLIENT_IP, SERVER_IP)) as ns:
        yield Lab(ns, ids, tmp_path, request.param)


async def exchange(pod: socket.socket, upstream: socket.socket, order: str) -> None:
    """8 MiB each way with both half-closes; `order` says which FIN goes first."""
    up, down = os.urandom(8 * MiB), os.urandom(8 * MiB)
    if order == "concurrent":
        _, got_up, _, got_down = await asyncio.gather(
            send_all_then_eof(pod, up), read_to_eof(upstream), send_all_then_eof(upstream, down), read_to_eof(pod)
        )
    elif order == "client-fin-first":
        _, got_up = await asyncio.gather(send_all_then_eof(pod, up), read_to_eof(upstream))
        # After the pod's FIN the other direction still carries data.
        _, got_down = await asyncio.gather(send_all_then_eof(upstream, down), read_to_eof(pod))
    else:
        _, got_down = await asyncio.gather(send_all_then_eof(upstream, down), read_to_eof(pod))
        _, got_up = await asyncio.gather(send_all_then_eof(pod, up), read_to_eof(upstream))
    assert digest(got_up) == digest(up)
    assert digest(got_down) == digest(down)


ORDERS = ["concurrent", "client-fin-first", "server-fin-first"]


@pytest.mark.parametrize("order", ORDERS)
def test_envoy_tcp_proxy_tunnel_into_ambit_inbound(lab: Lab, order: str) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        seen: list[tuple[SpiffeId, str, str, int]] = []

        def authorize(peer: SpiffeId, client_ip: str, dst_ip: str, dst_port: int) -> tuple[bool, str]:
            seen.append((peer, client_ip, dst_ip, dst_port))
            return True, "allowed"

        inbound = HboneInbound(
            lab.ids.store,
            identity_for_local_ip={SERVER_IP: PAYMENTS}.get,
            is_local_workload=lambda ip: ip == SERVER_IP,
            upstream_socket_factory=bound_socket,
            authorize=authorize,
        )
        listener = TransparentListener(ListenerKind.HBONE, inbound.handle, address=SERVER_IP, port=AMBIT_HBONE_PORT)
        await listener.start()
        app = await start_app_server(SERVER_IP)
        config = envoy.client_config(
            lab.ids.pem_files(CART),
            str(PAYMENTS),
            hbone=(SERVER_IP, AMBIT_HBONE_PORT),
            entries={(CLIENT_IP, ENVOY_ENTRY_PORT): f"{SERVER_IP}:{app.port}"},
            source_ip=CLIENT_IP,
        )
        proxy = envoy.EnvoyProcess(config, lab.workdir, "envoy-client")
        try:
            proxy.wait_listening(CLIENT_IP, ENVOY_ENTRY_PORT)
            pod = bound_socket(CLIENT_IP)
            await loop.sock_connect(pod, (CLIENT_IP, ENVOY_ENTRY_PORT))
            upstream, peer = await app.next(timeout=15)
            # Envoy connected from pod A's address, so the inbound connects from it too.
            assert peer[0] == CLIENT_IP
            assert seen == [(CART, CLIENT_IP, SERVER_IP, app.port)]
            (connection,) = inbound.connections
            assert connection.peer_identity == CART
            # Envoy's frames are 16 KiB; it may send no bigger frames than that to us either way.
            assert connection.core.max_outbound_frame_size == 16 * KiB
            await exchange(pod, upstream, order)
            (tunnel,) = connection.tunnels.values() or [None]
            if tunnel is not None:
                outcome = await asyncio.wait_for(tunnel.done, 5)
                assert outcome.end is TunnelEnd.CLOSED
            assert inbound.stats.tunnels_opened == 1 and inbound.stats.tunnels_refused == 0
            pod.close()
            upstream.close()
        except BaseException:
            print(proxy.log())
            raise
        finally:
            proxy.stop()
            await listener.stop()
            await inbound.aclose()
            app.close()

    lab.run(scenario)


def _terminator(lab: Lab, app_port: int) -> envoy.EnvoyProcess:
    config = envoy.server_config(
        lab.ids.pem_files(PAYMENTS), (SERVER_IP, ENVOY_HBONE_PORT), {f"{SERVER_IP}:{app_port}": (SERVER_IP, app_port)}, TD
    )
    return envoy.EnvoyProcess(config, lab.workdir, "envoy-server", log_level=os.environ.get("ENVOY_LOG", "warning"))


def test_ambit_pool_into_envoy_connect_terminator(lab: Lab) -> None:
    """Client FIN first: Envoy's terminator carries both half-closes."""

    async def scenario() -> None:
        app = await start_app_server(SERVER_IP)
        proxy = _terminator(lab, app.port)
        pool = HboneClientPool(lab.ids.store, bound_socket)
        key = PoolKey(CART, CLIENT_IP, SERVER_IP, frozenset({PAYMENTS}), ENVOY_HBONE_PORT)
        try:
            proxy.wait_listening(SERVER_IP, ENVOY_HBONE_PORT)
            pod, proxy_side = await tcp_pair(CLIENT_IP)
            tunnel = await pool.open_tunnel(key, f"{SERVER_IP}:{app.port}", proxy_side)
            assert tunnel.connection.peer_identity == PAYMENTS
            assert tunnel.connection.core.max_outbound_frame_size == 16 * KiB  # Envoy's frames
            upstream, peer = await app.next(timeout=15)
            await exchange(pod, upstream, "client-fin-first")
            outcome = await asyncio.wait_for(tunnel.done, 10)
            assert (outcome.end, outcome.bytes_to_stream, outcome.bytes_to_tcp) == (TunnelEnd.CLOSED, 8 * MiB, 8 * MiB)

            # Envoy refuses an authority it has no route for (404 + body);
            # the shared connection survives it and carries the next tunnel.
            other_pod, other_side = await tcp_pair(CLIENT_IP)
            with pytest.raises(TunnelRefused) as refused:
                await pool.open_tunnel(key, f"{SERVER_IP}:1", other_side)
            assert refused.value.status == 404
            third_pod, third_side = await tcp_pair(CLIENT_IP)
            third = await pool.open_tunnel(key, f"{SERVER_IP}:{app.port}", third_side)
            assert third.connection is tunnel.connection
            third_upstream, _ = await app.next(timeout=15)
            await asyncio.get_running_loop().sock_sendall(third_pod, b"hello envoy")
            assert await read_exactly(third_upstream, 11) == b"hello envoy"
            for sock in (pod, proxy_side, upstream, other_pod, other_side, third_pod, third_upstream):
                sock.close()
        except BaseException:
            print(proxy.log())
            raise
        finally:
            await pool.aclose()
            proxy.stop()
            app.close()

    lab.run(scenario)


def test_envoy_terminator_with_server_fin_first_delivers_everything_then_stops_the_upload(lab: Lab) -> None:
    """Server FIN first through Envoy's terminator.

    Envoy 1.40's CONNECT terminator does not keep a tunnel half-open when its
    TCP upstream closes first (TcpUpstream forces a reset; envoyproxy/envoy
    PR 47378): it sends END_STREAM and then RST_STREAM(NO_ERROR), RFC 9113
    §8.1's "response complete, stop sending". ambit must deliver every byte
    and the FIN to the pod (an RST would drop what is still queued in its
    socket), then close the pod's upload direction; the shared connection
    must survive.
    """

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        app = await start_app_server(SERVER_IP)
        proxy = _terminator(lab, app.port)
        pool = HboneClientPool(lab.ids.store, bound_socket)
        key = PoolKey(CART, CLIENT_IP, SERVER_IP, frozenset({PAYMENTS}), ENVOY_HBONE_PORT)
        try:
            proxy.wait_listening(SERVER_IP, ENVOY_HBONE_PORT)
            pod, proxy_side = await tcp_pair(CLIENT_IP)
            tunnel = await pool.open_tunnel(key, f"{SERVER_IP}:{app.port}", proxy_side)
            upstream, _ = await app.next(timeout=15)
            up, down = os.urandom(8 * MiB), os.urandom(8 * MiB)
            sending = loop.create_task(loop.sock_sendall(pod, up))
            assert digest(await read_exactly(upstream, len(up))) == digest(up)
            await sending
            # The server answers and closes its side at once while the pod is not
            # reading: Envoy gets the whole answer into our window, sends
            # END_STREAM + RST_STREAM(NO_ERROR), and the answer still sits in
            # ambit's buffers. (Beyond our window Envoy itself would truncate
            # the answer and reset with INTERNAL_ERROR: an RST for the pod then.)
            down = down[: 2 * MiB]
            await send_all_then_eof(upstream, down)
            await until(lambda: tunnel.peer_stopped_reading, "Envoy's RST_STREAM(NO_ERROR)")
            assert digest(await read_to_eof(pod)) == digest(down)
            outcome = await asyncio.wait_for(tunnel.done, 10)
            assert outcome.end is TunnelEnd.CLOSED and outcome.bytes_to_tcp == len(down)
            assert "RST_STREAM(NO_ERROR)" in outcome.detail
            # The upload direction is gone: the pod's next bytes are refused.
            with pytest.raises((BrokenPipeError, ConnectionResetError)):
                for _ in range(50):
                    await loop.sock_sendall(pod, b"too late")
                    await asyncio.sleep(0.02)
            assert tunnel.connection.is_open
            other_pod, other_side = await tcp_pair(CLIENT_IP)
            again = await pool.open_tunnel(key, f"{SERVER_IP}:{app.port}", other_side)
            assert again.connection is tunnel.connection
            for sock in (pod, proxy_side, upstream, other_pod, other_side):
                sock.close()
        except BaseException:
            print(proxy.log())
            raise
        finally:
            await pool.aclose()
            proxy.stop()
            app.close()

    lab.run(scenario)
