"""Spreading service connections evenly over ready endpoints.

Round robin per (service, port) over the endpoint list in the stable order
ClusterState returns: over any run of connections the endpoint counts differ
by at most one while the set does not change, with no per-connection state.
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TypeVar

T = TypeVar("T")


class EvenSpread:
    """Picks the next endpoint for a service port; one instance per proxy."""

    def __init__(self) -> None:
        self._next: dict[Hashable, int] = {}

    def pick(self, key: Hashable, endpoints: Sequence[T]) -> T | None:
        """`key` names the service port, e.g. ((namespace, name), port)."""
        if not endpoints:
            return None
        index = self._next.get(key, 0) % len(endpoints)
        self._next[key] = index + 1
        return endpoints[index]

    def peek(self, key: Hashable, endpoints: Sequence[T]) -> T | None:
        """What pick() would return, without advancing (for dry runs)."""
        if not endpoints:
            return None
        return endpoints[self._next.get(key, 0) % len(endpoints)]

    def forget(self, key: Hashable) -> None:
        """Drop the counter of a service port that went away."""
        self._next.pop(key, None)
