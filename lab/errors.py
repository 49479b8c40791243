"""What the lab raises: every message says what to do."""
from __future__ import annotations


class LabError(Exception):
    """The lab cannot do what was asked; the message says what to do."""


class LeftoversFound(LabError):
    """A previous lab run did not clean up."""


class LabNotRunning(LabError):
    """There is no lab state to act on."""
