"""What a sans-I/O HBONE connection reports: one event per thing that happened on the wire.

The I/O layer's whole view of the protocol (docs/hbone.md has the contract).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias


@dataclass(frozen=True, slots=True)
class TunnelRequested:
    """Server: a valid CONNECT arrived; answer with accept() or refuse()."""

    stream_id: int
    authority_host: str  # canonical IP text, no brackets
    authority_port: int
    headers: tuple[tuple[str, str], ...]  # regular headers (baggage, forwarded, ...), latin-1

    @property
    def authority(self) -> str:
        """`ip:port` (IPv6 in brackets) from the canonical host: what
        connect.format_authority gives, without parsing the address again."""
        host = self.authority_host
        return f"[{host}]:{self.authority_port}" if ":" in host else f"{host}:{self.authority_port}"

    def header(self, name: str) -> str | None:
        """First value of a header (names are lower case on HTTP/2)."""
        wanted = name.lower()
        return next((value for key, value in self.headers if key == wanted), None)


@dataclass(frozen=True, slots=True)
class TunnelAccepted:
    """Client: the server answered 2xx; the tunnel is up."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class TunnelRefused:
    """Client: the server answered with a non-2xx status; the stream is gone."""

    stream_id: int
    status: int


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Tunnel bytes; acknowledge flow_controlled_length once they are written out.

    `data` is `bytes` from receive_data(); from buffer_updated() it is a
    read-only memoryview into the receive buffer, valid until the next
    get_buffer()/receive_data() call: write it out or copy it before then.
    """

    stream_id: int
    data: bytes | memoryview
    flow_controlled_length: int


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer half-closed the tunnel (END_STREAM = TCP FIN)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The tunnel was aborted (RST_STREAM = TCP RST); the stream is gone.

    remote=False means the core reset it because the peer broke the rules on
    this stream (e.g. trailers on a tunnel, a response without a status).
    """

    stream_id: int
    error_code: int
    remote: bool = True


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The connection is finished; flush data_to_send() and close the socket.

    remote=True: the peer sent GOAWAY. remote=False: we sent one because the
    peer broke the protocol or an abuse limit. Streams above last_stream_id
    were never processed by whoever sent the GOAWAY and are safe to retry.
    """

    error_code: int
    reason: str
    last_stream_id: int
    remote: bool


@dataclass(frozen=True, slots=True)
class GoingAway:
    """The peer sent a graceful GOAWAY (NO_ERROR): it takes no new stream on
    this connection; the streams already open carry on until they end, then
    close the connection. On the client, streams above last_stream_id were
    never processed: they come as StreamReset(REFUSED_STREAM) just before
    this event and are safe to retry elsewhere.
    """

    last_stream_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class PingAcked:
    """The peer answered the PING carrying opaque_data."""

    opaque_data: bytes


@dataclass(frozen=True, slots=True)
class WindowOpened:
    """A send window that made send_data() come back short has room again.

    stream_id=None: the connection window; every paused stream may retry.
    """

    stream_id: int | None


@dataclass(frozen=True, slots=True)
class SettingsChanged:
    """The peer's SETTINGS now in force (what limits what we send)."""

    max_frame_size: int
    max_concurrent_streams: int
    initial_window_size: int


HboneEvent: TypeAlias = (
    TunnelRequested
    | TunnelAccepted
    | TunnelRefused
    | DataReceived
    | StreamEnded
    | StreamReset
    | ConnectionClosed
    | GoingAway
    | PingAcked
    | WindowOpened
    | SettingsChanged
)
