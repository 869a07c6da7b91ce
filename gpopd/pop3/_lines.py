"""Line-level parsing: status lines, CAPA and LIST/UIDL listings.

Every line is looked for only within its limit, so a server that never sends
a line end makes the engine buffer at most the limit plus one read.
"""

from __future__ import annotations

import re
from typing import Final

from ._buffer import ReceiveBuffer
from ._commands import Capa, List, Uidl
from ._errors import RemoteProtocolError
from ._events import Capabilities, ScanListing, UidListing
from ._limits import (
    MAX_CAPA_LINE,
    MAX_LISTING_ENTRIES,
    MAX_LISTING_LINE,
    MAX_NUMBER_DIGITS,
    MAX_UID_LENGTH,
)

_UID_CHARACTERS: Final = re.compile(rb"[\x21-\x7e]+")
# How much of a malformed line an error message quotes.
_QUOTE: Final = 60


def quote(line: bytes) -> str:
    """A bounded, repr'd prefix of ``line`` for error messages."""
    shown = repr(line[:_QUOTE])
    return shown + "..." if len(line) > _QUOTE else shown


def strip_eol(line: bytes) -> bytes:
    """``line`` without its LF or CRLF."""
    line = line[:-1] if line.endswith(b"\n") else line
    return line[:-1] if line.endswith(b"\r") else line


def parse_status(line: bytes) -> tuple[bool, str, str | None]:
    """Split a ``+OK``/``-ERR`` line (without line end) into (ok, text, code).

    The code is the RFC 2449 response code between brackets, upper-cased.
    """
    text = line.decode("utf-8", errors="replace")
    status, _, rest = text.partition(" ")
    if status not in ("+OK", "-ERR"):
        raise RemoteProtocolError(f"malformed status line {quote(line)}")
    code: str | None = None
    if rest.startswith("["):
        close = rest.find("]")
        if close > 1:
            code = rest[1:close].upper()
            rest = rest[close + 1 :]
    return status == "+OK", rest.strip(), code


def parse_number(field: bytes, minimum: int, what: str, digits: int = MAX_NUMBER_DIGITS) -> int:
    """A decimal number without sign, at most ``digits`` long and ``>= minimum``."""
    if not field.isdigit() or len(field) > digits:
        raise RemoteProtocolError(f"invalid {what} {quote(field)}")
    value = int(field)
    if value < minimum:
        raise RemoteProtocolError(f"invalid {what} {quote(field)}")
    return value


def parse_uid(field: bytes) -> str:
    """A unique-id: 1 to ``MAX_UID_LENGTH`` characters in 0x21..0x7E."""
    if len(field) > MAX_UID_LENGTH:
        raise RemoteProtocolError(
            f"UID longer than MAX_UID_LENGTH ({MAX_UID_LENGTH}): {quote(field)}"
        )
    if not _UID_CHARACTERS.fullmatch(field):
        raise RemoteProtocolError(f"UID with characters outside 0x21..0x7E: {quote(field)}")
    return field.decode("ascii")


def parse_scan_line(line: bytes) -> tuple[int, int]:
    """``n size`` (RFC 1939 lets more information follow the size)."""
    fields = line.split()
    if len(fields) < 2:
        raise RemoteProtocolError(f"malformed scan listing {quote(line)}")
    return (
        parse_number(fields[0], 1, "message number"),
        parse_number(fields[1], 0, "message size"),
    )


def parse_uid_line(line: bytes) -> tuple[int, str]:
    """``n uid``."""
    fields = line.split()
    if len(fields) != 2:
        raise RemoteProtocolError(f"malformed unique-id listing {quote(line)}")
    return parse_number(fields[0], 1, "message number"), parse_uid(fields[1])


class MultiLineReader:
    """Collects the lines of a CAPA, LIST or UIDL reply up to its ``.``."""

    __slots__ = ("_capabilities", "_command", "_numbers", "_scan", "_uids")

    def __init__(self, command: Capa | List | Uidl) -> None:
        self._command = command
        self._capabilities: list[tuple[str, tuple[str, ...]]] = []
        self._scan: list[tuple[int, int]] = []
        self._uids: list[tuple[int, str]] = []
        self._numbers: set[int] = set()

    def feed(self, buffer: ReceiveBuffer) -> Capabilities | ScanListing | UidListing | None:
        """Consume complete lines; return the event once the terminator arrives."""
        capa = isinstance(self._command, Capa)
        limit = MAX_CAPA_LINE if capa else MAX_LISTING_LINE
        what = "MAX_CAPA_LINE" if capa else "MAX_LISTING_LINE"
        while (raw := buffer.take_line(limit, what)) is not None:
            line = strip_eol(raw)
            if line == b".":
                return self._event()
            if line.startswith(b"."):
                line = line[1:]
            self._add(line)
        return None

    def _add(self, line: bytes) -> None:
        command = self._command
        if isinstance(command, Capa):
            fields = line.decode("utf-8", errors="replace").split()
            if not fields:
                return
            self._capabilities.append((fields[0].upper(), tuple(fields[1:])))
            count = len(self._capabilities)
        else:
            if isinstance(command, List):
                number, size = parse_scan_line(line)
                self._scan.append((number, size))
            else:
                number, uid = parse_uid_line(line)
                self._uids.append((number, uid))
            if number in self._numbers:
                raise RemoteProtocolError(f"message number {number} listed twice")
            self._numbers.add(number)
            count = len(self._numbers)
        if count > MAX_LISTING_ENTRIES:
            raise RemoteProtocolError(
                f"reply has more than MAX_LISTING_ENTRIES ({MAX_LISTING_ENTRIES}) entries; "
                "gpopd bounds its memory and does not poll a mailbox this large: "
                "move old messages off the server"
            )

    def _event(self) -> Capabilities | ScanListing | UidListing:
        command = self._command
        if isinstance(command, Capa):
            return Capabilities(command, tuple(self._capabilities))
        if isinstance(command, List):
            return ScanListing(command, tuple(self._scan))
        return UidListing(command, tuple(self._uids))
