"""Events: what ``Connection.next_event()`` reports from the server's bytes."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from ._commands import Auth, Capa, Command, List, Retr, Stat, Top, Uidl


class _NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"

    __str__ = __repr__


# A one-member enum rather than a bare object() so that type checkers narrow
# ``if event is NEED_DATA`` to ``Event``.
NEED_DATA: Final = _NeedData.NEED_DATA


@dataclass(frozen=True, slots=True)
class Event:
    """Base class of every event."""


@dataclass(frozen=True, slots=True)
class Greeting(Event):
    """The server's ``+OK`` greeting."""

    text: str
    code: str | None


@dataclass(frozen=True, slots=True)
class Ok(Event):
    """A single-line ``+OK`` (USER, PASS, final AUTH, STLS, DELE, NOOP, RSET, QUIT)."""

    command: Command
    text: str
    code: str | None


@dataclass(frozen=True, slots=True)
class Err(Event):
    """Any ``-ERR``; ``command`` is ``None`` for an ``-ERR`` greeting."""

    command: Command | None
    text: str
    code: str | None


@dataclass(frozen=True, slots=True)
class Continuation(Event):
    """A ``+ challenge`` line during AUTH; ``challenge`` is the raw base64 text."""

    command: Auth
    challenge: str


@dataclass(frozen=True, slots=True)
class Capabilities(Event):
    """A CAPA listing: upper-cased tags with their parameters as sent."""

    command: Capa
    capabilities: tuple[tuple[str, tuple[str, ...]], ...]


@dataclass(frozen=True, slots=True)
class StatReply(Event):
    """``+OK count size`` answering STAT."""

    command: Stat
    count: int
    size: int


@dataclass(frozen=True, slots=True)
class ScanListing(Event):
    """``(message number, size)`` pairs answering LIST or ``LIST n``."""

    command: List
    entries: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class UidListing(Event):
    """``(message number, uid)`` pairs answering UIDL or ``UIDL n``."""

    command: Uidl
    entries: tuple[tuple[int, str], ...]


@dataclass(frozen=True, slots=True)
class MessageStart(Event):
    """The ``+OK`` line of RETR or TOP; content follows as ``MessageData``."""

    command: Retr | Top
    text: str


@dataclass(frozen=True, slots=True)
class MessageData(Event):
    """A chunk of unstuffed content, every line end normalised to LF."""

    command: Retr | Top
    data: bytes


@dataclass(frozen=True, slots=True)
class MessageEnd(Event):
    """The terminating ``.`` line of RETR or TOP."""

    command: Retr | Top


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """The server closed the connection at a moment when that is allowed."""
