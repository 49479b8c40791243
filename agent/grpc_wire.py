"""gRPC's mapping onto HTTP/2, the part both of the agent's gRPC ends share:
status codes, the 5-byte message prefix, the status in trailers.

grpcio cost every agent ~17 MB of RSS (its core library and threads) for a
few unary calls: the agent API on a Unix socket (rpc/unary.py serves it) and
the certificate requests to the CA (grpc_call.py makes them). Both speak
HTTP/2 through h2 and protobuf through protobuf; this is what is left
(doc/PROTOCOL-HTTP2.md in grpc/grpc).
"""
from __future__ import annotations

import enum
import struct
import urllib.parse
from typing import Any

import hpack

PREFIX = struct.Struct(">?I")  # compressed flag, message length
CONTENT_TYPE = b"application/grpc"
# Percent-encoding of grpc-message: printable ASCII stays except '%'.
_MESSAGE_SAFE = " !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~"


class StatusCode(enum.IntEnum):
    """gRPC status codes (grpc/include/grpc/status.h)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16

    @classmethod
    def of(cls, value: int) -> StatusCode:
        try:
            return cls(value)
        except ValueError:
            return cls.UNKNOWN


class RpcError(Exception):
    """A call that ended with a status other than OK."""

    def __init__(self, code: StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


def encode_message(payload: bytes) -> bytes:
    return PREFIX.pack(False, len(payload)) + payload


def decode_message(body: bytes | bytearray) -> bytes:
    """The one message of a unary call's body; RpcError when it is not that."""
    if len(body) < PREFIX.size:
        raise RpcError(StatusCode.INTERNAL, "no gRPC message")
    compressed, length = PREFIX.unpack_from(body)
    if compressed:
        raise RpcError(StatusCode.UNIMPLEMENTED, "compressed messages are not accepted")
    if len(body) != PREFIX.size + length:
        raise RpcError(StatusCode.INTERNAL, "a unary call carries exactly one message")
    return bytes(body[PREFIX.size:])


def status_headers(code: StatusCode, details: str) -> list[tuple[bytes, bytes]]:
    headers = [(b"grpc-status", str(int(code)).encode())]
    if details:
        headers.append((b"grpc-message", urllib.parse.quote(details, safe=_MESSAGE_SAFE).encode()))
    return headers


def status_of(headers: dict[bytes, bytes]) -> tuple[StatusCode, str] | None:
    """The status a header block carries (trailers, or a trailers-only answer), if any."""
    raw = headers.get(b"grpc-status")
    if raw is None:
        return None
    try:
        code = StatusCode.of(int(raw))
    except ValueError:
        code = StatusCode.UNKNOWN
    return code, urllib.parse.unquote(headers.get(b"grpc-message", b"").decode("ascii", "replace"))


class PlainEncoder(hpack.Encoder):
    """Header values as literals, never Huffman-coded: grpcio sends them so,
    and ambit-cni decodes Huffman only on a rare path (it costs an import)."""

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        return super().encode(headers, huffman=False)
