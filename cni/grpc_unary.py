"""One unary gRPC call over HTTP/2 on a Unix socket, with the standard library only.

Why not grpcio here: the runtime starts the plugin once per pod per command,
often twenty at a time when a node boots. `import grpc` costs ~70 ms of CPU per
process on this class of machine (it pulls in asyncio, ssl and logging), which
at twenty concurrent ADDs on two cores adds about a second to every pod. The
plugin needs exactly one request/response per run, so it speaks that subset of
gRPC (RFC 9113 framing, RFC 7541 header decoding, the gRPC HTTP/2 mapping)
directly. The agent side is the real grpcio server; every CNI test runs this
client against it.
"""

import _socket as socket  # the C module: socket.py would import enum and selectors (start-up cost)
import struct
import time

# gRPC status codes used by callers (grpc/include/grpc/impl/codegen/status.h).
OK = 0
CANCELLED = 1
UNKNOWN = 2
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
NOT_FOUND = 5
FAILED_PRECONDITION = 9
INTERNAL = 13
UNAVAILABLE = 14

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PING, _GOAWAY, _WINDOW_UPDATE, _CONTINUATION = 0, 1, 3, 4, 6, 7, 8, 9
_END_STREAM = 0x1
_ACK = 0x1
_END_HEADERS = 0x4
_PADDED = 0x8
_PRIORITY = 0x20
_STREAM = 1
_MAX_FRAME = 16384
_MAX_RESPONSE = 4 * 1024 * 1024


class RpcError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"gRPC status {code}: {message}")
        self.code = code
        self.message = message


def _frame(ftype: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes((ftype, flags)) + struct.pack(">I", stream) + payload


def _literal(name: bytes, value: bytes) -> bytes:
    """Literal header field without indexing, new name, no Huffman (RFC 7541 6.2.2)."""
    return b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# RFC 7541 Appendix A.
_STATIC_TABLE: tuple[tuple[bytes, bytes], ...] = tuple(
    (n.encode(), v.encode()) for n, v in (
        (":authority", ""), (":method", "GET"), (":method", "POST"), (":path", "/"),
        (":path", "/index.html"), (":scheme", "http"), (":scheme", "https"), (":status", "200"),
        (":status", "204"), (":status", "206"), (":status", "304"), (":status", "400"),
        (":status", "404"), (":status", "500"), ("accept-charset", ""), ("accept-encoding", "gzip, deflate"),
        ("accept-language", ""), ("accept-ranges", ""), ("accept", ""), ("access-control-allow-origin", ""),
        ("age", ""), ("allow", ""), ("authorization", ""), ("cache-control", ""),
        ("content-disposition", ""), ("content-encoding", ""), ("content-language", ""), ("content-length", ""),
        ("content-location", ""), ("content-range", ""), ("content-type", ""), ("cookie", ""),
        ("date", ""), ("etag", ""), ("expect", ""), ("expires", ""),
        ("from", ""), ("host", ""), ("if-match", ""), ("if-modified-since", ""),
        ("if-none-match", ""), ("if-range", ""), ("if-unmodified-since", ""), ("last-modified", ""),
        ("link", ""), ("location", ""), ("max-forwards", ""), ("proxy-authenticate", ""),
        ("proxy-authorization", ""), ("range", ""), ("referer", ""), ("refresh", ""),
        ("retry-after", ""), ("server", ""), ("set-cookie", ""), ("strict-transport-security", ""),
        ("transfer-encoding", ""), ("user-agent", ""), ("vary", ""), ("via", ""),
        ("www-authenticate", ""),
    )
)


class HeaderDecoder:
    """RFC 7541 decoder with its dynamic table; Huffman-coded strings (which the
    grpcio server does not send today) are decoded by the `hpack` library,
    imported only when one appears."""

    def __init__(self, max_size: int = 4096) -> None:
        self._dynamic: list[tuple[bytes, bytes]] = []
        self._size = 0
        self._max_size = max_size

    def _entry(self, index: int) -> tuple[bytes, bytes]:
        if index <= 0:
            raise ValueError("HPACK index 0")
        if index <= len(_STATIC_TABLE):
            return _STATIC_TABLE[index - 1]
        try:
            return self._dynamic[index - len(_STATIC_TABLE) - 1]
        except IndexError:
            raise ValueError(f"HPACK index {index} outside the tables") from None

    def _add(self, name: bytes, value: bytes) -> None:
        self._dynamic.insert(0, (name, value))
        self._size += len(name) + len(value) + 32
        self._evict()

    def _evict(self) -> None:
        while self._size > self._max_size and self._dynamic:
            n, v = self._dynamic.pop()
            self._size -= len(n) + len(v) + 32

    @staticmethod
    def _int(data: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
        limit = (1 << prefix_bits) - 1
        value = data[pos] & limit
        pos += 1
        if value < limit:
            return value, pos
        shift = 0
        while True:
            byte = data[pos]
            pos += 1
            value += (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value, pos
            if shift > 28:
                raise ValueError("HPACK integer too large")

    def _string(self, data: bytes, pos: int) -> tuple[bytes, int]:
        huffman = bool(data[pos] & 0x80)
        length, pos = self._int(data, pos, 7)
        raw = data[pos:pos + length]
        if len(raw) != length:
            raise ValueError("HPACK string truncated")
        if huffman:
            from hpack.huffman_table import decode_huffman  # rare path, see class doc
            raw = decode_huffman(raw)
        return bytes(raw), pos + length

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        headers = []
        pos = 0
        while pos < len(block):
            byte = block[pos]
            if byte & 0x80:  # indexed field
                index, pos = self._int(block, pos, 7)
                headers.append(self._entry(index))
                continue
            if byte & 0xE0 == 0x20:  # dynamic table size update
                self._max_size, pos = self._int(block, pos, 5)
                self._evict()
                continue
            indexing = byte & 0xC0 == 0x40
            index, pos = self._int(block, pos, 6 if indexing else 4)
            if index:
                name = self._entry(index)[0]
            else:
                name, pos = self._string(block, pos)
            value, pos = self._string(block, pos)
            if indexing:
                self._add(name, value)
            headers.append((name, value))
        return headers


def _http_to_grpc(status: bytes) -> int:
    # gRPC "HTTP to gRPC status code mapping" (doc/http-grpc-status-mapping.md).
    return {b"400": INTERNAL, b"401": 16, b"403": 7, b"404": 12, b"429": UNAVAILABLE,
            b"502": UNAVAILABLE, b"503": UNAVAILABLE, b"504": UNAVAILABLE}.get(status, UNKNOWN)


def unary_call(socket_path: str, method: str, request: bytes, timeout: float,
               user_agent: str = "ambit-cni") -> bytes:
    """Send one serialized request to `method` ("/pkg.Service/Method") and
    return the serialized response, or raise RpcError. Connection problems and
    the deadline become UNAVAILABLE / DEADLINE_EXCEEDED, as grpcio reports them."""
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(socket_path)
        except FileNotFoundError:
            raise RpcError(UNAVAILABLE, f"agent socket {socket_path} does not exist (is ambit-agent running?)") from None
        except TimeoutError:
            raise RpcError(DEADLINE_EXCEEDED, f"connecting to {socket_path} timed out after {timeout:g}s") from None
        except OSError as exc:  # refused, permission, a file in the path, ...: the agent is not there
            raise RpcError(UNAVAILABLE, f"cannot connect to agent socket {socket_path}: {exc.strerror or exc}") from None
        return _exchange(sock, method, request, deadline, timeout, user_agent)
    except TimeoutError:
        raise RpcError(DEADLINE_EXCEEDED, f"agent did not answer {method} within {timeout:g}s") from None
    except (ConnectionError, BrokenPipeError) as exc:
        raise RpcError(UNAVAILABLE, f"agent connection failed during {method}: {exc}") from None
    finally:
        sock.close()


def _exchange(sock: socket.socket, method: str, request: bytes, deadline: float,
              timeout: float, user_agent: str) -> bytes:
    timeout_ms = max(1, int(timeout * 1000))
    block = b"".join((
        _literal(b":method", b"POST"), _literal(b":scheme", b"http"),
        _literal(b":path", method.encode()), _literal(b":authority", b"localhost"),
        _literal(b"content-type", b"application/grpc"), _literal(b"te", b"trailers"),
        _literal(b"grpc-timeout", f"{timeout_ms}m".encode()), _literal(b"user-agent", user_agent.encode()),
    ))
    message = b"\x00" + struct.pack(">I", len(request)) + request
    if len(message) > 65535:
        raise RpcError(INTERNAL, "request larger than the initial HTTP/2 window")
    out = [_PREFACE, _frame(_SETTINGS, 0, 0, struct.pack(">HI", 2, 0)),  # ENABLE_PUSH=0
           _frame(_HEADERS, _END_HEADERS, _STREAM, block)]
    chunks = [message[i:i + _MAX_FRAME] for i in range(0, len(message), _MAX_FRAME)]
    for i, chunk in enumerate(chunks):
        out.append(_frame(_DATA, _END_STREAM if i == len(chunks) - 1 else 0, _STREAM, chunk))
    sock.sendall(b"".join(out))

    decoder = HeaderDecoder()
    buf = bytearray()
    header_blocks: list[list[tuple[bytes, bytes]]] = []
    pending_block: bytearray | None = None
    pending_end = False
    body = bytearray()
    while True:
        # one frame: header then payload
        while len(buf) < 9 or len(buf) < 9 + int.from_bytes(buf[:3], "big"):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError()
            sock.settimeout(remaining)
            chunk = sock.recv(65536)
            if not chunk:
                raise RpcError(UNAVAILABLE, f"agent closed the connection before answering {method}")
            buf += chunk
        length = int.from_bytes(buf[:3], "big")
        ftype, flags = buf[3], buf[4]
        stream = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
        payload = bytes(buf[9:9 + length])
        del buf[:9 + length]

        if ftype == _SETTINGS:
            if not flags & _ACK:
                sock.sendall(_frame(_SETTINGS, _ACK, 0))
        elif ftype == _PING:
            if not flags & _ACK:
                sock.sendall(_frame(_PING, _ACK, 0, payload))
        elif ftype == _GOAWAY:
            last_stream = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            if last_stream < _STREAM:
                raise RpcError(UNAVAILABLE, f"agent refused the call (GOAWAY): {payload[8:].decode(errors='replace')}")
        elif ftype == _RST_STREAM and stream == _STREAM:
            raise RpcError(UNAVAILABLE if payload[:4] == b"\x00\x00\x00\x07" else INTERNAL,
                           f"agent reset the call, HTTP/2 error {int.from_bytes(payload[:4], 'big')}")
        elif ftype in (_HEADERS, _CONTINUATION) and stream == _STREAM:
            if ftype == _HEADERS:
                payload = _strip_padding(payload, flags)
                if flags & _PRIORITY:
                    payload = payload[5:]
                pending_block, pending_end = bytearray(), bool(flags & _END_STREAM)
            if pending_block is None:
                raise RpcError(INTERNAL, "CONTINUATION without HEADERS")
            pending_block += payload
            if flags & _END_HEADERS:
                header_blocks.append(decoder.decode(bytes(pending_block)))
                pending_block = None
                if pending_end:
                    return _finish(header_blocks, body)
        elif ftype == _DATA and stream == _STREAM:
            body += _strip_padding(payload, flags)
            if len(body) > _MAX_RESPONSE:
                raise RpcError(INTERNAL, "response too large")
            if length:
                increment = struct.pack(">I", length)
                sock.sendall(_frame(_WINDOW_UPDATE, 0, 0, increment) + _frame(_WINDOW_UPDATE, 0, _STREAM, increment))
            if flags & _END_STREAM:
                return _finish(header_blocks, body)


def _strip_padding(payload: bytes, flags: int) -> bytes:
    if flags & _PADDED:
        pad = payload[0]
        return payload[1:len(payload) - pad]
    return payload


def _finish(header_blocks: list[list[tuple[bytes, bytes]]], body: bytearray) -> bytes:
    if not header_blocks:
        raise RpcError(INTERNAL, "response ended without headers")
    first = dict(header_blocks[0])
    status = first.get(b":status", b"")
    if status != b"200":
        raise RpcError(_http_to_grpc(status), f"agent answered HTTP {status.decode(errors='replace')}")
    trailers = dict(header_blocks[-1])
    if b"grpc-status" not in trailers:
        raise RpcError(INTERNAL, "response has no grpc-status")
    code = int(trailers[b"grpc-status"])
    if code != OK:
        import urllib.parse  # error path only: keeps `re` out of the common start-up
        message = urllib.parse.unquote(trailers.get(b"grpc-message", b"").decode("ascii", "replace"))
        raise RpcError(code, message)
    if len(body) < 5:
        raise RpcError(INTERNAL, "response has no message")
    if body[0] != 0:
        raise RpcError(INTERNAL, "compressed responses are not supported")
    size = int.from_bytes(body[1:5], "big")
    return bytes(body[5:5 + size])
