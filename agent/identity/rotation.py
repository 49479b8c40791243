"""Certificates fetched before they are needed and replaced before they expire.

The agent tells the rotation which identities its node needs (the service
accounts of its pods in the mesh, as discovery shows them): each gets a
certificate at once, so a new pod's first connection does not wait for the
CA, and a new one at the rotation point (half its lifetime). When the CA is
away or refuses, the attempt is repeated after a capped, jittered
exponential backoff (0.5 s doubling to 150 s, ztunnel's cap), while
connections go on with the certificate held as long as it is valid; the
first attempt after the CA is back succeeds. Identities the node no longer
needs are forgotten (their key deleted).

A certificate issued on demand (a connection for an identity discovery did
not announce yet) is kept current too, until the next `want` leaves it out.
"""
from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable
from datetime import datetime

import structlog

from ..backoff import Backoff
from .spiffe import SpiffeId
from .store import CertificateStore, WorkloadCert

CA_RETRY = Backoff(initial=0.5, maximum=150.0)

_log = structlog.get_logger(__name__)


class CertificateRotation:
    def __init__(self, store: CertificateStore, backoff: Backoff = CA_RETRY, rng: random.Random | None = None) -> None:
        self.store = store
        self._backoff = backoff
        self._rng = rng or random.Random()
        self._wanted: set[SpiffeId] = set()
        self._tasks: dict[SpiffeId, asyncio.Task[None]] = {}
        self._wake: dict[SpiffeId, asyncio.Event] = {}
        self._failures: dict[SpiffeId, str] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False
        store.subscribe(self._on_change)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    def want(self, identities: Iterable[SpiffeId]) -> None:
        """The identities this node needs now; the others are dropped."""
        wanted = {i for i in identities if i.trust_domain == self.store.trust_domain}
        for identity in wanted - self._wanted:
            self._follow(identity)
        for identity in (self._wanted | set(self._tasks)) - wanted:
            self._drop(identity)
        self._wanted = wanted

    def failures(self) -> dict[SpiffeId, str]:
        """Identities whose last attempt failed, with why (for status)."""
        return dict(self._failures)

    async def stop(self) -> None:
        self._stopped = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

    # -- per identity ---------------------------------------------------------

    def _follow(self, identity: SpiffeId) -> None:
        if self._stopped or identity in self._tasks:
            return
        self._wake[identity] = asyncio.Event()
        self._tasks[identity] = asyncio.get_running_loop().create_task(self._keep(identity),
                                                                       name=f"cert:{identity}")

    def _drop(self, identity: SpiffeId) -> None:
        task = self._tasks.pop(identity, None)
        if task is not None:
            task.cancel()
        self._wake.pop(identity, None)
        self._failures.pop(identity, None)
        self.store.remove(identity)

    def _on_change(self, identity: SpiffeId, cert: WorkloadCert | None) -> None:
        """A certificate appeared (perhaps issued on demand): keep it current too."""
        if cert is None or self._loop is None or self._stopped:
            return
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._track(identity)
        else:  # a TLS context built on a worker thread issued it
            self._loop.call_soon_threadsafe(self._track, identity)

    def _track(self, identity: SpiffeId) -> None:
        if identity in self._tasks:
            self._wake[identity].set()  # recompute the next rotation point
        else:
            self._follow(identity)

    async def _keep(self, identity: SpiffeId) -> None:
        attempt = 0
        while True:
            held = self.store.current(identity)
            now = self.store.clock()
            if held is None or now >= self.store.due_at(held) or now < held.issued.not_before:
                try:
                    held = await self.store.renew(identity)
                except Exception as exc:  # IssueError, a refusal, a bug: retry all, never stop
                    delay = self._backoff.delay(attempt, self._rng)
                    attempt += 1
                    self._failures[identity] = str(exc)
                    _log.warning("cert.request_failed", spiffe_id=str(identity), error=str(exc),
                                 attempt=attempt, retry_in_s=round(delay, 2),
                                 serving_with=f"{held.serial:x}" if held is not None else None)
                    await self._sleep(identity, delay)
                    continue
                attempt = 0
                self._failures.pop(identity, None)
            await self._sleep(identity, _seconds_until(self.store.due_at(held), self.store.clock()))

    async def _sleep(self, identity: SpiffeId, seconds: float) -> None:
        wake = self._wake[identity]
        wake.clear()
        try:
            await asyncio.wait_for(wake.wait(), max(0.0, seconds))
        except TimeoutError:
            pass


def _seconds_until(when: datetime, now: datetime) -> float:
    return (when - now).total_seconds()
