"""Signals while the lab is built or torn down: Ctrl-C stops `up` at the next step and tears down;
during teardown it is held until the lab is gone.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class Interrupts:
    """Ctrl-C, SIGTERM and SIGHUP while `up` runs.

    The handler only notes the signal; `up` acts on it at its next checkpoint
    (between steps, after each pod), or at once while it is merely waiting.
    Raising KeyboardInterrupt at an arbitrary point would land it inside
    library code: in a fork hook (where CPython prints and drops it, so the
    Ctrl-C would be lost) or in pyroute2's event loop (which it breaks)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.received: list[int] = []
        self._owner = os.getpid()
        self._waiting = False

    def _handler(self, signum: int, frame: object) -> None:
        if os.getpid() != self._owner:  # a forked child not yet exec'd: never run our teardown there
            os._exit(128 + signum)
        self.received.append(signum)
        if self._waiting:
            raise KeyboardInterrupt(signal.Signals(signum).name)

    def check(self) -> None:
        if self.received:
            raise KeyboardInterrupt(signal.Signals(self.received[0]).name)

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """A stretch that only waits (for an agent, for a workload): stop it at once."""
        self.check()
        self._waiting = True
        try:
            yield
        finally:
            self._waiting = False
        self.check()

    @contextlib.contextmanager
    def installed(self) -> Iterator["Interrupts"]:
        if not _in_main_thread():  # signal handlers can only be set there
            yield self
            return
        previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[list[int]]:
    """Teardown must finish: a second Ctrl-C is noted, not obeyed."""
    received: list[int] = []
    if not _in_main_thread():
        yield received
        return
    owner = os.getpid()

    def note(signum: int, frame: object) -> None:
        if os.getpid() != owner:
            os._exit(128 + signum)
        received.append(signum)

    previous = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
