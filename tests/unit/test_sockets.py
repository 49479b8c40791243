"""sockets.connect on loopback: the inline completion, a refusal, and the
deadline that is armed only when the handshake has to be waited for."""
from __future__ import annotations

import asyncio
import socket

import pytest

from ambit.agent.proxy.sockets import connect, connect_now, finish_connect, set_nonblocking


def _client() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    set_nonblocking(sock)
    return sock


def test_set_nonblocking_makes_and_keeps_a_socket_non_blocking():
    with socket.socket() as sock:
        assert sock.gettimeout() is None
        set_nonblocking(sock)
        assert sock.gettimeout() == 0.0 and not sock.getblocking()
        set_nonblocking(sock)  # already: nothing to do
        assert not sock.getblocking()


def test_connect_completes_and_a_refusal_raises():
    async def scenario() -> None:
        with socket.create_server(("127.0.0.1", 0)) as listening, _client() as sock:
            await connect(sock, listening.getsockname(), timeout_s=5)
            assert sock.getpeername() == listening.getsockname()
        with socket.create_server(("127.0.0.1", 0)) as closed:
            address = closed.getsockname()
        with _client() as sock, pytest.raises(ConnectionRefusedError):
            await connect(sock, address, timeout_s=5)

    asyncio.run(scenario())


def test_connect_now_says_done_refused_or_in_progress_without_waiting():
    """What the inbound's inline set-up relies on: True only when connected,
    False while in progress (finish_connect then ends it), a refusal raised
    (at once, or by finish_connect when the RST came after the call). On an
    idle machine loopback completes both inside connect(2); a loaded one may
    defer the handshake, so that is not asserted. A SYN the listener drops
    always leaves the connect in progress."""
    def settle(sock: socket.socket, address: tuple[str, int]) -> bool:
        done = connect_now(sock, address)
        if not done:
            asyncio.run(finish_connect(sock, 5))
        return done

    with socket.create_server(("127.0.0.1", 0), backlog=0) as listening, _client() as sock:
        address = listening.getsockname()
        settle(sock, address)
        assert sock.getpeername() == address
        fillers: list[socket.socket] = []
        try:
            for _ in range(8):  # fill the accept queue (never accepted) until a SYN is dropped
                filler = _client()
                fillers.append(filler)
                if not connect_now(filler, address):
                    break
            else:
                pytest.fail("the accept queue never filled: every connect completed")
            with pytest.raises(OSError):
                fillers[-1].getpeername()  # in progress: not connected
        finally:
            for filler in fillers:
                filler.close()
    with socket.create_server(("127.0.0.1", 0)) as closed:
        address = closed.getsockname()
    with _client() as sock, pytest.raises(ConnectionRefusedError):
        settle(sock, address)


def test_a_connect_that_is_never_answered_times_out_and_leaves_no_watcher():
    """A listener whose accept queue is full drops SYNs: the handshake waits,
    and the deadline ends the wait with TimeoutError."""
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        with socket.create_server(("127.0.0.1", 0), backlog=0) as listening:
            address = listening.getsockname()
            fillers: list[socket.socket] = []
            try:
                # Fill the accept queue (never accepted) until a connect no longer completes at once.
                for _ in range(8):
                    sock = _client()
                    fillers.append(sock)
                    try:
                        await connect(sock, address, timeout_s=0.2)
                    except TimeoutError:
                        break
                else:
                    pytest.fail("the accept queue never filled: every connect completed")
                with _client() as sock:
                    started = loop.time()
                    with pytest.raises(TimeoutError):
                        await connect(sock, address, timeout_s=0.3)
                    assert 0.25 <= loop.time() - started < 3.0
                    assert not loop.remove_writer(sock.fileno())  # connect removed its watcher
            finally:
                for sock in fillers:
                    sock.close()

    asyncio.run(scenario())
