"""One structured JSON line per connection, when it closes: who talked to
whom (addresses and identities), how much, how long, what policy decided
and why. Logged under `ambit.access` so it can be routed separately.

The fields go straight to the logger as keywords: no record object is
built and converted per connection.
"""
from __future__ import annotations

import structlog

access_log = structlog.get_logger("ambit.access")


def log_connection(*, listener: str, src: str, dst: str, src_identity: str | None, dst_identity: str | None,
                   sent: int, received: int, duration_ms: float, decision: str, reason: str, end: str,
                   error: str | None = None, via: str = "direct") -> None:
    """listener: outbound | inbound_plaintext | hbone; src: the client's ip:port; dst: the original
    destination ip:port; sent: bytes client -> destination; received: bytes destination -> client;
    decision: allow | deny; end: closed, upstream_reset, connect_refused, denied, ...;
    via: direct | hbone | waypoint | passthrough | local."""
    access_log.info("connection", listener=listener, src=src, dst=dst, src_identity=src_identity,
                    dst_identity=dst_identity, sent=sent, received=received, duration_ms=duration_ms,
                    decision=decision, reason=reason, end=end, error=error, via=via)
