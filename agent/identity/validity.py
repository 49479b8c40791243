"""Time facts about workload certificates that need no X.509 library.

Kept apart from ca.py so the long-running agent can reason about the
certificates it holds (when to rotate, whether one is usable) without
loading `cryptography` (~9 MB of RSS): see credentials_child.py.
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Callable

Clock = Callable[[], datetime]

DEFAULT_LEAF_TTL = timedelta(hours=24)
# Certificates start a little in the past so a peer whose clock lags ours
# does not reject a certificate issued a moment ago as "not yet valid".
CLOCK_SKEW_ALLOWANCE = timedelta(minutes=1)


def utc_now() -> datetime:
    return datetime.now(timezone.utc)
