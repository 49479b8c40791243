"""Why a capture backend cannot run on this host."""
from __future__ import annotations


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
    behind); the datapaths ask again for callers that skip the agent."""
    if mode not in _LIBRARIES:
        return
    module, what = _LIBRARIES[mode]
    try:
        __import__(module)
    except ImportError:
        raise CaptureUnavailable(f"--capture {mode} needs {what}; a venv must see system site packages)") from None
