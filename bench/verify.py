"""Correctness of one run: every message delivered once, and for gpopd byte-exact.

Other tools add their own trace headers (``Received:``, ``Delivered-To:``...),
so their deliveries are matched to the source by ``Message-ID`` (every corpus
message has a distinct one): each must appear exactly once.  gpopd's files
must each equal ``expected_delivery`` of one source message, as a multiset.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

HEADER_READ = 256 * 1024
HASH_CHUNK = 1 << 20
MAX_PROBLEMS = 5
_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)


def message_id(head: bytes) -> bytes | None:
    """The Message-ID of a message whose first bytes are ``head``, unfolded."""
    end = len(head)
    for separator in (b"\n\n", b"\r\n\r\n"):
        found = head.find(separator)
        if 0 <= found < end:
            end = found
    match = _MESSAGE_ID.search(head, 0, end)
    if match is None:
        return None
    return b" ".join(match.group(1).split())


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Expected:
    """What a mailbox holds, reduced to what the checks need."""

    count: int = 0
    ids: Counter[bytes] = field(default_factory=Counter)
    digests: Counter[str] = field(default_factory=Counter)

    @classmethod
    def of(cls, messages: Iterable[bytes], delivery: Callable[[bytes], bytes]) -> Expected:
        expected = cls()
        for message in messages:
            expected.count += 1
            identity = message_id(message[:HEADER_READ])
            if identity is None:
                raise ValueError(f"corpus message {expected.count} has no Message-ID")
            expected.ids[identity] += 1
            expected.digests[hashlib.sha256(delivery(message)).hexdigest()] += 1
        if len(expected.ids) != expected.count:
            raise ValueError("corpus Message-IDs are not distinct")
        return expected


@dataclass
class Check:
    """The outcome of checking one run."""

    delivered: int = 0
    expected: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem(self, text: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)
        elif len(self.problems) == MAX_PROBLEMS:
            self.problems.append("...")

    def merge(self, other: Check) -> None:
        self.delivered += other.delivered
        self.expected += other.expected
        for text in other.problems:
            self.problem(text)


def _delivered_files(maildir: Path) -> list[Path]:
    return [
        Path(entry.path)
        for sub in ("new", "cur")
        if (maildir / sub).is_dir()
        for entry in os.scandir(maildir / sub)
        if entry.is_file()
    ]


def check_maildir(maildir: Path, expected: Expected, *, byte_exact: bool) -> Check:
    """Compare a Maildir with the mailbox it was filled from."""
    check = Check(expected=expected.count)
    files = _delivered_files(maildir)
    check.delivered = len(files)
    label = maildir.name
    if len(files) != expected.count:
        check.problem(f"{label}: {len(files)} messages delivered, {expected.count} expected")
    leftovers = os.listdir(maildir / "tmp") if (maildir / "tmp").is_dir() else []
    if byte_exact and leftovers:
        check.problem(f"{label}: {len(leftovers)} files left in tmp/")
    ids: Counter[bytes] = Counter()
    for path in files:
        with path.open("rb") as handle:
            identity = message_id(handle.read(HEADER_READ))
        if identity is None:
            check.problem(f"{label}: {path.name} has no Message-ID")
        else:
            ids[identity] += 1
    duplicated = sum(n - 1 for n in ids.values() if n > 1)
    if duplicated:
        check.problem(f"{label}: {duplicated} duplicate deliveries")
    missing = sum((expected.ids - ids).values())
    if missing:
        check.problem(f"{label}: {missing} messages missing")
    unknown = sum((ids - expected.ids).values())
    if unknown:
        check.problem(f"{label}: {unknown} messages not in the mailbox")
    if byte_exact:
        digests = Counter(file_digest(path) for path in files)
        differ = sum((digests - expected.digests).values())
        if differ:
            check.problem(f"{label}: {differ} files differ from the expected bytes")
    return check


def check_count(reported: int, expected: int, label: str) -> Check:
    """For clients that deliver nothing (the floor): the number of messages read."""
    check = Check(delivered=reported, expected=expected)
    if reported != expected:
        check.problem(f"{label}: {reported} messages read, {expected} expected")
    return check
