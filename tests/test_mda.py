"""Tests of delivery through an MDA: procmail and scripted stand-ins as real child processes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpopd.config import MdaDelivery
from gpopd.delivery import CommitResult, MessageInfo, message_key
from gpopd.delivery.mda import (
    CAPTURE_LIMIT,
    ENV_VALUE_LIMIT,
    HEADER_SCAN_LIMIT,
    KILL_GRACE,
    MdaDestination,
    MdaPermanentError,
    MdaStaged,
    MdaTemporaryError,
    envelope_sender,
    safe_env_value,
)
from gpopd.errors import PermanentDeliveryError, TemporaryDeliveryError

ALICE = "alice@example.com"
SCRIPT = Path(__file__).parent / "mda_scripts" / "fake_mda.py"
SAFE = re.compile(r"[A-Za-z0-9._@+=,-]*")
HOSTILE_UID = "$(rm -rf /)\n;`id`|x"
HOSTILE_SENDER = '"$(rm -rf /);`id`"@evil.example'

MESSAGE = (
    b"Return-Path: <sender@example.org>\n"
    b"From: Bob <bob@example.org>\n"
    b"Subject: hello\n"
    b"\n"
    b"From the body, not a separator\n"
    b"bare\rcarriage return, NUL \x00 and \xff\n"
)


def fake(*args: str) -> list[str]:
    return [sys.executable, str(SCRIPT), *args]


def info(uid: str, account: str = ALICE) -> MessageInfo:
    return MessageInfo(account=account, uid=uid, key=message_key(account, uid))


def stage(dest: MdaDestination, uid: str, data: bytes, chunk: int = 7919) -> MdaStaged:
    writer = dest.open(info(uid))
    for start in range(0, len(data), chunk):
        writer.write(data[start : start + chunk])
    staged = writer.finish()
    assert isinstance(staged, MdaStaged)
    return staged


async def deliver(dest: MdaDestination, uid: str, data: bytes = MESSAGE) -> CommitResult:
    (result,) = await dest.commit([stage(dest, uid, data)])
    return result


def is_gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    # A zombie is dead; reaping the orphan is init's business.
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


async def wait_gone(pids: Sequence[int], within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if all(is_gone(pid) for pid in pids):
            return True
        await asyncio.sleep(0.05)
    return all(is_gone(pid) for pid in pids)


def complete_text(path: Path) -> str | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    return text if text.endswith("\n") else None


async def wait_for_file(path: Path, within: float = 10.0) -> str:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if (text := complete_text(path)) is not None:
            return text
        await asyncio.sleep(0.02)
    raise AssertionError(f"{path} was never written")


def procmail() -> str:
    path = shutil.which("procmail")
    assert path is not None, "procmail is missing: apt-get install procmail"
    return path


async def test_procmail_writes_the_message_byte_for_byte(tmp_path: Path) -> None:
    """procmail as the MDA stores each message of a window unchanged in a Maildir."""
    maildir = tmp_path / "Maildir"
    dest = MdaDestination([procmail(), "-m", f"DEFAULT={maildir}/", "/dev/null"], timeout=30)
    await dest.prepare(ALICE)
    bodies = [MESSAGE, MESSAGE + b"second\n", b"Subject: no sender\n\nthird\n"]
    staged = [stage(dest, f"uid-{n}", body) for n, body in enumerate(bodies)]
    results = await dest.commit(staged)
    await dest.close()
    assert [r.error for r in results] == [None, None, None]
    stored = sorted(path.read_bytes() for path in (maildir / "new").iterdir())
    assert stored == sorted(bodies)
    assert [run.returncode for run in dest.last_runs] == [0, 0, 0]


async def test_large_message_is_streamed_intact(tmp_path: Path) -> None:
    """A multi-megabyte binary message reaches the MDA's stdin exactly as written."""
    data = bytes(range(256)) * 12_000 + b"\r\x00tail\n"
    dest = MdaDestination(fake("record", str(tmp_path)), timeout=30)
    result = await deliver(dest, "big", data)
    assert result.error is None
    assert (tmp_path / "big.msg").read_bytes() == data


async def test_window_is_delivered_one_at_a_time_in_order(tmp_path: Path) -> None:
    """The messages of one commit run the MDA one after the other, in the window's order."""
    dest = MdaDestination(fake("record", str(tmp_path)), timeout=30)
    uids = ["m3", "m1", "m4", "m2"]
    results = await dest.commit([stage(dest, uid, MESSAGE + uid.encode()) for uid in uids])
    assert all(result.ok for result in results)
    assert [result.staged.info.uid for result in results] == uids
    assert (tmp_path / "order").read_text().split() == uids
    assert not (tmp_path / "overlap").exists()
    assert (tmp_path / "m4.msg").read_bytes() == MESSAGE + b"m4"


async def test_exit_75_is_a_temporary_failure_with_the_mda_words(tmp_path: Path) -> None:
    """EX_TEMPFAIL keeps the message for the next poll and reports status and stderr."""
    dest = MdaDestination(fake("exit", "75", "mailbox is locked by pid 4242"), timeout=30)
    result = await deliver(dest, "u1")
    assert isinstance(result.error, MdaTemporaryError)
    assert "exit status 75 (EX_TEMPFAIL)" in str(result.error)
    assert "mailbox is locked by pid 4242" in str(result.error)
    assert result.error.run is not None
    assert result.error.run.returncode == 75


async def test_exit_1_is_a_permanent_failure_with_stderr(tmp_path: Path) -> None:
    """Any other exit status is permanent and the error carries status and stderr on one line."""
    dest = MdaDestination(fake("exit", "1", "quota exceeded\nfor user alice"), timeout=30)
    result = await deliver(dest, "u1")
    assert isinstance(result.error, MdaPermanentError)
    assert not isinstance(result.error, TemporaryDeliveryError)
    text = str(result.error)
    assert "exit status 1" in text
    assert "quota exceeded\\nfor user alice" in text
    assert "\n" not in text


async def test_last_words_before_exit_are_kept(tmp_path: Path) -> None:
    """Output the MDA writes just before exiting still reaches the error text."""
    dest = MdaDestination(fake("exit", "1", " FINAL WORDS", "read", "200000"), timeout=30)
    for uid in ("u1", "u2", "u3"):
        result = await deliver(dest, uid)
        assert str(result.error).endswith("FINAL WORDS")


async def test_output_arriving_just_after_exit_is_kept(tmp_path: Path) -> None:
    """stderr still in flight when the MDA's exit is noticed is awaited briefly, not lost."""
    dest = MdaDestination(fake("late", "1"), timeout=30)
    result = await deliver(dest, "u1")
    assert isinstance(result.error, PermanentDeliveryError)
    assert str(result.error).endswith("stderr: LATE WORDS")


async def test_mda_that_never_reads_stdin_is_judged_by_its_exit_status(tmp_path: Path) -> None:
    """An MDA exiting before reading a large message causes no broken-pipe crash."""
    big = MESSAGE * 100_000
    refusing = MdaDestination(fake("exit", "1", "refused unread", "skip"), timeout=30)
    refused = await deliver(refusing, "u1", big)
    assert isinstance(refused.error, PermanentDeliveryError)
    assert "refused unread" in str(refused.error)
    discarding = MdaDestination(fake("exit", "0", "", "skip"), timeout=30)
    assert (await deliver(discarding, "u2", big)).error is None


async def test_death_by_signal_is_permanent(tmp_path: Path) -> None:
    """An MDA killed by a signal is a permanent failure naming the signal."""
    dest = MdaDestination(fake("signal"), timeout=30)
    result = await deliver(dest, "u1")
    assert isinstance(result.error, PermanentDeliveryError)
    assert "killed by signal 9 (SIGKILL)" in str(result.error)


@pytest.mark.parametrize("term", ["die", "ignore"])
async def test_time_limit_kills_the_whole_process_group(tmp_path: Path, term: str) -> None:
    """A hanging MDA and the child it started are killed at the limit: a temporary failure."""
    pidfile = tmp_path / "pids"
    dest = MdaDestination(fake("hang", str(pidfile), term), timeout=1)
    started = time.monotonic()
    result = await deliver(dest, "u1")
    elapsed = time.monotonic() - started
    assert isinstance(result.error, TemporaryDeliveryError)
    assert "timed out" in str(result.error)
    assert "waiting for a lock that never comes" in str(result.error)
    assert 1 <= elapsed < 1 + 2 * KILL_GRACE + 3
    pids = [int(pid) for pid in pidfile.read_text().split()]
    assert await wait_gone(pids), f"still running: {pids}"


async def test_after_a_time_out_the_rest_of_the_window_waits(tmp_path: Path) -> None:
    """Once the MDA hung, the window's other messages are not tried and stay temporary."""
    pidfile = tmp_path / "pids"
    dest = MdaDestination(fake("hang", str(pidfile)), timeout=1)
    results = await dest.commit([stage(dest, uid, MESSAGE) for uid in ("u1", "u2", "u3")])
    assert "timed out" in str(results[0].error)
    for result in results[1:]:
        assert isinstance(result.error, TemporaryDeliveryError)
        assert "not attempted" in str(result.error)
    assert len(dest.last_runs) == 1
    assert [result.staged.info.uid for result in results] == ["u1", "u2", "u3"]


async def test_cancelled_commit_kills_the_process_group(tmp_path: Path) -> None:
    """Cancelling a commit (the poll going away) kills the MDA and its children."""
    pidfile = tmp_path / "pids"
    dest = MdaDestination(fake("hang", str(pidfile)), timeout=300)
    staged = stage(dest, "u1", MESSAGE)
    task = asyncio.create_task(dest.commit([staged]))
    pids = [int(pid) for pid in (await wait_for_file(pidfile)).split()]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await wait_gone(pids), f"still running: {pids}"
    assert staged.file is None


async def test_descendant_holding_the_pipes_does_not_stall_delivery(tmp_path: Path) -> None:
    """An MDA that exits 0 leaving a child with its stdout open is done without waiting for it."""
    pidfile = tmp_path / "pid"
    dest = MdaDestination(fake("background", str(pidfile)), timeout=30)
    started = time.monotonic()
    try:
        result = await deliver(dest, "u1")
    finally:
        if (text := complete_text(pidfile)) is not None:
            os.kill(int(text), signal.SIGKILL)
    assert result.error is None
    assert time.monotonic() - started < 10


async def test_huge_output_neither_deadlocks_nor_is_kept_whole(tmp_path: Path) -> None:
    """An MDA writing megabytes to stdout and stderr before reading is served, output bounded."""
    digest_file = tmp_path / "digest"
    data = b"Subject: flood\n\n" + b"y" * (3 << 20) + b"\n"
    dest = MdaDestination(fake("flood", str(8 << 20), str(digest_file)), timeout=60)
    result = await deliver(dest, "u1", data)
    assert result.error is None
    assert digest_file.read_text() == hashlib.sha256(data).hexdigest()
    (run,) = dest.last_runs
    for excerpt, end in ((run.stdout, "END-OF-STDOUT"), (run.stderr, "END-OF-STDERR")):
        assert excerpt.endswith(end)
        assert "bytes omitted" in excerpt
        assert len(excerpt) < CAPTURE_LIMIT + 100


async def test_environment_is_minimal_and_sanitised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The MDA sees only PATH, HOME, LANG, LC_*, TZ and the sanitised GPOPD_* values."""
    monkeypatch.setenv("GPOPD_TEST_SECRET", "hunter2")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    monkeypatch.setenv("TZ", "UTC")
    monkeypatch.setenv("IFS", "x")
    dest = MdaDestination(fake("record", str(tmp_path)), timeout=30)
    message = f"Return-Path: <{HOSTILE_SENDER}>\nFrom: other@example.org\n\nbody\n".encode()
    writer = dest.open(info(HOSTILE_UID, account="alice;`id`"))
    writer.write(message)
    (result,) = await dest.commit([writer.finish()])
    assert result.error is None
    facts = json.loads((tmp_path / "__rm_-rf______id__x.json").read_text())
    env: dict[str, str] = facts["env"]
    allowed = {"PATH", "HOME", "LANG", "TZ", "GPOPD_ACCOUNT", "GPOPD_UIDL", "GPOPD_SENDER"}
    assert {name for name in env if not name.startswith("LC_")} <= allowed
    assert "GPOPD_TEST_SECRET" not in env
    assert env["LC_ALL"] == "C.UTF-8"
    assert env["TZ"] == "UTC"
    assert env["PATH"] == os.environ["PATH"]
    assert env["GPOPD_UIDL"] == "__rm_-rf______id__x"
    assert env["GPOPD_SENDER"] == "___rm_-rf_____id__@evil.example"
    assert env["GPOPD_ACCOUNT"] == "alice__id_"
    for name in ("GPOPD_UIDL", "GPOPD_SENDER", "GPOPD_ACCOUNT"):
        assert SAFE.fullmatch(env[name])
    assert facts["sid"] == facts["pid"] == facts["pgid"]


async def test_sender_is_empty_without_return_path_or_from(tmp_path: Path) -> None:
    """A message without a sender header gets an empty but present GPOPD_SENDER."""
    dest = MdaDestination(fake("record", str(tmp_path)), timeout=30)
    assert (await deliver(dest, "u1", b"Subject: anonymous\n\nFrom: x@y.z\n")).error is None
    env = json.loads((tmp_path / "u1.json").read_text())["env"]
    assert env["GPOPD_SENDER"] == ""


async def test_arguments_are_never_interpreted_by_a_shell(tmp_path: Path) -> None:
    """Shell syntax in the configured argv reaches the MDA literally."""
    literal = ["$HOME", "a;b", "`id`", "*", "$(echo x)", "two words"]
    dest = MdaDestination(fake("record", str(tmp_path), *literal), timeout=30)
    assert (await deliver(dest, "u1")).error is None
    assert json.loads((tmp_path / "u1.json").read_text())["argv"] == literal


async def test_missing_program_is_permanent(tmp_path: Path) -> None:
    """A command that cannot be started fails prepare() and each commit, permanently."""
    absent = MdaDestination([str(tmp_path / "no-such-mda")], timeout=5)
    with pytest.raises(PermanentDeliveryError, match="not an executable file"):
        await absent.prepare(ALICE)
    result = await deliver(absent, "u1")
    assert isinstance(result.error, PermanentDeliveryError)
    assert "cannot start" in str(result.error)
    unknown = MdaDestination(["gpopd-no-such-mda-anywhere"], timeout=5)
    with pytest.raises(PermanentDeliveryError, match="not found in PATH"):
        await unknown.prepare(ALICE)


async def test_at_least_once_recognises_nothing() -> None:
    """An MDA keeps no trace to recover from, so nothing is reported as delivered."""
    dest = MdaDestination(["true"])
    assert dest.exactly_once is False
    assert await dest.find_delivered(ALICE, [message_key(ALICE, "u1")]) == set()


async def test_committed_messages_are_released_and_not_committed_twice(tmp_path: Path) -> None:
    """After a commit the spool file is closed and a second commit of it is refused."""
    dest = MdaDestination(["true"], timeout=30)
    staged = stage(dest, "u1", MESSAGE)
    (result,) = await dest.commit([staged])
    assert result.ok
    assert staged.file is None
    with pytest.raises(ValueError, match="already committed"):
        await dest.commit([staged])


async def test_close_releases_staged_messages_never_committed() -> None:
    """close() frees the spool of messages finished but never committed."""
    dest = MdaDestination(["true"])
    staged = stage(dest, "u1", MESSAGE)
    assert staged.file is not None
    await dest.close()
    assert staged.file is None


def test_writer_abort_discards_the_spool() -> None:
    """An aborted writer refuses further writes: nothing of the message is kept."""
    dest = MdaDestination(["true"])
    writer = dest.open(info("u1"))
    writer.write(b"Subject: partial\n")
    writer.abort()
    with pytest.raises(ValueError, match="after finish"):
        writer.write(b"more\n")


def test_from_config_takes_command_and_time_limit() -> None:
    """The config model's argv and timeout become the destination's."""
    cfg = MdaDelivery(type="mda", command=("/usr/bin/procmail", "-m", "x"), timeout=12)
    dest = MdaDestination.from_config(cfg)
    assert dest.command == ("/usr/bin/procmail", "-m", "x")
    assert dest.timeout == 12
    assert dest.name == "mda:/usr/bin/procmail"


@pytest.mark.parametrize("chunk", [1, 2, 3, 65536])
async def test_writer_finds_the_sender_in_the_header_only(chunk: int) -> None:
    """The header/body boundary is found however the message is chunked."""
    dest = MdaDestination(["true"])
    body_only = b"From: head@example.org\n\nReturn-Path: <body@example.org>\n"
    crlf = b"Subject: x\r\n\r\nFrom: body@example.org\n"
    beyond = b"X-Pad: " + b"p" * HEADER_SCAN_LIMIT + b"\nFrom: late@example.org\n\n"
    try:
        assert stage(dest, "u1", body_only, chunk).sender == "head@example.org"
        assert stage(dest, "u2", crlf, chunk).sender == ""
        assert stage(dest, "u3", beyond, chunk).sender == ""
    finally:
        await dest.close()


@pytest.mark.parametrize(
    ("head", "sender"),
    [
        (b"From: Bob <bob@example.org>\nReturn-Path: <rp@example.org>\n", "rp@example.org"),
        (b"Return-Path: <>\nFrom: Bob <bob@example.org>\n", ""),
        (b"From: Bob <bob@example.org>\n\nReturn-Path: <body@example.org>\n", "bob@example.org"),
        (b"Received: from x\n\tby y\nFROM:\n  bob@example.org (Bob)\n", "bob@example.org"),
        (b"return-path:\r\n <crlf@example.org>\r\n", "crlf@example.org"),
        (b"\nFrom: body@example.org\n", ""),
        (b"From someone Mon Jan  1 00:00:00 2024\nSubject: x\n", ""),
        (b"Subject: none\n", ""),
    ],
)
def test_envelope_sender(head: bytes, sender: str) -> None:
    """The sender comes from the first Return-Path, else the first From, of the header only."""
    assert envelope_sender(head) == sender


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_safe_env_value_is_always_safe(value: str) -> None:
    """Any text becomes a bounded string of safe characters that cannot look like an option."""
    cleaned = safe_env_value(value)
    assert SAFE.fullmatch(cleaned)
    assert len(cleaned) <= ENV_VALUE_LIMIT
    assert not cleaned.startswith("-")
    if SAFE.fullmatch(value) and not value.startswith("-") and len(value) <= ENV_VALUE_LIMIT:
        assert cleaned == value
