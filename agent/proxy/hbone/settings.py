"""Tunables of an HBONE connection (HTTP/2 CONNECT over mTLS on port 15008).

The defaults are ztunnel's: they decide throughput (large windows let one
stream fill a fast link; a connection window larger than the stream window
keeps one stalled tunnel from holding the whole shared window) and how much a
hostile peer can make us hold (header list sizes, stream counts, the
rapid-reset budget). Frame sizes only cap what *we* accept; what we send is
capped by the peer's own SETTINGS_MAX_FRAME_SIZE, so Envoy peers keep getting
16 KiB frames.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from .frames import _MAX_WINDOW

KiB: Final = 1024
MiB: Final = 1024 * KiB

# RFC 9113 limits.
_MIN_FRAME_SIZE: Final = 16 * KiB
_MAX_FRAME_SIZE: Final = 2**24 - 1
_MIN_WINDOW: Final = 65_535
_MAX_STREAM_ID: Final = 2**31 - 1


@dataclass(frozen=True, slots=True)
class HboneSettings:
    """Flow-control, framing and abuse limits for one HBONE connection.

    Sizes are bytes, durations seconds. The fields after rapid_reset_window_s
    are for the I/O layer (keepalive, pool, timeouts, read size); the sans-I/O
    core ignores them.
    """

    # Per-stream receive window we advertise (SETTINGS_INITIAL_WINDOW_SIZE).
    stream_window: int = 4 * MiB
    # Connection receive window, reached with a WINDOW_UPDATE after SETTINGS.
    connection_window: int = 16 * MiB
    # Largest frame we accept (SETTINGS_MAX_FRAME_SIZE).
    max_frame_size: int = 1 * MiB
    # Concurrent streams a server admits; one more is refused with REFUSED_STREAM.
    max_concurrent_streams: int = 200
    # SETTINGS_MAX_HEADER_LIST_SIZE we advertise as a client / as a server.
    client_max_header_list_size: int = 16 * KiB
    server_max_header_list_size: int = 64 * KiB
    # Streams open at once on one pooled (client) connection: the stream that
    # reaches this many is the connection's last; it is then retired (no new
    # stream ever) and closes when its streams have ended. A count of open
    # streams, not of streams over the connection's life: ztunnel's
    # pool_max_streams_per_conn as it counts today (pool.py says why no
    # lifetime cap is needed).
    pool_max_streams_per_connection: int = 100
    # Highest stream id a pooled connection may use: the stream that takes the
    # last id at or below it retires the connection. HTTP/2 client ids are odd
    # and below 2**31 (h2 raises when they run out); half the space is ample
    # (500 million streams) and leaves the end of the id space untouched.
    pool_max_stream_id: int = 2**30 - 1
    # Control-frame flood (both sides): every PING and SETTINGS the peer sends
    # makes us queue an acknowledgement. More than this many queued and not yet
    # written to the socket means the peer sends them without reading: GOAWAY
    # ENHANCE_YOUR_CALM. Envoy's max_outbound_control_frames, same default.
    max_outbound_control_frames: int = 1000
    # Rapid-reset protection (server): streams that end before we answered
    # them - cancelled by the peer, or refused by the core as malformed or over
    # a limit - cost us work and give the peer nothing. More than
    # `rapid_reset_limit` of them within `rapid_reset_window_s` means abuse:
    # GOAWAY ENHANCE_YOUR_CALM. 400 is twice max_concurrent_streams, so a
    # client may cancel every tunnel it can have pending twice over per window.
    rapid_reset_limit: int = 400
    rapid_reset_window_s: float = 10.0
    # Used by the I/O layer, not by the core.
    ping_interval_s: float = 10.0
    ping_timeout_s: float = 20.0
    pool_idle_timeout_s: float = 300.0
    upstream_connect_timeout_s: float = 10.0
    # TLS handshake on either side; a peer that stalls it costs a socket only this long.
    handshake_timeout_s: float = 10.0
    # Client: a CONNECT not answered in this long is reset and the pod's
    # connection refused. Keep-alive catches a dead peer, not a live one that
    # never answers. Longer than the server's upstream connect timeout, so a
    # slow upstream still gets its 503 from the server first.
    connect_response_timeout_s: float = 15.0
    # A server connection without tunnels is closed after this long. Longer
    # than the client pool's idle timeout, so the client normally closes
    # first and never races a GOAWAY with a new CONNECT.
    server_idle_timeout_s: float = 600.0
    # Bytes read from a tunnel's TCP socket at once (one DATA frame at most).
    tcp_read_size: int = 256 * KiB
    # Reading from the peer pauses while more than this many bytes wait in our
    # TLS write queue (tunnels already stop producing DATA at 1 MiB), so a peer
    # that does not read cannot make us buffer what we owe it without bound.
    max_write_queue: int = 4 * MiB
    # Inbound (15008) connection caps, enforced before the TLS handshake.
    # Concurrent handshakes not yet authenticated; a new connection over the
    # cap takes the place of the oldest one, so idle handshakes cannot lock
    # real clients out.
    max_pending_handshakes: int = 128
    # Connections (handshaking or established) from one peer address, and in total.
    max_connections_per_peer: int = 256
    max_connections: int = 8192

    def __post_init__(self) -> None:
        if not _MIN_WINDOW <= self.stream_window <= _MAX_WINDOW:
            raise ValueError(f"stream_window must be in [{_MIN_WINDOW}, {_MAX_WINDOW}]")
        if not self.stream_window < self.connection_window <= _MAX_WINDOW:
            # Equal windows let one stalled tunnel hold the whole shared window.
            raise ValueError("connection_window must exceed stream_window and be at most 2**31-1")
        if self.pool_max_stream_id > _MAX_STREAM_ID:
            raise ValueError(f"pool_max_stream_id must be at most {_MAX_STREAM_ID}")
        if not _MIN_FRAME_SIZE <= self.max_frame_size <= _MAX_FRAME_SIZE:
            raise ValueError(f"max_frame_size must be in [{_MIN_FRAME_SIZE}, {_MAX_FRAME_SIZE}]")
        for name in (
            "max_concurrent_streams",
            "client_max_header_list_size",
            "server_max_header_list_size",
            "pool_max_streams_per_connection",
            "pool_max_stream_id",
            "rapid_reset_limit",
            "max_outbound_control_frames",
            "tcp_read_size",
            "max_write_queue",
            "max_pending_handshakes",
            "max_connections_per_peer",
            "max_connections",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        for name in (
            "rapid_reset_window_s",
            "ping_interval_s",
            "ping_timeout_s",
            "pool_idle_timeout_s",
            "upstream_connect_timeout_s",
            "handshake_timeout_s",
            "connect_response_timeout_s",
            "server_idle_timeout_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")

    def max_header_list_size(self, *, client_side: bool) -> int:
        """The header list limit this side advertises."""
        return self.client_max_header_list_size if client_side else self.server_max_header_list_size
