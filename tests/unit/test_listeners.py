"""Per-connection socket options the agent sets once, not per connection:
TCP_NODELAY inherited from the listener, upstream sockets non-blocking from
socket(2) on (no ioctl per connection)."""
from __future__ import annotations

import asyncio
import socket

import pytest

from ambit.agent.proxy.listeners import (
    AcceptedConnection,
    ListenerKind,
    SocketAddress,
    TransparentListener,
    set_nodelay_inherited,
)
from ambit.agent.proxy.relay import NetnsUpstreamSockets, RelayOptions, prepare_upstream


def test_an_accepted_socket_inherits_tcp_nodelay_from_its_listener():
    with socket.create_server(("127.0.0.1", 0)) as listening:
        set_nodelay_inherited(listening)
        with socket.create_connection(listening.getsockname()):
            accepted, _ = listening.accept()
            with accepted:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    # and the default, so the test above shows inheritance, not a kernel default
    with socket.create_server(("127.0.0.1", 0)) as plain:
        with socket.create_connection(plain.getsockname()):
            accepted, _ = plain.accept()
            with accepted:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0


def test_upstream_sockets_are_non_blocking_from_creation_and_get_tcp_nodelay():
    async def make() -> socket.socket:
        return await NetnsUpstreamSockets(None)(socket.AF_INET)

    sock = asyncio.run(make())
    with sock:
        assert sock.gettimeout() == 0.0 and not sock.getblocking()
        assert sock.type == socket.SOCK_STREAM
        prepare_upstream(sock, "127.0.0.1", RelayOptions(transparent_source=False))
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert not sock.getblocking()


def test_a_transparent_listener_hands_its_handler_a_non_blocking_stream_socket_of_its_family():
    """The listener makes the accepted socket object itself (not socket.accept()):
    same family, type and protocol, non-blocking, the client's address from
    accept(2) and the original destination from getsockname()."""
    seen: list[tuple[AcceptedConnection, tuple]] = []

    async def handler(accepted: AcceptedConnection, sock: socket.socket) -> None:
        seen.append((accepted, (sock.family, sock.type, sock.proto, sock.getblocking(), sock.getpeername())))
        sock.sendall(b"ok")

    async def run() -> None:
        listener = TransparentListener(ListenerKind.OUTBOUND, handler, address="127.0.0.1", port=0)
        await listener.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.address.port)
            assert await reader.read() == b"ok"  # served, then closed by the listener
            client = writer.get_extra_info("sockname")
            writer.close()
        finally:
            await listener.stop()
        accepted, (family, kind, proto, blocking, peer) = seen[0]
        assert (family, kind, proto, blocking) == (socket.AF_INET, socket.SOCK_STREAM, 0, False)
        assert accepted.client == SocketAddress(*client) == SocketAddress(*peer)
        assert accepted.original_dst == listener.address

    asyncio.run(run())


def test_a_descriptor_no_socket_can_be_made_of_is_closed(monkeypatch):
    import os

    from ambit.agent.proxy import listeners

    fd = os.open("/dev/null", os.O_RDONLY)  # not a socket: socket(fileno=) refuses it
    with pytest.raises(OSError):
        listeners._accepted_socket(socket.AF_INET, fd)
    with pytest.raises(OSError):
        os.fstat(fd)  # closed
