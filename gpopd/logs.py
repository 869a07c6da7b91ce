"""The only place that configures logging.

Everyone else does ``structlog.get_logger()`` and binds context with
``structlog.contextvars.bound_contextvars(account=...)``.  Lines go to stdout,
unbuffered: JSON lines when stdout is not a terminal (what journald and log
shippers want), a readable console format on a terminal.  Standard-library
records (asyncio, aiosmtplib) pass through the same processors, so they carry
the same context and format.

gpopd's own lines take structlog's native path (a filtering bound logger, the
processors, then a write): going through the standard library's Logger,
Handler and Formatter for each line cost three times as much, and a poll logs
one line per message.  Only foreign records go through ``logging``; a handler
on the root logger hands them to the same processors and the same outputs.

With ``log_file``, every line also goes to that file, always as JSON lines
(whatever the format on stdout), for systems without journald.  The file is
created private (0600), reopened when logrotate or an administrator renamed
it away, and on demand with ``reopen_log_file()`` (SIGHUP).

Each output writes a line with a single write under its own lock, so lines
logged at once from worker threads never interleave, and an output that
fails costs its lines, never the caller: the failure is reported once on
stderr and the next line tries again.  ``written_together()`` lets a thread
hand over a burst of lines (a commit window's deliveries) as one write.

Redaction here is a safety net only: the code never puts a password, a PASS
or AUTH argument or a token into an event in the first place.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import operator
import os
import sys
import threading
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from pathlib import Path
from typing import Any, Literal, TextIO, cast

import structlog

from gpopd.durable import write_all
from gpopd.errors import ConfigError
from gpopd.privatefs import open_private

LogFormat = Literal["json", "console", "logfmt"]

Processor = Callable[[Any, str, Any], Any]

_dict_tracebacks = structlog.processors.dict_tracebacks

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
            return open_private(path, flags | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            try:
                # An existing file keeps the mode its owner gave it.
                return os.open(path, flags)
            except FileNotFoundError:
                continue  # renamed away between the two calls: create it after all


class _Output:
    """An output reports a failure once on stderr, then again only after a line got through."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failing = False

    def _failed(self, message: str) -> None:
        if self._failing:
            return
        self._failing = True
        with contextlib.suppress(Exception):  # stderr may be the same broken pipe
            print(message, file=sys.stderr, flush=True)


class _StreamOutput(_Output):
    """stdout (or the stream given to ``configure``): each line written and flushed whole."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream

    def write_lines(self, text: str) -> None:
        """Write ``text``, whole lines without their last newline, and flush."""
        with self._lock:
            try:
                # One write of the whole text, then flushed: journald and tail
                # see each line as soon as it is written.
                self.stream.write(text + "\n")
                self.stream.flush()
            except RecursionError:
                raise
            except Exception as exc:  # as logging.Handler does: drop the line, never raise
                self._failed(f"gpopd: cannot write log lines: {exc}; dropping them")
                return
            self._failing = False

    def flush(self) -> None:
        # A failure was reported at the line that failed.
        with self._lock, contextlib.suppress(Exception):
            self.stream.flush()


class _PrivateLogFile(_Output):
    """The log file: created 0600, reopened when renamed away, one write a line.

    Like ``logging.handlers.WatchedFileHandler``, each line first checks
    (one ``os.stat``) whether the path still names the open file, so the
    line after a rotation by rename lands in a new file.  A file that cannot
    be opened costs its lines (stdout still has them), is reported once on
    stderr, and is tried again at each line.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self._fd: int | None = None
        self._dev = self._ino = -1
        self._closed = False
        self._open()

    @property
    def closed(self) -> bool:
        return self._closed

    def _open(self) -> int:
        fd = _open_private_append(self.path)
        st = os.fstat(fd)
        self._fd, self._dev, self._ino = fd, st.st_dev, st.st_ino
        return fd

    def _close_fd(self) -> None:
        fd, self._fd, self._dev, self._ino = self._fd, None, -1, -1
        if fd is not None:
            with contextlib.suppress(OSError):  # every line was written by then
                os.close(fd)

    def _report(self, exc: OSError) -> None:
        self._failed(
            f"gpopd: cannot write the log file {self.path}: {exc.strerror or exc};"
            " retrying at each line"
        )

    def write_lines(self, text: str) -> None:
        """Append ``text``, whole lines without their last newline, with one write."""
        data = (text + "\n").encode("utf-8", "backslashreplace")
        with self._lock:
            if self._closed:
                return
            try:
                try:
                    st: os.stat_result | None = os.stat(self.path)
                except FileNotFoundError:
                    st = None
                fd = self._fd
                if fd is None or st is None or (st.st_ino, st.st_dev) != (self._ino, self._dev):
                    self._close_fd()
                    fd = self._open()
                # O_APPEND: the rest of a short write (a full disk) still
                # goes to the end.
                write_all(fd, data)
            except OSError as exc:
                self._report(exc)
                return
            self._failing = False

    def reopen(self) -> None:
        """Close and reopen now; a failure is reported on stderr and raised."""
        with self._lock:
            if self._closed:
                return
            self._close_fd()
            try:
                self._open()
            except OSError as exc:
                self._report(exc)
                raise
            self._failing = False

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._close_fd()


@functools.lru_cache(maxsize=4)
def _encoder(default: Callable[[Any], Any]) -> Callable[[Any], str]:
    return json.JSONEncoder(default=default).encode


def _dumps(obj: Any, *, default: Callable[[Any], Any]) -> str:
    # json.dumps(obj, default=...) builds a new JSONEncoder at each call; this
    # reuses one with the very same settings, so the output is the same.
    return _encoder(default)(obj)


class _Render:
    """The last processor: renders the event once for stdout and once for the log file.

    Returns the arguments of the logger call, ``(stdout_line, file_line)``,
    ``file_line`` being None without a log file.  The log file always gets
    JSON without journald's prefix; with JSON on stdout too, one rendering
    serves both.
    """

    def __init__(self, fmt: LogFormat, *, colors: bool, journal: bool, log_file: bool) -> None:
        self._json = structlog.processors.JSONRenderer(serializer=_dumps)
        self._journal = journal
        self._log_file = log_file
        self._stdout: list[Processor] | None
        if fmt == "console":
            self._stdout = [structlog.dev.ConsoleRenderer(colors=colors)]
        elif fmt == "logfmt":
            renderer = structlog.processors.LogfmtRenderer(
                key_order=["timestamp", "level", "event", "account"],
                drop_missing=True,
                # "key=true", not a bare "key": every field parses as key=value.
                bool_as_flag=False,
            )
            self._stdout = [_dict_tracebacks, renderer]
        else:
            self._stdout = None

    def __call__(
        self, logger: Any, name: str, event: MutableMapping[str, Any]
    ) -> tuple[tuple[str, str | None], dict[str, Any]]:
        # Renderers pop keys: what a fallback line needs is taken first.
        essentials = (event.get("event"), event.get("level", name), event.get("timestamp"))
        try:
            return self._render(logger, name, event)
        except RecursionError:
            raise
        except Exception as exc:
            # A log call must never fail the work it describes (a delivery,
            # a commit): a value that cannot be rendered costs its line only.
            fallback = {
                "event": str(essentials[0]),
                "level": str(essentials[1]),
                "timestamp": str(essentials[2]),
                "log_error": f"this line could not be rendered: {type(exc).__name__}",
            }
            line = json.dumps(fallback)
            return (line, line if self._log_file else None), {}

    def _render(
        self, logger: Any, name: str, event: MutableMapping[str, Any]
    ) -> tuple[tuple[str, str | None], dict[str, Any]]:
        # Before rendering: ConsoleRenderer pops the level from the event.
        priority = _JOURNAL_PRIORITY.get(str(event.get("level", "info")), 6)
        file_line: str | None = None
        line: Any
        if self._stdout is None:
            line = self._json(logger, name, _dict_tracebacks(logger, name, event))
            if self._log_file:
                file_line = line
        else:
            if self._log_file:
                # Renderers change the event they get (ConsoleRenderer pops
                # its keys): the file's rendering works on its own copy.
                copy = _dict_tracebacks(logger, name, dict(event))
                file_line = cast(str, self._json(logger, name, copy))
            line = event
            for processor in self._stdout:
                line = processor(logger, name, line)
        if self._journal:
            line = f"<{priority}>{line}"
        return (line, file_line), {}


class _Outputs:
    """stdout and the log file of one configure(); the log file is closed with them."""

    def __init__(self, stdout: _StreamOutput, log_file: _PrivateLogFile | None) -> None:
        self.stdout = stdout
        self.log_file = log_file

    def write(self, lines: Sequence[tuple[str, str | None]]) -> None:
        """Write ``(stdout_line, file_line)`` pairs, one write per output."""
        self.stdout.write_lines("\n".join(line for line, _ in lines))
        if self.log_file is not None:
            file_lines = [file_line for _, file_line in lines if file_line is not None]
            if file_lines:
                self.log_file.write_lines("\n".join(file_lines))

    def flush(self) -> None:
        self.stdout.flush()

    def close(self) -> None:
        # stdout is not ours to close; the log file is.
        self.stdout.flush()
        if self.log_file is not None:
            self.log_file.close()


# Lines a thread holds back inside ``written_together()``, with their outputs.
_held = threading.local()


def _emit(outputs: _Outputs, line: str, file_line: str | None) -> None:
    held: list[tuple[_Outputs, str, str | None]] | None = getattr(_held, "lines", None)
    if held is None:
        outputs.write([(line, file_line)])
    else:
        held.append((outputs, line, file_line))


@contextlib.contextmanager
def written_together() -> Iterator[None]:
    """Write the lines this thread logs inside the block together, at its end.

    A poll logs a line for each message it delivers, a whole commit window
    of them at once; one write for the window's lines, not one for each,
    saves the event loop a system call per message and the wait to take the
    GIL back from the file workers after it.  Lines keep their order, and
    each is still written whole.  The block should not wait on anything:
    its lines appear only when it ends (also when it raises).
    """
    if getattr(_held, "lines", None) is not None:
        yield  # nested: the outer block writes them
        return
    held: list[tuple[_Outputs, str, str | None]] = []
    _held.lines = held
    try:
        yield
    finally:
        _held.lines = None
        # Runs of lines for one configure()'s outputs (a new one may come mid-block).
        for outputs, run in itertools.groupby(held, key=operator.itemgetter(0)):
            outputs.write([(line, file_line) for _, line, file_line in run])


class _Writer:
    """The logger under gpopd's structlog loggers: hands rendered lines to the outputs.

    One for the whole process, so loggers structlog cached before a later
    configure() write to the outputs of that later configure().
    """

    outputs: _Outputs | None = None

    def __call__(self, *_args: Any) -> _Writer:
        """Serve as structlog's logger factory."""
        return self

    def write(self, line: str, file_line: str | None = None) -> None:
        outputs = self.outputs
        if outputs is not None:
            _emit(outputs, line, file_line)

    msg = log = debug = info = warn = warning = error = exception = critical = fatal = write


class _BoundLogger(structlog.BoundLoggerBase):
    """structlog's filtering bound logger, its level set by configure().

    configure() copies in the methods of ``make_filtering_bound_logger(level)``:
    a line below the level costs one call that returns None, and loggers
    structlog cached earlier follow a new level, which instances of the class
    made for the old level would not.
    """


def _set_level(level: int) -> None:
    filtering = structlog.make_filtering_bound_logger(level)
    for name, method in vars(filtering).items():
        if not name.startswith("__"):
            setattr(_BoundLogger, name, method)


_set_level(logging.INFO)


class _ForeignRecords(logging.Handler):
    """Standard-library records (asyncio, aiosmtplib) through gpopd's processors and outputs.

    The event is built as structlog's ``ProcessorFormatter`` builds it for a
    foreign record, so these lines look exactly like gpopd's own.
    """

    def __init__(self, processors: Sequence[Processor], outputs: _Outputs) -> None:
        super().__init__()
        self._processors = processors
        self.outputs = outputs

    def emit(self, record: logging.LogRecord) -> None:
        try:
            name = record.levelname.lower()
            event: Any = {"event": record.getMessage()}
            if record.exc_info:
                event["exc_info"] = record.exc_info
            if record.stack_info:
                event["stack_info"] = record.stack_info
            for processor in self._processors:
                event = processor(None, name, event)
            (line, file_line), _ = event
            _emit(self.outputs, line, file_line)
        except RecursionError:
            raise
        except Exception:  # logging's own policy for a record that fails
            self.handleError(record)

    def flush(self) -> None:
        self.outputs.flush()

    def close(self) -> None:
        if _WRITER.outputs is self.outputs:
            _WRITER.outputs = None
        self.outputs.close()
        super().close()


_WRITER = _Writer()
# The one processor list given to structlog, changed in place by configure()
# (as structlog.testing.capture_logs does) so cached loggers follow it.
_PROCESSORS: list[Processor] = []
# The handler installed by configure(), closed when it runs again.
_installed: list[logging.Handler] = []
_log_file: _PrivateLogFile | None = None


def reopen_log_file() -> bool:
    """Close and reopen the log file (after rotation); a no-op without one.

    Call it from the event loop (``loop.add_signal_handler``), not from a
    ``signal.signal`` handler, which could run while a line is half written.
    A file that cannot be opened is reported on the other outputs and
    retried at each later line; returns False then, else True.
    """
    if _log_file is None:
        return True
    try:
        _log_file.reopen()
    except OSError as exc:
        logging.getLogger("gpopd.logs").error(
            "cannot reopen the log file %s: %s", _log_file.path, exc.strerror or exc
        )
        return False
    return True


def flush() -> None:
    """Flush every output; call it before ``os._exit``."""
    for handler in _installed:
        handler.flush()


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
    """Configure structlog and the standard library's logging, at start-up.

    ``fmt`` applies to ``stream`` (stdout by default); ``log_file``, when
    given, receives the same lines as JSON always, whatever ``fmt`` is.  A
    log file that cannot be opened raises ``ConfigError`` before anything
    else changes.  Calling it again (once the configuration names a log
    file) replaces the outputs, also for loggers already in use.
    """
    global _log_file  # noqa: PLW0603  # logging is process-wide by nature
    file_output = None
    if log_file is not None:
        try:
            file_output = _PrivateLogFile(Path(log_file))
        except OSError as exc:
            raise ConfigError(f"log_file {log_file}: {exc.strerror or exc}") from exc

    out = stream if stream is not None else sys.stdout
    chosen = choose_format(fmt, out)
    journal = stdout_is_journal(out)
    numeric_level = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)

    render = _Render(
        chosen,
        colors=chosen == "console" and out.isatty() and not journal,
        journal=journal,
        log_file=file_output is not None,
    )
    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
        render,
    ]
    outputs = _Outputs(_StreamOutput(out), file_output)
    handler = _ForeignRecords(processors, outputs)

    # The new outputs before the old ones close: a line another thread logs
    # meanwhile still reaches stdout.
    _set_level(numeric_level)
    _PROCESSORS[:] = processors
    _WRITER.outputs = outputs
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric_level)
    for old in _installed:
        old.close()
    _installed[:] = [handler]
    _log_file = file_output
    structlog.configure(
        processors=_PROCESSORS,
        wrapper_class=_BoundLogger,
        logger_factory=_WRITER,
        cache_logger_on_first_use=True,
    )
