"""The HTTP/2 framing the core does itself (DATA and WINDOW_UPDATE never reach h2): frame layout,
types, flags, buffer sizes, and how a fatal input or an error code is carried.
"""
from __future__ import annotations

import struct
from typing import Final

from h2.errors import ErrorCodes


_CLIENT_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_FRAME_HEADER_LENGTH: Final = 9
# length (24 bits, as 8 + 16), type, flags, reserved bit + stream id
_FRAME_HEADER: Final = struct.Struct(">BHBBL")
_WINDOW_UPDATE_FRAME: Final = struct.Struct(">BHBBLL")
_UINT32: Final = struct.Struct(">L")
_GOAWAY_HEAD: Final = struct.Struct(">LL")  # reserved bit + last stream id, error code
_GOAWAY_DEBUG_MAX: Final = 256  # bytes of reason we send or log
_TYPE_DATA: Final = 0x0
_TYPE_HEADERS: Final = 0x1
_TYPE_SETTINGS: Final = 0x4
_TYPE_PUSH_PROMISE: Final = 0x5
_TYPE_PING: Final = 0x6
_TYPE_GOAWAY: Final = 0x7
_TYPE_WINDOW_UPDATE: Final = 0x8
_TYPE_CONTINUATION: Final = 0x9
_FLAG_END_STREAM: Final = 0x1
_FLAG_ACK: Final = 0x1  # on SETTINGS and PING
_FLAG_END_HEADERS: Final = 0x4
_FLAG_PADDED: Final = 0x8
_FLAG_PRIORITY: Final = 0x20  # on HEADERS
# A HEADERS frame that is a whole header block with nothing else in its payload.
_PLAIN_HEADERS_MASK: Final = _FLAG_END_HEADERS | _FLAG_PADDED | _FLAG_PRIORITY
_STREAM_ID_MASK: Final = 0x7FFF_FFFF
_MAX_WINDOW: Final = 2**31 - 1
_DEFAULT_WINDOW: Final = 65_535  # RFC 9113 §6.9.2: the connection window is not changed by SETTINGS

# Receive buffer: what one TLS read may fill (asyncio reads 256 KiB of
# ciphertext at a time). Only an incomplete frame header or control frame is
# ever carried from one read to the next, so this is all a connection holds.
_RECEIVE_BUFFER_SIZE: Final = 256 * 1024
_MIN_READ_ROOM: Final = 64 * 1024
# DATA payloads at least this big are referenced, not copied, by send_data(borrow=True).
_BORROW_MIN: Final = 32 * 1024


class _FatalInput(Exception):
    """Inbound bytes that end the connection (GOAWAY with this code)."""

    def __init__(self, error_code: ErrorCodes, reason: str) -> None:
        super().__init__(reason)
        self.error_code = error_code
        self.reason = reason


def _error_code(code: int | None) -> int:
    """ErrorCodes member when the code is a known one (readable reprs and logs)."""
    try:
        return ErrorCodes(code or 0)
    except ValueError:
        return int(code or 0)


def goaway_frame(last_stream_id: int, error_code: int, reason: str = "") -> bytes:
    """A GOAWAY frame built by the core itself, so h2's connection state
    stays open for the streams a graceful GOAWAY lets finish."""
    debug = reason.encode("utf-8", "replace")[:_GOAWAY_DEBUG_MAX]
    length = _GOAWAY_HEAD.size + len(debug)
    return (_FRAME_HEADER.pack(length >> 16, length & 0xFFFF, _TYPE_GOAWAY, 0, 0)
            + _GOAWAY_HEAD.pack(last_stream_id & _STREAM_ID_MASK, error_code) + debug)
