"""The terminating side of an HBONE connection (port 15008): vets each CONNECT, bounds rapid resets;
the caller decides what to answer.
"""
from __future__ import annotations

import collections
import time
from collections.abc import Callable

import h2.events
import h2.exceptions
import structlog
from h2.errors import ErrorCodes

from .connect import _BadRequest, _header_list_size, _parse_connect_request
from .connection import HboneProtocolError, _HboneConnection
from .events import HboneEvent, TunnelRequested
from .settings import HboneSettings
from .stream import _Phase, _Tunnel


class HboneServerConnection(_HboneConnection):
    """The terminating side on port 15008: vets CONNECTs, the caller decides."""

    def __init__(
        self,
        settings: HboneSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        super().__init__(settings or HboneSettings(), client_side=False, clock=clock, log=log)
        limit = self._settings.rapid_reset_limit
        self._early_ends: collections.deque[float] = collections.deque(maxlen=limit + 1)
        self._authorities: dict[bytes, tuple[str, int]] = {}  # parsed :authority -> (host, port)

    def _after_initiate(self) -> None:
        # We advertised max_concurrent_streams; let h2 admit one more so the
        # stream that crosses the limit reaches us and gets REFUSED_STREAM (a
        # stream error) instead of h2's connection error.
        self._h2.local_settings.max_concurrent_streams = self._settings.max_concurrent_streams + 1
        self._h2.local_settings.acknowledge()

    def awaiting_answer(self, stream_id: int) -> bool:
        """The stream's CONNECT is still to be answered: the peer has not
        reset it and the connection is not closed. Current as of everything
        parsed so far, so a caller acting on a TunnelRequested while the rest
        of the same read's events are still being handled learns of a reset
        that read carried (a rapid reset) before it connects anywhere."""
        tunnel = self._tunnels.get(stream_id)
        return tunnel is not None and not self._closed and tunnel.phase is _Phase.PENDING

    def accept(self, stream_id: int) -> bool:
        """Answer 200: policy allowed and the upstream connect succeeded.

        False if the stream is already gone (the peer reset it); close upstream then.
        """
        tunnel = self._tunnels.get(stream_id)
        if self._closed or tunnel is None:
            return False
        if tunnel.phase is not _Phase.PENDING:
            raise HboneProtocolError(f"stream {stream_id} was already answered")
        try:
            self._h2.send_response_200(stream_id)
        except h2.exceptions.ProtocolError:
            self._drop(stream_id)
            return False
        tunnel.phase = _Phase.OPEN
        return True

    def refuse(self, stream_id: int, status: int) -> bool:
        """Answer with an error status (400 bad request, 401 denied, 503 unreachable).

        The response ends the stream and is followed by RST_STREAM(NO_ERROR),
        which RFC 9113 §8.1 allows after a complete response, so the client
        stops sending and the stream frees its slot at once.
        """
        if not 400 <= status <= 599:
            raise ValueError(f"refusal status {status} is not 4xx/5xx")
        tunnel = self._tunnels.get(stream_id)
        if self._closed or tunnel is None:
            return False
        if tunnel.phase is not _Phase.PENDING:
            raise HboneProtocolError(f"stream {stream_id} was already answered")
        self._drop(stream_id)
        self._send_refusal(stream_id, status)
        return True

    def _check_may_send(self, tunnel: _Tunnel) -> None:
        if tunnel.phase is _Phase.PENDING:
            raise HboneProtocolError("no DATA or END_STREAM before the 200: accept() first")

    def _send_refusal(self, stream_id: int, status: int) -> None:
        try:
            self._h2.send_headers(stream_id, [(":status", str(status))], end_stream=True)
        except h2.exceptions.ProtocolError:
            return  # already closed by the peer
        self._quiet_reset(stream_id, ErrorCodes.NO_ERROR)

    def _on_request(self, event: h2.events.RequestReceived, out: list[HboneEvent]) -> None:
        stream_id = event.stream_id or 0
        headers = event.headers or []
        if self._goaway_sent is not None and stream_id > self._goaway_sent:
            # Crossed our GOAWAY: not processed, the client retries elsewhere.
            self._quiet_reset(stream_id, ErrorCodes.REFUSED_STREAM)
            self._log.debug("hbone_stream_refused", stream_id=stream_id, reason="going away")
            return
        if self._h2.open_inbound_streams_with(stream_id) > self._settings.max_concurrent_streams:
            self._quiet_reset(stream_id, ErrorCodes.REFUSED_STREAM)
            self._log.debug("hbone_stream_refused", stream_id=stream_id, reason="max concurrent streams")
            self._count_early_end(out)
            return
        if _header_list_size(headers) > self._header_list_limit:
            self._refuse_unseen(stream_id, 431, "header list over the limit", out)
            return
        try:
            request = _parse_connect_request(headers, self._authorities)
        except _BadRequest as exc:
            self._refuse_unseen(stream_id, 400, str(exc), out)
            return
        self._tunnels[stream_id] = self._new_tunnel(_Phase.PENDING)
        out.append(TunnelRequested(stream_id, request.host, request.port, request.headers))

    def _refuse_unseen(self, stream_id: int, status: int, reason: str, out: list[HboneEvent]) -> None:
        """Refuse a request the caller never heard of."""
        self._send_refusal(stream_id, status)
        self._log.debug("hbone_request_refused", stream_id=stream_id, status=status, reason=reason)
        self._count_early_end(out)

    def _on_early_reset(self, out: list[HboneEvent]) -> None:
        self._count_early_end(out)

    def _count_early_end(self, out: list[HboneEvent]) -> None:
        """Rapid-reset guard: too many streams ending unanswered closes the connection."""
        now = self._clock()
        horizon = now - self._settings.rapid_reset_window_s
        early_ends = self._early_ends
        while early_ends and early_ends[0] <= horizon:
            early_ends.popleft()
        early_ends.append(now)
        if len(early_ends) > self._settings.rapid_reset_limit:
            self._fail(out, ErrorCodes.ENHANCE_YOUR_CALM, "too many streams cancelled or refused before an answer")
