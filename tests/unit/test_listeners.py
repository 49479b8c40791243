"""Per-connection socket options the agent sets once, not per connection:
TCP_NODELAY inherited from the listener, upstream sockets non-blocking from
socket(2) on (no ioctl per connection)."""
from __future__ import annotations

import asyncio
import socket

from ambit.agent.proxy.listeners import set_nodelay_inherited
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
