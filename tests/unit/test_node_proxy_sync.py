"""A connection that arrives before discovery has synced waits (bounded) for
the sync instead of being refused at once: a restarted agent's listeners open
a moment before its view is whole."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from ambit.agent.proxy import node_proxy
from ambit.agent.proxy.node_proxy import NodeProxy
from ambit.agent.telemetry.metrics import Metrics


def _proxy(synced: asyncio.Event | None, pending: str = "AuthorizationPolicy: listing") -> NodeProxy:
    mesh = SimpleNamespace(pending=lambda: "" if synced is not None and synced.is_set() else pending,
                           until_synced=synced.wait if synced is not None else None)
    return NodeProxy("unused", Metrics(), lambda ip: None, mesh=mesh)  # type: ignore[arg-type]


def test_a_view_that_syncs_while_the_connection_waits_is_whole() -> None:
    async def scenario() -> str:
        synced = asyncio.Event()
        proxy = _proxy(synced)
        waiting = asyncio.ensure_future(proxy._partial_view())
        await asyncio.sleep(0)  # the connection is waiting now
        assert not waiting.done()
        synced.set()  # discovery's last list arrives
        return await waiting

    assert asyncio.run(scenario()) == ""


def test_a_view_that_never_syncs_is_refused_after_the_bounded_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node_proxy, "SYNC_WAIT_S", 0.01)
    assert asyncio.run(_proxy(asyncio.Event())._partial_view()) == "AuthorizationPolicy: listing"


def test_no_discovery_or_no_way_to_wait_decides_at_once() -> None:
    assert asyncio.run(NodeProxy("unused", Metrics(), lambda ip: None)._partial_view()) == ""
    assert asyncio.run(_proxy(None)._partial_view()) == "AuthorizationPolicy: listing"
