"""mbox delivery (mboxrd), exactly once.

Theory of operation.  A message becomes one record at the end of the mbox:
a ``From <sender> <asctime UTC>`` line, the message with one more ``>`` on
every line matching ``^>*From `` (mboxrd: reversible, unlike the mboxo
quoting of Python's ``mailbox.mbox``) and an empty line.  The writer builds
the record in an unnamed spool file while RETR streams, hashing it on the
way, so a commit only copies bytes.

A commit takes an fcntl lock on the mbox and then the dotlock
``<mbox>.lock`` (see ``gpopd.delivery.mboxlock``).  Then, for the whole
window (the journal's format is in ``gpopd.delivery.mboxjournal``):

1. append a sealed block to the journal ``.<name>.gpopd-journal`` next to
   the mbox, one entry per record (key, offset, length, SHA-256); fsync;
2. append the records to the mbox; fsync;
3. append ``C <n>`` to the block (its first n records are durable); fsync.

A block without its ``C`` line is an append cut short.  Whoever takes the
locks next settles it before anything else: records wholly present with
the right digest count as delivered and the file is cut back after them
(unless someone appended past the window meanwhile), so the file never
keeps half a message or gets a second copy.

Keys stay in the journal after their commit: the destination cannot see
when the store has recorded them.  It keeps each account's last
``JOURNAL_HISTORY`` keys, and ``find_delivered()`` looks only there; the
mbox is never scanned, and a MUA may expunge or rewrite it freely.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import socket
import string
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from email.utils import parseaddr
from pathlib import Path
from typing import TYPE_CHECKING

from gpopd.delivery.base import CommitResult, Destination, MessageInfo, Staged, Writer
from gpopd.delivery.mboxjournal import (
    JournalBlock,
    JournalEntry,
    compact,
    delivered,
    format_block,
    parse_journal,
    read_journal,
    settle,
)
from gpopd.delivery.mboxjournal import fsync as _fsync
from gpopd.delivery.mboxjournal import open_or_create_durably as _open_or_create
from gpopd.delivery.mboxlock import LOCK_TIMEOUT, STALE_LOCK_AGE, MboxLocker, process_guard
from gpopd.delivery.mboxlock import describe as _describe
from gpopd.delivery.spool import SpooledMessage, SpoolWriter
from gpopd.durable import pwrite_all as _pwrite_all
from gpopd.durable import write_all as _write_all
from gpopd.errors import DeliveryError, TemporaryDeliveryError
from gpopd.failpoints import failpoint

if TYPE_CHECKING:
    from gpopd.config import MboxDelivery

__all__ = [
    "JOURNAL_HISTORY",
    "LOCK_TIMEOUT",
    "STALE_LOCK_AGE",
    "FromQuoter",
    "JournalBlock",
    "JournalEntry",
    "MboxDestination",
    "MboxStaged",
    "envelope_sender",
    "from_line",
    "parse_journal",
]

# Per account: far more than the windows a poll can commit before the
# store records them (one, plus one more if recording fails).
JOURNAL_HISTORY = 1000
JOURNAL_COMPACT_SIZE = 4 << 20
HEADER_LIMIT = 64 << 10
MAX_SENDER_LENGTH = 256
MAILER_DAEMON = "MAILER-DAEMON"

_SAFE_SENDER = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-./=?^_`{|}~@")
_FROM_LINE = re.compile(rb"^(>*From )", re.MULTILINE)
_FROM_PREFIX = re.compile(rb">*(?:F(?:r(?:o(?:m)?)?)?)?")
_NULL_PATH = re.compile(r"\s*<\s*>\s*")
_KEY = re.compile(r"[0-9a-f]{32}")

_OPEN_FLAGS = os.O_RDWR | os.O_CLOEXEC


def _close(fd: int) -> None:
    # Everything that matters was fsync'd before; a failing close changes nothing.
    with contextlib.suppress(OSError):
        os.close(fd)


class FromQuoter:
    """mboxrd quoting of a stream: one more ``>`` on every ``^>*From `` line.

    A chunk may end anywhere; the start of a line that could still become
    ``>*From `` is held back until the next chunk decides it.
    """

    def __init__(self) -> None:
        self._held = b""
        self._line_start = True

    def feed(self, data: bytes) -> bytes:
        data = self._held + bytes(data)
        self._held = b""
        head = b""
        if not self._line_start:
            cut = data.find(b"\n") + 1
            if cut == 0:
                return data
            head, data = data[:cut], data[cut:]
        tail = data[data.rfind(b"\n") + 1 :]
        if tail and _FROM_PREFIX.fullmatch(tail):
            self._held = tail
            data = data[: len(data) - len(tail)]
            self._line_start = True
        else:
            self._line_start = not tail
        return head + _FROM_LINE.sub(rb">\1", data)

    def flush(self) -> bytes:
        """The held-back start of an unfinished last line (never a ``From `` line)."""
        held, self._held = self._held, b""
        return held


def _first_fields(header: bytes, names: Collection[str]) -> dict[str, str]:
    fields: dict[str, str] = {}
    current: str | None = None
    for line in header.decode("utf-8", "replace").split("\n"):
        if not line:
            break
        if line[0] in " \t":
            if current is not None:
                fields[current] += " " + line.strip()
            continue
        name, colon, value = line.partition(":")
        current = name.strip().lower()
        if not colon or current not in names or current in fields:
            current = None
        else:
            fields[current] = value.strip()
    return fields


def envelope_sender(header: bytes) -> str:
    """The sender for the ``From `` line: Return-Path, else From, as a safe token."""
    fields = _first_fields(header, ("return-path", "from"))
    for name in ("return-path", "from"):
        value = fields.get(name)
        if value is None:
            continue
        if name == "return-path" and _NULL_PATH.fullmatch(value):
            return MAILER_DAEMON  # the null sender of bounces
        address = parseaddr(value)[1]
        # Unsafe characters (space, controls, non-ASCII) would let a header
        # break the separator line; they become "_".
        token = "".join(c if c in _SAFE_SENDER else "_" for c in address)[:MAX_SENDER_LENGTH]
        if token.strip("_"):
            return token
    return MAILER_DAEMON


def from_line(sender: str, when: float) -> bytes:
    """The ``From `` separator line (RFC 4155) for ``sender`` at ``when`` (UTC)."""
    return f"From {sender} {time.asctime(time.gmtime(when))}\n".encode("ascii")


@dataclass(eq=False)
class MboxStaged(Staged):
    """A record (separator, quoted message, empty line) complete in a spool file."""

    spool: SpooledMessage | None = field(default=None, repr=False)
    length: int = 0
    digest: str = ""


class _MboxWriter(Writer):
    def __init__(self, info: MessageInfo, spool: SpoolWriter) -> None:
        self._info = info
        self._spool = spool
        self._head: bytearray | None = bytearray()
        self._quoter = FromQuoter()
        self._sha = hashlib.sha256()
        self._length = 0
        self._size = 0
        self._ends_in_newline = True
        self._staged: MboxStaged | None = None
        self._done = False

    def write(self, data: bytes) -> None:
        if self._done:
            raise RuntimeError(f"message {self._info.key} is already finished or aborted")
        if not data:
            return
        self._size += len(data)
        self._ends_in_newline = data.endswith(b"\n")
        if self._head is not None:
            # The separator needs the sender, so the header comes first.
            self._head += data
            if len(self._head) < HEADER_LIMIT and not (
                self._head.startswith(b"\n") or b"\n\n" in self._head
            ):
                return
            data = self._start()
        self._emit(self._quoter.feed(data))

    def finish(self) -> MboxStaged:
        if self._done:
            raise RuntimeError(f"message {self._info.key} is already finished or aborted")
        if self._head is not None:
            self._emit(self._quoter.feed(self._start()))
        self._emit(self._quoter.flush())
        if not self._ends_in_newline:
            self._emit(b"\n")
        self._emit(b"\n")
        try:
            spooled = self._spool.finish()
        finally:
            self._done = True
        self._staged = MboxStaged(
            self._info, self._size, spooled, self._length, self._sha.hexdigest()
        )
        return self._staged

    def abort(self) -> None:
        # After finish() the staged message owns the spool until commit()
        # claims it; aborting then still discards an uncommitted message.
        self._done = True
        self._spool.abort()
        if self._staged is not None and self._staged.spool is not None:
            self._staged.spool.release()
            self._staged.spool = None

    def _start(self) -> bytes:
        head = bytes(self._head or b"")
        self._head = None
        self._emit(from_line(envelope_sender(head), time.time()))
        return head

    def _emit(self, data: bytes) -> None:
        if not data:
            return
        try:
            self._spool.write(data)
        except DeliveryError:
            self.abort()
            raise
        self._sha.update(data)
        self._length += len(data)


@dataclass
class _Locked:
    fd: int
    journal_fd: int
    journal_end: int


class MboxDestination(Destination):
    """Append to the mbox at ``path`` (mboxrd; created 0600 if missing)."""

    exactly_once = True

    def __init__(
        self,
        path: Path,
        *,
        lock_timeout: float = LOCK_TIMEOUT,
        stale_lock_age: float = STALE_LOCK_AGE,
        hostname: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.name = f"mbox:{self.path}"
        self.lock_timeout = lock_timeout
        self.stale_lock_age = stale_lock_age
        self._host = hostname if hostname is not None else socket.gethostname()

    @classmethod
    def from_config(cls, cfg: MboxDelivery) -> MboxDestination:
        return cls(Path(cfg.path))

    async def prepare(self, account: str) -> None:
        await asyncio.to_thread(self._prepare)

    def open(self, info: MessageInfo) -> Writer:
        if not _KEY.fullmatch(info.key):
            # The journal could not record it, and a record it cannot
            # parse would read as torn.
            raise ValueError(f"message key must be 32 lowercase hex digits, not {info.key!r}")
        return _MboxWriter(info, SpoolWriter(info, self.path.parent))

    async def commit(self, staged: Sequence[Staged]) -> list[CommitResult]:
        items: list[MboxStaged] = []
        for item in staged:
            if not isinstance(item, MboxStaged):
                raise TypeError(f"{self.name} cannot commit {type(item).__name__}")
            if item.spool is None:
                raise ValueError(f"message {item.info.key} was already committed or aborted")
            items.append(item)
        # Taking the spools makes a later Writer.abort() leave them alone.
        claimed = [(item, item.spool) for item in items if item.spool is not None]
        for item in items:
            item.spool = None
        if not claimed:
            return []
        return await asyncio.to_thread(self._commit, claimed)

    async def find_delivered(self, account: str, keys: Collection[str]) -> set[str]:
        wanted = set(keys)
        if not wanted:
            return set()
        return await asyncio.to_thread(self._find, wanted)

    async def close(self) -> None:
        return None

    # -- in worker threads -------------------------------------------------

    def _prepare(self) -> None:
        try:
            missing: list[Path] = []
            directory = self.path.parent
            while not directory.exists():
                missing.append(directory)
                directory = directory.parent
            for directory in reversed(missing):
                with contextlib.suppress(FileExistsError):
                    os.mkdir(directory, 0o700)
                    os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask
        except OSError as exc:
            raise TemporaryDeliveryError(
                f"{self.name}: cannot create {directory}: {_describe(exc)}"
            ) from exc
        with self._locked():
            pass  # creating the files and settling a cut append is all

    def _find(self, wanted: set[str]) -> set[str]:
        with self._locked() as locked:
            try:
                blocks, _ = read_journal(
                    locked.journal_fd, locked.journal_end, self.name, self._journal
                )
            except OSError as exc:
                raise TemporaryDeliveryError(
                    f"{self.name}: cannot read {self._journal}: {_describe(exc)}"
                ) from exc
        return wanted & {entry.key for entry in delivered(blocks)}

    def _commit(self, claimed: list[tuple[MboxStaged, SpooledMessage]]) -> list[CommitResult]:
        try:
            with self._locked() as locked:
                errors = self._append(locked, claimed)
        except TemporaryDeliveryError as exc:
            errors = [TemporaryDeliveryError(str(exc)) for _ in claimed]
        except OSError as exc:
            errors = self._failed(len(claimed), f"cannot append to {self._real}", exc)
        finally:
            for _, spool in claimed:
                spool.release()
        return [CommitResult(item, error) for (item, _), error in zip(claimed, errors, strict=True)]

    def _append(
        self, locked: _Locked, claimed: list[tuple[MboxStaged, SpooledMessage]]
    ) -> list[DeliveryError | None]:
        fd, jfd, jend = locked.fd, locked.journal_fd, locked.journal_end
        stat = os.fstat(fd)
        start = stat.st_size
        # A file left without a final newline by another program would
        # glue our separator to its last line.
        pad = b"\n" if start and os.pread(fd, 1, start - 1) != b"\n" else b""
        offset = start + len(pad)
        entries: list[JournalEntry] = []
        for item, _ in claimed:
            entries.append(JournalEntry(item.info.key, offset, item.length, item.digest))
            offset += item.length
        block = format_block(stat.st_ino, entries)
        try:
            _pwrite_all(jfd, block, jend)
            _fsync(jfd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(jfd, jend)
            return self._failed(len(claimed), f"cannot write {self._journal}", exc)
        failpoint("after-journal-seal")
        jend += len(block)
        written = 0
        failure: tuple[str, OSError] | None = None
        try:
            if pad:
                _write_all(fd, pad)
            for _, spool in claimed:
                for chunk in spool.chunks():
                    _write_all(fd, chunk)
                written += 1
        except OSError as exc:
            failure = (f"writing {self._real} failed", exc)
        kept = written
        try:
            if failure is not None:
                os.ftruncate(fd, entries[written].offset)
            _fsync(fd)
        except OSError as exc:
            # After a failed fsync the kernel may have dropped the dirty
            # pages: what the file holds is unknown, so the window goes.
            failure = failure or (f"fsync of {self._real} failed", exc)
            kept = 0
            try:
                os.ftruncate(fd, start)
                _fsync(fd)
            except OSError:
                # The block stays cut short; the next holder of the locks settles it.
                return self._failed(len(claimed), *failure)
        else:
            failpoint("after-append-fsync")
        line = b"C %d\n" % kept
        try:
            _pwrite_all(jfd, line, jend)
            _fsync(jfd)
        except OSError:
            # The records are durable; without the C line the next holder
            # of the locks settles the block from the mbox itself.
            pass
        else:
            failpoint("after-journal-commit")
            if jend + len(line) > JOURNAL_COMPACT_SIZE:
                size = jend + len(line)
                compact(
                    jfd,
                    size,
                    stat.st_ino,
                    name=self.name,
                    path=self._journal,
                    history=JOURNAL_HISTORY,
                )
        results: list[DeliveryError | None] = [None] * kept
        if failure is not None:
            results += self._failed(len(claimed) - kept, *failure)
        return results

    def _failed(self, count: int, what: str, exc: OSError) -> list[DeliveryError | None]:
        return [
            TemporaryDeliveryError(f"{self.name}: {what}: {_describe(exc)}") for _ in range(count)
        ]

    # -- locking -----------------------------------------------------------------

    @property
    def _real(self) -> Path:
        return Path(os.path.realpath(self.path))

    @property
    def _journal(self) -> Path:
        real = self._real
        return real.with_name(f".{real.name}.gpopd-journal")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[_Locked]:
        """Hold the mbox (fcntl lock and dotlock) with any cut append settled."""
        real = self._real
        guard = process_guard(str(real))
        deadline = time.monotonic() + self.lock_timeout
        with contextlib.ExitStack() as stack:
            if not guard.acquire(timeout=self.lock_timeout):
                raise TemporaryDeliveryError(
                    f"{self.name}: another poll of this process held {real} "
                    f"for more than {self.lock_timeout:g} s"
                )
            stack.callback(guard.release)
            try:
                fd = _open_or_create(real, _OPEN_FLAGS | os.O_APPEND)
            except OSError as exc:
                raise TemporaryDeliveryError(
                    f"{self.name}: cannot open {real}: {_describe(exc)}"
                ) from exc
            stack.callback(_close, fd)  # also releases the fcntl lock
            locker = MboxLocker(self.name, self.lock_timeout, self.stale_lock_age, self._host)
            stack.callback(locker.unlock, real, locker.lock(fd, real, deadline))
            journal = self._journal
            try:
                jfd = _open_or_create(journal, _OPEN_FLAGS)
                stack.callback(_close, jfd)
                end = settle(fd, jfd, self.name, journal)
            except OSError as exc:
                raise TemporaryDeliveryError(
                    f"{self.name}: cannot recover with {journal}: {_describe(exc)}"
                ) from exc
            yield _Locked(fd, jfd, end)
