"""Waiting on an observed condition, never on time: poll it briefly, give up
at a deadline, and say what never arrived."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(check: Callable[[], T], what: str, timeout: float = 10.0, interval: float = 0.02) -> T:
    """check()'s first truthy value; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened within {timeout:g}s: {what}")
        time.sleep(interval)


async def until(check: Callable[[], T], what: str, timeout: float = 10.0, interval: float = 0.02) -> T:
    """wait_until for a coroutine: the event loop runs between looks."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened within {timeout:g}s: {what}")
        await asyncio.sleep(interval)
