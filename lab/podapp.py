"""The lab's built-in workloads and clients, run inside pod namespaces.

  python -m ambit.lab.podapp --name shop/web-0 --http 8080 --echo 9000
  python -m ambit.lab.podapp get http://10.244.2.2:8080/
  python -m ambit.lab.podapp send 10.244.2.2 9000 < file

The HTTP server answers `GET /` with JSON naming the pod and the peer address
it saw: the point of a transparent mesh is that the server still sees the
real client IP (and, behind a waypoint, the x-forwarded-for it added).
`GET /bytes/N` returns N bytes, for throughput. The echo
server returns every byte it reads and honours half-close: when the client
shuts down its sending side, the server finishes echoing, then shuts down its
own. `get` and `send` are the matching clients, so the lab needs neither curl
nor nc inside pods.

Request parsing and response building are pure functions; the asyncio part
only moves bytes.
"""
from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import socket
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import structlog

MAX_HEAD = 16 * 1024
CHUNK = 64 * 1024
MAX_BYTES = 1 << 36  # /bytes/N upper bound: 64 GiB is plenty for a benchmark
_PATTERN = bytes(range(256)) * (CHUNK // 256)


class BadRequest(ValueError):
    """The request head is not HTTP/1.x the server can answer."""


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    version: str
    headers: Mapping[str, str] = field(default_factory=dict, hash=False)  # lower-case names

    @property
    def keep_alive(self) -> bool:
        connection = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return connection == "keep-alive"
        return connection != "close"

    @property
    def has_body(self) -> bool:
        length = self.headers.get("content-length", "0").strip() or "0"
        return "transfer-encoding" in self.headers or not length.isdigit() or int(length) > 0


@dataclass(frozen=True)
class Response:
    status: int
    reason: str
    content_type: str
    length: int
    body: bytes | None = None  # None: `length` pattern bytes, streamed


@dataclass(frozen=True)
class Identity:
    """Who this server is, as reported to clients."""

    pod: str
    node: str = ""


def parse_request_head(head: bytes) -> Request:
    """The request line and headers (without the blank line)."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes everything
        raise BadRequest("undecodable request head") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(f"bad request line {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest(f"bad header line {line[:80]!r}")
        headers[name.lower()] = value.strip()
    return Request(parts[0], parts[1], parts[2], headers)


def respond(request: Request, me: Identity, peer: tuple[str, int], local: tuple[str, int]) -> Response:
    """What the server answers; pure."""
    if request.method not in ("GET", "HEAD"):
        return _json(405, "Method Not Allowed", {"error": f"{request.method} is not supported"})
    path = urllib.parse.urlsplit(request.target).path
    if path == "/":
        return _json(200, "OK", {"pod": me.pod, "node": me.node, "peer": peer[0], "peer_port": peer[1],
                                 "local": local[0], "local_port": local[1], "path": request.target,
                                 "forwarded_for": request.headers.get("x-forwarded-for")})
    if path == "/healthz":
        return Response(200, "OK", "text/plain", 3, b"ok\n")
    if path.startswith("/bytes/"):
        count = path[len("/bytes/"):]
        if not count.isdigit() or int(count) > MAX_BYTES:
            return _json(400, "Bad Request", {"error": f"/bytes/N needs 0 <= N <= {MAX_BYTES}"})
        return Response(200, "OK", "application/octet-stream", int(count))
    return _json(404, "Not Found", {"error": f"no such path {path}"})


def _json(status: int, reason: str, payload: Mapping[str, object]) -> Response:
    body = json.dumps(payload).encode() + b"\n"
    return Response(status, reason, "application/json", len(body), body)


def response_head(response: Response, keep_alive: bool) -> bytes:
    return (f"HTTP/1.1 {response.status} {response.reason}\r\n"
            f"Content-Type: {response.content_type}\r\n"
            f"Content-Length: {response.length}\r\n"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n").encode()


def body_chunks(response: Response) -> Iterator[bytes | memoryview]:
    if response.body is not None:
        yield response.body
        return
    view = memoryview(_PATTERN)
    left = response.length
    while left > 0:
        n = min(left, CHUNK)
        yield view[:n]
        left -= n


# --- servers -------------------------------------------------------------------------------------------------

class HttpServer:
    def __init__(self, me: Identity) -> None:
        self.me = me
        self.log = structlog.get_logger(__name__).bind(pod=me.pod, server="http")

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")[:2]
        local = writer.get_extra_info("sockname")[:2]
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return  # the client closed between requests
                except asyncio.LimitOverrunError:
                    writer.write(response_head(_json(431, "Request Header Fields Too Large", {}), False))
                    return
                try:
                    request = parse_request_head(head[:-4])
                except BadRequest as exc:
                    body = _json(400, "Bad Request", {"error": str(exc)})
                    writer.write(response_head(body, False) + (body.body or b""))
                    return
                response = respond(request, self.me, peer, local)
                keep_alive = request.keep_alive and not request.has_body
                writer.write(response_head(response, keep_alive))
                if request.method != "HEAD":
                    for chunk in body_chunks(response):
                        writer.write(chunk)
                        await writer.drain()
                await writer.drain()
                self.log.debug("request", peer=peer[0], target=request.target, status=response.status)
                if not keep_alive:
                    return
        except (ConnectionError, OSError) as exc:
            self.log.debug("connection error", peer=peer[0], error=str(exc))
        finally:
            writer.close()


class EchoServer:
    def __init__(self, me: Identity) -> None:
        self.log = structlog.get_logger(__name__).bind(pod=me.pod, server="echo")

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")[:2]
        echoed = 0
        try:
            while data := await reader.read(CHUNK):
                writer.write(data)
                echoed += len(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()  # the client half-closed: finish our side too
            await writer.drain()
        except (ConnectionError, OSError) as exc:
            self.log.debug("connection error", peer=peer[0], error=str(exc))
        finally:
            self.log.debug("echoed", peer=peer[0], bytes=echoed)
            writer.close()


async def serve(me: Identity, http_ports: Sequence[int], echo_ports: Sequence[int], ready_fd: int | None) -> None:
    log = structlog.get_logger(__name__).bind(pod=me.pod)
    servers: list[asyncio.Server] = []
    for port in http_ports:
        servers.append(await asyncio.start_server(HttpServer(me).handle, "0.0.0.0", port, reuse_address=True,
                                                  limit=MAX_HEAD))
    for port in echo_ports:
        servers.append(await asyncio.start_server(EchoServer(me).handle, "0.0.0.0", port, reuse_address=True))
    log.info("listening", http=list(http_ports), echo=list(echo_ports))
    if ready_fd is not None:  # tell the lab we are listening
        os.write(ready_fd, b"ready\n")
        os.close(ready_fd)
    await asyncio.gather(*(s.serve_forever() for s in servers))


# --- clients ---------------------------------------------------------------------------------------------------

def http_get(url: str, timeout: float) -> tuple[int, bytes]:
    """GET without any proxy settings from the environment: the lab must only
    talk to addresses inside its own namespaces."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"only http://HOST[:PORT]/PATH URLs are supported, not {url!r}")
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    try:
        conn.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def send_and_receive(host: str, port: int, source, sink, timeout: float) -> int:
    """Copy `source` to the server, half-close, copy what comes back to `sink`
    until the server closes. Sending runs on its own thread so a large
    payload cannot deadlock against the echo filling our receive buffer."""
    sock = socket.create_connection((host, port), timeout=timeout)
    errors: list[BaseException] = []

    def pump() -> None:
        try:
            while chunk := source.read(CHUNK):
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    sender = threading.Thread(target=pump, daemon=True)
    sender.start()
    received = 0
    try:
        while data := sock.recv(CHUNK):
            sink.write(data)
            received += len(data)
        sender.join(timeout)
    finally:
        sock.close()
    if errors:
        raise errors[0]
    return received


def steady_load(urls: Sequence[str], rate: float, timeout: float, until: str,
                progress: str | None = None) -> dict[str, object]:
    """GET each of `urls` `rate` times a second, each on a new connection,
    until the file `until` exists; every answer but a 200 within `timeout`
    counts as failed. Returns the counts and the slowest success. With
    `progress`, the number of 200s so far is kept in that file (replaced
    atomically), so a caller can wait until traffic is observed flowing."""
    results: list[tuple[bool, float]] = []
    answered = [0]  # 200s so far, for `progress`
    lock = threading.Lock()

    def one(url: str) -> None:
        started = time.monotonic()
        try:
            ok = http_get(url, timeout)[0] == 200
        except (OSError, http.client.HTTPException):
            ok = False
        with lock:
            results.append((ok, time.monotonic() - started))
            answered[0] += ok
            if progress is not None:
                tmp = f"{progress}.tmp"
                with open(tmp, "w") as f:
                    f.write(str(answered[0]))
                os.replace(tmp, progress)

    threads: list[threading.Thread] = []
    next_at = time.monotonic()
    while not os.path.exists(until):
        for url in urls:
            thread = threading.Thread(target=one, args=(url,), daemon=True)
            thread.start()
            threads.append(thread)
        next_at += 1.0 / rate
        time.sleep(max(0.0, next_at - time.monotonic()))
    for thread in threads:
        thread.join(timeout + 1)
    return {"requests": len(results), "failed": sum(1 for ok, _ in results if not ok),
            "slowest_s": round(max((s for ok, s in results if ok), default=0.0), 3)}


# --- entry point -----------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ambit.lab.podapp",
                                     description="the lab's built-in servers and clients")
    sub = parser.add_subparsers(dest="mode", required=True)
    srv = sub.add_parser("serve", help="run the HTTP and/or echo servers")
    srv.add_argument("--name", required=True, help="namespace/pod, reported to clients")
    srv.add_argument("--node", default="", help="the node the pod runs on, reported to clients")
    srv.add_argument("--http", type=int, action="append", default=[], metavar="PORT")
    srv.add_argument("--echo", type=int, action="append", default=[], metavar="PORT")
    srv.add_argument("--ready-fd", type=int, help="write 'ready' to this descriptor once listening")
    srv.add_argument("--log-level", default="info", choices=("debug", "info", "warn", "error"))
    get = sub.add_parser("get", help="HTTP GET a URL, print the body; exit 1 on an HTTP error, 2 if unreachable")
    get.add_argument("url")
    get.add_argument("--timeout", type=float, default=5.0)
    load = sub.add_parser("load", help="GET the URLs on new connections at a steady rate until a file exists; "
                          "print the counts as JSON")
    load.add_argument("urls", nargs="+", metavar="URL")
    load.add_argument("--rate", type=float, default=20.0, help="requests per second per URL")
    load.add_argument("--timeout", type=float, default=5.0)
    load.add_argument("--until-file", required=True)
    load.add_argument("--progress-file", help="keep the number of 200s so far in this file")
    send = sub.add_parser("send", help="send stdin to HOST:PORT, half-close, print what comes back")
    send.add_argument("host")
    send.add_argument("port", type=int)
    send.add_argument("--timeout", type=float, default=10.0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("--") and argv[0] not in ("--help", "-h"):
        argv.insert(0, "serve")  # `workload --http 8080 --name x` is the server
    args = _parser().parse_args(argv)
    from ambit.agent import log as logconf
    if args.mode == "serve":
        logconf.configure(args.log_level)
        if not args.http and not args.echo:
            print("serve: give at least one --http or --echo port", file=sys.stderr)
            return 2
        try:
            asyncio.run(serve(Identity(args.name, args.node), args.http, args.echo, args.ready_fd))
        except KeyboardInterrupt:
            return 0
        except (OSError, OverflowError) as exc:  # e.g. the port is taken or out of range
            print(f"serve: cannot listen: {exc}", file=sys.stderr)
            return 1
        return 0
    logconf.configure("warn")
    try:
        if args.mode == "get":
            status, body = http_get(args.url, args.timeout)
            sys.stdout.buffer.write(body)
            sys.stdout.flush()
            if status >= 400:
                print(f"get: HTTP {status}", file=sys.stderr)
                return 1
            return 0
        if args.mode == "load":
            print(json.dumps(steady_load(args.urls, args.rate, args.timeout, args.until_file,
                                         args.progress_file)))
            return 0
        send_and_receive(args.host, args.port, sys.stdin.buffer, sys.stdout.buffer, args.timeout)
        sys.stdout.flush()
        return 0
    except (OSError, http.client.HTTPException, ValueError) as exc:
        print(f"{args.mode}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
