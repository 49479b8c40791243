"""When TlsStream sends: a lone message leaves at once, a busy loop round's
writes leave together in one send (real TLS 1.3 over a socket pair, sends
counted at the socket)."""
from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest

from ambit.agent.identity.ca import LocalCA
from ambit.agent.identity.spiffe import SpiffeId
from ambit.agent.identity.store import CertificateStore
from ambit.agent.identity.tls import client_context, server_context
from ambit.agent.proxy.tls_stream import TlsStream

TD = "cluster.local"
CLIENT = SpiffeId(TD, "shop", "client")
SERVER = SpiffeId(TD, "shop", "web")
DEADLINE_S = 5.0


class CountingSocket(socket.socket):
    """A socket that counts send() calls (the syscalls the stream makes)."""

    sends = 0  # per instance once assigned; class default for the type checker

    def send(self, data: Any, flags: int = 0) -> int:  # type: ignore[override]
        self.sends += 1
        return super().send(data, flags)


class Collect:
    """The receiving end's protocol: keeps every plaintext byte."""

    def __init__(self) -> None:
        self.received = bytearray()
        self._buf = memoryview(bytearray(65536))

    def connection_made(self, transport: Any) -> None:
        pass

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buf

    def buffer_updated(self, nbytes: int) -> None:
        self.received += self._buf[:nbytes]

    def eof_received(self) -> None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        pass

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass


@pytest.fixture
def store(tmp_path: Path) -> CertificateStore:
    return CertificateStore(LocalCA.create(TD), tmp_path / "certs")


async def _pair(store: CertificateStore) -> tuple[TlsStream, CountingSocket, Collect]:
    """A client stream (sends counted) and the server's collecting protocol."""
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    counted = CountingSocket(a.family, a.type, a.proto, fileno=a.detach())
    client = TlsStream(loop, counted, client_context(store, CLIENT), server_side=False)
    server = TlsStream(loop, b, server_context(store, SERVER), server_side=True)
    await asyncio.wait_for(asyncio.gather(client.handshake(), server.handshake()), DEADLINE_S)
    collect = Collect()
    client.start(Collect())
    server.start(collect)
    return client, counted, collect


async def _next_round() -> None:
    """Let the event loop finish this round and run the next one."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def _until_received(collect: Collect, expected: bytes) -> None:
    async def wait() -> None:
        while bytes(collect.received) != expected:
            await asyncio.sleep(0.001)

    try:
        await asyncio.wait_for(wait(), DEADLINE_S)
    except TimeoutError:
        raise AssertionError(f"peer received {bytes(collect.received)!r}, expected {expected!r}") from None


def test_a_lone_write_is_sent_at_once_and_a_busy_rounds_writes_together(store: CertificateStore) -> None:
    async def scenario() -> None:
        client, sock, collect = await _pair(store)
        await _next_round()
        sock.sends = 0

        # A quiet connection: the write leaves before the loop runs again.
        client.write(b"ping")
        assert sock.sends == 1, "a lone write waited for the end of the loop round"
        await _next_round()
        await _until_received(collect, b"ping")

        # A busy round (three writes): the first left at once, the other two
        # together at the round's end.
        sock.sends = 0
        client.write(b"a")
        client.write(b"b")
        client.write(b"c")
        assert sock.sends == 1
        await _next_round()
        assert sock.sends == 2, "the round's later writes did not leave in one send"
        await _until_received(collect, b"pingabc")

        # The round after a busy one: its first write waits too, and all of
        # the round's writes leave in one send.
        sock.sends = 0
        client.write(b"d")
        client.writelines([b"e", b"f"])
        assert sock.sends == 0, "after a busy round, the first write did not wait for the round's end"
        await _next_round()
        assert sock.sends == 1
        await _until_received(collect, b"pingabcdef")

        # A quiet round (one write, deferred while busy) ends the busy mode.
        sock.sends = 0
        client.write(b"g")
        await _next_round()
        assert sock.sends == 1
        client.write(b"h")
        assert sock.sends == 2, "a connection that went quiet still deferred its writes"
        await _next_round()
        await _until_received(collect, b"pingabcdefgh")
        client.abort()

    asyncio.run(scenario())


def test_without_a_burst_hint_a_quiet_connections_writes_each_leave_at_once(store: CertificateStore) -> None:
    """expect_bursts(False) (an HBONE connection with one tunnel): a quiet
    connection's writes are sent as they come and book no round's end, so
    they never make it busy; a busy one still gathers until a quiet round."""

    async def scenario() -> None:
        client, sock, collect = await _pair(store)
        await _next_round()
        client.expect_bursts(False)
        sock.sends = 0
        client.write(b"a")
        client.write(b"b")
        assert sock.sends == 2, "a write waited for the round's end without a burst hint"
        await _next_round()
        client.write(b"c")
        assert sock.sends == 3, "writes without a burst hint made the connection busy"
        await _until_received(collect, b"abc")

        # The hint comes (a second tunnel) in a round that may have sent
        # already: the round's writes from then on wait for its end together.
        client.expect_bursts(True)
        client.write(b"d")
        client.write(b"e")
        assert sock.sends == 3, "a write after the hint came went out alone"
        await _next_round()
        assert sock.sends == 4, "the round's writes did not leave in one send"

        # Busy, then the hint goes: the next round still gathers, and a quiet
        # round ends it.
        client.expect_bursts(False)
        sock.sends = 0
        client.write(b"f")
        assert sock.sends == 0, "a busy connection stopped gathering when the hint went"
        await _next_round()
        assert sock.sends == 1
        client.write(b"g")
        assert sock.sends == 2, "a connection that went quiet still deferred its writes"
        await _until_received(collect, b"abcdefg")
        client.abort()

    asyncio.run(scenario())


def test_much_pending_is_sent_without_waiting_for_the_round(store: CertificateStore) -> None:
    async def scenario() -> None:
        client, sock, collect = await _pair(store)
        await _next_round()
        client.write(b"x")
        client.write(b"y")  # a busy round: the next round's first write waits
        await _next_round()
        sock.sends = 0
        big = b"z" * (2 * 1024 * 1024)  # above the high-water mark
        client.write(big)
        assert sock.sends >= 1, "a write above high water waited for the round's end"
        await _until_received(collect, b"xy" + big)
        client.abort()

    asyncio.run(scenario())
