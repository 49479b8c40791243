"""What an HBONE CONNECT may look like: the :authority (an IP literal and a port, nothing else),
the request headers (RFC 9113 §8.5), the response status, and the extra headers we send.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, TypeAlias, TypeVar


IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
_K = TypeVar("_K")
_V = TypeVar("_V")

# --- authority ---------------------------------------------------------------

# "[" + 45-char IPv6 text + "]:" + 5 digits fits in 60; anything longer is junk.
_MAX_AUTHORITY_LENGTH: Final = 64
# Parsed authorities one connection keeps (client and server side).
_MAX_CHECKED_AUTHORITIES: Final = 64


def _remember_checked(checked: dict[_K, _V], key: _K, value: _V) -> None:
    """Keep a parsed authority in a connection's cache, bounded to
    _MAX_CHECKED_AUTHORITIES (emptied when full: a connection's streams name few destinations)."""
    if len(checked) >= _MAX_CHECKED_AUTHORITIES:
        checked.clear()
    checked[key] = value


def format_authority(host: str | IPAddress, port: int) -> str:
    """`ip:port` for CONNECT's :authority; IPv6 in brackets (RFC 9110 §7.2)."""
    address = ipaddress.ip_address(host) if isinstance(host, str) else host
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    if address.version == 6:
        return f"[{address}]:{port}"
    return f"{address}:{port}"


def parse_authority(authority: str) -> tuple[IPAddress, int]:
    """Parse an HBONE :authority: an IP literal and a port, nothing else.

    HBONE names the original destination address (pod IP or service VIP), so
    host names, zone IDs, user info and bare IPv6 without brackets are refused.
    """
    if len(authority) > _MAX_AUTHORITY_LENGTH or not authority.isascii():
        raise ValueError("authority too long or not ASCII")
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0 or authority[close + 1 : close + 2] != ":":
            raise ValueError("IPv6 authority must be [address]:port")
        host_text, port_text = authority[1:close], authority[close + 2 :]
        if "%" in host_text:
            raise ValueError("zone IDs are not allowed in an authority")
        address: IPAddress = ipaddress.IPv6Address(host_text)
    else:
        host_text, sep, port_text = authority.rpartition(":")
        if not sep:
            raise ValueError("authority has no port")
        address = ipaddress.IPv4Address(host_text)
    if not (port_text.isdigit() and len(port_text) <= 5):
        raise ValueError("authority port is not a number")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"authority port {port} out of range")
    return address, port


# --- request/response validation ----------------------------------------------

_REQUEST_PSEUDO_HEADERS: Final = frozenset({b":method", b":authority", b":scheme", b":path", b":protocol"})
# Connection-specific fields make an HTTP/2 message malformed (RFC 9113 §8.2.2);
# content-length has no meaning on a CONNECT tunnel.
_FORBIDDEN_REQUEST_HEADERS: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"content-length"}
)
_FORBIDDEN_OUTBOUND_HEADERS: Final = frozenset(s.decode() for s in _FORBIDDEN_REQUEST_HEADERS) | {"te", "host"}
_HEADER_NAME_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+-.^_`|~")
_HEADER_ENTRY_OVERHEAD: Final = 32  # RFC 9113 §6.5.2: name + value + 32 per field


class _BadRequest(Exception):
    """A request that gets a 400: not a well-formed HBONE CONNECT."""


@dataclass(frozen=True, slots=True)
class _ConnectRequest:
    host: str
    port: int
    headers: tuple[tuple[str, str], ...]


def _header_list_size(headers: Iterable[tuple[bytes, bytes]]) -> int:
    size = 0
    for name, value in headers:  # a loop, not sum() of a generator: no frame resumed per header
        size += len(name) + len(value) + _HEADER_ENTRY_OVERHEAD
    return size


def _parse_connect_request(
    headers: Iterable[tuple[bytes, bytes]], checked: dict[bytes, tuple[str, int]] | None = None
) -> _ConnectRequest:
    """Validate a decoded request header list as an HBONE CONNECT (RFC 9113 §8.5).

    checked: authorities already parsed (-> canonical host, port), kept by the
    caller (one connection's streams name few destinations); added to here,
    bounded to _MAX_CHECKED_AUTHORITIES.
    """
    pseudo: dict[bytes, bytes] = {}
    regular: list[tuple[str, str]] = []
    for name, value in headers:
        if name.startswith(b":"):
            if regular:
                raise _BadRequest("pseudo-header after a regular header")
            if name not in _REQUEST_PSEUDO_HEADERS:
                raise _BadRequest(f"unknown pseudo-header {name!r}")
            if name in pseudo:
                raise _BadRequest(f"duplicate pseudo-header {name!r}")
            pseudo[name] = value
        else:
            if name in _FORBIDDEN_REQUEST_HEADERS:
                raise _BadRequest(f"header {name!r} not allowed on CONNECT")
            regular.append((name.decode("latin-1"), value.decode("latin-1")))
    method = pseudo.get(b":method")
    if method != b"CONNECT":
        raise _BadRequest(f"method {method!r} is not CONNECT")
    if b":scheme" in pseudo or b":path" in pseudo or b":protocol" in pseudo:
        raise _BadRequest("CONNECT must not carry :scheme, :path or :protocol")
    authority = pseudo.get(b":authority")
    if authority is None:
        raise _BadRequest("CONNECT without :authority")
    known = checked.get(authority) if checked is not None else None
    if known is None:
        try:
            address, port = parse_authority(authority.decode("latin-1"))
        except ValueError as exc:
            raise _BadRequest(f"bad authority {authority[:_MAX_AUTHORITY_LENGTH]!r}: {exc}") from None
        known = (str(address), port)
        if checked is not None:
            _remember_checked(checked, authority, known)
    return _ConnectRequest(host=known[0], port=known[1], headers=tuple(regular))


def _response_status(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    statuses = [value for name, value in headers if name == b":status"]
    if len(statuses) != 1 or len(statuses[0]) != 3 or not statuses[0].isdigit():
        return None
    return int(statuses[0])


def _check_outbound_headers(extra_headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Reject extra request headers h2 would choke on halfway through sending."""
    checked = []
    for name, value in extra_headers:
        if not name or not set(name) <= _HEADER_NAME_CHARS or name in _FORBIDDEN_OUTBOUND_HEADERS:
            raise ValueError(f"header name {name!r} not allowed")
        # Three `in` tests, not any() over a generator (a frame resumed per character tested).
        if "\r" in value or "\n" in value or "\0" in value or value != value.strip(" \t"):
            raise ValueError(f"header value for {name!r} not allowed")
        checked.append((name, value))
    return checked
