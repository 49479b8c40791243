"""The agent's event loop: uvloop when it is installed, asyncio's own otherwise.

Why: every byte the node proxy relays costs one loop wake-up per hop, and on
a small message that wake-up is most of what the proxy adds to a round trip.
Measured on the HBONE bench (two agents, 64-byte ping-pong, one CPU):
asyncio's selector loop spends ~4.5 us more per wake-up than uvloop's
(libuv in C), i.e. 165 -> 147 us per round trip. The proxy code is the same
on both (raw non-blocking sockets with add_reader/add_writer, BufferedProtocol
for TLS), so asyncio stays a complete fallback: `--event-loop asyncio`, or any
host without uvloop.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

CHOICES = ("auto", "uvloop", "asyncio")
T = TypeVar("T")


class EventLoopUnavailable(RuntimeError):
    """--event-loop uvloop on a host without it."""


def loop_factory(kind: str = "auto") -> tuple[str, Callable[[], asyncio.AbstractEventLoop]]:
    """(name, factory) of the loop to run: `auto` prefers uvloop."""
    if kind not in CHOICES:
        raise ValueError(f"unknown event loop {kind!r} (choose from {', '.join(CHOICES)})")
    if kind in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise EventLoopUnavailable("uvloop is not installed (pip install uvloop, or --event-loop asyncio)") from None
        else:
            return "uvloop", uvloop.new_event_loop
    return "asyncio", asyncio.new_event_loop


def run(main: Coroutine[Any, Any, T], kind: str = "auto") -> T:
    """asyncio.run() on the chosen loop."""
    _, factory = loop_factory(kind)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def current_name() -> str:
    """Which loop runs this coroutine: "uvloop" or "asyncio" (for logs and status)."""
    loop = asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
