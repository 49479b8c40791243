"""How a tunnel ended, and why one could not be opened (what the access log, metrics and callers see)."""
from __future__ import annotations

import enum
from dataclasses import dataclass


class TunnelEnd(enum.Enum):
    """How a tunnel ended (access log, metrics)."""

    CLOSED = "closed"  # FIN both ways
    STREAM_RESET = "stream_reset"  # the HBONE peer reset the stream; TCP got RST
    TCP_RESET = "tcp_reset"  # the TCP side failed; the stream got RST_STREAM
    CONNECTION_LOST = "connection_lost"  # the HBONE connection went away
    REFUSED = "refused"  # never opened (non-200, or refused by us)
    ABORTED = "aborted"  # we aborted it (shutdown, cancellation)


@dataclass(frozen=True)
class TunnelOutcome:
    end: TunnelEnd
    bytes_to_stream: int  # read from TCP, sent as DATA
    bytes_to_tcp: int  # received as DATA, written to TCP
    detail: str = ""


class TunnelError(Exception):
    """A tunnel could not be opened."""


class TunnelRefused(TunnelError):
    """The HBONE server answered the CONNECT with a non-200 status."""

    def __init__(self, status: int) -> None:
        super().__init__(f"CONNECT refused with status {status}")
        self.status = status


class TunnelReset(TunnelError):
    """The stream was reset before the server answered."""

    def __init__(self, error_code: int) -> None:
        name = getattr(error_code, "name", str(error_code))
        super().__init__(f"CONNECT stream reset ({name})")
        self.error_code = error_code


class HboneConnectionLost(TunnelError):
    """The HBONE connection ended before the server answered."""
