"""Maildir delivery, exactly once.

Theory of operation (cr.yp.to/proto/maildir.html): a message is written
to ``tmp/NAME`` (created with ``O_EXCL``), fsync'd, hard-linked to
``new/NAME`` and unlinked from ``tmp/``; a reader never sees a partial
message.  Commit works on a window of messages and fsyncs the ``new/``
directory once for the whole window, which is what makes the links
durable.

``NAME`` is ``SEC.M<usec>P<pid>Q<n>X<key>.<host>``: the ``X<key>`` part
carries the message key (account + UID), so after a crash between the
link and the store's commit, ``find_delivered()`` recognises the earlier
delivery and the message is not stored a second time.  MUAs move files
to ``cur/`` and append ``:2,<flags>`` but keep the base name.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import re
import socket
import time
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from gpopd.delivery.base import (
    CommitResult,
    Destination,
    MessageInfo,
    Staged,
    Writer,
    account_tag,
)
from gpopd.durable import fsync_dir, write_all
from gpopd.errors import DeliveryError, TemporaryDeliveryError
from gpopd.failpoints import failpoint
from gpopd.privatefs import make_private_dir, open_private

__all__ = ["BUFFER_SIZE", "MaildirDestination", "MaildirStaged", "parse_key"]

# Large enough that a message costs a few write(2) calls, small enough that
# a window of messages being streamed does not grow the process.
BUFFER_SIZE = 512 * 1024

_NAME_RE = re.compile(r"\d+\.M\d+P\d+Q\d+X([0-9a-f]{32})\.")
_KEY_RE = re.compile(r"[0-9a-f]{32}")
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
# Filesystems without hard links (FAT, some FUSE and network mounts) say so
# with one of these; rename() is then the only way into new/.
_NO_LINK_ERRNOS = frozenset({errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP})
_NAME_ATTEMPTS = 3

_counter = itertools.count(1)

# Shared by every Maildir of the process; threads start only when used.
FSYNC_THREADS = 16
_fsync_pool = ThreadPoolExecutor(FSYNC_THREADS, thread_name_prefix="gpopd-fsync")


def _make_durable(job: tuple[str, int, bytes | None]) -> OSError | None:
    """Write (if still in memory), fsync and close one tmp/ file; return, not raise, errors."""
    path, fd, data = job
    try:
        if fd < 0:
            fd = _create(path)
            if data:
                try:
                    write_all(fd, data)
                except OSError:
                    os.close(fd)
                    raise
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        return exc
    return None


def _make_all_durable(jobs: list[tuple[str, int, bytes | None]]) -> list[OSError | None]:
    return [_make_durable(job) for job in jobs]


def parse_key(name: str) -> str | None:
    """Return the message key carried by a Maildir file name, if it is one of ours."""
    match = _NAME_RE.match(name)
    return match.group(1) if match else None


def _maildir_host(host: str) -> str:
    # The spec reserves "/" and ":" (":" starts the info part in cur/).
    return host.replace("/", "\\057").replace(":", "\\072")


def _describe(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _unlink_quietly(path: str) -> None:
    # What cannot be removed now is left for the next prepare(), which
    # removes our orphans in tmp/.
    with contextlib.suppress(OSError):
        os.unlink(path)


@dataclass(eq=False)
class MaildirStaged(Staged):
    """A complete message: still in memory (``data``) or in ``tmp/``, open as ``fd``."""

    filename: str = ""
    fd: int = field(default=-1, repr=False)
    data: bytes | None = field(default=None, repr=False)

    @property
    def claimable(self) -> bool:
        return self.fd >= 0 or self.data is not None


def _create(path: str) -> int:
    """Create ``path`` for writing, 0600 whatever the umask; O_EXCL."""
    return open_private(path, _CREATE_FLAGS)


# Chunks handed to one writev(2); Linux accepts up to 1,024 (IOV_MAX).
_MAX_IOV = 256


def _writev_all(fd: int, chunks: list[bytes]) -> None:
    """Write ``chunks`` in order with as few system calls and copies as possible."""
    start = 0
    while start < len(chunks):
        written = os.writev(fd, chunks[start : start + _MAX_IOV])
        while written >= len(chunks[start]):
            written -= len(chunks[start])
            start += 1
            if start == len(chunks):
                return
        if written:
            # A short write (a full disk, a signal) ended inside this chunk:
            # its rest goes the slow way, the next ones in the next writev.
            write_all(fd, memoryview(chunks[start])[written:])
            start += 1


class _MaildirWriter(Writer):
    """Buffers a message; creates its ``tmp/`` file only once it outgrows the buffer.

    Most mail is far smaller than the buffer, so most files are created,
    written and fsync'd by the commit's worker threads, not by the event
    loop: creating a file must wait while the filesystem journal commits
    another thread's fsync, which would stall the transfer.  The buffer is a
    list of the pieces received, written with one writev(2): copying them
    into one growing buffer first cost 7% of the event loop's time on large
    mail.
    """

    def __init__(self, info: MessageInfo, tmp_path: str, filename: str) -> None:
        self._info = info
        self._fd = -1
        self._tmp_path = tmp_path
        self._filename = filename
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._size = 0
        self._staged: MaildirStaged | None = None
        self._done = False

    def write(self, data: bytes) -> None:
        if self._done:
            raise RuntimeError(f"message {self._filename} is already finished or aborted")
        if not data:
            return
        try:
            self._chunks.append(bytes(data))
            self._buffered += len(data)
            if self._buffered >= BUFFER_SIZE:
                self._flush()
        except OSError as exc:
            # Free the space at once: a full disk is the usual cause.
            self.abort()
            raise TemporaryDeliveryError(
                f"writing {self._tmp_path} failed: {_describe(exc)}"
            ) from exc
        self._size += len(data)

    def finish(self) -> MaildirStaged:
        if self._done:
            raise RuntimeError(f"message {self._filename} is already finished or aborted")
        data: bytes | None = None
        try:
            if self._fd >= 0:
                self._flush()
            else:
                data = b"".join(self._chunks)
        except OSError as exc:
            self.abort()
            raise TemporaryDeliveryError(
                f"writing {self._tmp_path} failed: {_describe(exc)}"
            ) from exc
        self._done = True
        self._chunks = []  # do not hold the pieces per staged message
        self._buffered = 0
        self._staged = MaildirStaged(self._info, self._size, self._filename, self._fd, data)
        self._fd = -1
        return self._staged

    def abort(self) -> None:
        # After finish() the staged message owns the file until commit()
        # claims it; aborting then still discards an uncommitted message.
        self._done = True
        self._chunks = []
        self._buffered = 0
        fd, self._fd = self._fd, -1
        if self._staged is not None:
            fd, self._staged.fd = self._staged.fd, -1
            self._staged.data = None
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
            _unlink_quietly(self._tmp_path)

    def _flush(self) -> None:
        if self._fd < 0:
            self._fd = _create(self._tmp_path)
        if self._chunks:
            _writev_all(self._fd, self._chunks)
            self._chunks = []
            self._buffered = 0


class MaildirDestination(Destination):
    """Deliver into the Maildir at ``path`` (created if missing)."""

    exactly_once = True

    def __init__(self, path: Path, *, hostname: str | None = None) -> None:
        self.path = Path(path)
        self.name = f"maildir:{self.path}"
        self._tmp = self.path / "tmp"
        self._new = self.path / "new"
        self._cur = self.path / "cur"
        self._host = _maildir_host(hostname if hostname is not None else socket.gethostname())

    async def prepare(self, account: str) -> None:
        await asyncio.to_thread(self._prepare, account_tag(account))

    def open(self, info: MessageInfo) -> Writer:
        if not _KEY_RE.fullmatch(info.key):
            raise ValueError(f"message key must be 32 lowercase hex digits, not {info.key!r}")
        filename = self._filename(info.key)
        return _MaildirWriter(info, os.path.join(self._tmp, filename), filename)

    async def commit(self, staged: Sequence[Staged]) -> list[CommitResult]:
        items: list[MaildirStaged] = []
        for item in staged:
            if not isinstance(item, MaildirStaged):
                raise TypeError(f"{self.name} cannot commit {type(item).__name__}")
            if not item.claimable:
                raise ValueError(f"{item.filename} was already committed or aborted")
            items.append(item)
        # Taking the fds and data makes a later Writer.abort() leave them alone.
        claimed = [(item, (item.fd, item.data)) for item in items]
        for item in items:
            item.fd = -1
            item.data = None
        if not claimed:
            return []
        # Should the poll be cancelled meanwhile, the thread still finishes:
        # whatever it linked is found again through the pending rows.
        return await asyncio.to_thread(self._commit, claimed)

    async def find_delivered(self, account: str, keys: Collection[str]) -> set[str]:
        wanted = set(keys)
        if not wanted:
            return set()
        found = await asyncio.to_thread(self._scan_keys, account_tag(account))
        return wanted & found

    async def close(self) -> None:
        return None

    def _filename(self, key: str) -> str:
        sec, nsec = divmod(time.time_ns(), 1_000_000_000)
        return f"{sec}.M{nsec // 1000}P{os.getpid()}Q{next(_counter)}X{key}.{self._host}"

    def _prepare(self, tag: str) -> None:
        try:
            missing: list[Path] = []
            directory = self.path
            while not directory.exists():
                missing.append(directory)
                directory = directory.parent
            for directory in reversed(missing):
                make_private_dir(directory)
            for directory in (self.path, self._tmp, self._new, self._cur):
                make_private_dir(directory)
            # The caller holds the account lock, so no writer of ours is
            # using these files: they are what a crash left behind.
            with os.scandir(self._tmp) as entries:
                for entry in entries:
                    key = parse_key(entry.name)
                    if (
                        key is not None
                        and key.startswith(tag)
                        and entry.is_file(follow_symlinks=False)
                    ):
                        _unlink_quietly(entry.path)
        except OSError as exc:
            raise TemporaryDeliveryError(
                f"{self.name}: cannot prepare the Maildir: {_describe(exc)}"
            ) from exc

    def _commit(
        self, claimed: list[tuple[MaildirStaged, tuple[int, bytes | None]]]
    ) -> list[CommitResult]:
        errors: list[DeliveryError | None] = []
        linked = False
        # Flushing the files of a window concurrently lets the disk and the
        # filesystem journal merge the flushes: measured on ext4 here, 4.7 ms
        # for one fsync after another, 0.5 ms a file with 16 at a time.
        jobs = [(os.path.join(self._tmp, item.filename), fd, data) for item, (fd, data) in claimed]
        if len(jobs) > 1:
            # One task per thread, each with every lanes-th file, not one task
            # per file: every task is a queue hand-off and a future, more
            # threads woken to fight over the GIL (4,000 small messages:
            # 0.2-0.3 s of wall time and 0.3-0.4 s of CPU less).
            lanes = min(FSYNC_THREADS, len(jobs))
            parts = _fsync_pool.map(_make_all_durable, [jobs[n::lanes] for n in range(lanes)])
            synced: list[OSError | None] = [None] * len(jobs)
            for n, lane_errors in enumerate(parts):
                synced[n::lanes] = lane_errors
        else:
            synced = [_make_durable(job) for job in jobs]
        for (item, _), fsync_error in zip(claimed, synced, strict=True):
            tmp_path = os.path.join(self._tmp, item.filename)
            try:
                if fsync_error is not None:
                    raise fsync_error
            except OSError as exc:
                # After a failed fsync the kernel may have dropped the dirty
                # pages: the file's content is unknown, so it must go.
                _unlink_quietly(tmp_path)
                errors.append(
                    TemporaryDeliveryError(
                        f"{self.name}: fsync of {tmp_path} failed: {_describe(exc)}"
                    )
                )
                continue
            failpoint("after-spool-fsync")
            try:
                self._link_into_new(tmp_path, os.path.join(self._new, item.filename))
            except OSError as exc:
                _unlink_quietly(tmp_path)
                errors.append(
                    TemporaryDeliveryError(
                        f"{self.name}: cannot move {item.filename} into new/: {_describe(exc)}"
                    )
                )
                continue
            failpoint("after-link")
            errors.append(None)
            linked = True
        if linked:
            try:
                fsync_dir(self._new)
            except OSError as exc:
                # The links may or may not be on disk.  They stay: the store
                # keeps these messages pending, so the next poll's recovery
                # counts those that survived as delivered and fetches the
                # others again.  Removing them could not be made durable
                # either, since fsync of new/ is what just failed.
                failure = TemporaryDeliveryError(
                    f"{self.name}: fsync of {self._new} failed: {_describe(exc)}"
                )
                errors = [failure if error is None else error for error in errors]
            else:
                failpoint("after-dir-fsync")
        return [CommitResult(item, error) for (item, _), error in zip(claimed, errors, strict=True)]

    @staticmethod
    def _link_into_new(tmp_path: str, new_path: str) -> None:
        try:
            os.link(tmp_path, new_path)
        except OSError as exc:
            if exc.errno not in _NO_LINK_ERRNOS:
                raise
            os.rename(tmp_path, new_path)
            return
        # The message is in new/ already; a leftover in tmp/ is removed by
        # the next prepare() and must not fail the delivery.
        _unlink_quietly(tmp_path)

    def _scan_keys(self, tag: str) -> set[str]:
        found: set[str] = set()
        # new/ before cur/: a message an MUA moves from new/ to cur/ during
        # the scan is then seen in one of the two, never missed.
        for directory in (self._new, self._cur):
            try:
                with os.scandir(directory) as entries:
                    for entry in entries:
                        key = parse_key(entry.name)
                        if key is not None and key.startswith(tag):
                            found.add(key)
            except OSError as exc:
                # A missing directory must not read as "nothing delivered":
                # that would fetch again what an unmounted disk still holds.
                raise TemporaryDeliveryError(
                    f"{self.name}: cannot list {directory}: {_describe(exc)}"
                ) from exc
        return found
