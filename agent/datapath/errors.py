"""Why a capture backend cannot run on this host."""
from __future__ import annotations


class CaptureUnavailable(RuntimeError):
    """The host lacks what a --capture backend needs (a library, a kernel
    feature): the agent says so and exits instead of running without capture."""
