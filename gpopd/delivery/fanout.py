"""Several destinations for one account: every one must accept each message.

``delivery:`` given as a list becomes a ``FanOutDestination`` over one child
destination per entry.  A message is delivered when every child accepted it;
only then does the store record it and may it be deleted from the server.

Theory of operation: ``open()`` opens a writer on each child that has not
yet accepted the message's key (the ``Ledger`` says which did) and the
message is streamed to all of them at once.  ``commit()`` commits each
child's share of the window (the children side by side), then writes every
acceptance to the ledger, durably, before it reports any result.  A child
that fails does not stop the others: what they accepted is recorded, and at
the next poll only the children still missing the message get it.

Results: ok when every child accepted; a permanent failure of any child
makes the message's failure permanent (set aside for a day, quarantined);
otherwise a temporary one.  ``exactly_once`` holds only if it holds for
every child.

Crash windows: a child that accepted a message just before gpopd died, with
its acceptance not yet in the ledger, is asked at the next poll through its
own ``find_delivered()``: Maildir and mbox recognise the message and it is
recorded, not stored again.  SMTP, LMTP and MDA children keep no such trace;
they may receive that one message again (at least once, as on their own).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from gpopd.delivery.base import CommitResult, Destination, MessageInfo, Staged, Writer
from gpopd.delivery.ledger import Ledger
from gpopd.errors import DeliveryError, PermanentDeliveryError, TemporaryDeliveryError

__all__ = [
    "Child",
    "FanOutCommitResult",
    "FanOutDestination",
    "FanOutStaged",
    "combined_error",
    "destination_identity",
]


def destination_identity(delivery: Any) -> str:
    """A destination's stable name in the ledger: its kind and where it delivers.

    The position in the list is left out, so that adding or reordering
    destinations does not make the ledger forget who has a message.
    """
    kind = delivery.type
    if kind in ("maildir", "mbox"):
        return f"{kind}:{delivery.path}"
    if kind == "mda":
        return "mda:" + json.dumps(list(delivery.command))
    socket = getattr(delivery, "socket", None)
    if socket is not None:
        target = f"unix:{socket}"
    else:
        port = getattr(delivery, "effective_port", None) or delivery.port
        target = f"{delivery.host}:{port}"
    recipients = ",".join(delivery.recipient)
    header = getattr(delivery, "recipient_header", None)
    return f"{kind}:{target}:{recipients}" + (f":{header}" if header else "")


@dataclass(frozen=True, slots=True)
class Child:
    """One destination of the list and its identity in the ledger."""

    identity: str
    destination: Destination


@dataclass(eq=False)
class FanOutStaged(Staged):
    """One staged part per child that got the message, and the children that failed."""

    parts: dict[int, Staged] = field(default_factory=dict)
    errors: dict[int, DeliveryError] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class FanOutCommitResult(CommitResult):
    """A commit result carrying the children's warnings (recipients refused...)."""

    warning: str | None = None


def combined_error(errors: dict[str, DeliveryError]) -> DeliveryError:
    """One error for the failures of several children (identity -> error)."""
    text = "; ".join(f"{identity}: {error}" for identity, error in errors.items())
    if any(isinstance(error, PermanentDeliveryError) for error in errors.values()):
        return PermanentDeliveryError(text)
    return TemporaryDeliveryError(text)


class _FanOutWriter(Writer):
    def __init__(self, owner: FanOutDestination, info: MessageInfo) -> None:
        self._owner = owner
        self._info = info
        self._writers: dict[int, Writer] = {}
        self._errors: dict[int, DeliveryError] = {}
        self._size = 0
        self._staged: FanOutStaged | None = None
        done = owner.ledger.accepted(info.key)
        try:
            for index, child in enumerate(owner.children):
                if child.identity in done:
                    continue
                try:
                    self._writers[index] = child.destination.open(info)
                except DeliveryError as exc:
                    self._errors[index] = exc
        except BaseException:
            self.abort()
            raise
        self._raise_if_nobody_left()

    def write(self, data: bytes) -> None:
        for index, writer in list(self._writers.items()):
            try:
                writer.write(data)
            except DeliveryError as exc:
                self._drop(index, exc)
        self._size += len(data)
        self._raise_if_nobody_left()

    def finish(self) -> FanOutStaged:
        parts: dict[int, Staged] = {}
        for index, writer in list(self._writers.items()):
            try:
                parts[index] = writer.finish()
            except DeliveryError as exc:
                self._drop(index, exc)
        self._raise_if_nobody_left()
        self._staged = FanOutStaged(self._info, self._size, parts, dict(self._errors))
        return self._staged

    def abort(self) -> None:
        # Aborting a child's writer after its finish() discards the staged part.
        writers, self._writers = self._writers, {}
        for writer in writers.values():
            writer.abort()

    def _drop(self, index: int, exc: DeliveryError) -> None:
        self._errors[index] = exc
        writer = self._writers.pop(index)
        writer.abort()

    def _raise_if_nobody_left(self) -> None:
        # With every remaining child failed there is nothing worth streaming.
        if self._errors and not self._writers:
            raise self._owner.error_of(self._errors)


class FanOutDestination(Destination):
    """Delivers every message to each of ``children``; see the module docstring."""

    def __init__(self, children: Sequence[Child], ledger: Ledger) -> None:
        if len(children) < 2:
            raise ValueError("a fan-out needs at least two destinations")
        identities = [child.identity for child in children]
        if len(set(identities)) != len(identities):
            raise ValueError("destination identities must be distinct")
        self.children = tuple(children)
        self.ledger = ledger
        self.name = "[" + ", ".join(child.destination.name for child in children) + "]"
        self.exactly_once = all(child.destination.exactly_once for child in children)

    def error_of(self, errors: dict[int, DeliveryError]) -> DeliveryError:
        return combined_error({self.children[i].identity: e for i, e in errors.items()})

    async def prepare(self, account: str) -> None:
        await self.ledger.load(account)
        for child in self.children:
            await child.destination.prepare(account)

    def open(self, info: MessageInfo) -> Writer:
        return _FanOutWriter(self, info)

    async def commit(self, staged: Sequence[Staged]) -> list[CommitResult]:
        items: list[FanOutStaged] = []
        for item in staged:
            if not isinstance(item, FanOutStaged):
                raise TypeError(f"{self.name} cannot commit {type(item).__name__}")
            items.append(item)
        shares: dict[int, list[Staged]] = {}
        for item in items:
            for index, part in item.parts.items():
                shares.setdefault(index, []).append(part)
        order = sorted(shares)
        outcomes = await asyncio.gather(
            *(self._commit_child(index, shares[index]) for index in order),
            return_exceptions=True,
        )
        by_part: dict[int, CommitResult] = {}
        failure: BaseException | None = None
        for index, outcome in zip(order, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                failure = failure or outcome
                continue
            for part, result in zip(shares[index], outcome, strict=True):
                by_part[id(part)] = result
        accepted = [
            (item.info.key, self.children[index].identity)
            for item in items
            for index, part in item.parts.items()
            if (done := by_part.get(id(part))) is not None and done.ok
        ]
        # Keys that earlier polls delivered in part keep their rows fresh.
        touched = [item.info.key for item in items if len(item.parts) < len(self.children)]
        # Durable before any child is reported done, whatever else went wrong.
        await self.ledger.record(accepted, touched)
        if failure is not None:
            raise failure
        return [self._result(item, by_part) for item in items]

    def _result(self, item: FanOutStaged, by_part: dict[int, CommitResult]) -> CommitResult:
        errors = dict(item.errors)
        warnings: list[str] = []
        for index, part in item.parts.items():
            result = by_part[id(part)]
            if result.error is not None:
                errors[index] = result.error
            elif warning := getattr(result, "warning", None):
                warnings.append(str(warning))
        if errors:
            return FanOutCommitResult(item, self.error_of(errors))
        return FanOutCommitResult(item, None, "; ".join(warnings) or None)

    async def _commit_child(self, index: int, parts: list[Staged]) -> list[CommitResult]:
        try:
            return await self.children[index].destination.commit(parts)
        except DeliveryError as exc:
            return [CommitResult(part, exc) for part in parts]

    async def find_delivered(self, account: str, keys: Collection[str]) -> set[str]:
        if self.ledger.account != account:
            await self.ledger.load(account)
        wanted = set(keys)
        everywhere = set(wanted)
        found_now: list[tuple[str, str]] = []
        for child in self.children:
            known = {key for key in wanted if child.identity in self.ledger.accepted(key)}
            found = await child.destination.find_delivered(account, wanted - known)
            found_now += [(key, child.identity) for key in sorted(found)]
            everywhere &= known | found
        # What a child found by itself is recorded, so that a message fetched
        # again is not stored there a second time.
        await self.ledger.record(found_now)
        return everywhere

    async def close(self) -> None:
        try:
            for child in self.children:
                await child.destination.close()
        finally:
            await self.ledger.close()
