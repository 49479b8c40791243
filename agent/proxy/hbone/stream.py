"""Per-stream bookkeeping the core keeps beside h2's stream state: answered or not, windows, half-closes."""
from __future__ import annotations

import enum
from dataclasses import dataclass


class _Phase(enum.Enum):
    PENDING = "pending"  # request sent / surfaced, no answer yet
    OPEN = "open"  # answered 2xx: DATA may flow both ways


@dataclass(slots=True)
class _Tunnel:
    """Per-stream bookkeeping the core keeps beside h2's stream state."""

    phase: _Phase
    send_window: int  # what the peer lets us send on this stream
    recv_window: int  # what the peer may still send before our next WINDOW_UPDATE
    unacked: int = 0  # flow-controlled bytes surfaced and not yet acknowledged
    recv_credit: int = 0  # acknowledged bytes not yet announced in a WINDOW_UPDATE
    local_ended: bool = False
    remote_ended: bool = False
