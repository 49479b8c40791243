"""What the HBONE core does with each event h2 reports for the frames it parses
(HEADERS, RST_STREAM, SETTINGS, PING ACK, GOAWAY): a part of `_HboneConnection`
(connection.py), kept apart because it is the h2-facing half; the frames the core
parses itself (DATA, WINDOW_UPDATE) stay in connection.py."""
from __future__ import annotations

import h2.events
import h2.settings
from h2.errors import ErrorCodes

from .events import (
    ConnectionClosed,
    GoingAway,
    HboneEvent,
    PingAcked,
    SettingsChanged,
    StreamEnded,
    StreamReset,
    WindowOpened,
)
from .frames import _DEFAULT_WINDOW, _GOAWAY_DEBUG_MAX, _MAX_WINDOW, _FatalInput, _error_code
from .stream import _Phase

class _H2EventHandling:
    """Mixed into `_HboneConnection`, whose state it uses (_tunnels, _h2,
    _blocked_streams, _log ...); client.py and server.py override the hooks
    (_on_early_reset, _refuse_unprocessed)."""

    def _dispatch(self, h2_events: list[h2.events.Event], out: list[HboneEvent]) -> None:
        for event in h2_events:
            if self._closed:
                return
            if isinstance(event, h2.events.RequestReceived):
                self._on_request(event, out)
            elif isinstance(event, h2.events.ResponseReceived):
                self._on_response(event, out)
            elif isinstance(event, h2.events.StreamEnded):
                self._on_stream_ended(event, out)
            elif isinstance(event, h2.events.StreamReset):
                self._on_stream_reset(event, out)
            elif isinstance(event, h2.events.TrailersReceived):
                self._on_trailers(event, out)
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                self._on_remote_settings(event, out)
            elif isinstance(event, h2.events.PingAckReceived):
                out.append(PingAcked(event.ping_data or b""))
            elif isinstance(event, h2.events.ConnectionTerminated):
                self._on_terminated(event, out)
            # DataReceived (only the zero-length frames we feed h2), WindowUpdated
            # (only for streams we do not carry), PingReceived (h2 answers it),
            # SettingsAcknowledged, PriorityUpdated, InformationalResponseReceived,
            # UnknownFrameReceived: nothing to do.

    def _on_stream_ended(self, event: h2.events.StreamEnded, out: list[HboneEvent]) -> None:
        stream_id = event.stream_id or 0
        tunnel = self._tunnels.get(stream_id)
        if tunnel is None:
            return
        tunnel.remote_ended = True
        out.append(StreamEnded(stream_id))
        self._forget_if_done(stream_id, tunnel)

    def _on_stream_reset(self, event: h2.events.StreamReset, out: list[HboneEvent]) -> None:
        stream_id = event.stream_id or 0
        tunnel = self._drop(stream_id)
        if tunnel is None:
            return
        out.append(StreamReset(stream_id, _error_code(event.error_code), remote=bool(event.remote_reset)))
        if event.remote_reset and tunnel.phase is _Phase.PENDING:
            self._on_early_reset(out)

    def _on_early_reset(self, out: list[HboneEvent]) -> None:
        """The peer cancelled a stream before it was answered (server counts these)."""

    def _on_graceful_goaway(self, last_stream_id: int, debug: bytes, out: list[HboneEvent]) -> None:
        if self._goaway_received is not None:
            # A second one may only lower the bound (RFC 9113 §6.8).
            last_stream_id = min(last_stream_id, self._goaway_received)
        self._goaway_received = last_stream_id
        self._refuse_unprocessed(last_stream_id, out)
        reason = debug[:_GOAWAY_DEBUG_MAX].decode("utf-8", "replace")
        out.append(GoingAway(last_stream_id, reason))
        self._log.info("hbone_goaway_received", error_code="NO_ERROR", last_stream_id=last_stream_id, reason=reason,
                       open_streams=len(self._tunnels))

    def _refuse_unprocessed(self, last_stream_id: int, out: list[HboneEvent]) -> None:
        """Hook: the client's streams the peer never processed."""

    def _on_trailers(self, event: h2.events.TrailersReceived, out: list[HboneEvent]) -> None:
        # RFC 9113 §8.5: only DATA and stream management frames on a tunnel.
        self._abort_stream(event.stream_id or 0, ErrorCodes.PROTOCOL_ERROR, out, "trailers on a tunnel")

    def _on_request(self, event: h2.events.RequestReceived, out: list[HboneEvent]) -> None:
        # h2 itself rejects requests arriving at a client.
        self._quiet_reset(event.stream_id or 0, ErrorCodes.PROTOCOL_ERROR)

    def _on_response(self, event: h2.events.ResponseReceived, out: list[HboneEvent]) -> None:
        self._quiet_reset(event.stream_id or 0, ErrorCodes.PROTOCOL_ERROR)

    def _on_remote_settings(self, event: h2.events.RemoteSettingsChanged, out: list[HboneEvent]) -> None:
        remote = self._h2.remote_settings
        changed = event.changed_settings.get(h2.settings.SettingCodes.INITIAL_WINDOW_SIZE)
        if changed is not None:
            before = _DEFAULT_WINDOW if changed.original_value is None else changed.original_value
            delta = changed.new_value - before
            if delta:
                # RFC 9113 §6.9.2: the change applies to every open stream's window.
                for tunnel in self._tunnels.values():
                    tunnel.send_window += delta
                    if tunnel.send_window > _MAX_WINDOW:
                        raise _FatalInput(ErrorCodes.FLOW_CONTROL_ERROR, "SETTINGS pushed a window above 2**31-1")
        self._max_outbound_frame = self._h2.max_outbound_frame_size
        out.append(SettingsChanged(remote.max_frame_size, remote.max_concurrent_streams, remote.initial_window_size))
        # A larger SETTINGS_INITIAL_WINDOW_SIZE opens every stream window.
        for stream_id in sorted(self._blocked_streams):
            tunnel = self._tunnels.get(stream_id)
            if tunnel is None:
                self._blocked_streams.discard(stream_id)
            elif tunnel.send_window > 0:
                self._blocked_streams.discard(stream_id)
                out.append(WindowOpened(stream_id))

    def _on_terminated(self, event: h2.events.ConnectionTerminated, out: list[HboneEvent]) -> None:
        error_code = _error_code(event.error_code)
        reason = (event.additional_data or b"").decode("utf-8", "replace")
        self._mark_closed()
        out.append(ConnectionClosed(error_code, reason, event.last_stream_id or 0, remote=True))
        self._log.info("hbone_goaway_received", error_code=getattr(error_code, "name", error_code), reason=reason)
