"""NftSession keeps listings off the context that applies changes: a listing
leaves libnftables' cache holding all it printed, which the next command on
that context frees first (O(pods) after every metrics scrape)."""
from __future__ import annotations

from typing import Any

import pytest

from ambit.agent.datapath import nft_session


class RecordingContext:
    """Stands in for a libnftables context: records what it was asked."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def json_cmd(self, payload: dict) -> tuple[int, dict, str]:
        self.calls.append(payload["nftables"])
        return 0, {"nftables": [{"metainfo": {}}, {"counter": {"name": "c"}}]}, ""


def test_reads_and_changes_use_separate_contexts(monkeypatch) -> None:
    made: list[RecordingContext] = []
    monkeypatch.setattr(nft_session, "_new_context", lambda: made.append(RecordingContext()) or made[-1])
    session = nft_session.NftSession()
    change = [{"create": {"element": {"family": "ip", "table": "ambit", "name": "pods", "elem": ["10.0.0.1"]}}}]
    listing = [{"list": {"counters": {"family": "ip", "table": "ambit"}}}]
    assert session.run(change) == [{"counter": {"name": "c"}}]
    assert len(made) == 1  # the reading context is made on the first read only
    assert session.read(listing) == [{"counter": {"name": "c"}}]
    session.run(change)
    writer, reader = made
    assert writer.calls == [change, change] and reader.calls == [listing]
    session.close()
    with pytest.raises(RuntimeError, match="closed"):
        session.read(listing)
