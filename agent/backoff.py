"""Retry delays: exponential, capped and jittered, so a fleet of agents does
not come back in step (watch reconnects, certificate requests to a CA that
was away)."""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    initial: float = 0.5
    maximum: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def delay(self, attempt: int, rng: random.Random) -> float:
        base = min(self.maximum, self.initial * self.multiplier ** min(attempt, 32))
        return min(self.maximum, base * (1.0 + self.jitter * (2.0 * rng.random() - 1.0)))
