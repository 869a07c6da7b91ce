"""mbox delivery (mboxrd), exactly once.

Theory of operation.  A message becomes one record at the end of the mbox:
a ``From <sender> <asctime UTC>`` line, the message with one more ``>`` on
every line matching ``^>*From `` (mboxrd: reversible, unlike the mboxo
quoting of Python's ``mailbox.mbox``) and an empty line.  The writer builds
the record in an unnamed spool file while RETR streams, hashing it on the
way, so a commit only copies bytes.

A commit takes an fcntl lock on the mbox and then the dotlock
``<mbox>.lock`` (that order, as Debian policy asks; neither is held while
waiting for the other).  The dotlock holds ``<pid>:<host>`` (Dovecot's
format): one left by a dead process of this host is broken at once, any
other once older than ``STALE_LOCK_AGE``.  Then, for the whole window:

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
import errno
import fcntl
import hashlib
import os
import re
import socket
import string
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from email.utils import parseaddr
from pathlib import Path
from typing import TYPE_CHECKING

from gpopd.delivery.base import CommitResult, Destination, MessageInfo, Staged, Writer
from gpopd.delivery.spool import CHUNK_SIZE, SpooledMessage, SpoolWriter
from gpopd.errors import DeliveryError, TemporaryDeliveryError

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

# Long enough for a MUA to rewrite a large mbox, short enough that a poll
# gives up while the messages are still safe on the server.
LOCK_TIMEOUT = 30.0
# A dotlock this old is stale whoever wrote it (procmail waits 1024 s);
# one left by a dead process of this host is broken at once.
STALE_LOCK_AGE = 600.0
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
_LOCK_OWNER = re.compile(rb"\s*(\d+)(?::([^\s]*))?\s*")

_JOURNAL_HEADER = b"gpopd-mbox-journal 1\n"
_BLOCK = re.compile(rb"B (\d{1,20}) (\d{1,9})\n")
_ENTRY = re.compile(rb"E ([0-9a-f]{32}) (\d{1,20}) (\d{1,20}) ([0-9a-f]{64})\n")
_SEAL = re.compile(rb"S ([0-9a-f]{64})\n")
_COMMIT = re.compile(rb"C (\d{1,9})\n")
_KEY = re.compile(r"[0-9a-f]{32}")
_CLEAN_TAIL = re.compile(rb"\nC \d{1,9}\n\Z")

_OPEN_FLAGS = os.O_RDWR | os.O_CLOEXEC
_guards: dict[str, threading.Lock] = {}
_guards_lock = threading.Lock()


def _describe(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _process_guard(path: str) -> threading.Lock:
    # fcntl locks belong to the process, so two polls of this process
    # sharing an mbox are kept apart here.
    with _guards_lock:
        return _guards.setdefault(path, threading.Lock())


def _close(fd: int) -> None:
    # Everything that matters was fsync'd before; a failing close changes nothing.
    with contextlib.suppress(OSError):
        os.close(fd)


def _fsync(fd: int) -> None:
    os.fsync(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    with memoryview(data) as view:
        done = 0
        while done < len(view):
            with view[done:] as rest:
                done += os.write(fd, rest)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    with memoryview(data) as view:
        done = 0
        while done < len(view):
            with view[done:] as rest:
                done += os.pwrite(fd, rest, offset + done)


def _digest(fd: int, offset: int, length: int) -> str:
    sha = hashlib.sha256()
    while length > 0:
        chunk = os.pread(fd, min(length, CHUNK_SIZE), offset)
        if not chunk:
            break
        sha.update(chunk)
        offset += len(chunk)
        length -= len(chunk)
    return sha.hexdigest()


def _open_private(path: Path, flags: int) -> int:
    """Open ``path``, creating it 0600 (and making that durable) if missing."""
    while True:
        try:
            return os.open(path, flags)
        except FileNotFoundError:
            pass
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        try:
            # O_CREAT's mode is filtered by the umask; mail is for the owner only.
            if os.fstat(fd).st_mode & 0o777 != 0o600:
                os.fchmod(fd, 0o600)
            _fsync_dir(path.parent)
        except OSError:
            os.close(fd)
            raise
        return fd


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


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One record of a window: where it went in the mbox and what it was."""

    key: str
    offset: int
    length: int
    digest: str


@dataclass
class JournalBlock:
    """The records of one commit window; ``committed`` is None while it is cut short."""

    inode: int
    entries: list[JournalEntry]
    committed: int | None


def _format_block(inode: int, entries: Sequence[JournalEntry]) -> bytes:
    lines = [b"B %d %d\n" % (inode, len(entries))]
    lines += [f"E {e.key} {e.offset} {e.length} {e.digest}\n".encode("ascii") for e in entries]
    body = b"".join(lines)
    return body + b"S " + hashlib.sha256(body).hexdigest().encode("ascii") + b"\n"


def _parse_block(data: bytes, pos: int) -> tuple[JournalBlock | None, int]:
    match = _BLOCK.match(data, pos)
    if match is None:
        return None, pos
    inode, count = int(match[1]), int(match[2])
    end = match.end()
    entries: list[JournalEntry] = []
    for _ in range(count):
        entry = _ENTRY.match(data, end)
        if entry is None:
            return None, pos
        entries.append(
            JournalEntry(entry[1].decode(), int(entry[2]), int(entry[3]), entry[4].decode())
        )
        end = entry.end()
    seal = _SEAL.match(data, end)
    if seal is None or seal[1].decode() != hashlib.sha256(data[pos:end]).hexdigest():
        return None, pos  # torn while being written: the mbox was not touched yet
    commit = _COMMIT.match(data, seal.end())
    if commit is not None and int(commit[1]) <= count:
        return JournalBlock(inode, entries, int(commit[1])), commit.end()
    return JournalBlock(inode, entries, None), seal.end()


def parse_journal(data: bytes) -> tuple[list[JournalBlock], int]:
    """The valid blocks of a journal and where its valid part ends."""
    if not data.startswith(_JOURNAL_HEADER):
        raise ValueError("not a gpopd mbox journal")
    blocks: list[JournalBlock] = []
    pos = len(_JOURNAL_HEADER)
    while True:
        block, end = _parse_block(data, pos)
        if block is None:
            return blocks, pos
        blocks.append(block)
        pos = end
        if block.committed is None:
            return blocks, pos  # only the last block can be cut short


def _delivered(blocks: Sequence[JournalBlock]) -> list[JournalEntry]:
    return [e for b in blocks for e in b.entries[: b.committed or 0]]


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
                blocks, _ = self._read_journal(locked.journal_fd, locked.journal_end)
            except OSError as exc:
                raise TemporaryDeliveryError(
                    f"{self.name}: cannot read {self._journal}: {_describe(exc)}"
                ) from exc
        return wanted & {entry.key for entry in _delivered(blocks)}

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
        block = _format_block(stat.st_ino, entries)
        try:
            _pwrite_all(jfd, block, jend)
            _fsync(jfd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(jfd, jend)
            return self._failed(len(claimed), f"cannot write {self._journal}", exc)
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
        line = b"C %d\n" % kept
        try:
            _pwrite_all(jfd, line, jend)
            _fsync(jfd)
        except OSError:
            # The records are durable; without the C line the next holder
            # of the locks settles the block from the mbox itself.
            pass
        else:
            if jend + len(line) > JOURNAL_COMPACT_SIZE:
                self._compact(jfd, jend + len(line), stat.st_ino)
        results: list[DeliveryError | None] = [None] * kept
        if failure is not None:
            results += self._failed(len(claimed) - kept, *failure)
        return results

    def _failed(self, count: int, what: str, exc: OSError) -> list[DeliveryError | None]:
        return [
            TemporaryDeliveryError(f"{self.name}: {what}: {_describe(exc)}") for _ in range(count)
        ]

    # -- the journal -----------------------------------------------------------

    def _read_journal(self, jfd: int, size: int) -> tuple[list[JournalBlock], int]:
        data = bytearray()
        while len(data) < size and (chunk := os.pread(jfd, size - len(data), len(data))):
            data += chunk
        try:
            return parse_journal(bytes(data))
        except ValueError:
            # Starting afresh would forget which records are already in the mbox.
            raise TemporaryDeliveryError(
                f"{self.name}: {self._journal} is not a gpopd mbox journal; "
                "move it away only after checking the mbox"
            ) from None

    def _settle(self, fd: int, jfd: int) -> int:
        """Settle a cut append, if the journal shows one; return where the journal ends."""
        size = os.fstat(jfd).st_size
        if size == 0:
            _pwrite_all(jfd, _JOURNAL_HEADER, 0)
            _fsync(jfd)
            return len(_JOURNAL_HEADER)
        tail = os.pread(jfd, 64, max(0, size - 64))
        if _CLEAN_TAIL.search(tail) or (size == len(_JOURNAL_HEADER) and tail == _JOURNAL_HEADER):
            return size
        blocks, end = self._read_journal(jfd, size)
        if blocks and blocks[-1].committed is None:
            line = b"C %d\n" % self._present(fd, blocks[-1])
            _pwrite_all(jfd, line, end)
            end += len(line)
        # Whatever follows the valid part was torn before the mbox was touched.
        os.ftruncate(jfd, end)
        _fsync(jfd)
        return end

    def _present(self, fd: int, block: JournalBlock) -> int:
        """How many records of a cut append are whole; cut the file after them."""
        stat = os.fstat(fd)
        if stat.st_ino != block.inode or not block.entries:
            return 0  # the mbox was replaced: the records, if any, are not in this file
        last = block.entries[-1]
        # Bytes past the window were appended by someone else after our
        # dotlock went stale: nothing of theirs may be cut.
        foreign = stat.st_size > last.offset + last.length
        count = 0
        for entry in block.entries:
            end = entry.offset + entry.length
            if stat.st_size >= end and _digest(fd, entry.offset, entry.length) == entry.digest:
                count += 1
                continue
            if not foreign and stat.st_size > entry.offset:
                os.ftruncate(fd, entry.offset)
                _fsync(fd)
            break
        return count

    def _compact(self, jfd: int, size: int, inode: int) -> None:
        try:
            blocks, _ = self._read_journal(jfd, size)
        except TemporaryDeliveryError:
            return
        kept: list[JournalEntry] = []
        per_account: dict[str, int] = {}
        for entry in reversed(_delivered(blocks)):
            tag = entry.key[:8]
            if per_account.get(tag, 0) < JOURNAL_HISTORY:
                per_account[tag] = per_account.get(tag, 0) + 1
                kept.append(entry)
        kept.reverse()
        data = _JOURNAL_HEADER + _format_block(inode, kept) + b"C %d\n" % len(kept)
        new = self._journal.with_name(self._journal.name + ".new")
        try:
            fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, data)
                _fsync(fd)
            finally:
                os.close(fd)
            os.replace(new, self._journal)
            _fsync_dir(self._journal.parent)
        except OSError:
            # The old journal is still whole; compaction is tried again next time.
            with contextlib.suppress(OSError):
                os.unlink(new)

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
        guard = _process_guard(str(real))
        deadline = time.monotonic() + self.lock_timeout
        with contextlib.ExitStack() as stack:
            if not guard.acquire(timeout=self.lock_timeout):
                raise TemporaryDeliveryError(
                    f"{self.name}: another poll of this process held {real} "
                    f"for more than {self.lock_timeout:g} s"
                )
            stack.callback(guard.release)
            try:
                fd = _open_private(real, _OPEN_FLAGS | os.O_APPEND)
            except OSError as exc:
                raise TemporaryDeliveryError(
                    f"{self.name}: cannot open {real}: {_describe(exc)}"
                ) from exc
            stack.callback(_close, fd)  # also releases the fcntl lock
            stack.callback(self._unlock, real, self._lock(fd, real, deadline))
            journal = self._journal
            try:
                jfd = _open_private(journal, _OPEN_FLAGS)
                stack.callback(_close, jfd)
                end = self._settle(fd, jfd)
            except OSError as exc:
                raise TemporaryDeliveryError(
                    f"{self.name}: cannot recover with {journal}: {_describe(exc)}"
                ) from exc
            yield _Locked(fd, jfd, end)

    def _lock(self, fd: int, real: Path, deadline: float) -> int:
        delay = 0.01
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAGAIN):
                    raise TemporaryDeliveryError(
                        f"{self.name}: cannot lock {real}: {_describe(exc)}"
                    ) from exc
                holder = f"another process holds an fcntl lock on {real}"
            else:
                inode, holder = self._dotlock(Path(f"{real}.lock"))
                if inode is not None:
                    return inode
                fcntl.lockf(fd, fcntl.LOCK_UN)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TemporaryDeliveryError(
                    f"{self.name}: gave up after {self.lock_timeout:g} s: {holder}"
                )
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.25)

    def _dotlock(self, lock: Path) -> tuple[int | None, str]:
        """Create the dotlock (breaking a stale one); its inode, or who holds it."""
        # Dovecot's format: lets a process of this host see that we died.
        content = f"{os.getpid()}:{self._host}".encode()
        for _ in range(3):
            try:
                inode = _create_dotlock(lock, content)
            except OSError as exc:
                raise TemporaryDeliveryError(
                    f"{self.name}: cannot create {lock}: {_describe(exc)}"
                ) from exc
            if inode is not None:
                return inode, ""
            holder = self._stale(lock)
            if holder is not None:
                return None, holder
        return None, f"{lock} keeps coming back"

    def _stale(self, lock: Path) -> str | None:
        """Remove ``lock`` if it is stale; otherwise say who holds it."""
        try:
            lfd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return f"{lock} exists and cannot be read: {_describe(exc)}"
        try:
            stat = os.fstat(lfd)
            owner = _LOCK_OWNER.fullmatch(os.read(lfd, 256))
        except OSError as exc:
            return f"{lock} exists and cannot be read: {_describe(exc)}"
        finally:
            os.close(lfd)
        age = time.time() - stat.st_mtime
        pid = int(owner[1]) if owner else 0
        host = owner[2].decode("utf-8", "replace") if owner and owner[2] else None
        dead = pid > 0 and host == self._host and not _alive(pid)
        if not dead and age <= self.stale_lock_age:
            by = f" by pid {pid}" + (f" on {host}" if host else "") if pid else ""
            return f"{lock} is held{by} ({age:.0f} s old)"
        with contextlib.suppress(OSError):
            # Only the lock judged stale: another process may have just
            # broken it and taken a fresh one.
            if os.lstat(lock).st_ino == stat.st_ino:
                os.unlink(lock)
        return None

    def _unlock(self, real: Path, inode: int) -> None:
        lock = Path(f"{real}.lock")
        with contextlib.suppress(OSError):
            if os.lstat(lock).st_ino == inode:
                os.unlink(lock)


def _create_dotlock(lock: Path, content: bytes) -> int | None:
    """Create ``lock`` holding ``content``; its inode, or None if it exists.

    The file is written unnamed and then linked into place, so a crash
    cannot leave an empty lock that nobody can tell is stale.
    """
    try:
        fd = os.open(lock.parent, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    except OSError:
        return _create_dotlock_in_place(lock, content)  # no O_TMPFILE here (e.g. NFS)
    try:
        os.write(fd, content)
        dirfd = os.open(lock.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            # With a dir fd os.link() is linkat(AT_SYMLINK_FOLLOW), which
            # links the unnamed file itself rather than the /proc symlink.
            os.link(f"/proc/self/fd/{fd}", lock.name, dst_dir_fd=dirfd)
        except FileExistsError:
            return None
        except OSError:
            return _create_dotlock_in_place(lock, content)  # no /proc
        finally:
            os.close(dirfd)
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


def _create_dotlock_in_place(lock: Path, content: bytes) -> int | None:
    # A crash between creating and writing leaves an empty lock, broken
    # only once it is older than the stale age.
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return None
    try:
        os.write(fd, content)
        return os.fstat(fd).st_ino
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        raise
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    # The guard is ours, so a dotlock naming this process is a leftover.
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
