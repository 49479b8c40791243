"""One call in flight per key: concurrent callers asking the same thing share it.

A hundred pods of one node enrolled at once ask the CA for their certificates
together; the agent must send one request per identity, and the CA one
TokenReview per token and one pod list per node, not one per caller. Nothing
is cached once the call is done, so no answer is ever older than the call
that produced it.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    def __init__(self) -> None:
        self._calls: dict[K, asyncio.Task[V]] = {}

    def in_flight(self, key: K) -> bool:
        return key in self._calls

    async def run(self, key: K, call: Callable[[], Awaitable[V]]) -> V:
        """`call()`'s result, shared with everyone who asks for `key` meanwhile.

        One caller giving up (cancelled) does not cancel the call for the others."""
        task = self._calls.get(key)
        if task is None:
            task = asyncio.ensure_future(call())
            self._calls[key] = task
            task.add_done_callback(lambda done: self._forget(key, done))
        return await asyncio.shield(task)

    def _forget(self, key: K, task: asyncio.Task[V]) -> None:
        if self._calls.get(key) is task:
            del self._calls[key]
        if not task.cancelled():
            task.exception()  # retrieved: a call nobody awaits any more must not warn
