"""Tests of the logging set-up: formats, context, journald priorities, redaction, log file."""

from __future__ import annotations

import json
import logging
import os
import re
import select
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import pytest
import structlog
from structlog._config import BoundLoggerLazyProxy
from structlog.contextvars import bound_contextvars
from structlog.testing import capture_logs

from gpopd import logs, transfer
from gpopd.errors import ConfigError

LOGFMT_PAIR = re.compile(r'([^\s=]+)=("(?:[^"\\]|\\.)*"|[^\s"]*)(?:\s+|$)')


def forget_cached_loggers() -> None:
    """Make gpopd's module loggers look up the configuration afresh.

    logs.configure() caches each logger on first use (structlog's
    cache_logger_on_first_use): the module-level proxy keeps, as its own
    ``bind``, the logger assembled then.  reset_defaults() does not undo
    that, so a test that polled after configure() left gpopd.fetch and
    gpopd.transfer writing to its stream, and structlog.testing.capture_logs()
    in a later test saw none of their lines.
    """
    for name, module in list(sys.modules.items()):
        if name == "gpopd" or name.startswith("gpopd."):
            for value in list(vars(module).values()):
                if isinstance(value, BoundLoggerLazyProxy):
                    vars(value).pop("bind", None)


@pytest.fixture(autouse=True)
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Give each test a clean slate and put pytest's own handlers back afterwards."""
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in logs._installed:
        handler.close()
    logs._installed.clear()
    logs._log_file = None
    for handler in saved_handlers:
        root.addHandler(handler)
    root.setLevel(saved_level)
    structlog.reset_defaults()
    forget_cached_loggers()


@pytest.fixture
def out(tmp_path: Path) -> Iterator[TextIO]:
    """A regular file standing in for stdout (so not a terminal)."""
    with (tmp_path / "stdout").open("w+", encoding="utf-8") as stream:
        yield stream


def lines_of(stream: TextIO) -> list[str]:
    stream.flush()
    return Path(stream.name).read_text(encoding="utf-8").splitlines()


def json_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def parse_logfmt(line: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    position = 0
    for match in LOGFMT_PAIR.finditer(line):
        assert match.start() == position, f"unparsable logfmt at {position}: {line!r}"
        key, value = match.groups()
        if value.startswith('"'):
            value = re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m[1], m[1]), value[1:-1])
        pairs[key] = value
        position = match.end()
    assert position == len(line), f"unparsable logfmt tail: {line[position:]!r}"
    return pairs


# -- formats ------------------------------------------------------------------------


def test_json_lines_have_event_level_and_utc_timestamp(out: TextIO) -> None:
    """Off a terminal each line is a JSON object with event, level and a UTC ISO timestamp."""
    logs.configure(stream=out)
    log = structlog.get_logger("test")
    log.info("poll finished", delivered=3)
    log.warning("backing off", seconds=60.5)
    first, second = (json.loads(line) for line in lines_of(out))
    assert first["event"] == "poll finished"
    assert first["level"] == "info"
    assert first["delivered"] == 3
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", first["timestamp"])
    assert (second["event"], second["level"], second["seconds"]) == ("backing off", "warning", 60.5)


def test_level_filters_lines(out: TextIO) -> None:
    """Lines below the configured level are dropped, for structlog and stdlib loggers alike."""
    logs.configure(stream=out, level="warning")
    structlog.get_logger("test").info("quiet")
    logging.getLogger("asyncio").info("quiet too")
    structlog.get_logger("test").error("loud")
    assert [json.loads(line)["event"] for line in lines_of(out)] == ["loud"]


def test_console_format_on_a_terminal() -> None:
    """On a terminal (a pty) the console renderer is chosen, with colours, not JSON."""
    master, slave = os.openpty()
    try:
        with os.fdopen(slave, "w", encoding="utf-8", closefd=True) as terminal:
            assert logs.choose_format(None, terminal) == "console"
            logs.configure(stream=terminal)
            structlog.get_logger("test").info("hello terminal", account="alice")
            terminal.flush()
            ready, _, _ = select.select([master], [], [], 10)
            assert ready, "nothing written to the terminal"
            text = os.read(master, 65536).decode("utf-8", "replace")
    finally:
        os.close(master)
    assert "hello terminal" in text
    assert "alice" in text
    assert "\x1b[" in text  # colours
    assert not text.lstrip().startswith("{")


def test_json_chosen_when_not_a_terminal(out: TextIO) -> None:
    """A regular file (or pipe) gets JSON unless a format is requested."""
    assert logs.choose_format(None, out) == "json"
    assert logs.choose_format("logfmt", out) == "logfmt"


def test_logfmt_lines_parse_as_key_value_pairs(out: TextIO) -> None:
    """--log-format logfmt gives key=value pairs, quoting spaces, quotes and newlines."""
    logs.configure(fmt="logfmt", stream=out)
    with bound_contextvars(account="alice"):
        structlog.get_logger("test").info(
            "poll finished",
            delivered=3,
            ok=True,
            failed=False,
            error='-ERR [AUTH] bad "x" = y\nnext',
            nothing=None,
        )
    [line] = lines_of(out)
    pairs = parse_logfmt(line)
    assert list(pairs)[:4] == ["timestamp", "level", "event", "account"]
    assert pairs["event"] == "poll finished"
    assert pairs["account"] == "alice"
    assert pairs["level"] == "info"
    assert pairs["delivered"] == "3"
    assert (pairs["ok"], pairs["failed"]) == ("true", "false")
    assert pairs["error"] == '-ERR [AUTH] bad "x" = y\nnext'
    assert pairs["nothing"] == ""


# -- context ------------------------------------------------------------------------


def test_bound_context_reaches_structlog_and_stdlib_records(out: TextIO) -> None:
    """Inside bound_contextvars the account appears on structlog and stdlib lines, not after."""
    logs.configure(stream=out)
    with bound_contextvars(account="alice"):
        structlog.get_logger("test").info("from structlog")
        logging.getLogger("asyncio").warning("slow callback %s", "took 1.2s")
    structlog.get_logger("test").info("outside")
    inside_structlog, inside_stdlib, outside = (json.loads(line) for line in lines_of(out))
    assert inside_structlog["account"] == "alice"
    assert inside_stdlib["account"] == "alice"
    assert inside_stdlib["event"] == "slow callback took 1.2s"
    assert inside_stdlib["level"] == "warning"
    assert "timestamp" in inside_stdlib
    assert "account" not in outside


# -- journald -----------------------------------------------------------------------


def test_journald_priority_prefix_per_level(out: TextIO, monkeypatch: pytest.MonkeyPatch) -> None:
    """With JOURNAL_STREAM naming stdout, each line starts with its syslog priority."""
    st = os.fstat(out.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert logs.stdout_is_journal(out)
    logs.configure(stream=out, level="debug")
    log = structlog.get_logger("test")
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    log.critical("c")
    logging.getLogger("asyncio").error("stdlib error")
    lines = lines_of(out)
    prefixes = [line[:3] for line in lines]
    assert prefixes == ["<7>", "<6>", "<4>", "<3>", "<2>", "<3>"]
    events = [json.loads(line[3:])["event"] for line in lines]
    assert events == ["d", "i", "w", "e", "c", "stdlib error"]
    assert all("_priority" not in json.loads(line[3:]) for line in lines)


def test_no_priority_prefix_when_journal_stream_is_another_file(
    out: TextIO, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JOURNAL_STREAM naming some other file (inherited by a child) adds no prefix."""
    other = tmp_path / "other"
    other.write_text("")
    st = other.stat()
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    logs.configure(stream=out)
    structlog.get_logger("test").error("plain")
    [line] = lines_of(out)
    assert json.loads(line)["event"] == "plain"


# -- redaction ----------------------------------------------------------------------


def test_secret_keys_are_redacted_everywhere(out: TextIO, tmp_path: Path) -> None:
    """Values under password, token and similar keys never reach stdout or the log file."""
    log_file = tmp_path / "gpopd.log"
    logs.configure(stream=out, log_file=log_file)
    secrets = {
        "password": "hunter2-pw",
        "pass": "pass-value",
        "secret": "secret-value",
        "token": "tok-123",
        "access_token": "ya29.access",
        "refresh_token": "1//refresh",
        "client_secret": "GOCSPX-secret",
    }
    structlog.get_logger("test").info("oops", user="alice", **secrets)
    [line] = lines_of(out)
    event = json.loads(line)
    for key in secrets:
        assert event[key] == logs.REDACTED
    assert event["user"] == "alice"
    written = line + log_file.read_text(encoding="utf-8")
    for value in secrets.values():
        assert value not in written


# -- log file -----------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o277])
def test_log_file_is_created_private_whatever_the_umask(
    out: TextIO, tmp_path: Path, umask: int
) -> None:
    """The log file is created 0600 even under a umask that would give 0666 or 0400."""
    log_file = tmp_path / "gpopd.log"
    old = os.umask(umask)
    try:
        logs.configure(stream=out, log_file=log_file)
    finally:
        os.umask(old)
    structlog.get_logger("test").info("first line")
    assert stat.S_IMODE(log_file.stat().st_mode) == 0o600
    assert [event["event"] for event in json_lines(log_file)] == ["first line"]


def test_existing_log_file_keeps_its_mode_and_is_appended(out: TextIO, tmp_path: Path) -> None:
    """An existing log file is appended to, and the mode its owner chose is left alone."""
    log_file = tmp_path / "gpopd.log"
    log_file.write_text('{"event": "older"}\n')
    log_file.chmod(0o640)
    logs.configure(stream=out, log_file=log_file)
    structlog.get_logger("test").info("newer")
    assert [event["event"] for event in json_lines(log_file)] == ["older", "newer"]
    assert stat.S_IMODE(log_file.stat().st_mode) == 0o640


@pytest.mark.parametrize("fmt", ["console", "logfmt", "json"])
def test_log_file_is_json_whatever_the_stdout_format(
    out: TextIO, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: logs.LogFormat
) -> None:
    """The log file holds JSON lines without journald prefixes, whatever stdout gets."""
    st = os.fstat(out.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    log_file = tmp_path / "gpopd.log"
    logs.configure(fmt=fmt, stream=out, log_file=log_file)
    with bound_contextvars(account="bob"):
        structlog.get_logger("test").warning("to both", n=1)
        logging.getLogger("asyncio").error("stdlib too")
    [first, second] = json_lines(log_file)
    assert (first["event"], first["level"], first["account"], first["n"]) == (
        "to both",
        "warning",
        "bob",
        1,
    )
    assert "timestamp" in first
    assert (second["event"], second["account"]) == ("stdlib too", "bob")
    assert all(line.startswith("<") for line in lines_of(out))  # stdout keeps its prefix


def test_log_file_renamed_away_is_recreated_on_the_next_line(out: TextIO, tmp_path: Path) -> None:
    """After a rotation by rename, the next line goes to a new private file at the old path."""
    log_file = tmp_path / "gpopd.log"
    rotated = tmp_path / "gpopd.log.1"
    logs.configure(stream=out, log_file=log_file)
    log = structlog.get_logger("test")
    log.info("before")
    log_file.rename(rotated)
    log.info("after")
    assert [event["event"] for event in json_lines(rotated)] == ["before"]
    assert [event["event"] for event in json_lines(log_file)] == ["after"]
    assert stat.S_IMODE(log_file.stat().st_mode) == 0o600


def test_reopen_log_file_on_demand(out: TextIO, tmp_path: Path) -> None:
    """reopen_log_file() opens a fresh file at once, before any further line is logged."""
    log_file = tmp_path / "gpopd.log"
    logs.configure(stream=out, log_file=log_file)
    log = structlog.get_logger("test")
    log.info("one")
    log_file.rename(tmp_path / "gpopd.log.1")
    assert logs.reopen_log_file()
    assert log_file.exists()
    assert log_file.read_text() == ""
    assert stat.S_IMODE(log_file.stat().st_mode) == 0o600
    log.info("two")
    logs.reopen_log_file()  # reopening the same file keeps appending
    log.info("three")
    assert [event["event"] for event in json_lines(log_file)] == ["two", "three"]


def test_reopen_without_a_log_file_does_nothing(out: TextIO) -> None:
    """reopen_log_file() is harmless when no log file is configured."""
    logs.configure(stream=out)
    assert logs.reopen_log_file()
    structlog.get_logger("test").info("still logging")
    assert json.loads(lines_of(out)[0])["event"] == "still logging"


def test_unopenable_log_file_is_a_config_error_and_changes_nothing(
    out: TextIO, tmp_path: Path
) -> None:
    """A log file in a missing directory raises ConfigError and leaves logging as it was."""
    logs.configure(stream=out)
    before = list(logging.getLogger().handlers)
    with pytest.raises(ConfigError, match="log_file"):
        logs.configure(stream=out, log_file=tmp_path / "missing" / "gpopd.log")
    assert logging.getLogger().handlers == before
    structlog.get_logger("test").info("unchanged")
    assert json.loads(lines_of(out)[-1])["event"] == "unchanged"


def test_configuring_again_closes_the_previous_log_file(out: TextIO, tmp_path: Path) -> None:
    """A second configure() (reload) closes the old log file and writes to the new one."""
    logs.configure(stream=out, log_file=tmp_path / "a.log")
    first = logs._log_file
    assert first is not None
    assert not first.closed
    logs.configure(stream=out, log_file=tmp_path / "b.log")
    assert first.closed
    structlog.get_logger("test").info("to b")
    assert (tmp_path / "a.log").read_text() == ""
    assert [event["event"] for event in json_lines(tmp_path / "b.log")] == ["to b"]


def test_reopen_failure_is_reported_and_retried(
    out: TextIO, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A log file that cannot be reopened is reported once; logging carries on and retries."""
    directory = tmp_path / "logdir"
    directory.mkdir()
    log_file = directory / "gpopd.log"
    logs.configure(stream=out, log_file=log_file)
    directory.rename(tmp_path / "gone")
    assert not logs.reopen_log_file()
    log = structlog.get_logger("test")
    log.info("file missing")  # must not raise out of the logging call
    events = [json.loads(line)["event"] for line in lines_of(out)]
    assert events[-1] == "file missing"
    assert "cannot reopen the log file" in events[-2]
    assert capsys.readouterr().err.count("cannot write the log file") == 1
    directory.mkdir()
    log.info("back")
    assert [event["event"] for event in json_lines(log_file)] == ["back"]


def test_module_loggers_used_under_configure_are_seen_by_capture_logs_afterwards(
    out: TextIO,
) -> None:
    """What restore_logging undoes between tests: a module logger cached under configure()."""
    logs.configure(fmt="json", stream=out)
    transfer.log.info("written under configure")
    structlog.reset_defaults()  # what restore_logging does after each test
    forget_cached_loggers()
    with capture_logs() as captured:
        transfer.log.info("captured")
    assert [event["event"] for event in captured] == ["captured"]
    assert [json.loads(line)["event"] for line in lines_of(out)] == ["written under configure"]
