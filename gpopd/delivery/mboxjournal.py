"""The journal that makes mbox appends exactly once, and the writes it relies on.

The journal ``.<name>.gpopd-journal`` sits next to the mbox.  Each commit
window is one block: ``B <inode> <n>``, one ``E <key> <offset> <length>
<sha256>`` line per record, ``S <sha256 of the block>`` (the seal), then,
once the records are durable in the mbox, ``C <n>``: the first n records
were delivered.  A block without its ``C`` line is an append cut short;
``settle()`` decides from the mbox itself which of its records are whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gpopd import privatefs
from gpopd.delivery.spool import CHUNK_SIZE
from gpopd.durable import fsync_dir, pwrite_all, write_all
from gpopd.errors import TemporaryDeliveryError

__all__ = [
    "JOURNAL_HEADER",
    "JournalBlock",
    "JournalEntry",
    "compact",
    "delivered",
    "digest",
    "format_block",
    "fsync",
    "open_or_create_durably",
    "parse_journal",
    "read_journal",
    "settle",
]

JOURNAL_HEADER = b"gpopd-mbox-journal 1\n"
_BLOCK = re.compile(rb"B (\d{1,20}) (\d{1,9})\n")
_ENTRY = re.compile(rb"E ([0-9a-f]{32}) (\d{1,20}) (\d{1,20}) ([0-9a-f]{64})\n")
_SEAL = re.compile(rb"S ([0-9a-f]{64})\n")
_COMMIT = re.compile(rb"C (\d{1,9})\n")
_CLEAN_TAIL = re.compile(rb"\nC \d{1,9}\n\Z")


def fsync(fd: int) -> None:
    """``os.fsync`` of a file, under the one name mbox imports (and its tests replace)."""
    os.fsync(fd)


def open_or_create_durably(path: Path, flags: int) -> int:
    """Open ``path``, creating it 0600 (and making that durable) if missing."""
    while True:
        try:
            return os.open(path, flags)
        except FileNotFoundError:
            pass
        try:
            fd = privatefs.open_private(path, flags | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            continue
        try:
            fsync_dir(path.parent)
        except OSError:
            os.close(fd)
            raise
        return fd


def digest(fd: int, offset: int, length: int) -> str:
    """SHA-256 (hex) of ``length`` bytes at ``offset``, or of fewer at the end of the file."""
    sha = hashlib.sha256()
    while length > 0:
        chunk = os.pread(fd, min(length, CHUNK_SIZE), offset)
        if not chunk:
            break
        sha.update(chunk)
        offset += len(chunk)
        length -= len(chunk)
    return sha.hexdigest()


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


def format_block(inode: int, entries: Sequence[JournalEntry]) -> bytes:
    """A sealed block for ``entries`` of the mbox with ``inode``, without its ``C`` line."""
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
    if not data.startswith(JOURNAL_HEADER):
        raise ValueError("not a gpopd mbox journal")
    blocks: list[JournalBlock] = []
    pos = len(JOURNAL_HEADER)
    while True:
        block, end = _parse_block(data, pos)
        if block is None:
            return blocks, pos
        blocks.append(block)
        pos = end
        if block.committed is None:
            return blocks, pos  # only the last block can be cut short


def delivered(blocks: Sequence[JournalBlock]) -> list[JournalEntry]:
    """The entries the blocks record as delivered, oldest first."""
    return [e for b in blocks for e in b.entries[: b.committed or 0]]


def read_journal(jfd: int, size: int, name: str, path: Path) -> tuple[list[JournalBlock], int]:
    """Parse the first ``size`` bytes of the journal open as ``jfd``.

    Raises ``TemporaryDeliveryError`` (naming destination ``name`` and the
    journal's ``path``) when it is not a gpopd journal.
    """
    data = bytearray()
    while len(data) < size and (chunk := os.pread(jfd, size - len(data), len(data))):
        data += chunk
    try:
        return parse_journal(bytes(data))
    except ValueError:
        # Starting afresh would forget which records are already in the mbox.
        raise TemporaryDeliveryError(
            f"{name}: {path} is not a gpopd mbox journal; move it away only after checking the mbox"
        ) from None


def settle(fd: int, jfd: int, name: str, path: Path) -> int:
    """Settle a cut append, if the journal shows one; return where the journal ends."""
    size = os.fstat(jfd).st_size
    if size == 0:
        pwrite_all(jfd, JOURNAL_HEADER, 0)
        fsync(jfd)
        return len(JOURNAL_HEADER)
    tail = os.pread(jfd, 64, max(0, size - 64))
    if _CLEAN_TAIL.search(tail) or (size == len(JOURNAL_HEADER) and tail == JOURNAL_HEADER):
        return size
    blocks, end = read_journal(jfd, size, name, path)
    if blocks and blocks[-1].committed is None:
        line = b"C %d\n" % _present(fd, blocks[-1])
        pwrite_all(jfd, line, end)
        end += len(line)
    # Whatever follows the valid part was torn before the mbox was touched.
    os.ftruncate(jfd, end)
    fsync(jfd)
    return end


def _present(fd: int, block: JournalBlock) -> int:
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
        if stat.st_size >= end and digest(fd, entry.offset, entry.length) == entry.digest:
            count += 1
            continue
        if not foreign and stat.st_size > entry.offset:
            os.ftruncate(fd, entry.offset)
            fsync(fd)
        break
    return count


def compact(jfd: int, size: int, inode: int, *, name: str, path: Path, history: int) -> None:
    """Replace the journal by one block of each account's last ``history`` keys."""
    try:
        blocks, _ = read_journal(jfd, size, name, path)
    except TemporaryDeliveryError:
        return
    kept: list[JournalEntry] = []
    per_account: dict[str, int] = {}
    for entry in reversed(delivered(blocks)):
        tag = entry.key[:8]
        if per_account.get(tag, 0) < history:
            per_account[tag] = per_account.get(tag, 0) + 1
            kept.append(entry)
    kept.reverse()
    data = JOURNAL_HEADER + format_block(inode, kept) + b"C %d\n" % len(kept)
    new = path.with_name(path.name + ".new")
    try:
        fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            write_all(fd, data)
            fsync(fd)
        finally:
            os.close(fd)
        os.replace(new, path)
        fsync_dir(path.parent)
    except OSError:
        # The old journal is still whole; compaction is tried again next time.
        with contextlib.suppress(OSError):
            os.unlink(new)
