"""Tests of mbox delivery: mboxrd format, locking, modes and exactly-once recovery."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import mailbox
import os
import re
import socket
import stat
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpopd.config import MboxDelivery
from gpopd.delivery import CommitResult, MessageInfo, Staged, message_key
from gpopd.delivery import mbox as mbox_module
from gpopd.delivery.mbox import (
    FromQuoter,
    MboxDestination,
    MboxStaged,
    envelope_sender,
    from_line,
    parse_journal,
)
from gpopd.delivery.mboxlock import create_dotlock_in_place
from gpopd.errors import TemporaryDeliveryError

REPO = Path(__file__).resolve().parents[1]
ALICE = "alice@example.com"
BOB = "bob@example.com"
FROM_LINE_RE = re.compile(
    rb"From (\S+) (Mon|Tue|Wed|Thu|Fri|Sat|Sun) "
    rb"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) [ \d]\d \d\d:\d\d:\d\d \d{4}\n"
)

# Run by the crash tests in a child process: stage the messages, then die
# (os._exit, no clean-up at all) at the requested step of the commit.
CHILD = r"""
import asyncio, json, os, sys
from pathlib import Path
from gpopd.delivery import mbox
from gpopd.delivery.base import MessageInfo, message_key

spec = json.loads(Path(sys.argv[1]).read_text())
point = spec["point"]
real_fsync, real_write, real_pwrite = mbox._fsync, mbox._write_all, mbox._pwrite_all
calls = {"fsync": 0, "write": 0}

def fsync(fd):
    real_fsync(fd)
    calls["fsync"] += 1
    if (point, calls["fsync"]) in {("after-journal", 1), ("after-mbox", 2), ("after-commit", 3)}:
        os._exit(99)

def write_all(fd, data):
    calls["write"] += 1
    if point == "mid-append" and calls["write"] == 2:
        real_write(fd, data[: len(data) // 2])
        os._exit(99)
    real_write(fd, data)

def pwrite_all(fd, data, offset):
    if point == "mid-journal":
        real_pwrite(fd, data[: len(data) // 2], offset)
        os._exit(99)
    real_pwrite(fd, data, offset)

async def main():
    dest = mbox.MboxDestination(Path(spec["path"]), lock_timeout=spec["lock_timeout"])
    await dest.prepare(spec["account"])
    for window in spec["windows"]:
        staged = []
        for uid, name in window:
            info = MessageInfo(spec["account"], uid, message_key(spec["account"], uid))
            writer = dest.open(info)
            writer.write(Path(name).read_bytes())
            staged.append(writer.finish())
        mbox._fsync, mbox._write_all, mbox._pwrite_all = fsync, write_all, pwrite_all
        results = await dest.commit(staged)
        mbox._fsync, mbox._write_all, mbox._pwrite_all = real_fsync, real_write, real_pwrite
        assert all(r.ok for r in results), [str(r.error) for r in results]
    if point == "after-return":
        os._exit(99)

asyncio.run(main())
"""

HOLD_DOTLOCK = r"""
import os, socket, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
os.write(fd, f"{os.getpid()}:{socket.gethostname()}".encode())
os.close(fd)
print("ready", flush=True)
sys.stdin.read()
"""

HOLD_FCNTL = r"""
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.lockf(fd, fcntl.LOCK_EX)
print("ready", flush=True)
sys.stdin.read()
"""


def message(n: int, extra: bytes = b"") -> bytes:
    return (
        b"Return-Path: <sender%d@example.org>\n"
        b"From: Sender %d <from%d@example.org>\n"
        b"Subject: message %d\n"
        b"\n"
        b"From the start of a line\n"
        b">From quoted once\n"
        b">>From quoted twice\n"
        b"Fromage is not a From_ line\n"
        b"a bare \r inside, a NUL \x00 and \xff\n" % (n, n, n, n)
    ) + extra


def quote(data: bytes) -> bytes:
    return re.sub(rb"(?m)^(>*From )", rb">\1", data)


def unquote(data: bytes) -> bytes:
    return re.sub(rb"(?m)^>(>*From )", rb"\1", data)


def info(uid: str, account: str = ALICE) -> MessageInfo:
    return MessageInfo(account=account, uid=uid, key=message_key(account, uid))


def stage(
    dest: MboxDestination, uid: str, data: bytes, account: str = ALICE, chunk: int = 7
) -> MboxStaged:
    writer = dest.open(info(uid, account))
    for start in range(0, len(data), chunk):
        writer.write(data[start : start + chunk])
    staged = writer.finish()
    assert isinstance(staged, MboxStaged)
    return staged


async def deliver(
    dest: MboxDestination, messages: Sequence[tuple[str, bytes]], account: str = ALICE
) -> list[CommitResult]:
    return await dest.commit([stage(dest, uid, data, account) for uid, data in messages])


def read_mbox(path: Path) -> list[tuple[str, bytes]]:
    """(sender, message with one level of mboxrd quoting removed) per message."""
    box = mailbox.mbox(path, create=False)
    try:
        out = []
        for key in box.iterkeys():
            sender = box.get_message(key).get_from().split(" ", 1)[0]
            out.append((sender, unquote(box.get_bytes(key))))
        return out
    finally:
        box.close()


def formail_split(path: Path, outdir: Path) -> list[bytes]:
    outdir.mkdir()
    with path.open("rb") as stdin:
        subprocess.run(
            ["formail", "-s", "sh", "-c", 'cat > "$0/msg.$FILENO"', str(outdir)],
            stdin=stdin,
            check=True,
            timeout=60,
        )
    return [(outdir / name).read_bytes() for name in sorted(os.listdir(outdir))]


def contents(path: Path) -> list[bytes]:
    return [data for _, data in read_mbox(path)]


def read(path: Path) -> bytes:
    return path.read_bytes()


def write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def append(path: Path, data: bytes) -> None:
    with path.open("ab") as file:
        file.write(data)


def dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True
    )
    return int(done.stdout)


def lock_of(box: Path) -> Path:
    return Path(f"{box}.lock")


def exists(path: Path) -> bool:
    return path.exists()


def size(path: Path) -> int:
    return path.stat().st_size


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def journal_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.gpopd-journal")


@pytest.fixture
def box(tmp_path: Path) -> Path:
    return tmp_path / "mail" / "inbox"


@pytest.fixture
async def dest(box: Path) -> MboxDestination:
    destination = MboxDestination(box, lock_timeout=2.0)
    await destination.prepare(ALICE)
    return destination


@pytest.fixture(params=[0o022, 0o277], ids=["umask022", "umask277"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    original = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(original)


# -- format -------------------------------------------------------------------


def test_from_line_format() -> None:
    """The separator is ``From <sender> <asctime in UTC>``."""
    assert from_line("a@b.example", 0) == b"From a@b.example Thu Jan  1 00:00:00 1970\n"
    assert FROM_LINE_RE.fullmatch(from_line("x@y", time.time()))


@pytest.mark.parametrize(
    ("header", "sender"),
    [
        (b"Return-Path: <bounce@lists.example>\nFrom: a@b.example\n\n", "bounce@lists.example"),
        (b"Return-Path: <>\nFrom: a@b.example\n\n", "MAILER-DAEMON"),
        (b"From: Jane Doe <jane@example.org>\nSubject: x\n\n", "jane@example.org"),
        (b"FROM:\n  Folded Name\n  <folded@example.org>\n\n", "folded@example.org"),
        (b'From: "John Doe"@example.org\n\n', "_John_Doe_@example.org"),
        (b"From: <caf\xc3\xa9@example.org>\n\n", "caf_@example.org"),
        (b"Subject: no sender\n\n", "MAILER-DAEMON"),
        (b"Subject: x\n\nFrom: body@example.org\n", "MAILER-DAEMON"),
        (b"From: first@example.org\nFrom: second@example.org\n\n", "first@example.org"),
    ],
)
def test_envelope_sender(header: bytes, sender: str) -> None:
    """The sender comes from Return-Path, then From, sanitised to one safe token."""
    assert envelope_sender(header) == sender


def test_envelope_sender_cannot_break_the_separator() -> None:
    """Spaces and control characters in an address never reach the From_ line."""
    token = envelope_sender(b"Return-Path: <a b\tc\x01d@e.example>\n\n")
    assert re.fullmatch(r"[!-~]+", token), token
    assert FROM_LINE_RE.fullmatch(from_line(token, 0))


@pytest.mark.parametrize(
    ("line", "quoted"),
    [
        (b"From me\n", b">From me\n"),
        (b">From x\n", b">>From x\n"),
        (b">>From y\n", b">>>From y\n"),
        (b"From\n", b"From\n"),
        (b"Fromage\n", b"Fromage\n"),
        (b" From x\n", b" From x\n"),
        (b">> From x\n", b">> From x\n"),
    ],
)
def test_quoter_lines(line: bytes, quoted: bytes) -> None:
    """Exactly the lines matching ``^>*From `` get one more ``>``."""
    quoter = FromQuoter()
    assert quoter.feed(b"x\n" + line) + quoter.flush() == b"x\n" + quoted


@settings(max_examples=300, deadline=None)
@given(
    data=st.lists(st.sampled_from([b"From ", b">", b"F", b"rom", b" ", b"\n", b"x", b"om "])).map(
        b"".join
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=8),
)
def test_quoter_chunking_property(data: bytes, cuts: list[int]) -> None:
    """Quoting a stream cut anywhere equals quoting it whole, and unquoting restores it."""
    quoter = FromQuoter()
    out = b""
    previous = 0
    for cut in sorted(c for c in cuts if c <= len(data)):
        out += quoter.feed(data[previous:cut])
        previous = cut
    out += quoter.feed(data[previous:]) + quoter.flush()
    assert out == quote(data)
    assert unquote(out) == data


# -- delivery ---------------------------------------------------------------------


async def test_round_trip_with_python_mailbox(dest: MboxDestination, box: Path) -> None:
    """Messages delivered in one window and alone read back byte for byte with mailbox.mbox."""
    first = [("u1", message(1)), ("u2", message(2, b"\n\n")), ("u3", message(3))]
    results = await deliver(dest, first)
    assert [r.ok for r in results] == [True, True, True]
    (result,) = await deliver(dest, [("u4", message(4))])
    assert result.ok
    assert result.staged.size == len(message(4))
    read = read_mbox(box)
    assert [data for _, data in read] == [
        message(n) if n != 2 else message(2, b"\n\n") for n in (1, 2, 3, 4)
    ]
    assert [sender for sender, _ in read] == [f"sender{n}@example.org" for n in (1, 2, 3, 4)]


async def test_file_layout_and_formail(dest: MboxDestination, box: Path, tmp_path: Path) -> None:
    """formail -s splits the file into the same records: From_ line, quoted message, empty line."""
    messages = [("a", message(1)), ("b", message(2)), ("c", b"Subject: bare\n\nFrom x\n")]
    assert all(r.ok for r in await deliver(dest, messages))
    raw = read(box)
    parts = formail_split(box, tmp_path / "split")
    assert len(parts) == 3
    assert b"".join(parts) == raw
    for part, (_, original) in zip(parts, messages, strict=True):
        head, _, rest = part.partition(b"\n")
        assert FROM_LINE_RE.fullmatch(head + b"\n")
        assert rest == quote(original) + b"\n"
    assert b"\n>From the start of a line\n>>From quoted once\n>>>From quoted twice\n" in raw
    assert parts[2].startswith(b"From MAILER-DAEMON ")


async def test_message_without_final_newline_stays_parsable(
    dest: MboxDestination, box: Path
) -> None:
    """A message not ending in a newline gets one, so the next separator stays a line."""
    await deliver(dest, [("a", b"Subject: a\n\nno newline"), ("b", message(2))])
    assert contents(box) == [b"Subject: a\n\nno newline\n", message(2)]


async def test_mbox_without_final_newline_gets_one(box: Path) -> None:
    """An mbox another program left without a final newline keeps its last message apart."""
    box.parent.mkdir()
    write(box, b"From x@y Thu Jan  1 00:00:00 1970\nSubject: old\n\nno newline")
    dest = MboxDestination(box)
    await dest.prepare(ALICE)
    await deliver(dest, [("u1", message(1))])
    assert contents(box) == [b"Subject: old\n\nno newline\n", message(1)]


async def test_find_delivered_after_commit(dest: MboxDestination) -> None:
    """Committed keys are found through the journal; unknown keys and other accounts are not."""
    await deliver(dest, [("u1", message(1)), ("u2", message(2))])
    await deliver(dest, [("u1", message(9))], account=BOB)
    keys = {message_key(ALICE, u) for u in ("u1", "u2", "u3")}
    found = await dest.find_delivered(ALICE, keys)
    assert found == {message_key(ALICE, "u1"), message_key(ALICE, "u2")}
    assert await dest.find_delivered(BOB, [message_key(BOB, "u2")]) == set()
    assert await dest.find_delivered(ALICE, []) == set()


async def test_find_delivered_does_not_read_the_mbox(dest: MboxDestination, box: Path) -> None:
    """Keys stay found after a MUA expunged the messages: only the journal is consulted."""
    await deliver(dest, [("u1", message(1))])
    os.truncate(box, 0)
    assert await dest.find_delivered(ALICE, [message_key(ALICE, "u1")]) == {
        message_key(ALICE, "u1")
    }
    assert all(r.ok for r in await deliver(dest, [("u2", message(2))]))
    assert contents(box) == [message(2)]


async def test_modes_of_created_files(tmp_path: Path, umask: int) -> None:
    """A missing mbox is created 0600 in new 0700 directories; the journal is 0600."""
    box = tmp_path / "a" / "b" / "inbox"
    dest = MboxDestination(box)
    await dest.prepare(ALICE)
    await deliver(dest, [("u1", message(1))])
    assert mode(box) == 0o600
    assert mode(box.parent) == 0o700
    assert mode(box.parent.parent) == 0o700
    assert mode(journal_path(box)) == 0o600
    assert not exists(lock_of(box))


async def test_existing_mbox_mode_is_kept(tmp_path: Path) -> None:
    """The mode of an existing mbox is never changed."""
    box = tmp_path / "inbox"
    write(box, b"")
    os.chmod(box, 0o640)
    dest = MboxDestination(box)
    await dest.prepare(ALICE)
    await deliver(dest, [("u1", message(1))])
    assert mode(box) == 0o640
    assert contents(box) == [message(1)]


async def test_writer_abort_and_commit_misuse(dest: MboxDestination, box: Path) -> None:
    """Aborted messages and foreign staged messages are refused and nothing is written."""
    writer = dest.open(info("u1"))
    writer.write(message(1))
    staged = writer.finish()
    assert isinstance(staged, MboxStaged)
    writer.abort()  # after finish(): discards the uncommitted message
    assert staged.spool is None
    with pytest.raises(RuntimeError):
        writer.write(b"more")
    with pytest.raises(ValueError, match="already committed or aborted"):
        await dest.commit([staged])
    with pytest.raises(TypeError):
        await dest.commit([Staged(info("u2"), 1)])
    assert await dest.commit([]) == []
    with pytest.raises(ValueError, match="32 lowercase hex"):
        dest.open(MessageInfo(ALICE, "u3", "not-a-key"))
    assert read(box) == b""


async def test_from_config() -> None:
    """The destination is built from the validated ``delivery:`` model."""
    cfg = MboxDelivery(type="mbox", path=Path("/var/tmp/gpopd-test/inbox"))
    dest = MboxDestination.from_config(cfg)
    assert dest.path == Path("/var/tmp/gpopd-test/inbox")
    assert dest.exactly_once
    assert dest.name == "mbox:/var/tmp/gpopd-test/inbox"


async def test_large_message_is_streamed(dest: MboxDestination, box: Path) -> None:
    """A 10 MB message goes through a spool: memory stays far below its size."""
    line = b"From a line that needs quoting, and some filler text to make it long\n"
    other = b">From already quoted " + b"x" * 50 + b"\n"
    chunk = (line + other * 9) * 100
    count = 10_000_000 // len(chunk) + 1
    original = hashlib.sha256()
    original.update(b"Subject: big\n\n")
    tracemalloc.start()
    try:
        writer = dest.open(info("big"))
        writer.write(b"Subject: big\n\n")
        for _ in range(count):
            writer.write(chunk)
            original.update(chunk)
        staged = writer.finish()
        (result,) = await dest.commit([staged])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.ok
    assert staged.size == 14 + count * len(chunk) > 10_000_000
    assert peak < 4 << 20, f"peak {peak} bytes"
    (data,) = contents(box)
    assert hashlib.sha256(data).hexdigest() == original.hexdigest()


async def test_two_accounts_share_an_mbox(box: Path) -> None:
    """Two polls committing concurrently to one mbox never interleave their records."""
    alice = MboxDestination(box)
    bob = MboxDestination(box)
    await alice.prepare(ALICE)
    await bob.prepare(BOB)

    async def run(dest: MboxDestination, account: str, base: int) -> None:
        for n in range(10):
            results = await deliver(dest, [(f"u{n}", message(base + n))], account=account)
            assert results[0].ok

    await asyncio.gather(run(alice, ALICE, 0), run(bob, BOB, 100))
    assert sorted(contents(box)) == sorted(
        [message(n) for n in range(10)] + [message(100 + n) for n in range(10)]
    )
    assert (
        len(await alice.find_delivered(ALICE, [message_key(ALICE, f"u{n}") for n in range(10)]))
        == 10
    )
    assert len(await bob.find_delivered(BOB, [message_key(BOB, f"u{n}") for n in range(10)])) == 10


# -- failures inside a commit ------------------------------------------------------


async def test_failed_mbox_fsync_rolls_the_window_back(
    dest: MboxDestination, box: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the mbox fsync fails, every message of the window fails and the file is cut back."""
    await deliver(dest, [("u0", message(0))])
    before = read(box)
    real = mbox_module._fsync
    calls = {"n": 0}

    def failing(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # 1: journal block, 2: the mbox
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(mbox_module, "_fsync", failing)
    results = await deliver(dest, [("u1", message(1)), ("u2", message(2))])
    monkeypatch.setattr(mbox_module, "_fsync", real)
    assert [type(r.error) for r in results] == [TemporaryDeliveryError] * 2
    assert "fsync of" in str(results[0].error)
    assert "Input/output error" in str(results[0].error)
    assert read(box) == before
    assert await dest.find_delivered(ALICE, [message_key(ALICE, "u1")]) == set()
    assert all(r.ok for r in await deliver(dest, [("u1", message(1))]))
    assert contents(box) == [message(0), message(1)]


async def test_full_disk_keeps_the_messages_before_it(
    dest: MboxDestination, box: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write failing on the second message keeps the first and cuts the partial second."""
    real = mbox_module._write_all
    calls = {"n": 0}

    def failing(fd: int, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            real(fd, data[:10])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(mbox_module, "_write_all", failing)
    results = await deliver(dest, [("u1", message(1)), ("u2", message(2)), ("u3", message(3))])
    monkeypatch.setattr(mbox_module, "_write_all", real)
    assert [r.ok for r in results] == [True, False, False]
    assert "No space left on device" in str(results[1].error)
    assert contents(box) == [message(1)]
    keys = [message_key(ALICE, u) for u in ("u1", "u2", "u3")]
    assert await dest.find_delivered(ALICE, keys) == {keys[0]}


async def test_foreign_journal_is_not_overwritten(dest: MboxDestination, box: Path) -> None:
    """A journal in an unknown format stops delivery instead of being replaced."""
    write(journal_path(box), b"something else\n")
    results = await deliver(dest, [("u1", message(1))])
    assert isinstance(results[0].error, TemporaryDeliveryError)
    assert "not a gpopd mbox journal" in str(results[0].error)
    with pytest.raises(TemporaryDeliveryError):
        await dest.find_delivered(ALICE, [message_key(ALICE, "u1")])
    assert read(box) == b""
    assert read(journal_path(box)) == b"something else\n"


async def test_journal_is_compacted(
    dest: MboxDestination, box: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The journal stays small and keeps each account's most recent keys."""
    monkeypatch.setattr(mbox_module, "JOURNAL_COMPACT_SIZE", 2000)
    monkeypatch.setattr(mbox_module, "JOURNAL_HISTORY", 5)
    for n in range(40):
        assert (await deliver(dest, [(f"u{n}", b"Subject: %d\n\n" % n)]))[0].ok
    assert (await deliver(dest, [("b1", message(1))], account=BOB))[0].ok
    assert size(journal_path(box)) < 3000
    keys = [message_key(ALICE, f"u{n}") for n in range(40)]
    found = await dest.find_delivered(ALICE, keys)
    assert set(keys[-5:]) <= found
    assert keys[0] not in found
    assert await dest.find_delivered(BOB, [message_key(BOB, "b1")]) == {message_key(BOB, "b1")}
    assert len(contents(box)) == 41


# -- crashes ------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def child_command(
    tmp_path: Path,
    box: Path,
    point: str,
    windows: list[list[tuple[str, bytes]]],
    account: str = ALICE,
) -> list[str]:
    """The command line of a child committing ``windows`` and dying at ``point``."""
    tag = f"{account}-{point}-{len(list(tmp_path.iterdir()))}"
    spec_windows = []
    for w, window in enumerate(windows):
        items = []
        for uid, data in window:
            name = tmp_path / f"msg-{tag}-{w}-{uid}"
            name.write_bytes(data)
            items.append((uid, str(name)))
        spec_windows.append(items)
    spec = tmp_path / f"spec-{tag}.json"
    spec.write_text(
        json.dumps(
            {
                "path": str(box),
                "account": account,
                "point": point,
                "windows": spec_windows,
                "lock_timeout": 60,
            }
        )
    )
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return [sys.executable, str(script), str(spec)]


def run_child(tmp_path: Path, box: Path, point: str, windows: list[list[tuple[str, bytes]]]) -> int:
    done = subprocess.run(
        child_command(tmp_path, box, point, windows),
        env=child_env(),
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.returncode in (0, 99), done.stderr.decode()
    return done.returncode


WINDOW = [("u1", message(1)), ("u2", message(2)), ("u3", message(3))]


@pytest.mark.parametrize(
    ("point", "survivors"),
    [
        ("mid-journal", 0),
        ("after-journal", 0),
        ("mid-append", 1),
        ("after-mbox", 3),
        ("after-commit", 3),
        ("after-return", 3),
    ],
)
async def test_crash_at_every_step(tmp_path: Path, box: Path, point: str, survivors: int) -> None:
    """After a crash at any step and a re-fetch of what was not found, each message is in once."""
    box.parent.mkdir()
    assert run_child(tmp_path, box, "none", [[("u0", message(0))]]) == 0
    assert run_child(tmp_path, box, point, [WINDOW]) == 99
    if point != "after-return":
        # The dead process's dotlock is still there; its pid shows it is stale.
        assert read(lock_of(box)).endswith(socket.gethostname().encode())
    dest = MboxDestination(box, lock_timeout=2.0)
    started = time.monotonic()
    await dest.prepare(ALICE)
    assert time.monotonic() - started < 1.5
    assert not exists(lock_of(box))
    keys = {message_key(ALICE, uid): (uid, data) for uid, data in WINDOW}
    found = await dest.find_delivered(ALICE, keys)
    assert found == {message_key(ALICE, uid) for uid, _ in WINDOW[:survivors]}
    # What the fetch layer does next: fetch again what was not found.
    refetch = [keys[key] for key in keys if key not in found]
    if refetch:
        assert all(r.ok for r in await deliver(dest, refetch))
    assert contents(box) == [message(n) for n in range(4)]
    assert len(formail_split(box, tmp_path / "split")) == 4
    assert await dest.find_delivered(ALICE, keys) == set(keys)


@pytest.mark.parametrize(
    ("cut", "survivors"),
    [("inside-first", 0), ("at-second", 1), ("inside-second", 1), ("last-byte-missing", 2)],
)
async def test_append_cut_short_is_truncated(
    tmp_path: Path, box: Path, cut: str, survivors: int
) -> None:
    """A file that lost the end of an append is cut back to the last whole record."""
    box.parent.mkdir()
    assert run_child(tmp_path, box, "none", [[("u0", message(0))]]) == 0
    assert run_child(tmp_path, box, "after-mbox", [WINDOW]) == 99
    blocks, _ = parse_journal(read(journal_path(box)))
    assert blocks[-1].committed is None
    first, second, third = blocks[-1].entries
    offset = {
        "inside-first": first.offset + 10,
        "at-second": second.offset,
        "inside-second": second.offset + second.length // 2,
        "last-byte-missing": third.offset + third.length - 1,
    }[cut]
    os.truncate(box, offset)
    dest = MboxDestination(box, lock_timeout=2.0)
    await dest.prepare(ALICE)
    assert size(box) == blocks[-1].entries[survivors].offset
    keys = [message_key(ALICE, uid) for uid, _ in WINDOW]
    found = await dest.find_delivered(ALICE, keys)
    assert found == set(keys[:survivors])
    assert contents(box) == [message(n) for n in range(survivors + 1)]
    assert all(r.ok for r in await deliver(dest, WINDOW[survivors:]))
    assert contents(box) == [message(n) for n in range(4)]


async def test_garbled_record_is_cut_off(tmp_path: Path, box: Path) -> None:
    """A record whose bytes never reached the disk (zeros) is cut off with everything after it."""
    box.parent.mkdir()
    assert run_child(tmp_path, box, "after-mbox", [WINDOW]) == 99
    blocks, _ = parse_journal(read(journal_path(box)))
    second = blocks[-1].entries[1]
    with box.open("r+b") as file:
        file.seek(second.offset + 100)
        file.write(b"\0" * 50)
    dest = MboxDestination(box, lock_timeout=2.0)
    keys = [message_key(ALICE, uid) for uid, _ in WINDOW]
    assert await dest.find_delivered(ALICE, keys) == {keys[0]}
    assert size(box) == second.offset
    assert contents(box) == [message(1)]


async def test_records_appended_by_others_are_never_cut(tmp_path: Path, box: Path) -> None:
    """When someone appended after a cut append, recovery counts what is whole and cuts nothing."""
    box.parent.mkdir()
    assert run_child(tmp_path, box, "after-mbox", [WINDOW]) == 99
    blocks, _ = parse_journal(read(journal_path(box)))
    third = blocks[-1].entries[2]
    os.truncate(box, third.offset + 20)
    foreign = b"From other@example.org Thu Jan  1 00:00:00 1970\nSubject: theirs\n\n" + b"y" * 500
    append(box, foreign + b"\n\n")
    before = read(box)
    dest = MboxDestination(box, lock_timeout=2.0)
    keys = [message_key(ALICE, uid) for uid, _ in WINDOW]
    assert await dest.find_delivered(ALICE, keys) == set(keys[:2])
    assert read(box) == before


async def test_replaced_mbox_is_not_truncated(tmp_path: Path, box: Path) -> None:
    """After a cut append, a file replaced meanwhile is left alone and nothing counts."""
    box.parent.mkdir()
    assert run_child(tmp_path, box, "mid-append", [WINDOW]) == 99
    os.unlink(box)
    write(box, b"From someone Thu Jan  1 00:00:00 1970\nSubject: other\n\n" + b"x" * 5000 + b"\n\n")
    kept = read(box)
    dest = MboxDestination(box, lock_timeout=2.0)
    await dest.prepare(ALICE)
    assert read(box) == kept
    assert await dest.find_delivered(ALICE, [message_key(ALICE, "u1")]) == set()


def test_concurrent_processes(tmp_path: Path, box: Path) -> None:
    """Several processes appending at once through both locks leave only whole records."""
    box.parent.mkdir()
    writers, windows, per_window = 4, 8, 2
    children = []
    for w in range(writers):
        messages = [
            [(f"w{w}-{n}-{m}", message(1000 * w + 10 * n + m)) for m in range(per_window)]
            for n in range(windows)
        ]
        command = child_command(tmp_path, box, "none", messages, account=f"acct{w}")
        children.append(subprocess.Popen(command, env=child_env(), stderr=subprocess.PIPE))
    for child in children:
        _, err = child.communicate(timeout=120)
        assert child.returncode == 0, err.decode()
    expected = sorted(
        message(1000 * w + 10 * n + m)
        for w in range(writers)
        for n in range(windows)
        for m in range(per_window)
    )
    assert sorted(contents(box)) == expected
    assert len(formail_split(box, tmp_path / "split")) == len(expected)


# -- locking -----------------------------------------------------------------------


def hold(script: str, target: Path) -> subprocess.Popen[bytes]:
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(target)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert child.stdout is not None
    assert child.stdout.readline() == b"ready\n"
    return child


def release(child: subprocess.Popen[bytes]) -> None:
    assert child.stdin is not None
    child.stdin.close()
    child.wait(timeout=10)
    if child.stdout is not None:
        child.stdout.close()


async def test_locks_are_held_during_the_append(
    dest: MboxDestination, box: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the records are appended the dotlock names this process and is gone afterwards."""
    seen: list[bytes] = []
    real = mbox_module._fsync

    def spying(fd: int) -> None:
        seen.append(read(lock_of(box)))
        real(fd)

    monkeypatch.setattr(mbox_module, "_fsync", spying)
    assert (await deliver(dest, [("u1", message(1))]))[0].ok
    assert seen == [f"{os.getpid()}:{socket.gethostname()}".encode()] * 3
    assert not exists(lock_of(box))


def test_dotlock_without_o_tmpfile(tmp_path: Path) -> None:
    """The fallback for filesystems without O_TMPFILE creates the lock once, with its owner."""
    lock = tmp_path / "inbox.lock"
    inode = create_dotlock_in_place(lock, b"123:host")
    assert inode == lock.stat().st_ino
    assert lock.read_bytes() == b"123:host"
    assert create_dotlock_in_place(lock, b"456:host") is None
    assert lock.read_bytes() == b"123:host"


async def test_dotlock_held_by_another_process(box: Path) -> None:
    """A live process holding the dotlock makes the commit fail temporarily after the timeout."""
    dest = MboxDestination(box, lock_timeout=0.5)
    await dest.prepare(ALICE)
    holder = hold(HOLD_DOTLOCK, lock_of(box))
    try:
        started = time.monotonic()
        (result,) = await deliver(dest, [("u1", message(1))])
        elapsed = time.monotonic() - started
        assert isinstance(result.error, TemporaryDeliveryError)
        assert f"pid {holder.pid}" in str(result.error)
        assert 0.5 <= elapsed < 5
        with pytest.raises(TemporaryDeliveryError):
            await dest.find_delivered(ALICE, [message_key(ALICE, "u1")])
        assert read(box) == b""
    finally:
        release(holder)
    os.unlink(lock_of(box))
    assert (await deliver(dest, [("u1", message(1))]))[0].ok


async def test_fcntl_lock_held_by_another_process(box: Path) -> None:
    """A process holding an fcntl lock on the mbox makes the commit fail temporarily."""
    dest = MboxDestination(box, lock_timeout=0.5)
    await dest.prepare(ALICE)
    holder = hold(HOLD_FCNTL, box)
    try:
        (result,) = await deliver(dest, [("u1", message(1))])
        assert isinstance(result.error, TemporaryDeliveryError)
        assert "fcntl" in str(result.error)
        assert not exists(lock_of(box))
    finally:
        release(holder)
    assert (await deliver(dest, [("u1", message(1))]))[0].ok


async def test_stale_dotlocks_are_broken(box: Path) -> None:
    """Dotlocks of dead local processes or past the stale age are broken; fresh ones are not."""
    dest = MboxDestination(box, lock_timeout=0.3, stale_lock_age=60)
    await dest.prepare(ALICE)
    lock = lock_of(box)
    pid = dead_pid()
    write(lock, f"{pid}:{socket.gethostname()}".encode())
    assert (await deliver(dest, [("u1", message(1))]))[0].ok
    write(lock, b"")
    old = time.time() - 120
    os.utime(lock, (old, old))
    assert (await deliver(dest, [("u2", message(2))]))[0].ok
    write(lock, f"{pid}:elsewhere.example".encode())
    (result,) = await deliver(dest, [("u3", message(3))])
    assert isinstance(result.error, TemporaryDeliveryError)
    assert exists(lock)
    assert contents(box) == [message(1), message(2)]
