"""The agent's choice of event loop (agent/eventloop.py)."""
import asyncio
import sys

import pytest

from ambit.agent import eventloop


async def which() -> str:
    await asyncio.sleep(0)
    return eventloop.current_name()


def test_auto_prefers_uvloop_when_installed():
    assert eventloop.loop_factory("auto")[0] == "uvloop"
    assert eventloop.run(which()) == "uvloop"


def test_asyncio_can_be_forced():
    assert eventloop.run(which(), "asyncio") == "asyncio"


def test_auto_falls_back_to_asyncio_without_uvloop(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)  # makes `import uvloop` fail
    assert eventloop.loop_factory("auto")[0] == "asyncio"
    assert eventloop.run(which()) == "asyncio"


def test_asking_for_uvloop_without_it_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)
    with pytest.raises(eventloop.EventLoopUnavailable, match="uvloop is not installed"):
        eventloop.loop_factory("uvloop")


def test_unknown_loop_is_rejected():
    with pytest.raises(ValueError, match="unknown event loop"):
        eventloop.loop_factory("trio")


def test_run_returns_the_result_and_closes_the_loop():
    loops = []

    async def body():
        loops.append(asyncio.get_running_loop())
        return 42

    assert eventloop.run(body()) == 42
    assert loops[0].is_closed()


def test_the_agent_exits_2_when_the_asked_for_loop_is_missing(tmp_path):
    """--event-loop uvloop on a host without it: a one-line reason, no traceback, nothing made."""
    import json
    import subprocess

    code = ("import sys; sys.modules['uvloop'] = None\n"
            "from ambit.agent.main import main\n"
            f"main(['--capture', 'none', '--event-loop', 'uvloop', '--socket', {str(tmp_path / 'run/agent.sock')!r},"
            f" '--state-dir', {str(tmp_path / 'state')!r}, '--discovery', 'none'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert lines[-1]["event"] == "cannot start" and "uvloop is not installed" in lines[-1]["error"]
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []
