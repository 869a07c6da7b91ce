"""The only place that configures logging.

Everyone else does ``structlog.get_logger()`` and binds context with
``structlog.contextvars.bound_contextvars(account=...)``.  Lines go to stdout,
unbuffered: JSON lines when stdout is not a terminal (what journald and log
shippers want), a readable console format on a terminal.  Standard-library
records (asyncio, aiosmtplib) pass through the same processors, so they carry
the same context and format.

With ``log_file``, every line also goes to that file, always as JSON lines
(whatever the format on stdout), for systems without journald.  The file is
created private (0600), reopened when logrotate or an administrator renamed
it away, and on demand with ``reopen_log_file()`` (SIGHUP).

Redaction here is a safety net only: the code never puts a password, a PASS
or AUTH argument or a token into an event in the first place.
"""

from __future__ import annotations

import io
import logging
import logging.handlers
import os
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, Literal, TextIO

import structlog

from gpopd.errors import ConfigError

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


def _open_private_append(path: str) -> int:
    """Open ``path`` for appending, creating it 0600 whatever the umask."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
    while True:
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            try:
                # An existing file keeps the mode its owner gave it.
                return os.open(path, flags)
            except FileNotFoundError:
                continue  # renamed away between the two calls: create it after all
        try:
            # O_CREAT's mode went through the umask, which may have removed
            # the owner's write bit (umask 0277) or nothing at all.
            os.fchmod(fd, 0o600)
        except OSError:
            os.close(fd)
            raise
        return fd


class _PrivateLogFile(logging.handlers.WatchedFileHandler):
    """A WatchedFileHandler whose file is created 0600 and can be reopened on demand.

    The standard handler lets an error from reopening the file escape from
    the logging call itself; here a file that cannot be opened costs its
    lines (stdout still has them), is reported once on stderr, and is tried
    again at each line.
    """

    def __init__(self, path: Path) -> None:
        self._failing = False
        super().__init__(path, mode="a", encoding="utf-8", errors="backslashreplace")

    def _open(self) -> io.TextIOWrapper:
        fd = _open_private_append(self.baseFilename)
        return open(fd, "a", encoding=self.encoding, errors=self.errors)

    def _reopen(self, *, force: bool) -> None:
        if force and self.stream is not None:
            self.stream.flush()
            self.stream.close()
            self.stream = None  # _open() may fail
        if self.stream is not None:
            self.reopenIfNeeded()
        if self.stream is None:
            self.stream = self._open()
            self._statstream()
        self._failing = False

    def _report(self, exc: OSError) -> None:
        if not self._failing:
            self._failing = True
            print(
                f"gpopd: cannot write the log file {self.baseFilename}: {exc.strerror or exc};"
                " retrying at each line",
                file=sys.stderr,
                flush=True,
            )

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._reopen(force=False)
        except OSError as exc:
            self._report(exc)
            return
        logging.StreamHandler.emit(self, record)

    def reopen(self) -> None:
        self.acquire()
        try:
            self._reopen(force=True)
        except OSError as exc:
            self._report(exc)
            raise
        finally:
            self.release()


# Handlers installed by configure(), closed when it runs again.
_installed: list[logging.Handler] = []
_log_file: _PrivateLogFile | None = None


def reopen_log_file() -> bool:
    """Close and reopen the log file (after rotation); a no-op without one.

    Call it from the event loop (``loop.add_signal_handler``), not from a
    ``signal.signal`` handler, which could run while a line is half written.
    A file that cannot be opened is reported on the other handlers and
    retried at each later line; returns False then, else True.
    """
    if _log_file is None:
        return True
    try:
        _log_file.reopen()
    except OSError as exc:
        logging.getLogger("gpopd.logs").error(
            "cannot reopen the log file %s: %s", _log_file.baseFilename, exc.strerror or exc
        )
        return False
    return True


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
    log_file: Path | None = None,
) -> None:
    """Configure structlog and the standard library's logging once, at start-up.

    ``fmt`` applies to ``stream`` (stdout by default); ``log_file``, when
    given, receives the same lines as JSON always, whatever ``fmt`` is.  A
    log file that cannot be opened raises ``ConfigError`` before anything
    else changes.
    """
    global _log_file  # noqa: PLW0603  # logging is process-wide by nature
    file_handler = None
    if log_file is not None:
        try:
            file_handler = _PrivateLogFile(Path(log_file))
        except OSError as exc:
            raise ConfigError(f"log_file {log_file}: {exc.strerror or exc}") from exc

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
            key_order=["timestamp", "level", "event", "account"],
            drop_missing=True,
            # "key=true", not a bare "key": every field parses as key=value.
            bool_as_flag=False,
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
    handlers: list[logging.Handler] = [handler]
    if file_handler is not None:
        # Each formatter works on its own copy of the event, so the two
        # renderings do not see each other's changes.
        file_handler.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                foreign_pre_chain=shared,
                processors=[
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.dict_tracebacks,
                    structlog.processors.JSONRenderer(),
                ],
            )
        )
        handlers.append(file_handler)

    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    for old in _installed:
        old.close()
    _installed[:] = handlers
    _log_file = file_handler
    for new in handlers:
        root.addHandler(new)
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
