"""Routes: the first rule whose header matches picks the destination.

An account's ``routes:`` is an ordered list of rules, each naming a header,
a test (``matches``: a regular expression searched in the value;
``contains``: a text found in it, ignoring case) and a destination (one, or a
list).  The first rule that holds for any occurrence of its header wins;
with none, the account's ``delivery:`` is used.  Header names are compared
ignoring case, values are tested unfolded, both as written and with RFC 2047
encoded words decoded.

Theory of operation: the writer keeps the start of the message in memory
until the header block ends (the first empty line) or ``MAX_HEADER_BLOCK``
bytes arrived, decides with the fields complete by then, opens the chosen
destination's writer and streams it what it kept and everything after.  A
message whose header block never ends within the bound is routed by the
fields seen in that bound.

After a crash, ``find_delivered()`` must ask the destination the message
went to.  When no destination appears in two routes, asking every route is
exact: only the route a message took can hold it in full.  When routes
share a destination (the same Maildir alone in one route, with a relay in
another), the route each message takes is written to the fan-out ledger
before its destinations commit, and only that route is asked; a message
without a record is fetched again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from email.errors import HeaderParseError
from email.header import decode_header, make_header

from gpopd.delivery.base import CommitResult, Destination, MessageInfo, Staged, Writer
from gpopd.delivery.ledger import Ledger
from gpopd.errors import DeliveryError

__all__ = [
    "MAX_HEADER_BLOCK",
    "Route",
    "RoutedStaged",
    "RoutingDestination",
    "Rule",
    "header_fields",
]

# Enough for any honest header block; a larger one is routed by its first part.
MAX_HEADER_BLOCK = 256 * 1024

_BLANK_LINE = re.compile(rb"(?:\A|\n)\r?\n")


def _decoded(value: str) -> str:
    if "=?" not in value:
        return value
    try:
        return str(make_header(decode_header(value)))
    except (HeaderParseError, LookupError, ValueError, UnicodeError):
        return value  # a broken encoded word is tested as written


def header_fields(block: bytes) -> dict[str, list[str]]:
    """Field name (lower case) -> its unfolded values, in order, from a header block.

    Lines that are neither a field nor a continuation (an mbox ``From ``
    line, garbage) are skipped; an unfinished last line is ignored.
    """
    fields: dict[str, list[str]] = {}
    lines = block.split(b"\n")
    lines.pop()  # the text after the last line end: empty, or unfinished
    name: str | None = None
    value = b""

    def flush() -> None:
        if name is not None:
            fields.setdefault(name, []).append(value.strip().decode("utf-8", "replace"))

    for raw in lines:
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if line[:1] in (b" ", b"\t"):
            if name is not None:
                value += line  # unfolding: the line break goes, the blank stays
            continue
        flush()
        colon = line.find(b":")
        candidate = line[:colon].strip() if colon > 0 else b""
        if candidate and b" " not in candidate and candidate.isascii():
            name, value = candidate.decode("ascii").lower(), line[colon + 1 :]
        else:
            name, value = None, b""
    flush()
    return fields


@dataclass(frozen=True, slots=True)
class Rule:
    """A test on one header: a ``pattern`` searched, or a text it ``contains``."""

    header: str
    pattern: re.Pattern[str] | None = None
    contains: str | None = None

    def __post_init__(self) -> None:
        if (self.pattern is None) == (self.contains is None):
            raise ValueError("a rule has exactly one of pattern and contains")

    def holds(self, fields: Mapping[str, list[str]]) -> bool:
        for value in fields.get(self.header.lower(), ()):
            for text in dict.fromkeys((value, _decoded(value))):
                if self.pattern is not None and self.pattern.search(text):
                    return True
                if self.contains is not None and self.contains.casefold() in text.casefold():
                    return True
        return False


@dataclass(frozen=True, slots=True)
class Route:
    """A destination, its identity, the identities it delivers to, and its rule.

    The default route has no rule.
    """

    destination: Destination
    identity: str
    leaves: frozenset[str]
    rule: Rule | None = None


@dataclass(eq=False)
class RoutedStaged(Staged):
    """A message staged in the destination of route number ``route``."""

    route: int = 0
    inner: Staged | None = field(default=None, repr=False)


class _RoutingWriter(Writer):
    def __init__(self, owner: RoutingDestination, info: MessageInfo) -> None:
        self._owner = owner
        self._info = info
        self._buffer = bytearray()
        self._scanned = 0
        self._route: int | None = None
        self._child: Writer | None = None
        self._done = False

    def write(self, data: bytes) -> None:
        if self._done:
            raise RuntimeError("write() after finish() or abort()")
        if self._child is not None:
            self._child.write(data)
            return
        self._buffer += data
        # Resume the search just before the old end: a blank line may straddle chunks.
        blank = _BLANK_LINE.search(self._buffer, max(0, self._scanned - 2))
        self._scanned = len(self._buffer)
        if blank is not None:
            self._decide(bytes(self._buffer[: blank.start() + 1]))
        elif len(self._buffer) >= MAX_HEADER_BLOCK:
            self._decide(bytes(self._buffer[:MAX_HEADER_BLOCK]))

    def finish(self) -> RoutedStaged:
        if self._done:
            raise RuntimeError("finish() after finish() or abort()")
        if self._child is None or self._route is None:
            # A message without body: its whole text is the header block.
            route, child = self._decide(bytes(self._buffer) + b"\n")
        else:
            route, child = self._route, self._child
        inner = child.finish()
        self._done = True
        return RoutedStaged(self._info, inner.size, route=route, inner=inner)

    def abort(self) -> None:
        self._done = True
        self._buffer = bytearray()
        if self._child is not None:
            self._child.abort()

    def _decide(self, block: bytes) -> tuple[int, Writer]:
        route = self._owner.choose(block)
        child = self._child = self._owner.routes[route].destination.open(self._info)
        self._route = route
        kept, self._buffer = bytes(self._buffer), bytearray()
        if kept:
            child.write(kept)
        return route, child


class RoutingDestination(Destination):
    """Sends each message to the destination of the first route whose rule holds."""

    def __init__(self, routes: Sequence[Route], default: Route, ledger: Ledger) -> None:
        if any(route.rule is None for route in routes) or default.rule is not None:
            raise ValueError("every route but the default needs a rule")
        self.routes = (*routes, default)
        self.ledger = ledger
        seen: set[str] = set()
        shared = False
        for route in self.routes:
            shared = shared or bool(route.leaves & seen)
            seen |= route.leaves
        # See the module docstring: only shared destinations need the record.
        self.records_routes = shared
        self.name = f"routes({len(routes)} rules, default {default.destination.name})"
        self.exactly_once = all(route.destination.exactly_once for route in self.routes)

    def choose(self, block: bytes) -> int:
        """The number of the route a message with this header block takes."""
        fields = header_fields(block)
        for number, route in enumerate(self.routes[:-1]):
            if route.rule is not None and route.rule.holds(fields):
                return number
        return len(self.routes) - 1

    async def prepare(self, account: str) -> None:
        if self.records_routes:
            await self.ledger.load(account)
        for route in self.routes:
            await route.destination.prepare(account)

    def open(self, info: MessageInfo) -> Writer:
        return _RoutingWriter(self, info)

    async def commit(self, staged: Sequence[Staged]) -> list[CommitResult]:
        items: list[RoutedStaged] = []
        for item in staged:
            if not isinstance(item, RoutedStaged) or item.inner is None:
                raise TypeError(f"{self.name} cannot commit {type(item).__name__}")
            items.append(item)
        if self.records_routes:
            await self.ledger.set_routes(
                (item.info.key, self.routes[item.route].identity) for item in items
            )
        groups: dict[int, list[RoutedStaged]] = {}
        for item in items:
            groups.setdefault(item.route, []).append(item)
        order = sorted(groups)
        outcomes = await asyncio.gather(
            *(self._commit_route(number, groups[number]) for number in order),
            return_exceptions=True,
        )
        results: dict[int, CommitResult] = {}
        for number, outcome in zip(order, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                raise outcome
            for item, result in zip(groups[number], outcome, strict=True):
                results[id(item)] = dataclasses.replace(result, staged=item)
        return [results[id(item)] for item in items]

    async def _commit_route(self, number: int, items: list[RoutedStaged]) -> list[CommitResult]:
        inner = [item.inner for item in items if item.inner is not None]
        try:
            return await self.routes[number].destination.commit(inner)
        except DeliveryError as exc:
            return [CommitResult(part, exc) for part in inner]

    async def find_delivered(self, account: str, keys: Collection[str]) -> set[str]:
        if not self.records_routes:
            found: set[str] = set()
            for route in self.routes:
                found |= await route.destination.find_delivered(account, keys)
            return found
        if self.ledger.account != account:
            await self.ledger.load(account)
        numbers = {route.identity: n for n, route in reversed(list(enumerate(self.routes)))}
        asked: dict[int, set[str]] = {}
        for key in keys:
            number = numbers.get(self.ledger.route(key) or "")
            if number is not None:
                asked.setdefault(number, set()).add(key)
        found = set()
        for number, wanted in sorted(asked.items()):
            found |= await self.routes[number].destination.find_delivered(account, wanted)
        return found

    async def close(self) -> None:
        try:
            for route in self.routes:
                await route.destination.close()
        finally:
            await self.ledger.close()
