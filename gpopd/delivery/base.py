"""The interface every destination implements.

A message goes through three steps: ``open()`` gives a ``Writer`` that
receives the message as chunks, ``Writer.finish()`` turns it into a
``Staged`` message, and ``Destination.commit()`` makes a whole window of
staged messages durable at once (group commit).  Only after ``commit()``
reported success may the caller record the UID and DELE the message.

Every message has a key derived from its account and UID.  Destinations
that can keep the key next to the message (Maildir keeps it in the file
name) recognise an earlier delivery after a crash through
``find_delivered()``, which is what makes them exactly-once.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from gpopd.errors import DeliveryError

__all__ = [
    "CommitResult",
    "Destination",
    "MessageInfo",
    "Staged",
    "Writer",
    "account_tag",
    "message_key",
]

ACCOUNT_TAG_LENGTH = 8
KEY_LENGTH = 32


def account_tag(account: str) -> str:
    """Return the 8 hex digits that start every key of ``account``."""
    return hashlib.sha256(account.encode()).hexdigest()[:ACCOUNT_TAG_LENGTH]


def message_key(account: str, uid: str) -> str:
    """Return the 32-hex-digit key of the message ``uid`` of ``account``.

    The account tag comes first so that files of one account can be told
    apart from another's without knowing their UIDs (orphan clean-up).
    """
    digest = hashlib.sha256(f"{account}\0{uid}".encode()).hexdigest()
    return account_tag(account) + digest[: KEY_LENGTH - ACCOUNT_TAG_LENGTH]


@dataclass(frozen=True, slots=True)
class MessageInfo:
    """What a destination knows about a message before reading it."""

    account: str
    uid: str
    key: str
    size_hint: int | None = None


@dataclass
class Staged:
    """A message completely written but not yet durable."""

    info: MessageInfo
    size: int


@dataclass(frozen=True, slots=True)
class CommitResult:
    """The outcome of committing one staged message."""

    staged: Staged
    error: DeliveryError | None

    @property
    def ok(self) -> bool:
        return self.error is None


class Writer(ABC):
    """Receives one message as chunks.

    Used as a context manager, it aborts when the block raises before
    ``finish()``, so that no partial message is left behind.
    """

    @abstractmethod
    def write(self, data: bytes) -> None:
        """Append ``data``; raises ``TemporaryDeliveryError`` on I/O failure."""

    @abstractmethod
    def finish(self) -> Staged:
        """End the message and return it staged for ``Destination.commit()``."""

    @abstractmethod
    def abort(self) -> None:
        """Remove everything written so far; safe to call more than once."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()


class Destination(ABC):
    """Where messages go: a Maildir, an mbox, an MDA, an SMTP or LMTP server."""

    name: str
    exactly_once: bool = False

    @abstractmethod
    async def prepare(self, account: str) -> None:
        """Get ready for a poll of ``account`` (which the caller holds locked)."""

    @abstractmethod
    def open(self, info: MessageInfo) -> Writer:
        """Start writing the message described by ``info``."""

    @abstractmethod
    async def commit(self, staged: Sequence[Staged]) -> list[CommitResult]:
        """Make ``staged`` durable, returning one result per message, in order.

        A failed result does not prove that the message is absent: a
        destination may be unable to tell (a failed directory fsync, a
        connection lost before the reply).  Keep the pending rows of failed
        messages so that ``find_delivered()`` decides at the next poll.
        """

    @abstractmethod
    async def find_delivered(self, account: str, keys: Collection[str]) -> set[str]:
        """Return those of ``keys`` that an earlier delivery left here."""

    @abstractmethod
    async def close(self) -> None:
        """Release whatever the destination holds open."""
