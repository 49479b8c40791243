"""Waiting on an observed condition, never on time: poll it briefly, give up
at a deadline, and say what never arrived (`what` may be a callable, asked
then, so the message can carry the last thing observed)."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


Described = str | Callable[[], str]


class _Deadline:
    def __init__(self, what: Described, timeout: float) -> None:
        self.what, self.timeout = what, timeout
        self.at = time.monotonic() + timeout

    def check(self) -> None:
        if time.monotonic() > self.at:
            what = self.what() if callable(self.what) else self.what
            raise AssertionError(f"never happened within {self.timeout:g}s: {what}")


def wait_until(check: Callable[[], T], what: Described, timeout: float = 10.0, interval: float = 0.02) -> T:
    """check()'s first truthy value; AssertionError naming `what` after `timeout` seconds."""
    deadline = _Deadline(what, timeout)
    while not (value := check()):
        deadline.check()
        time.sleep(interval)
    return value


async def until(check: Callable[[], T], what: Described, timeout: float = 10.0, interval: float = 0.02) -> T:
    """wait_until for a coroutine: the event loop runs between looks."""
    deadline = _Deadline(what, timeout)
    while not (value := check()):
        deadline.check()
        await asyncio.sleep(interval)
    return value
