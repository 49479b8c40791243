"""One unary gRPC call over TLS and HTTP/2 (h2), without grpcio.

The agent calls a remote gRPC service for one thing: a certificate from the
CA (identity/istio_ca.py), a call per identity at start and per renewal. A
connection per call is cheap at that rate and leaves nothing to keep alive;
the call waits for a CA that is away (refused, unreachable) and retries the
connection until its deadline, as grpcio's wait_for_ready did. The server's
certificate must chain to the given roots and name `server_name`; ALPN must
pick h2. Framing and statuses: grpc_wire.py.
"""
from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Iterable

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from .grpc_wire import CONTENT_TYPE, PlainEncoder, RpcError, StatusCode, decode_message, encode_message, status_of

MAX_RESPONSE = 4 * 1024 * 1024
RECONNECT_DELAY_S = 0.25  # between attempts while the server is away
READ_SIZE = 65536


def client_context(root_pem: bytes) -> ssl.SSLContext:
    """TLS to a gRPC server: its chain verified against `root_pem`, ALPN h2."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=root_pem.decode())
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    return context


async def unary_call(host: str, port: int, context: ssl.SSLContext, server_name: str, path: str, request: bytes,
                     metadata: Iterable[tuple[str, str]], timeout: float, max_response: int = MAX_RESPONSE) -> bytes:
    """Send `request` (a serialized message) to `path` ("/pkg.Service/Method")
    and return the serialized answer. RpcError with the server's status, or
    UNAVAILABLE / DEADLINE_EXCEEDED when it cannot be reached or does not
    answer within `timeout`, as grpcio reports them."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            detail = f"{type(last).__name__}: {last}" if last else "no answer"
            raise RpcError(StatusCode.DEADLINE_EXCEEDED if last is None else StatusCode.UNAVAILABLE,
                           f"{host}:{port}: {detail}")
        try:
            async with asyncio.timeout(remaining):
                reader, writer = await asyncio.open_connection(host, port, ssl=context,
                                                               server_hostname=server_name or host)
        except TimeoutError:
            raise RpcError(StatusCode.DEADLINE_EXCEEDED, f"{host}:{port}: no connection within {timeout:g}s") from None
        except ssl.SSLError as exc:  # not the server we trust: waiting will not help
            raise RpcError(StatusCode.UNAVAILABLE, f"{host}:{port}: TLS: {exc}") from None
        except OSError as exc:  # refused, unreachable: the server may be coming back
            last = exc
            await asyncio.sleep(min(RECONNECT_DELAY_S, max(0.0, deadline - time.monotonic())))
            continue
        try:
            if writer.get_extra_info("ssl_object").selected_alpn_protocol() != "h2":
                raise RpcError(StatusCode.UNAVAILABLE, f"{host}:{port} does not speak HTTP/2 (ALPN)")
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    return await _exchange(reader, writer, f"{server_name or host}:{port}", path, request,
                                           metadata, timeout, max_response)
            except TimeoutError:
                raise RpcError(StatusCode.DEADLINE_EXCEEDED, f"{path}: no answer within {timeout:g}s") from None
        finally:
            # Done with it: no TLS close_notify round (a server may take its time answering one).
            writer.transport.abort()


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, authority: str, path: str,
                    request: bytes, metadata: Iterable[tuple[str, str]], timeout: float, max_response: int) -> bytes:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.encoder = PlainEncoder()
    conn.initiate_connection()
    stream = conn.get_next_available_stream_id()
    conn.send_headers(stream, [
        (b":method", b"POST"), (b":scheme", b"https"), (b":path", path.encode()), (b":authority", authority.encode()),
        (b"content-type", CONTENT_TYPE), (b"te", b"trailers"),
        (b"grpc-timeout", f"{max(1, int(timeout * 1000))}m".encode()),
        *((name.lower().encode(), value.encode()) for name, value in metadata)])
    body = encode_message(request)
    conn.send_data(stream, body, end_stream=True)  # a CSR fits the initial 64 KiB windows
    writer.write(conn.data_to_send())
    answer = bytearray()
    headers: list[dict[bytes, bytes]] = []
    while True:
        data = await reader.read(READ_SIZE)
        if not data:
            raise RpcError(StatusCode.UNAVAILABLE, f"{path}: the server closed the connection")
        try:
            events = conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            raise RpcError(StatusCode.INTERNAL, f"{path}: bad HTTP/2 from the server: {exc}") from None
        for event in events:
            if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)) and \
                    event.stream_id == stream:
                headers.append(dict(event.headers))
            elif isinstance(event, h2.events.DataReceived) and event.stream_id == stream:
                answer += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, stream)
                if len(answer) > max_response:
                    raise RpcError(StatusCode.RESOURCE_EXHAUSTED, f"{path}: answer larger than {max_response} bytes")
            elif isinstance(event, h2.events.StreamReset) and event.stream_id == stream:
                raise RpcError(StatusCode.UNAVAILABLE if event.error_code == 7 else StatusCode.INTERNAL,
                               f"{path}: the server reset the call (HTTP/2 error {event.error_code})")
            elif isinstance(event, h2.events.ConnectionTerminated):
                raise RpcError(StatusCode.UNAVAILABLE, f"{path}: the server went away (GOAWAY {event.error_code})")
            elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream:
                return _result(path, headers, answer)
        out = conn.data_to_send()
        if out:
            writer.write(out)


def _result(path: str, headers: list[dict[bytes, bytes]], answer: bytearray) -> bytes:
    if not headers:
        raise RpcError(StatusCode.INTERNAL, f"{path}: an answer without headers")
    if headers[0].get(b":status") != b"200":
        raise RpcError(StatusCode.UNAVAILABLE if headers[0].get(b":status") in (b"502", b"503", b"504")
                       else StatusCode.UNKNOWN, f"{path}: HTTP {headers[0].get(b':status', b'?').decode()}")
    status = status_of(headers[-1])
    if status is None:
        raise RpcError(StatusCode.INTERNAL, f"{path}: the answer carries no grpc-status")
    code, details = status
    if code is not StatusCode.OK:
        raise RpcError(code, details)
    return decode_message(answer)
