"""Attack tools for the hostile-peer tests: raw HTTP/2 frames on TLS sockets, non-blocking I/O.

Used in-process (functions) and inside lab pods (`python hostile_peer.py CMD ...`, one JSON
line on stdout). Built to cost the attacking machine little: frames are packed with struct,
TLS is the ssl module's, and many connections wait in one selector, never a thread each.

  ping-flood       a peer with a valid certificate sends PINGs without reading, then reads
                   what it was sent (ACKs, GOAWAY) until the server's FIN or RST
  idle-handshakes  N TCP connections that start a TLS handshake and say nothing more
  idle-tcp         N TCP connections that send nothing at all (e.g. to a metrics port)
  connect          a good client: TLS + HTTP/2 CONNECT, how long until the 200
  dial             one TCP connect: connected, refused or timed out
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import resource
import selectors
import socket
import ssl
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER = struct.Struct(">BHBBL")
TYPE_HEADERS, TYPE_SETTINGS, TYPE_PING, TYPE_GOAWAY = 0x1, 0x4, 0x6, 0x7
FLAG_ACK, FLAG_END_HEADERS = 0x1, 0x4
ERROR_NAMES = {0: "NO_ERROR", 1: "PROTOCOL_ERROR", 2: "INTERNAL_ERROR", 3: "FLOW_CONTROL_ERROR",
               7: "REFUSED_STREAM", 8: "CANCEL", 11: "ENHANCE_YOUR_CALM"}


def frame(frame_type: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return FRAME_HEADER.pack(len(payload) >> 16, len(payload) & 0xFFFF, frame_type, flags, stream_id) + payload


def raise_fd_limit(wanted: int) -> int:
    """Soft RLIMIT_NOFILE up to `wanted` (within the hard limit); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(soft, wanted if hard == resource.RLIM_INFINITY else min(wanted, hard))
    if target != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def client_context(cert: str, key: str, bundle: str) -> ssl.SSLContext:
    """mTLS as an HBONE client: TLS 1.3, ALPN h2, the server checked against the bundle (no SNI)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.load_verify_locations(bundle)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2"])
    return context


def _tcp(host: str, port: int, source_ip: str | None, timeout: float) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout,
                                    source_address=(source_ip, 0) if source_ip else None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _tls(host: str, port: int, context: ssl.SSLContext, source_ip: str | None, timeout: float) -> ssl.SSLSocket:
    sock = _tcp(host, port, source_ip, timeout)
    try:
        return context.wrap_socket(sock, server_hostname=None)  # handshake, blocking with `timeout`
    except BaseException:
        sock.close()
        raise


# --- PING flood ------------------------------------------------------------------------------------------------


@dataclass
class FloodReport:
    pings_sent: int = 0  # at least this many (a record cut short when sending stopped may have gone too)
    send_stopped: str = ""  # "all sent", "reset", "closed", "deadline: server stopped reading"
    ping_acks: int = 0
    goaway_error: str | None = None
    goaway_reason: str = ""
    end: str = ""  # how reading ended: "eof", "reset", "deadline"
    bytes_received: int = 0


def _frames(buffer: bytearray, report: FloodReport) -> None:
    """Consume whole frames from `buffer`, noting PING ACKs and the GOAWAY."""
    pos = 0
    while len(buffer) - pos >= 9:
        hi, lo, frame_type, flags, _ = FRAME_HEADER.unpack_from(buffer, pos)
        length = hi << 16 | lo
        if len(buffer) - pos - 9 < length:
            break
        payload = bytes(buffer[pos + 9 : pos + 9 + length])
        if frame_type == TYPE_PING and flags & FLAG_ACK:
            report.ping_acks += 1
        elif frame_type == TYPE_GOAWAY and length >= 8:
            code = struct.unpack_from(">L", payload, 4)[0]
            report.goaway_error = ERROR_NAMES.get(code, str(code))
            report.goaway_reason = payload[8:].decode("utf-8", "replace")
        pos += 9 + length
    del buffer[:pos]


def ping_flood(host: str, port: int, context: ssl.SSLContext, count: int, *, source_ip: str | None = None,
               send_deadline_s: float = 60.0, read_idle_s: float = 10.0) -> FloodReport:
    """Send `count` PINGs without reading a byte, then read everything the server sent.

    Sending stops early if the server closes or resets the connection, or
    stops taking bytes for the whole of `send_deadline_s` (it stopped
    reading). Reading ends at the server's FIN or RST, once every PING sent
    is acknowledged, or after `read_idle_s` without a byte (a server that
    neither answers nor closes).
    """
    report = FloodReport()
    tls = _tls(host, port, context, source_ip, 10.0)
    try:
        tls.setblocking(False)
        batch_pings = 4096  # 68 KiB of frames per send
        ping = frame(TYPE_PING, 0, 0, b"\0" * 8)
        pending = memoryview(PREFACE + frame(TYPE_SETTINGS, 0, 0))
        with selectors.DefaultSelector() as selector:
            selector.register(tls, selectors.EVENT_WRITE)
            last_progress = time.monotonic()
            while True:
                if not pending:
                    if report.pings_sent >= count:
                        report.send_stopped = "all sent"
                        break
                    n = min(batch_pings, count - report.pings_sent)
                    pending = memoryview(ping * n)
                    report.pings_sent += n  # counted as handed over; corrected below if not all went
                try:
                    sent = tls.send(pending)
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                    sent = 0
                except (ConnectionResetError, BrokenPipeError) as exc:
                    report.send_stopped = "reset" if isinstance(exc, ConnectionResetError) else "closed"
                    report.pings_sent -= len(pending) // len(ping)
                    break
                if sent:
                    pending = pending[sent:]
                    last_progress = time.monotonic()
                    continue
                if time.monotonic() - last_progress > send_deadline_s:
                    report.send_stopped = "deadline: server stopped reading"
                    report.pings_sent -= len(pending) // len(ping)
                    break
                selector.select(1.0)
        _read_all(tls, report, read_idle_s)
    finally:
        tls.close()
    return report


def _read_all(tls: ssl.SSLSocket, report: FloodReport, idle_s: float) -> None:
    buffer = bytearray()
    with selectors.DefaultSelector() as selector:
        selector.register(tls, selectors.EVENT_READ)
        while True:
            try:
                chunk = tls.recv(256 * 1024)
            except (ssl.SSLWantReadError, BlockingIOError):
                if tls.pending():
                    continue
                if not selector.select(idle_s):
                    report.end = "deadline"
                    return
                continue
            except ssl.SSLZeroReturnError:
                report.end = "eof"  # close_notify
                return
            except (ConnectionResetError, ssl.SSLError, OSError) as exc:
                report.end = "reset" if isinstance(exc, ConnectionResetError) else f"error: {exc}"
                return
            if not chunk:
                report.end = "eof"
                return
            report.bytes_received += len(chunk)
            buffer += chunk
            _frames(buffer, report)
            if report.ping_acks >= report.pings_sent and not report.goaway_error:
                report.end = "all acknowledged"
                return


# --- many idle connections ----------------------------------------------------------------------------------------


@dataclass
class IdleReport:
    opened: int = 0
    failed: dict[str, int] = field(default_factory=dict)  # connect errors by errno name
    closed_by_server: int = 0  # EOF or RST seen while holding
    still_open: int = 0


def hold_idle(host: str, port: int, count: int, *, hello: bytes = b"", source_ip: str | None = None,
              connect_timeout_s: float = 10.0) -> tuple[list[socket.socket], IdleReport]:
    """Open `count` TCP connections at once (non-blocking), send `hello` on each
    (e.g. the start of a TLS ClientHello) and keep them, reading nothing."""
    raise_fd_limit(count + 256)
    report = IdleReport()
    socks: list[socket.socket] = []
    with selectors.DefaultSelector() as selector:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            if source_ip:
                sock.bind((source_ip, 0))
            err = sock.connect_ex((host, port))
            if err not in (0, errno.EINPROGRESS):
                report.failed[errno.errorcode.get(err, str(err))] = report.failed.get(errno.errorcode.get(err, str(err)), 0) + 1
                sock.close()
                continue
            selector.register(sock, selectors.EVENT_WRITE)
        deadline = time.monotonic() + connect_timeout_s
        while selector.get_map() and time.monotonic() < deadline:
            for key, _ in selector.select(0.5):
                sock = key.fileobj  # type: ignore[assignment]
                selector.unregister(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    name = errno.errorcode.get(err, str(err))
                    report.failed[name] = report.failed.get(name, 0) + 1
                    sock.close()
                    continue
                if hello:
                    try:
                        sock.send(hello)
                    except OSError as exc:  # already reset by the server
                        name = errno.errorcode.get(exc.errno or 0, str(exc))
                        report.failed[name] = report.failed.get(name, 0) + 1
                        sock.close()
                        continue
                socks.append(sock)
        for key in list(selector.get_map().values()):
            report.failed["timeout"] = report.failed.get("timeout", 0) + 1
            key.fileobj.close()  # type: ignore[union-attr]
    report.opened = len(socks)
    return socks, report


def count_closed(socks: Sequence[socket.socket]) -> int:
    """How many of these connections the server has closed (EOF or RST waiting to be read)."""
    closed = 0
    for sock in socks:
        try:
            data = sock.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            continue
        except OSError:
            closed += 1
            continue
        if not data:
            closed += 1
        else:  # something arrived (a TLS alert, an HTTP 408): read past it
            try:
                while sock.recv(65536, socket.MSG_DONTWAIT):
                    pass
                else:
                    closed += 1
            except BlockingIOError:
                pass
            except OSError:
                closed += 1
    return closed


def client_hello_start() -> bytes:
    """The first bytes of a real TLS 1.3 ClientHello (a record header and a partial message):
    the server has started a handshake and waits for the rest."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    tls = context.wrap_bio(incoming, outgoing, server_hostname=None)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()[:64]


# --- a good client -----------------------------------------------------------------------------------------------


def connect_once(host: str, port: int, context: ssl.SSLContext, authority: str, *, source_ip: str | None = None,
                 timeout_s: float = 10.0) -> dict[str, Any]:
    """TCP + TLS + HTTP/2 CONNECT; seconds until the response HEADERS, and its :status."""
    import h2.config
    import h2.connection
    import h2.events

    started = time.monotonic()
    tls = _tls(host, port, context, source_ip, timeout_s)
    try:
        handshake_s = time.monotonic() - started
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        conn.initiate_connection()
        stream_id = conn.get_next_available_stream_id()
        conn.send_headers(stream_id, [(":method", "CONNECT"), (":authority", authority)])
        tls.sendall(conn.data_to_send())
        tls.settimeout(max(0.1, timeout_s - (time.monotonic() - started)))
        while True:
            data = tls.recv(65536)
            if not data:
                return {"status": None, "seconds": time.monotonic() - started, "handshake_s": handshake_s,
                        "error": "connection closed before the response"}
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream_id:
                    status = int(dict(event.headers)[b":status"])
                    return {"status": status, "seconds": time.monotonic() - started, "handshake_s": handshake_s}
                if isinstance(event, h2.events.ConnectionTerminated):
                    return {"status": None, "seconds": time.monotonic() - started, "handshake_s": handshake_s,
                            "error": f"GOAWAY {event.error_code}"}
            out = conn.data_to_send()
            if out:
                tls.sendall(out)
    finally:
        tls.close()


def dial(host: str, port: int, timeout_s: float) -> str:
    """One TCP connect: "connected", "refused" (RST) or "timeout" (no answer: dropped)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        sock.connect((host, port))
        return "connected"
    except ConnectionRefusedError:
        return "refused"
    except (TimeoutError, socket.timeout):
        return "timeout"
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))
    finally:
        sock.close()


# --- command line (inside lab pods) -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hostile_peer")
    sub = parser.add_subparsers(dest="command", required=True)
    flood = sub.add_parser("ping-flood")
    connect = sub.add_parser("connect")
    for p in (flood, connect):
        p.add_argument("host")
        p.add_argument("port", type=int)
        p.add_argument("--cert", required=True)
        p.add_argument("--key", required=True)
        p.add_argument("--bundle", required=True)
    flood.add_argument("--count", type=int, default=1_000_000)
    connect.add_argument("--authority", required=True)
    idle = sub.add_parser("idle", help="hold N idle connections until stdin closes, then report")
    idle.add_argument("host")
    idle.add_argument("port", type=int)
    idle.add_argument("--count", type=int, required=True)
    idle.add_argument("--tls-hello", action="store_true", help="start a TLS handshake on each, then go silent")
    idle.add_argument("--ready-file", help="written (opened/failed counts) once every connection is set up")
    dialp = sub.add_parser("dial")
    dialp.add_argument("host")
    dialp.add_argument("port", type=int)
    dialp.add_argument("--timeout", type=float, default=2.0)
    args = parser.parse_args(argv)

    if args.command == "ping-flood":
        report = ping_flood(args.host, args.port, client_context(args.cert, args.key, args.bundle), args.count)
        print(json.dumps(asdict(report)))
    elif args.command == "connect":
        print(json.dumps(connect_once(args.host, args.port, client_context(args.cert, args.key, args.bundle),
                                      args.authority)))
    elif args.command == "idle":
        socks, report = hold_idle(args.host, args.port, args.count, hello=client_hello_start() if args.tls_hello else b"")
        if args.ready_file:
            with open(args.ready_file + ".tmp", "w") as ready:
                json.dump({"opened": report.opened, "failed": report.failed}, ready)
            os.rename(args.ready_file + ".tmp", args.ready_file)
        sys.stdin.read()  # hold until the test says so (closes our stdin)
        report.closed_by_server = count_closed(socks)
        report.still_open = len(socks) - report.closed_by_server
        for sock in socks:
            sock.close()
        print(json.dumps(asdict(report)), flush=True)
    elif args.command == "dial":
        print(json.dumps({"result": dial(args.host, args.port, args.timeout)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
