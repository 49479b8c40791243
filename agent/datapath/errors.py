"""Why a capture backend cannot run on this host."""
from __future__ import annotations

import importlib.util


class CaptureUnavailable(RuntimeError):
    """The host lacks what a --capture backend needs (a library, a kernel
    feature): the agent says so and exits instead of running without capture."""


_LIBRARIES = {
    "ebpf": ("bcc", "bcc's Python module (Debian: apt-get install python3-bpfcc"),
    "nftables": ("nftables", "libnftables' Python binding (Debian: apt-get install python3-nftables"),
}


def require_backend(mode: str) -> None:
    """CaptureUnavailable if the backend's library is missing. The agent
    asks before making anything (it would otherwise leave a proxy namespace
    behind); the datapaths ask again for callers that skip the agent.

    Found, not imported: importing bcc maps LLVM into the process, and only
    the short-lived loader (programs.load_program_set) ever imports it. The
    eBPF backend's agent side needs libbpf.so.1 (bpfsys), which bcc's
    package depends on."""
    if mode not in _LIBRARIES:
        return
    module, what = _LIBRARIES[mode]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise CaptureUnavailable(f"--capture {mode} needs {what}; a venv must see system site packages)")
    if mode == "ebpf":
        from . import bpfsys

        if not bpfsys.available():
            raise CaptureUnavailable(f"--capture ebpf needs {bpfsys.LIBBPF} (Debian: apt-get install libbpf1)")
