"""Registry of the connections the proxy is serving right now.

Kept apart from the relay so `ambitctl connections`, metrics and policy
re-evaluation can read it without touching sockets. The relay writes byte
counts into a `ConnectionProgress` it is given (a plain attribute add per
spliced chunk, nothing more on the data path); readers get immutable
`ConnectionInfo` snapshots. An entry may name the task serving it, so a
policy change can close the connection (`TrackedConnection.cancel`) without
the registry knowing how bytes move.
"""
from __future__ import annotations

import asyncio
import enum
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..identity.spiffe import SpiffeId
from .listeners import AcceptedConnection, ListenerKind, SocketAddress


class ConnectionState(enum.Enum):
    CONNECTING = "connecting"    # accepted, upstream not connected yet
    ESTABLISHED = "established"  # bytes flow both ways
    HALF_CLOSED = "half_closed"  # one side sent FIN, the other still talks
    CLOSED = "closed"            # both sides done (or reset); about to be removed


class ConnectionProgress:
    """Mutable, per-connection counters written by whoever moves the bytes."""

    __slots__ = ("state", "bytes_to_upstream", "bytes_to_client")

    def __init__(self) -> None:
        self.state = ConnectionState.CONNECTING
        self.bytes_to_upstream = 0  # client -> original destination
        self.bytes_to_client = 0    # original destination -> client


@dataclass(frozen=True)
class DestinationCheck:
    """What this node's destination-side policy decision was made on, kept
    so the same question can be asked again when policy changes."""

    source_ip: str
    source_identity: SpiffeId | None  # None: plaintext peer
    dst_ip: str
    dst_port: int


class ConnectionMeta:
    """What the proxy learned about a connection while setting it up: who is
    on each end, how it travels, what policy said. Written once by the
    handler, read by `ambitctl connections`; `authorized` is set when this
    node admitted the connection as its destination, `revoked` when a later
    policy change closed it."""

    __slots__ = ("source_identity", "destination_identity", "decision", "reason", "via", "destination_ip",
                 "service", "authorized", "revoked", "series")

    def __init__(self) -> None:
        self.destination_ip = ""  # where the connection really goes (a Service VIP resolves to a pod)
        self.service = ""         # "namespace/name" when dialled through a Service
        self.source_identity = ""
        self.destination_identity = ""
        self.decision = "allow"
        self.reason = ""
        self.via = "direct"
        self.authorized: DestinationCheck | None = None
        self.revoked = False
        self.series: Any = None  # the metrics series it was opened with (telemetry.metrics.TcpSeries)


@dataclass(frozen=True)
class ConnectionInfo:
    """One row of `ambitctl connections`."""

    id: int
    client: SocketAddress
    original_dst: SocketAddress
    listener: ListenerKind
    started_at: float
    state: ConnectionState
    bytes_to_upstream: int
    bytes_to_client: int
    source_identity: str = ""
    destination_identity: str = ""
    decision: str = "allow"
    reason: str = ""
    via: str = "direct"


@dataclass(frozen=True)
class TrackedConnection:
    """A registry entry: identity + the live progress the relay updates, and
    the task serving the connection (None: it cannot be closed from outside)."""

    id: int
    accepted: AcceptedConnection
    progress: ConnectionProgress
    meta: ConnectionMeta
    task: asyncio.Task[Any] | None = None

    def cancel(self, reason: str) -> bool:
        """Ask the serving task to stop: its relay resets both sides. False
        when there is no task or it already finished."""
        if self.task is None or self.task.done():
            return False
        return self.task.cancel(reason)

    def info(self) -> ConnectionInfo:
        return ConnectionInfo(
            id=self.id,
            client=self.accepted.client,
            original_dst=self.accepted.original_dst,
            listener=self.accepted.listener,
            started_at=self.accepted.accepted_at,
            state=self.progress.state,
            bytes_to_upstream=self.progress.bytes_to_upstream,
            bytes_to_client=self.progress.bytes_to_client,
            source_identity=self.meta.source_identity,
            destination_identity=self.meta.destination_identity,
            decision=self.meta.decision,
            reason=self.meta.reason,
            via=self.meta.via,
        )


class ConnectionRegistry:
    """Live connections by id; ids are never reused within one registry."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._live: dict[int, TrackedConnection] = {}

    def add(self, accepted: AcceptedConnection, task: asyncio.Task[Any] | None = None) -> TrackedConnection:
        tracked = TrackedConnection(next(self._ids), accepted, ConnectionProgress(), ConnectionMeta(), task)
        self._live[tracked.id] = tracked
        return tracked

    def remove(self, connection_id: int) -> ConnectionInfo | None:
        """Forget a connection; returns its last state (for an access log), or
        None if it was not registered."""
        tracked = self._live.pop(connection_id, None)
        return None if tracked is None else tracked.info()

    def discard(self, connection_id: int) -> None:
        """Forget a connection (the proxy's close path: no final snapshot built)."""
        self._live.pop(connection_id, None)

    def get(self, connection_id: int) -> TrackedConnection | None:
        return self._live.get(connection_id)

    def snapshot(self) -> tuple[ConnectionInfo, ...]:
        """Immutable copy of every live connection, oldest first."""
        return tuple(tracked.info() for tracked in self._live.values())

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[TrackedConnection]:
        return iter(list(self._live.values()))
