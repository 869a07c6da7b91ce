"""Tests of the delivery interface, Maildir delivery and the in-memory destination."""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import re
import resource
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpopd.delivery import CommitResult, MessageInfo, account_tag, message_key
from gpopd.delivery.maildir import (
    BUFFER_SIZE,
    FSYNC_THREADS,
    MaildirDestination,
    MaildirStaged,
    parse_key,
)
from gpopd.delivery.memory import MemoryDestination
from gpopd.errors import PermanentDeliveryError, TemporaryDeliveryError

ALICE = "alice@example.com"
BOB = "bob@example.com"
HOST = "mx1.example.org"


def info(uid: str, account: str = ALICE) -> MessageInfo:
    return MessageInfo(account=account, uid=uid, key=message_key(account, uid))


def stage(dest: MaildirDestination, message: MessageInfo, chunks: Sequence[bytes]) -> MaildirStaged:
    writer = dest.open(message)
    for chunk in chunks:
        writer.write(chunk)
    staged = writer.finish()
    assert isinstance(staged, MaildirStaged)
    return staged


async def deliver(
    dest: MaildirDestination, message: MessageInfo, chunks: Sequence[bytes]
) -> CommitResult:
    (result,) = await dest.commit([stage(dest, message, chunks)])
    return result


def names(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def maildir(tmp_path: Path) -> Path:
    return tmp_path / "Maildir"


@pytest.fixture
async def dest(maildir: Path) -> MaildirDestination:
    destination = MaildirDestination(maildir, hostname=HOST)
    await destination.prepare(ALICE)
    return destination


@pytest.fixture
def umask() -> Iterator[Callable[[int], None]]:
    original = os.umask(0o022)
    os.umask(original)

    def set_umask(value: int) -> None:
        os.umask(value)

    try:
        yield set_umask
    finally:
        os.umask(original)


# -- keys -------------------------------------------------------------------------


def test_message_key_shape_and_stability() -> None:
    """A key is 32 lowercase hex digits, starts with the account tag and depends on both parts."""
    key = message_key(ALICE, "GmailId1")
    assert re.fullmatch(r"[0-9a-f]{32}", key)
    assert key.startswith(account_tag(ALICE))
    assert len(account_tag(ALICE)) == 8
    assert key == message_key(ALICE, "GmailId1")
    assert key != message_key(ALICE, "GmailId2")
    assert key != message_key(BOB, "GmailId1")
    # The separator keeps "a" + "b\0c" apart from "a\0b" + "c".
    assert message_key("a", "b\0c") != message_key("a\0b", "c")


# -- content ----------------------------------------------------------------------


async def test_content_is_stored_byte_for_byte(dest: MaildirDestination, maildir: Path) -> None:
    """Hostile bytes (NUL, 0xff, a 200 000-byte line, mixed line ends) are stored unchanged."""
    chunks = [
        b"From: a@example.com\nSubject: x\n\n",
        b"\x00\xff\r\n.\n..\nFrom me\n",
        b"y" * 200_000,
        b"\n",
        b"",
        b"no final newline",
    ]
    result = await deliver(dest, info("u1"), chunks)
    assert result.ok
    assert result.error is None
    (name,) = names(maildir / "new")
    assert (maildir / "new" / name).read_bytes() == b"".join(chunks)
    assert result.staged.size == len(b"".join(chunks))


async def test_ten_megabytes_streamed_in_64k_chunks_is_exact_and_buffered(
    dest: MaildirDestination, maildir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 10 MB message written in 64 KiB chunks is exact and reaches the file in ~1 MiB writes."""
    content = os.urandom(10 * 1024 * 1024)
    writes: list[int] = []
    real_write = os.write

    def counting_write(fd: int, data: bytes) -> int:
        writes.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", counting_write)
    step = 64 * 1024
    result = await deliver(
        dest, info("big"), [content[i : i + step] for i in range(0, len(content), step)]
    )
    assert result.ok
    (name,) = names(maildir / "new")
    assert (maildir / "new" / name).read_bytes() == content
    assert len(writes) <= len(content) // BUFFER_SIZE + 1
    assert all(size >= BUFFER_SIZE for size in writes[:-1])


async def test_hundred_megabyte_message_does_not_grow_the_process(
    dest: MaildirDestination, maildir: Path
) -> None:
    """Streaming a 100 MB message keeps the peak RSS far below the message size."""
    chunk = b"0123456789abcdef" * 4096  # 64 KiB, reused so the test itself stays small
    count = 100 * 1024 * 1024 // len(chunk)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    writer = dest.open(info("huge"))
    for _ in range(count):
        writer.write(chunk)
    staged = writer.finish()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    (result,) = await dest.commit([staged])
    assert result.ok
    assert staged.size == count * len(chunk)
    (name,) = names(maildir / "new")
    assert (maildir / "new" / name).stat().st_size == count * len(chunk)
    assert after - before < 20 * 1024


async def test_a_chunk_larger_than_the_buffer_is_written_whole(
    dest: MaildirDestination, maildir: Path
) -> None:
    """A single chunk bigger than the buffer, between small ones, keeps the byte order."""
    parts = [b"head\n", os.urandom(3 * BUFFER_SIZE + 17), b"tail\n"]
    result = await deliver(dest, info("u"), parts)
    assert result.ok
    (name,) = names(maildir / "new")
    assert (maildir / "new" / name).read_bytes() == b"".join(parts)


@settings(max_examples=40, deadline=None)
@given(
    content=st.binary(max_size=5000),
    cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=10),
)
def test_any_chunking_gives_the_same_file(content: bytes, cuts: list[int]) -> None:
    """However the content is cut into chunks, the delivered file is the concatenation."""
    points = sorted({min(cut, len(content)) for cut in cuts} | {0, len(content)})
    chunks = [content[a:b] for a, b in itertools.pairwise(points)]
    with tempfile.TemporaryDirectory() as tmp:
        destination = MaildirDestination(Path(tmp) / "Maildir", hostname=HOST)

        async def run() -> CommitResult:
            await destination.prepare(ALICE)
            return await deliver(destination, info("u"), chunks)

        result = asyncio.run(run())
        assert result.ok
        (name,) = os.listdir(Path(tmp) / "Maildir" / "new")
        assert (Path(tmp) / "Maildir" / "new" / name).read_bytes() == content


# -- names and modes ----------------------------------------------------------------


async def test_names_follow_the_maildir_spec_and_carry_the_key(
    dest: MaildirDestination, maildir: Path
) -> None:
    """Names are SEC.M<usec>P<pid>Q<n>X<key>.<host>, unique, and tmp/ is empty after commit."""
    messages = [info(f"u{n}") for n in range(3)]
    staged = [stage(dest, message, [b"x\n"]) for message in messages]
    # Small messages wait in memory; their files are created by the commit.
    assert names(maildir / "tmp") == []
    results = await dest.commit(staged)
    assert all(result.ok for result in results)
    assert names(maildir / "tmp") == []
    assert names(maildir / "new") == sorted(item.filename for item in staged)
    pattern = re.compile(
        rf"(\d+)\.M(\d{{1,6}})P{os.getpid()}Q(\d+)X([0-9a-f]{{32}})\.{re.escape(HOST)}"
    )
    for message, item in zip(messages, staged, strict=True):
        match = pattern.fullmatch(item.filename)
        assert match, item.filename
        assert match.group(4) == message.key
        assert parse_key(item.filename) == message.key
        assert int(match.group(2)) < 1_000_000
    assert len({item.filename for item in staged}) == 3


async def test_hostname_slash_and_colon_are_escaped(maildir: Path) -> None:
    """A host name with "/" and ":" appears as \\057 and \\072 in the file name."""
    destination = MaildirDestination(maildir, hostname="we/ird:host")
    await destination.prepare(ALICE)
    result = await deliver(destination, info("u"), [b"x"])
    assert result.ok
    (name,) = names(maildir / "new")
    assert name.endswith(".we\\057ird\\072host")
    assert ":" not in name
    assert "/" not in name


async def test_default_hostname_is_the_machines(maildir: Path) -> None:
    """Without a hostname argument the name ends in this machine's (escaped) host name."""
    destination = MaildirDestination(maildir)
    await destination.prepare(ALICE)
    await deliver(destination, info("u"), [b"x"])
    (name,) = names(maildir / "new")
    expected = socket.gethostname().replace("/", "\\057").replace(":", "\\072")
    assert name.endswith("." + expected)


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o277])
async def test_files_are_0600_and_new_directories_0700_whatever_the_umask(
    maildir: Path, umask: Callable[[int], None], mask: int
) -> None:
    """Message files are 0600 and created directories 0700 under umask 0, 022 and 277."""
    umask(mask)
    destination = MaildirDestination(maildir, hostname=HOST)
    await destination.prepare(ALICE)
    writer = destination.open(info("u"))
    writer.write(b"x" * BUFFER_SIZE + b"\n")  # larger than the buffer: goes to tmp/ now
    (tmp_name,) = names(maildir / "tmp")
    assert mode(maildir / "tmp" / tmp_name) == 0o600
    writer.write(b"data\n")
    results = await destination.commit([writer.finish()])
    assert results[0].ok
    (name,) = names(maildir / "new")
    assert mode(maildir / "new" / name) == 0o600
    for directory in (maildir, maildir / "tmp", maildir / "new", maildir / "cur"):
        assert mode(directory) == 0o700


async def test_prepare_creates_missing_parents_and_leaves_existing_modes(tmp_path: Path) -> None:
    """prepare() creates missing parents 0700 and never changes the mode of existing directories."""
    existing = tmp_path / "home"
    existing.mkdir()
    existing.chmod(0o755)
    maildir = existing / "mail" / "Maildir"
    destination = MaildirDestination(maildir, hostname=HOST)
    await destination.prepare(ALICE)
    assert mode(existing) == 0o755
    assert mode(existing / "mail") == 0o700
    (maildir / "cur").chmod(0o750)
    await destination.prepare(ALICE)
    assert mode(maildir / "cur") == 0o750


async def test_prepare_fails_cleanly_when_the_path_is_a_file(tmp_path: Path) -> None:
    """A Maildir path that is a regular file gives a TemporaryDeliveryError."""
    path = tmp_path / "Maildir"
    path.write_text("not a directory")
    with pytest.raises(TemporaryDeliveryError, match="cannot prepare"):
        await MaildirDestination(path, hostname=HOST).prepare(ALICE)


async def test_open_refuses_a_malformed_key(dest: MaildirDestination) -> None:
    """A key that find_delivered could never recognise is refused before anything is written."""
    with pytest.raises(ValueError, match="32 lowercase hex"):
        dest.open(MessageInfo(ALICE, "u", "not-a-key"))


# -- find_delivered -----------------------------------------------------------------


async def test_find_delivered_sees_new_and_cur_with_mua_suffixes(
    dest: MaildirDestination, maildir: Path
) -> None:
    """Keys are found in new/ and in cur/ after an MUA renamed the file with flags and size."""
    in_new, seen, dovecot, absent = (info(uid) for uid in ("n", "s", "d", "x"))
    for message in (in_new, seen, dovecot):
        assert (await deliver(dest, message, [b"m\n"])).ok
    for message, suffix in ((seen, ":2,S"), (dovecot, ",S=2,W=3:2,RS")):
        (name,) = [n for n in names(maildir / "new") if message.key in n]
        os.rename(maildir / "new" / name, maildir / "cur" / (name + suffix))
    keys = {m.key for m in (in_new, seen, dovecot, absent)}
    assert await dest.find_delivered(ALICE, keys) == {in_new.key, seen.key, dovecot.key}
    assert await dest.find_delivered(ALICE, [absent.key]) == set()
    assert await dest.find_delivered(ALICE, []) == set()


async def test_find_delivered_ignores_foreign_files_and_other_accounts(
    dest: MaildirDestination, maildir: Path
) -> None:
    """Files of other programs and other accounts never count as this account's deliveries."""
    mine, theirs = info("u1"), info("u1", BOB)
    assert (await deliver(dest, theirs, [b"b\n"])).ok
    (maildir / "new" / f"1700000000.M1P2Q3.{HOST}").write_text("foreign")
    (maildir / "cur" / f"1700000000.12345_1.{HOST}:2,S").write_text("foreign")
    (maildir / "cur" / f"x{mine.key}").write_text("key in a foreign name")
    assert await dest.find_delivered(ALICE, [mine.key, theirs.key]) == set()
    assert await dest.find_delivered(BOB, [theirs.key]) == {theirs.key}


async def test_find_delivered_fails_when_the_maildir_is_gone(
    dest: MaildirDestination, maildir: Path
) -> None:
    """A missing cur/ raises instead of reporting nothing delivered."""
    (maildir / "cur").rmdir()
    with pytest.raises(TemporaryDeliveryError, match="cannot list"):
        await dest.find_delivered(ALICE, [info("u").key])


async def test_find_delivered_lists_each_directory_once(
    dest: MaildirDestination, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However many keys are asked about, new/ and cur/ are each listed once."""
    listed: list[str] = []
    real_scandir = os.scandir

    def recording_scandir(path: str | os.PathLike[str]) -> object:
        listed.append(os.path.basename(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", recording_scandir)
    await dest.find_delivered(ALICE, [info(f"u{n}").key for n in range(500)])
    assert listed == ["new", "cur"]


# -- prepare and orphans --------------------------------------------------------------


async def test_prepare_removes_only_this_accounts_orphans(
    dest: MaildirDestination, maildir: Path
) -> None:
    """prepare() deletes our own crashed tmp files of that account and nothing else."""
    ours = f"1700000000.M5P99Q1X{info('u1').key}.{HOST}"
    other_account = f"1700000000.M5P99Q2X{info('u1', BOB).key}.{HOST}"
    foreign = f"1700000000.M5P99Q3.{HOST}"
    lookalike = f"notours-X{info('u2').key}.{HOST}"
    for name in (ours, other_account, foreign, lookalike):
        (maildir / "tmp" / name).write_bytes(b"partial")
    (maildir / "tmp" / f"1700000000.M5P99Q4X{info('u3').key}.{HOST}").mkdir()
    await dest.prepare(ALICE)
    remaining = names(maildir / "tmp")
    assert ours not in remaining
    assert sorted(remaining) == sorted(
        [other_account, foreign, lookalike, f"1700000000.M5P99Q4X{info('u3').key}.{HOST}"]
    )
    await dest.prepare(BOB)
    assert other_account not in names(maildir / "tmp")


# -- abort --------------------------------------------------------------------------


async def test_abort_removes_the_partial_file_and_is_idempotent(
    dest: MaildirDestination, maildir: Path
) -> None:
    """abort() during writing removes the tmp file; a second abort() does nothing."""
    writer = dest.open(info("u"))
    writer.write(b"half a mess" * BUFFER_SIZE)
    assert len(names(maildir / "tmp")) == 1
    writer.abort()
    writer.abort()
    assert names(maildir / "tmp") == []
    assert names(maildir / "new") == []
    with pytest.raises(RuntimeError):
        writer.write(b"more")


async def test_abort_after_finish_discards_an_uncommitted_message(
    dest: MaildirDestination, maildir: Path
) -> None:
    """A staged message that is aborted before commit is removed and cannot be committed."""
    writer = dest.open(info("u"))
    writer.write(b"whole message\n")
    staged = writer.finish()
    writer.abort()
    assert names(maildir / "tmp") == []
    with pytest.raises(ValueError, match="already committed or aborted"):
        await dest.commit([staged])


async def test_abort_after_commit_keeps_the_delivered_message(
    dest: MaildirDestination, maildir: Path
) -> None:
    """abort() after a successful commit leaves the delivered file alone."""
    writer = dest.open(info("u"))
    writer.write(b"kept\n")
    (result,) = await dest.commit([writer.finish()])
    assert result.ok
    writer.abort()
    (name,) = names(maildir / "new")
    assert (maildir / "new" / name).read_bytes() == b"kept\n"


async def test_writer_context_manager_aborts_on_error(
    dest: MaildirDestination, maildir: Path
) -> None:
    """Leaving a writer's with-block by an exception removes the partial message."""

    def write_then_fail() -> None:
        with dest.open(info("u")) as writer:
            writer.write(b"partial")
            raise ConnectionResetError

    with pytest.raises(ConnectionResetError):
        write_then_fail()
    assert names(maildir / "tmp") == []


async def test_write_error_is_temporary_and_frees_the_space(
    dest: MaildirDestination, maildir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC while writing raises TemporaryDeliveryError and removes the partial file."""
    writer = dest.open(info("u"))

    def full_disk(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    monkeypatch.setattr(os, "writev", full_disk)
    with pytest.raises(TemporaryDeliveryError, match="No space left"):
        writer.write(b"x" * BUFFER_SIZE)
    assert names(maildir / "tmp") == []


async def test_short_writes_still_write_every_byte_in_order(
    dest: MaildirDestination, maildir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large message survives writev and write calls that each write only part of the data."""
    real_writev, real_write = os.writev, os.write

    def short_writev(fd: int, buffers: list[bytes]) -> int:
        first = bytes(buffers[0])
        return real_writev(fd, [first[: max(1, len(first) // 3)]])

    def short_write(fd: int, data: bytes) -> int:
        return real_write(fd, bytes(data)[:4093])

    monkeypatch.setattr(os, "writev", short_writev)
    monkeypatch.setattr(os, "write", short_write)
    pieces = [bytes([65 + n % 26]) * (50_000 + n) for n in range(30)]  # ~1.5 MB in 30 writes
    writer = dest.open(info("big"))
    for piece in pieces:
        writer.write(piece)
    staged = writer.finish()
    [outcome] = await dest.commit([staged])
    assert outcome.error is None
    [name] = names(maildir / "new")
    assert (maildir / "new" / name).read_bytes() == b"".join(pieces)


# -- commit -------------------------------------------------------------------------


def _fd_name(fd: int) -> str:
    """The base name of the file open as ``fd``."""
    return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))


def _is_dir(fd: int) -> bool:
    return stat.S_ISDIR(os.fstat(fd).st_mode)


async def test_commit_fsyncs_the_directory_once_per_window(
    dest: MaildirDestination, maildir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A window of five messages costs five file fsyncs and exactly one fsync of new/."""
    calls: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        calls.append("dir" if _is_dir(fd) else "file")
        real_fsync(fd)

    staged = [stage(dest, info(f"u{n}"), [b"m\n"]) for n in range(5)]
    monkeypatch.setattr(os, "fsync", recording_fsync)
    results = await dest.commit(staged)
    assert [result.ok for result in results] == [True] * 5
    assert calls.count("file") == 5
    assert calls.count("dir") == 1
    assert len(names(maildir / "new")) == 5


async def test_commit_order_is_file_fsync_then_link_then_directory_fsync(
    dest: MaildirDestination, maildir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each file is fsync'd before it is linked, and new/ is fsync'd after every link."""
    events: list[tuple[str, str]] = []
    real_fsync, real_link = os.fsync, os.link
    staged = [stage(dest, info(f"u{n}"), [b"m\n"]) for n in range(3)]

    def recording_fsync(fd: int) -> None:
        events.append(("fsync-dir", "new") if _is_dir(fd) else ("fsync", _fd_name(fd)))
        real_fsync(fd)

    def recording_link(src: str, dst: str) -> None:
        assert os.path.basename(src) == os.path.basename(dst)
        assert os.path.basename(os.path.dirname(dst)) == "new"
        events.append(("link", os.path.basename(dst)))
        real_link(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "link", recording_link)
    await dest.commit(staged)
    for item in staged:
        assert events.index(("fsync", item.filename)) < events.index(("link", item.filename))
    assert events[-1] == ("fsync-dir", "new")
    assert len(events) == 7


async def test_a_failing_file_fsync_fails_only_that_message(
    dest: MaildirDestination, maildir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EIO from one file's fsync fails that message alone and removes its file."""
    staged = [stage(dest, info(f"u{n}"), [f"m{n}\n".encode()]) for n in range(3)]
    bad_name = staged[1].filename
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        if not _is_dir(fd) and _fd_name(fd) == bad_name:
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    results = await dest.commit(staged)
    assert [result.ok for result in results] == [True, False, True]
    assert [result.staged for result in results] == staged
    assert isinstance(results[1].error, TemporaryDeliveryError)
    assert "Input/output error" in str(results[1].error)
    assert names(maildir / "tmp") == []
    assert names(maildir / "new") == sorted([staged[0].filename, staged[2].filename])


async def test_failing_fsyncs_in_a_window_wider_than_the_threads_fail_their_own_messages(
    dest: MaildirDestination, maildir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each worker takes several files of a window: errors still reach the right messages."""
    count = 2 * FSYNC_THREADS + 7
    staged = [stage(dest, info(f"u{n}"), [f"m{n}\n".encode()]) for n in range(count)]
    bad = {1, FSYNC_THREADS + 1, count - 1}
    bad_names = {staged[n].filename for n in bad}
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        if not _is_dir(fd) and _fd_name(fd) in bad_names:
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    results = await dest.commit(staged)
    assert [result.staged for result in results] == staged
    assert [n for n, result in enumerate(results) if not result.ok] == sorted(bad)
    assert names(maildir / "new") == sorted(
        item.filename for n, item in enumerate(staged) if n not in bad
    )
    assert names(maildir / "tmp") == []


async def test_a_failing_directory_fsync_fails_the_window_but_keeps_the_files(
    dest: MaildirDestination, maildir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When fsync of new/ fails every message fails, and recovery still finds the linked files."""
    messages = [info(f"u{n}") for n in range(3)]
    staged = [stage(dest, message, [b"m\n"]) for message in messages]
    real_fsync = os.fsync

    def failing_dir_fsync(fd: int) -> None:
        if _is_dir(fd):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_dir_fsync)
    results = await dest.commit(staged)
    assert not any(result.ok for result in results)
    assert all(isinstance(result.error, TemporaryDeliveryError) for result in results)
    monkeypatch.undo()
    found = await dest.find_delivered(ALICE, [message.key for message in messages])
    assert found == {message.key for message in messages}


@pytest.mark.parametrize("code", [errno.EPERM, errno.EXDEV, errno.EOPNOTSUPP])
async def test_rename_is_used_where_hard_links_are_not_supported(
    dest: MaildirDestination, maildir: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """When link() is refused as unsupported the message is renamed into new/ instead."""

    def no_links(src: str, dst: str) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "link", no_links)
    result = await deliver(dest, info("u"), [b"renamed\n"])
    assert result.ok
    assert names(maildir / "tmp") == []
    (name,) = names(maildir / "new")
    assert (maildir / "new" / name).read_bytes() == b"renamed\n"


async def test_other_link_errors_fail_the_message_and_clean_up(
    dest: MaildirDestination, maildir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A link() failure that is not "unsupported" fails the message and leaves no files."""

    def broken_link(src: str, dst: str) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "link", broken_link)
    result = await deliver(dest, info("u"), [b"m\n"])
    assert not result.ok
    assert isinstance(result.error, TemporaryDeliveryError)
    assert names(maildir / "tmp") == []
    assert names(maildir / "new") == []


async def test_commit_runs_in_one_worker_thread_call(
    dest: MaildirDestination, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A window is committed with a single asyncio.to_thread call."""
    calls = 0
    real_to_thread = asyncio.to_thread

    async def counting_to_thread(func, /, *args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        return await real_to_thread(func, *args, **kwargs)

    staged = [stage(dest, info(f"u{n}"), [b"m\n"]) for n in range(4)]
    monkeypatch.setattr(asyncio, "to_thread", counting_to_thread)
    results = await dest.commit(staged)
    assert len(results) == 4
    assert calls == 1


async def test_committing_twice_or_an_empty_window(dest: MaildirDestination) -> None:
    """An empty window commits nothing, and a committed message cannot be committed again."""
    assert await dest.commit([]) == []
    staged = stage(dest, info("u"), [b"m\n"])
    assert (await dest.commit([staged]))[0].ok
    with pytest.raises(ValueError, match="already committed"):
        await dest.commit([staged])


async def test_maildir_destination_describes_itself(maildir: Path) -> None:
    """The destination is exactly-once and names its path for logs."""
    destination = MaildirDestination(maildir, hostname=HOST)
    assert destination.exactly_once
    assert destination.name == f"maildir:{maildir}"
    await destination.close()


# -- the in-memory destination --------------------------------------------------------


async def test_memory_destination_delivers_and_fails_on_request() -> None:
    """MemoryDestination keeps committed content and fails the keys it was told to fail."""
    memory = MemoryDestination()
    good, temporary, permanent = info("g"), info("t"), info("p")
    memory.fail(temporary.key)
    memory.fail(permanent.key, permanent=True)
    await memory.prepare(ALICE)
    staged = []
    for message in (good, temporary, permanent):
        writer = memory.open(message)
        writer.write(b"a")
        writer.write(b"b")
        staged.append(writer.finish())
    results = await memory.commit(staged)
    assert results[0].ok
    assert isinstance(results[1].error, TemporaryDeliveryError)
    assert isinstance(results[2].error, PermanentDeliveryError)
    assert memory.messages == {good.key: b"ab"}
    assert await memory.find_delivered(ALICE, [good.key, temporary.key]) == {good.key}
    memory.heal(temporary.key)
    assert (await memory.commit([staged[1]]))[0].ok
    assert memory.prepared == [ALICE]
    assert memory.commits == 2
    await memory.close()
    assert memory.closed


async def test_memory_writer_abort_discards() -> None:
    """An aborted MemoryDestination writer cannot be finished."""
    memory = MemoryDestination()
    writer = memory.open(info("u"))
    writer.write(b"x")
    writer.abort()
    with pytest.raises(RuntimeError):
        writer.finish()
    assert memory.messages == {}
