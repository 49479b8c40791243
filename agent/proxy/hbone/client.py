"""The originating side of an HBONE connection: one CONNECT stream per tunnelled TCP connection."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import h2.events
import h2.exceptions
import structlog
from h2.errors import ErrorCodes

from .connect import (
    _check_outbound_headers,
    _header_list_size,
    _response_status,
    format_authority,
    _remember_checked,
    parse_authority,
)
from .connect_block import ConnectBlockEncoder
from .connection import HboneProtocolError, _HboneConnection
from .events import HboneEvent, StreamReset, TunnelAccepted, TunnelRefused
from .settings import HboneSettings
from .stream import _Phase, _Tunnel


class HboneClientConnection(_HboneConnection):
    """The originating side: one CONNECT stream per tunnelled TCP connection."""

    def __init__(
        self,
        settings: HboneSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        super().__init__(settings or HboneSettings(), client_side=True, clock=clock, log=log)
        self._streams_opened = 0
        self._retired = False
        # Authorities already checked, as given -> canonical (bytes): a connection carries
        # streams to few destinations, and parsing the address is most of open_stream's own work.
        self._authorities: dict[str, bytes] = {}
        self._blocks = ConnectBlockEncoder(self._h2.encoder)  # the only user of the encoder

    @property
    def streams_opened(self) -> int:
        """Streams opened over this connection's lifetime."""
        return self._streams_opened

    @property
    def retired(self) -> bool:
        """The pool puts no new stream here, ever; the open ones carry on."""
        return self._retired

    def retire(self) -> None:
        """Take no new stream from now on (e.g. the certificate this connection
        was made with has been replaced). Nothing is sent: the open streams
        carry on and the I/O layer closes the connection after the last."""
        self._retired = True

    @property
    def can_open_stream(self) -> bool:
        """Whether the pool should put another tunnel on this connection.

        False once closed, going away or retired, or while the peer's
        concurrent stream limit is reached. open_stream retires the
        connection when the stream it opens is the
        pool_max_streams_per_connection-th open at once, or takes the last
        stream id up to pool_max_stream_id (open_stream itself still opens
        streams on a retired connection: the rule is the pool's).
        """
        if not self._initiated or self._closed or self._retired or self.going_away:
            return False
        # Every stream h2 counts open is one of our tunnels (a tunnel outlives its
        # h2 stream until its bytes are acknowledged, never the other way round),
        # so below the limit in tunnels is below it in h2's count: h2's count walks
        # all its streams (a Python call each), and open_stream makes it anyway.
        limit = self._h2.remote_settings.max_concurrent_streams
        return len(self._tunnels) < limit or self._h2.open_outbound_streams < limit

    def open_stream(self, authority: str, extra_headers: Iterable[tuple[str, str]] = ()) -> int:
        """Send CONNECT for `authority` ("ip:port", "[ipv6]:port"); returns the stream id.

        extra_headers: e.g. baggage, forwarded, traceparent (lower-case names).
        Raises ValueError for a bad authority or header, HboneProtocolError when
        the connection is closed or the peer's stream limit is reached.
        """
        self._require_live()
        canonical = self._authorities.get(authority)
        if canonical is None:
            address, port = parse_authority(authority)
            canonical = format_authority(address, port).encode()
            _remember_checked(self._authorities, authority, canonical)
        extra = _check_outbound_headers(extra_headers) if extra_headers else ()
        try:
            stream_id = self._h2.get_next_available_stream_id()
            self._h2.begin_request(stream_id, b"CONNECT", canonical)
        except h2.exceptions.TooManyStreamsError as exc:
            raise HboneProtocolError(f"peer's concurrent stream limit reached: {exc}") from None
        except h2.exceptions.NoAvailableStreamIDError:
            raise HboneProtocolError("stream ids exhausted; open a new connection") from None
        # Never indexed: an extra header names this connection (forwarded: the
        # client's address and port), so adding it to both sides' HPACK tables
        # costs work on each CONNECT and evicts the entries that do repeat.
        self._h2.send_header_block(stream_id, self._blocks.encode(canonical, extra))
        self._tunnels[stream_id] = self._new_tunnel(_Phase.PENDING)
        self._streams_opened += 1
        if (len(self._tunnels) >= self._settings.pool_max_streams_per_connection
                or stream_id + 2 > self._settings.pool_max_stream_id):
            self._retired = True
        return stream_id

    def _refuse_unprocessed(self, last_stream_id: int, out: list[HboneEvent]) -> None:
        # Above the server's last stream id: never processed, so the caller
        # may retry it on another connection (REFUSED_STREAM says exactly that).
        for stream_id in sorted(s for s in self._tunnels if s > last_stream_id):
            self._drop(stream_id)
            self._quiet_reset(stream_id, ErrorCodes.CANCEL)
            out.append(StreamReset(stream_id, ErrorCodes.REFUSED_STREAM, remote=True))

    def _may_receive(self, tunnel: _Tunnel) -> bool:
        # DATA before the response is not tunnel data; h2 makes it a connection error.
        return tunnel.phase is _Phase.OPEN and not tunnel.remote_ended

    def _on_response(self, event: h2.events.ResponseReceived, out: list[HboneEvent]) -> None:
        stream_id = event.stream_id or 0
        tunnel = self._tunnels.get(stream_id)
        if tunnel is None:
            return
        headers = event.headers or []
        if tunnel.phase is not _Phase.PENDING:
            self._abort_stream(stream_id, ErrorCodes.PROTOCOL_ERROR, out, "second response")
            return
        if _header_list_size(headers) > self._header_list_limit:
            self._abort_stream(stream_id, ErrorCodes.PROTOCOL_ERROR, out, "response headers over the limit")
            return
        status = _response_status(headers)
        if status is None or status < 200:
            self._abort_stream(stream_id, ErrorCodes.PROTOCOL_ERROR, out, "response without a valid :status")
        elif status < 300:
            tunnel.phase = _Phase.OPEN
            out.append(TunnelAccepted(stream_id))
        else:
            # The stream is over for us; a body (Envoy sends one) gets credited.
            self._drop(stream_id)
            self._quiet_reset(stream_id, ErrorCodes.CANCEL)
            out.append(TunnelRefused(stream_id, status))
