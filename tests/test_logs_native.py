"""Tests of gpopd's own log lines on structlog's native path.

The same lines as the standard library's chain produced, written whole from
any thread, never failing the caller.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import re
import select
import threading
import time
from pathlib import Path
from typing import Any, TextIO

import pytest
import structlog
from structlog.contextvars import bound_contextvars
from structlog.testing import capture_logs

from gpopd import logs
from tests.test_logs import json_lines, lines_of, out, restore_logging

__all__ = ["out", "restore_logging"]  # fixtures, used by name

# -- the native path ----------------------------------------------------------------

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d\.\d+Z?")


def same_time(lines: list[str]) -> list[str]:
    """The lines with every timestamp replaced, the only part two runs cannot share."""
    return [TIMESTAMP.sub("<time>", line) for line in lines]


def legacy_configure(
    fmt: logs.LogFormat, stream: TextIO, log_file: Path, *, journal: bool
) -> list[logging.Handler]:
    """The former set-up, every line through the standard library, as the reference."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        logs._redact,
    ]
    meta = structlog.stdlib.ProcessorFormatter.remove_processors_meta
    renderer: Any = {
        "json": structlog.processors.JSONRenderer(),
        "console": structlog.dev.ConsoleRenderer(colors=False),
        "logfmt": structlog.processors.LogfmtRenderer(
            key_order=["timestamp", "level", "event", "account"],
            drop_missing=True,
            bool_as_flag=False,
        ),
    }[fmt]
    if journal:
        inner = renderer

        def renderer(logger: Any, name: str, event: dict[str, Any]) -> str:
            priority = logs._JOURNAL_PRIORITY.get(str(event.get("level", "info")), 6)
            return f"<{priority}>{inner(logger, name, event)}"

    tracebacks = [] if fmt == "console" else [structlog.processors.dict_tracebacks]
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared, processors=[meta, *tracebacks, renderer]
        )
    )
    to_file = logging.FileHandler(log_file, encoding="utf-8")
    to_file.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                meta,
                structlog.processors.dict_tracebacks,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    root = logging.getLogger()
    for handler_ in (handler, to_file):
        root.addHandler(handler_)
    root.setLevel(logging.INFO)
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
    )
    return [handler, to_file]


def log_sample_events() -> None:
    """The same events for both set-ups: context, odd values, secrets, an exception, stdlib."""
    log = structlog.get_logger("gpopd.sample")
    with bound_contextvars(account="alice", session=7):
        log.info("message delivered", uid="abc 1", size=4096, ok=True, gone=None)
        log.warning("quoted", error='-ERR "x" = y\nnext', seconds=1.5, token="tok-1")
        try:
            raise KeyError("missing")
        except KeyError:
            log.exception("poll raised")
            logging.getLogger("asyncio").error("stdlib failed %s", "here", exc_info=True)
        logging.getLogger("aiosmtplib").warning("foreign %d", 3)
    log.critical("outside", n=[1, 2])


@pytest.mark.parametrize("journal", [False, True])
@pytest.mark.parametrize("fmt", ["json", "logfmt", "console"])
def test_lines_are_byte_for_byte_those_of_the_stdlib_chain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: logs.LogFormat, journal: bool
) -> None:
    """Own and foreign lines, on stdout and in the log file, equal the former rendering."""
    rendered: dict[str, tuple[list[str], list[str]]] = {}
    for name in ("legacy", "native"):
        stdout, log_file = tmp_path / f"{name}.out", tmp_path / f"{name}.log"
        with stdout.open("w", encoding="utf-8") as stream:
            if name == "legacy":
                handlers = legacy_configure(fmt, stream, log_file, journal=journal)
                log_sample_events()
                for handler in handlers:
                    logging.getLogger().removeHandler(handler)
                    handler.close()
            else:
                if journal:
                    st = os.fstat(stream.fileno())
                    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
                logs.configure(fmt=fmt, stream=stream, log_file=log_file)
                log_sample_events()
        rendered[name] = (
            same_time(stdout.read_text(encoding="utf-8").splitlines()),
            same_time(log_file.read_text(encoding="utf-8").splitlines()),
        )
    assert rendered["native"] == rendered["legacy"]
    stdout_lines, file_lines = rendered["native"]
    assert len(file_lines) == 6
    assert "tok-1" not in "".join(stdout_lines + file_lines)
    assert json.loads(file_lines[2])["exception"][0]["exc_type"] == "KeyError"
    assert stdout_lines[1].startswith("<4>") == journal


def test_log_file_line_equals_the_stdout_line_for_json(
    out: TextIO, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With JSON on stdout the log file gets the very same line, without journald's prefix."""
    log_file = tmp_path / "gpopd.log"
    logs.configure(stream=out, log_file=log_file)
    log_sample_events()
    assert lines_of(out) == log_file.read_text(encoding="utf-8").splitlines()
    st = os.fstat(out.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    out.seek(0)
    out.truncate()
    log_file.unlink()
    logs.configure(stream=out, log_file=log_file)
    log_sample_events()
    stdout_lines = lines_of(out)
    assert [line[:3] for line in stdout_lines] == ["<6>", "<4>", "<3>", "<3>", "<4>", "<2>"]
    assert [line[3:] for line in stdout_lines] == log_file.read_text().splitlines()


def test_foreign_record_and_own_line_come_out_alike(out: TextIO, tmp_path: Path) -> None:
    """A stdlib record and a structlog line for the same event differ only by their timestamp."""
    logs.configure(stream=out, log_file=tmp_path / "gpopd.log")
    with bound_contextvars(account="carol"):
        structlog.get_logger("test").warning("slow callback took 1.2s")
        logging.getLogger("asyncio").warning("slow callback took %.1fs", 1.2)
    own, foreign = same_time(lines_of(out))
    assert own == foreign
    assert list(json.loads(own)) == ["event", "account", "level", "timestamp"]


class ChoppyStream(io.StringIO):
    """A stream that writes a line in pieces, letting other threads run in between."""

    def write(self, text: str) -> int:
        for start in range(0, len(text), 7):
            super().write(text[start : start + 7])
            time.sleep(0)
        return len(text)


def test_concurrent_threads_write_whole_lines(tmp_path: Path) -> None:
    """Lines logged at once from many threads never interleave, on stdout or in the file."""
    stream = ChoppyStream()
    log_file = tmp_path / "gpopd.log"
    logs.configure(fmt="json", stream=stream, log_file=log_file)
    log = structlog.get_logger("test")
    threads, per_thread = 8, 60

    def work(n: int) -> None:
        with bound_contextvars(thread=n):
            for i in range(per_thread):
                log.info("delivered", i=i, pad="x" * 300)

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    for text in (stream.getvalue(), log_file.read_text(encoding="utf-8")):
        events = [json.loads(line) for line in text.splitlines()]
        assert len(events) == threads * per_thread
        for n in range(threads):
            assert [e["i"] for e in events if e["thread"] == n] == list(range(per_thread))


class BrokenStream(io.StringIO):
    """A stdout whose reader went away: every write fails until ``broken`` is cleared."""

    broken = True

    def write(self, text: str) -> int:
        if self.broken:
            raise BrokenPipeError(32, "Broken pipe")
        return super().write(text)


def test_failing_stdout_never_raises_into_the_caller(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A stdout that raises costs its lines only: reported once, the log file still gets them."""
    stream = BrokenStream()
    log_file = tmp_path / "gpopd.log"
    logs.configure(fmt="json", stream=stream, log_file=log_file)
    log = structlog.get_logger("test")
    log.info("one")
    log.error("two")
    logging.getLogger("asyncio").error("three")
    err = capsys.readouterr().err
    assert err.count("cannot write log lines") == 1
    assert "Broken pipe" in err
    assert "Logging error" not in err
    stream.broken = False
    log.info("four")
    assert [json.loads(line)["event"] for line in stream.getvalue().splitlines()] == ["four"]
    events = [event["event"] for event in json_lines(log_file)]
    assert events == ["one", "two", "three", "four"]
    stream.close()
    log.info("five")  # a closed stream is no different
    assert capsys.readouterr().err.count("cannot write log lines") == 1


def test_each_line_reaches_a_pipe_at_once() -> None:
    """stdout is flushed at each line: a reader sees it without any flush from the caller."""
    read_end, write_end = os.pipe()
    try:
        with open(write_end, "w", buffering=1 << 16, encoding="utf-8") as stream:
            logs.configure(stream=stream)
            structlog.get_logger("test").info("right away")
            ready, _, _ = select.select([read_end], [], [], 5)
            assert ready, "the line stayed in a buffer"
            assert json.loads(os.read(read_end, 65536))["event"] == "right away"
    finally:
        os.close(read_end)


def test_exceptions_are_rendered(out: TextIO) -> None:
    """log.exception() gives an error line with the structured traceback."""
    logs.configure(stream=out)
    try:
        raise ValueError("bad value")
    except ValueError:
        structlog.get_logger("test").exception("poll raised", account="alice")
    [event] = (json.loads(line) for line in lines_of(out))
    assert (event["level"], event["event"], event["account"]) == ("error", "poll raised", "alice")
    [exception] = event["exception"]
    assert (exception["exc_type"], exception["exc_value"]) == ("ValueError", "bad value")
    assert exception["frames"]


def test_loggers_in_use_follow_a_later_configure(tmp_path: Path) -> None:
    """A logger used before configure() runs again gets the new level, stream and log file."""
    first, second = tmp_path / "first", tmp_path / "second"
    log = structlog.get_logger("gpopd.early")
    with first.open("w", encoding="utf-8") as one, second.open("w", encoding="utf-8") as two:
        logs.configure(stream=one, level="info")
        log.info("to the first")
        logs.configure(stream=two, level="warning", log_file=tmp_path / "gpopd.log")
        log.info("below the new level")
        log.warning("to the second")
        logs.configure(stream=two, level="debug")
        log.debug("debug now shown")
    assert [json.loads(line)["event"] for line in first.read_text().splitlines()] == [
        "to the first"
    ]
    events = [json.loads(line)["event"] for line in second.read_text().splitlines()]
    assert events == ["to the second", "debug now shown"]
    assert [event["event"] for event in json_lines(tmp_path / "gpopd.log")] == ["to the second"]


def test_capture_logs_still_captures(out: TextIO) -> None:
    """structlog.testing.capture_logs() captures lines, also of loggers used before it."""
    logs.configure(stream=out)
    log = structlog.get_logger("test")
    log.info("before")
    with capture_logs() as captured:
        log.warning("captured", account="alice")
    log.info("after")
    assert captured == [{"event": "captured", "account": "alice", "log_level": "warning"}]
    assert [json.loads(line)["event"] for line in lines_of(out)] == ["before", "after"]


def test_flush_reaches_the_stream(tmp_path: Path) -> None:
    """logs.flush(), called before os._exit, flushes the stdout stream."""
    flushed: list[bool] = []

    class Counting(io.StringIO):
        def flush(self) -> None:
            flushed.append(True)
            super().flush()

    logs.configure(stream=Counting())
    flushed.clear()
    logs.flush()
    assert flushed == [True]


def test_log_file_short_and_failed_writes(
    out: TextIO, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A short write still ends in a whole line; a failed one is reported once, then retried."""
    log_file = tmp_path / "gpopd.log"
    logs.configure(stream=out, log_file=log_file)
    assert logs._log_file is not None
    file_fd, real_write, disk_full = logs._log_file._fd, os.write, [True]

    def write(fd: int, data: bytes) -> int:
        if fd != file_fd:
            return real_write(fd, data)
        if disk_full[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data[:10])

    monkeypatch.setattr(os, "write", write)
    log = structlog.get_logger("test")
    log.info("lost one")
    log.info("lost two")
    assert capsys.readouterr().err.count("No space left on device") == 1
    disk_full[0] = False
    log.info("kept", pad="y" * 100)
    assert [event["event"] for event in json_lines(log_file)] == ["kept"]
    assert [json.loads(line)["event"] for line in lines_of(out)] == ["lost one", "lost two", "kept"]


class _Unprintable:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")

    __str__ = __repr__


@pytest.mark.parametrize("fmt", ["json", "console", "logfmt"])
def test_a_value_that_cannot_be_rendered_never_fails_the_caller(fmt: logs.LogFormat) -> None:
    """A log call with an unrenderable value returns normally and still writes a line."""
    out = io.StringIO()
    logs.configure(fmt=fmt, stream=out)
    structlog.get_logger("gpopd.test").info("message delivered", uid=_Unprintable())
    [line] = out.getvalue().splitlines()
    parsed = json.loads(line)
    assert parsed["event"] == "message delivered"
    assert "could not be rendered" in parsed["log_error"]


class CountingStream(io.StringIO):
    """A stdout that records each write it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def test_lines_written_together_come_out_in_one_write_in_order(tmp_path: Path) -> None:
    """Inside written_together() nothing is written; at its end one write has every line."""
    stream = CountingStream()
    log_file = tmp_path / "gpopd.log"
    logs.configure(fmt="json", stream=stream, log_file=log_file)
    log = structlog.get_logger("test")
    with logs.written_together():
        for i in range(5):
            log.info("delivered", i=i)
        logging.getLogger("asyncio").warning("a foreign record")
        with logs.written_together():
            log.info("delivered", i=5)
        assert stream.writes == []
        assert log_file.read_text(encoding="utf-8") == ""
    assert len(stream.writes) == 1
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [event.get("i") for event in events] == [0, 1, 2, 3, 4, None, 5]
    assert events[5]["event"] == "a foreign record"
    assert log_file.read_text(encoding="utf-8") == stream.getvalue()
    log.info("after")
    assert len(stream.writes) == 2


def test_lines_held_together_are_written_when_the_block_raises(out: TextIO) -> None:
    logs.configure(fmt="json", stream=out)
    log = structlog.get_logger("test")

    def fail_after_a_line() -> None:
        with logs.written_together():
            log.info("before the failure")
            raise RuntimeError("failed")

    with pytest.raises(RuntimeError):
        fail_after_a_line()
    assert [json.loads(line)["event"] for line in lines_of(out)] == ["before the failure"]


def test_only_the_thread_inside_written_together_holds_its_lines() -> None:
    """Another thread's line is written at once while the event loop's are held."""
    stream = CountingStream()
    logs.configure(fmt="json", stream=stream)
    log = structlog.get_logger("test")
    with logs.written_together():
        log.info("held")
        worker = threading.Thread(target=log.info, args=("from a worker",))
        worker.start()
        worker.join()
        assert [json.loads(text)["event"] for text in stream.writes] == ["from a worker"]
    assert json.loads(stream.writes[-1])["event"] == "held"
