"""One structured JSON line per connection, when it closes: who talked to
whom (addresses and identities), how much, how long, what policy decided
and why. Logged under `ambit.access` so it can be routed separately."""
from __future__ import annotations

from dataclasses import dataclass

import structlog

access_log = structlog.get_logger("ambit.access")


@dataclass(frozen=True)
class ConnectionRecord:
    listener: str                 # outbound | inbound_plaintext | hbone
    src: str                      # client ip:port
    dst: str                      # original destination ip:port
    src_identity: str | None
    dst_identity: str | None
    sent: int                     # bytes client -> destination
    received: int                 # bytes destination -> client
    duration_ms: float
    decision: str                 # allow | deny
    reason: str
    end: str                      # closed, upstream_reset, connect_refused, denied, ...
    error: str | None = None
    via: str = "direct"           # direct | hbone | passthrough


def log_connection(record: ConnectionRecord) -> None:
    access_log.info("connection", **record.__dict__)
