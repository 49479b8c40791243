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
        Programs.load(str(tmp_path / "pins"))
    assert not (tmp_path / "pins").exists()  # nothing made on the way
