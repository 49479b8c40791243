"""Structured JSON logs for the agent, one object per line on stderr.

Loggers are bound with context (pod=, conn=, peer=) instead of formatting
strings, so a platform team can filter on any field.

Each line leaves in one write(2), its newline included (structlog's
WriteLogger; its PrintLogger wrote the newline in a second syscall): one
syscall per line instead of two (an access-log line per connection), and a
reader of the log never sees half a line.
"""
from __future__ import annotations

import logging
import sys

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
          "warning": logging.WARNING, "error": logging.ERROR}


def configure(level: str = "info", stream=None, json_output: bool = True) -> None:
    """Configure structlog once per process (agent start, CLI start)."""
    renderer = structlog.processors.JSONRenderer() if json_output else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=True,
    )
