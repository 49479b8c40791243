"""`python -m ambit.agent.datapath.loader --pin-dir DIR`: compile ambit's
tc programs with bcc, have the kernel verify and load them, pin them, exit.

The agent runs this as a child process when the program set it needs is
not pinned yet (programs.Programs.open), so LLVM and clang are mapped
only for the ~1-2 s of a compile and never in the long-running agent. The
maps are created or re-adopted by BPF_TABLE_PINNED during the compile.
The set is pinned into a scratch directory and renamed into place when
complete; a concurrent loader that published the same set first wins.
Prints one JSON line: the set id, its directory and the seconds taken.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from pathlib import Path

from . import bpfsys
from .programs import BPF_SOURCE_DIR, PROGRAM_NAMES, SCRATCH_PREFIX, ProgramSet, ensure_bpffs, remove_tree


def load_program_set(program_set: ProgramSet) -> bool:
    """Compile, load and pin; False when another loader published the set first."""
    from bcc import BPF  # only ever imported in this short-lived process

    ensure_bpffs(program_set.pin_dir)
    bpf = BPF(text=program_set.text.encode(), cflags=list(program_set.flags))
    scratch = os.path.join(program_set.pin_dir, f"{SCRATCH_PREFIX}{program_set.set_id}-{os.getpid()}")
    try:
        os.mkdir(scratch, 0o700)
        for name in PROGRAM_NAMES:
            bpfsys.obj_pin(bpf.load_func(name.encode(), BPF.SCHED_CLS).fd, os.path.join(scratch, name))
        try:
            os.rename(scratch, program_set.directory)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            return False
        return True
    finally:
        remove_tree(scratch)  # gone after the rename; left over after a failure
        bpf.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ambit.agent.datapath.loader",
                                     description="Compile, load and pin ambit's tc programs (run by ambit-agent).")
    parser.add_argument("--pin-dir", required=True, help="the agent's bpffs directory")
    parser.add_argument("--source-dir", type=Path, default=BPF_SOURCE_DIR, help="where bpf/*.c are")
    args = parser.parse_args(argv)
    program_set = ProgramSet.read(args.pin_dir, args.source_dir)
    started = time.monotonic()
    try:
        published = load_program_set(program_set)
    except Exception as exc:  # a compile error, the verifier's refusal: one readable line for the agent
        print(f"cannot load the eBPF programs: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"set": program_set.set_id, "directory": program_set.directory, "published": published,
                      "seconds": round(time.monotonic() - started, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
