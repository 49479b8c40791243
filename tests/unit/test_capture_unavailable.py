"""A host without a backend's library gets a sentence, not a traceback."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ambit.agent.datapath import nft_session
from ambit.agent.datapath.errors import CaptureUnavailable
from ambit.agent.datapath.programs import Programs


def test_nftables_without_its_python_binding(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "nftables", None)  # makes `import nftables` fail
    with pytest.raises(CaptureUnavailable, match="python3-nftables"):
        nft_session._new_context()


def test_ebpf_without_bcc(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "bcc", None)
    with pytest.raises(CaptureUnavailable, match="python3-bpfcc"):
        Programs.open(str(tmp_path / "pins"))
    assert not (tmp_path / "pins").exists()  # nothing made on the way


@pytest.mark.parametrize("mode, module, package", [("ebpf", "bcc", "python3-bpfcc"),
                                                    ("nftables", "nftables", "python3-nftables")])
def test_the_agent_exits_2_before_making_anything(tmp_path: Path, mode: str, module: str, package: str) -> None:
    """Checked before the socket, the proxy namespace or any state exists."""
    import json
    import subprocess

    code = (f"import sys; sys.modules[{module!r}] = None\n"
            "from ambit.agent.main import main\n"
            f"main(['--capture', {mode!r}, '--socket', {str(tmp_path / 'run/agent.sock')!r},"
            f" '--state-dir', {str(tmp_path / 'state')!r}, '--proxy-netns', 'never-made-proxy',"
            " '--discovery', 'none'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert lines[-1]["event"] == "cannot start" and package in lines[-1]["error"]
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []
    assert not Path("/var/run/netns/never-made-proxy").exists()
