"""A connection that arrives before the agent can decide (its enrolment
records not loaded, discovery not synced) waits, bounded, instead of being
refused at once: a restarted agent's listeners open a moment before its
records and view are whole."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from ambit.agent.policy.authz import DISCOVERY_NOT_SYNCED, RECORDS_NOT_LOADED
from ambit.agent.proxy import node_proxy
from ambit.agent.proxy.node_proxy import NodeProxy
from ambit.agent.telemetry.metrics import Metrics


def _proxy(synced: asyncio.Event | None, records: asyncio.Event | None = None,
           pending: str = "AuthorizationPolicy: listing") -> NodeProxy:
    mesh = SimpleNamespace(pending=lambda: "" if synced is not None and synced.is_set() else pending,
                           until_synced=synced.wait if synced is not None else None)
    return NodeProxy("unused", Metrics(), lambda ip: None, mesh=mesh, records_loaded=records)  # type: ignore[arg-type]


def test_records_and_a_view_that_arrive_while_the_connection_waits_let_it_be_decided() -> None:
    async def scenario() -> object:
        synced, records = asyncio.Event(), asyncio.Event()
        waiting = asyncio.ensure_future(_proxy(synced, records)._undecidable())
        await asyncio.sleep(0)
        assert not waiting.done()  # the connection waits for the records
        records.set()
        await asyncio.sleep(0)
        assert not waiting.done()  # and then for discovery
        synced.set()
        return await waiting

    assert asyncio.run(scenario()) is None


def test_a_view_that_never_syncs_is_refused_after_the_bounded_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node_proxy, "SYNC_WAIT_S", 0.01)
    reason, label = asyncio.run(_proxy(asyncio.Event())._undecidable())
    assert label == DISCOVERY_NOT_SYNCED and "AuthorizationPolicy: listing" in reason


def test_records_never_loaded_are_refused_with_their_own_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node_proxy, "SYNC_WAIT_S", 0.01)
    synced = asyncio.Event()
    synced.set()
    reason, label = asyncio.run(_proxy(synced, asyncio.Event())._undecidable())
    assert label == RECORDS_NOT_LOADED and "enrolment records" in reason


def test_nothing_to_wait_for_decides_at_once() -> None:
    assert asyncio.run(NodeProxy("unused", Metrics(), lambda ip: None)._undecidable()) is None
    reason, label = asyncio.run(_proxy(None)._undecidable())  # no way to wait: refused at once
    assert label == DISCOVERY_NOT_SYNCED
