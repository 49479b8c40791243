"""gRPC's unary calls over HTTP/2 on a Unix socket: the agent API's server.

The agent serves two small unary services on a local socket (a CNI call per
pod event, ambitctl now and then). grpcio cost the agent ~17 MB of RSS for
that (its core library and threads: 12.9 MB at import, 4.3 MB serving,
measured), paid on every node. HTTP/2 here is h2's (the proxy's HBONE
library), messages are protobuf's, gRPC's framing is grpc_wire.py's; this is
the server: a call's status in trailers, or in a trailers-only response when
it fails before answering.

Clients are the real ones: ambit-cni's standard-library client
(cni/grpc_unary.py) and grpcio (ambitctl, the tests). Headers are sent
without Huffman coding, as grpcio does, so the plugin's decoder stays on its
fast path. Streaming calls are not served (UNIMPLEMENTED); the health
service answers Check. grpc-timeout is left to the client, which enforces
its own deadline.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import structlog
from google.protobuf.message import DecodeError, Message

from ..grpc_wire import CONTENT_TYPE, PREFIX, PlainEncoder, RpcError, StatusCode, decode_message, encode_message, \
    status_headers

__all__ = ["CallContext", "Method", "RpcAbort", "StatusCode", "UnaryServer", "methods_of"]

log = structlog.get_logger(__name__)

MAX_MESSAGE = 4 * 1024 * 1024  # grpcio's default receive limit
MAX_CONCURRENT_CALLS = 256     # per connection
RpcAbort = RpcError  # what a handler's refusal raises


class CallContext:
    """What a handler may do besides returning: refuse the call."""

    __slots__ = ()

    async def abort(self, code: StatusCode, details: str) -> NoReturn:
        raise RpcAbort(code, details)


Handler = Callable[[Message, CallContext], Awaitable[Message]]


@dataclass(frozen=True)
class Method:
    request: type[Message]
    handler: Handler


def methods_of(service: Any, descriptor: Any, messages: Any) -> dict[str, Method]:
    """`/package.Service/Method` -> request class and handler, for every
    method of a service descriptor that `service` implements (by name, as
    grpcio's servicers do); `messages` is the generated *_pb2 module."""
    found = {}
    for method in descriptor.methods:
        handler = getattr(service, method.name, None)
        if handler is not None and not method.client_streaming and not method.server_streaming:
            found[f"/{descriptor.full_name}/{method.name}"] = Method(getattr(messages, method.input_type.name),
                                                                     handler)
    return found


class _Connection(asyncio.Protocol):
    """One client connection: h2 state, its calls, flow control."""

    def __init__(self, server: UnaryServer) -> None:
        self.server = server
        config = h2.config.H2Configuration(client_side=False, header_encoding=None, validate_inbound_headers=True)
        self.h2 = h2.connection.H2Connection(config)
        self.h2.encoder = PlainEncoder()
        self.h2.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_CALLS,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 16384})
        self.transport: asyncio.Transport | None = None
        self.paths: dict[int, bytes] = {}
        self.bodies: dict[int, bytearray] = {}
        self.calls: dict[int, asyncio.Task[None]] = {}
        self.window_open: dict[int, asyncio.Event] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport subclasses
        self.server.connections.add(self)
        self.h2.initiate_connection()
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        for task in self.calls.values():
            task.cancel()
        for event in self.window_open.values():
            event.set()

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.info("agent API: bad HTTP/2 from a client", error=str(exc))
            self._flush()
            if self.transport is not None:
                self.transport.close()
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self._request(event.stream_id, dict(event.headers))
            elif isinstance(event, h2.events.DataReceived):
                self._data(event)
            elif isinstance(event, h2.events.StreamEnded):
                self._dispatch(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self._forget(event.stream_id, cancel=True)
            elif isinstance(event, h2.events.WindowUpdated):
                self._window_updated(event.stream_id)
            elif isinstance(event, h2.events.ConnectionTerminated):
                if self.transport is not None:
                    self.transport.close()
        self._flush()

    def _request(self, stream_id: int, headers: dict[bytes, bytes]) -> None:
        if headers.get(b":method") != b"POST" or not headers.get(b"content-type", b"").startswith(CONTENT_TYPE):
            self._trailers_only(stream_id, StatusCode.INTERNAL, "not a gRPC request", http_status=b"415")
            return
        self.paths[stream_id] = headers.get(b":path", b"")
        self.bodies[stream_id] = bytearray()

    def _data(self, event: h2.events.DataReceived) -> None:
        body = self.bodies.get(event.stream_id)
        self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        if body is None:
            return
        body += event.data
        if len(body) > PREFIX.size + MAX_MESSAGE:
            self._forget(event.stream_id)
            self._trailers_only(event.stream_id, StatusCode.RESOURCE_EXHAUSTED,
                                f"request larger than {MAX_MESSAGE} bytes")

    def _dispatch(self, stream_id: int) -> None:
        body = self.bodies.pop(stream_id, None)
        path = self.paths.pop(stream_id, None)
        if body is None or path is None:
            return
        task = asyncio.get_running_loop().create_task(self._call(stream_id, path.decode(errors="replace"), bytes(body)))
        self.calls[stream_id] = task
        task.add_done_callback(lambda _, s=stream_id: self.calls.pop(s, None))

    async def _call(self, stream_id: int, path: str, body: bytes) -> None:
        method = self.server.methods.get(path)
        try:
            if method is None:
                raise RpcAbort(StatusCode.UNIMPLEMENTED, f"method {path} is not served here")
            try:
                request = method.request.FromString(decode_message(body))
            except DecodeError as exc:
                raise RpcAbort(StatusCode.INTERNAL, f"cannot parse the request: {exc}") from None
            reply = await method.handler(request, CallContext())
            payload = encode_message(reply.SerializeToString())
        except RpcAbort as exc:
            self._trailers_only(stream_id, exc.code, exc.details)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a handler's bug: the caller gets UNKNOWN, the agent keeps serving
            log.exception("agent API call failed", method=path)
            self._trailers_only(stream_id, StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}")
            return
        await self._respond(stream_id, payload)

    async def _respond(self, stream_id: int, payload: bytes) -> None:
        try:
            self.h2.send_headers(stream_id, [(b":status", b"200"), (b"content-type", CONTENT_TYPE)])
            view = memoryview(payload)
            while view:
                room = min(self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size)
                if room <= 0:
                    event = self.window_open.setdefault(stream_id, asyncio.Event())
                    event.clear()
                    self._flush()
                    await event.wait()
                    if self.transport is None or self.transport.is_closing():
                        return
                    continue
                self.h2.send_data(stream_id, view[:room].tobytes())
                view = view[room:]
            self.h2.send_headers(stream_id, status_headers(StatusCode.OK, ""), end_stream=True)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return  # the client reset or went away
        finally:
            self.window_open.pop(stream_id, None)
        self._flush()

    def _window_updated(self, stream_id: int) -> None:
        if stream_id == 0:
            for event in self.window_open.values():
                event.set()
        elif stream_id in self.window_open:
            self.window_open[stream_id].set()

    def _trailers_only(self, stream_id: int, code: StatusCode, details: str, http_status: bytes = b"200") -> None:
        try:
            self.h2.send_headers(stream_id, [(b":status", http_status), (b"content-type", CONTENT_TYPE),
                                             *status_headers(code, details)], end_stream=True)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return
        self._flush()

    def _forget(self, stream_id: int, cancel: bool = False) -> None:
        self.paths.pop(stream_id, None)
        self.bodies.pop(stream_id, None)
        task = self.calls.pop(stream_id, None)
        if cancel and task is not None:
            task.cancel()

    def close(self) -> None:
        """Tell the client no new calls are taken (GOAWAY), then close."""
        if self.transport is None or self.transport.is_closing():
            return
        try:
            self.h2.close_connection()
            self._flush()
        except h2.exceptions.ProtocolError:
            pass
        self.transport.close()


class UnaryServer:
    """Serves `methods` (see methods_of) on a Unix socket."""

    def __init__(self, methods: dict[str, Method]) -> None:
        self.methods = methods
        self.connections: set[_Connection] = set()
        self._server: asyncio.AbstractServer | None = None

    async def listen(self, path: str) -> None:
        self._server = await asyncio.get_running_loop().create_unix_server(lambda: _Connection(self), path)

    async def stop(self, grace: float) -> None:
        """Stop accepting, let calls in flight finish for up to `grace` s, close."""
        if self._server is not None:
            self._server.close()
        calls = [task for conn in self.connections for task in conn.calls.values()]
        if calls:
            await asyncio.wait(calls, timeout=grace)
        for conn in list(self.connections):
            conn.close()
        if self._server is not None:
            await self._server.wait_closed()
