"""The program set's id: what makes a restart reuse the pinned programs."""
from __future__ import annotations

import shutil
from pathlib import Path

from ambit.agent.datapath.programs import BPF_SOURCE_DIR, SET_DIR_PREFIX, ProgramSet


def test_the_id_follows_the_sources_and_defines_not_where_they_lie(tmp_path: Path) -> None:
    copy = tmp_path / "bpf"
    shutil.copytree(BPF_SOURCE_DIR, copy)
    original = ProgramSet.read("/sys/fs/bpf/ambit", BPF_SOURCE_DIR)
    assert ProgramSet.read("/sys/fs/bpf/ambit", copy).set_id == original.set_id   # -I is not part of it
    assert ProgramSet.read("/sys/fs/bpf/ambit/node2", copy).set_id != original.set_id  # AMBIT_PIN_DIR is
    (copy / "proxy_ingress.c").write_text((copy / "proxy_ingress.c").read_text() + "\n")
    changed = ProgramSet.read("/sys/fs/bpf/ambit", copy)
    assert changed.set_id != original.set_id
    assert changed.directory == f"/sys/fs/bpf/ambit/{SET_DIR_PREFIX}{changed.set_id}"
    assert "." not in changed.directory.rsplit("/", 1)[1]  # bpffs refuses names with a dot
