"""A text stream that keeps each write() call apart, as the kernel sees them
(a log line and its newline in one call is one write(2))."""
from __future__ import annotations


class WriteRecorder:
    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass
