"""The only place that configures logging.

Everyone else does ``structlog.get_logger()`` and binds context with
``structlog.contextvars.bound_contextvars(account=...)``.  Lines go to stdout,
unbuffered: JSON lines when stdout is not a terminal (what journald and log
shippers want), a readable console format on a terminal.  Standard-library
records (asyncio, aiosmtplib) pass through the same processors, so they carry
the same context and format.

Redaction here is a safety net only: the code never puts a password, a PASS
or AUTH argument or a token into an event in the first place.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any, Literal, TextIO

import structlog

LogFormat = Literal["json", "console", "logfmt"]

# Keys whose values are never printed, whatever code put them into an event.
_SECRET_KEYS = frozenset(
    {"password", "pass", "secret", "token", "access_token", "refresh_token", "client_secret"}
)
REDACTED = "***"

# journald reads a "<N>" prefix on each line as the syslog priority.
_JOURNAL_PRIORITY = {
    "debug": 7,
    "info": 6,
    "warning": 4,
    "warn": 4,
    "error": 3,
    "critical": 2,
    "exception": 3,
}


def _redact(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in _SECRET_KEYS.intersection(event):
        event[key] = REDACTED
    return event


def _journal_prefix(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    # Runs before the renderer: stash the priority for the final formatter.
    event["_priority"] = _JOURNAL_PRIORITY.get(str(event.get("level", "info")), 6)
    return event


class _PriorityPrefixRenderer:
    """Wraps a renderer so each line starts with journald's ``<N>``."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __call__(self, logger: Any, name: str, event: MutableMapping[str, Any]) -> str:
        priority = event.pop("_priority", 6)
        return f"<{priority}>{self._inner(logger, name, event)}"


def stdout_is_journal(stream: TextIO = sys.stdout) -> bool:
    """True when ``stream`` is the journal stream systemd gave us ($JOURNAL_STREAM)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, inode = (int(part) for part in value.split(":", 1))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, inode)


def choose_format(requested: LogFormat | None, stream: TextIO = sys.stdout) -> LogFormat:
    if requested is not None:
        return requested
    try:
        return "console" if stream.isatty() else "json"
    except (AttributeError, ValueError):
        return "json"


def configure(
    *,
    fmt: LogFormat | None = None,
    level: str = "info",
    stream: TextIO | None = None,
) -> None:
    """Configure structlog and the standard library's logging once, at start-up."""
    out = stream if stream is not None else sys.stdout
    chosen = choose_format(fmt, out)
    journal = stdout_is_journal(out)
    numeric_level = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
    ]
    renderer: Any
    if chosen == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty() and not journal)
    elif chosen == "logfmt":
        renderer = structlog.processors.LogfmtRenderer(
            key_order=["timestamp", "level", "event", "account"], drop_missing=True
        )
    else:
        renderer = structlog.processors.JSONRenderer()
    final: list[Any] = []
    if chosen != "console":
        final.append(structlog.processors.dict_tracebacks)
    if journal:
        final.append(_journal_prefix)
        renderer = _PriorityPrefixRenderer(renderer)

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final, renderer],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric_level)

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
