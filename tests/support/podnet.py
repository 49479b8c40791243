"""Sockets inside pod namespaces for tests: servers and clients that run in
the test process but live in the pods' network namespaces."""
from __future__ import annotations

import os
import socket
import threading
from collections import defaultdict
from collections.abc import Callable

from ambit.agent.netns import socket_in_netns


def tcp_socket(netns: str) -> socket.socket:
    return socket_in_netns(netns, socket.AF_INET, socket.SOCK_STREAM)


def udp_socket(netns: str) -> socket.socket:
    return socket_in_netns(netns, socket.AF_INET, socket.SOCK_DGRAM)


def connect(netns: str, ip: str, port: int, timeout: float = 5.0) -> socket.socket:
    sock = tcp_socket(netns)
    sock.settimeout(timeout)
    try:
        sock.connect((ip, port))
    except BaseException:
        sock.close()
        raise
    return sock


def refused(netns: str, ip: str, port: int) -> bool:
    """True when a new connection from `netns` is closed without an answer:
    refused, reset or EOF (a proxy's denial), False when it stays open."""
    try:
        sock = connect(netns, ip, port)
    except OSError:
        return True
    with sock:
        try:
            sock.sendall(b"x" * 4096)
            return sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
            return True
        except socket.timeout:
            return False


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(1 << 20, n - len(buf)))
        if not chunk:
            raise ConnectionError(f"peer closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_until_eof(sock: socket.socket) -> bytes:
    buf = bytearray()
    while chunk := sock.recv(1 << 20):
        buf += chunk
    return bytes(buf)


class TcpServer:
    """A listening socket in a pod namespace; each connection is handed to
    `handle(conn, peer)` on its own thread. Records every peer it saw."""

    def __init__(self, netns: str, port: int, handle: Callable[[socket.socket, tuple], None]) -> None:
        self.sock = tcp_socket(netns)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0", port))
        self.sock.listen(256)
        self.port = port
        self.peers: list[tuple] = []
        self._handle = handle
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.peers.append(peer)
            t = threading.Thread(target=self._serve, args=(conn, peer), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, conn: socket.socket, peer: tuple) -> None:
        with conn:
            try:
                self._handle(conn, peer)
            except OSError:
                pass

    def close(self) -> None:
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._acceptor.join(timeout=2)
        for t in self._threads:
            t.join(timeout=5)

    def __enter__(self) -> "TcpServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RecordingEcho:
    """Echoes what it reads and counts, per client IP, the bytes that arrived."""

    def __init__(self) -> None:
        self.received: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    def __call__(self, conn: socket.socket, peer: tuple) -> None:
        while chunk := conn.recv(1 << 16):
            with self._lock:
                self.received[peer[0]] += len(chunk)
            conn.sendall(chunk)


def echo_until_eof(conn: socket.socket, peer: tuple) -> None:
    """Echo everything, then half-close after the client's FIN."""
    while chunk := conn.recv(1 << 20):
        conn.sendall(chunk)
    conn.shutdown(socket.SHUT_WR)


def random_bytes(n: int) -> bytes:
    return os.urandom(n)
