"""Moving the planned messages of one session from the server to the destination.

RETR streams each message into the destination's spool (and, with
``quarantine``, into a copy); staged messages are made durable in windows
(group commit: many messages, one directory fsync) and each window is then
recorded as delivered in the store.  See ``gpopd.fetch`` for the order of
these steps and why it makes delivery safe.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from gpopd import logs, pop3
from gpopd.config import Account
from gpopd.delivery.base import CommitResult, Destination, MessageInfo, Staged, Writer
from gpopd.delivery.maildir import MaildirDestination
from gpopd.errors import DeliveryError, PermanentDeliveryError
from gpopd.failpoints import failpoint
from gpopd.headers import trace_headers
from gpopd.session import Session

if TYPE_CHECKING:
    from gpopd.fetch import PollResult, StoreWorker

# A commit window never holds more than this many staged messages or bytes
# (a destination may keep small messages in memory until commit): beyond
# either the fetch waits for the previous commit rather than stage more.
MAX_COMMIT_WINDOW = 128
MAX_COMMIT_BYTES = 2 * 1024 * 1024
# Windows committed at once (exactly-once destinations only): the next
# window's file fsyncs then overlap the previous window's links, directory
# fsync and store commit, during which the fsync threads used to sit idle
# (py-spy on 4,000 small messages: a third of each commit).
MAX_COMMITS_IN_FLIGHT = 2

PERMANENT_FAILURE = "delivery failed permanently"

log = structlog.get_logger("gpopd.transfer")


@dataclass(slots=True)
class Planned:
    """A message a session fetches: its number in the listing, UID, key and size."""

    number: int
    uid: str
    key: str
    size: int


class _Tee(Writer):
    """Writes a message to its destination and a quarantine copy at once."""

    def __init__(self, main: Writer, copy: Writer) -> None:
        self.main = main
        self.copy: _Copy = _Copy(copy)

    def write(self, data: bytes) -> None:
        self.main.write(data)
        self.copy.write(data)

    def finish(self) -> Staged:
        staged = self.main.finish()
        self.copy.finish()
        return staged

    def abort(self) -> None:
        self.main.abort()
        self.copy.abort()


class _Copy:
    """The quarantine side of a ``_Tee``: its failures never fail the delivery."""

    def __init__(self, writer: Writer) -> None:
        self.writer: Writer | None = writer
        self.staged: Staged | None = None

    def write(self, data: bytes) -> None:
        if self.writer is not None:
            try:
                self.writer.write(data)
            except DeliveryError as exc:
                log.warning("quarantine copy failed", error=str(exc))
                self.abort()

    def finish(self) -> None:
        if self.writer is not None:
            try:
                self.staged = self.writer.finish()
            except DeliveryError as exc:
                log.warning("quarantine copy failed", error=str(exc))
                self.abort()

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None
        self.staged = None


class Transfer:
    """RETR the planned messages into the destination with group commit."""

    def __init__(
        self,
        account: Account,
        session: Session,
        destination: Destination,
        db: StoreWorker,
        result: PollResult,
    ) -> None:
        self.account = account
        self.session = session
        self.destination = destination
        self.db = db
        self.result = result
        self.delivered_numbers: list[int] = []
        # (uid, reason, size) of messages refused for good: not retried every poll.
        self.set_aside: list[tuple[str, str, int]] = []
        # Messages read from the server and not (yet) durably delivered.
        self.unsettled = 0
        self._batch: list[tuple[Planned, Staged, float]] = []
        self._batch_bytes = 0
        # With quarantine: a copy of each message in flight, kept only if the
        # destination refuses it for good.
        self.quarantine = (
            MaildirDestination(account.quarantine) if account.quarantine is not None else None
        )
        self._copies: dict[str, _Copy] = {}
        self._commits: list[asyncio.Task[None]] = []  # oldest first
        self.planned = 0

    @property
    def fetched_all(self) -> bool:
        """Whether every planned message was delivered."""
        return len(self.delivered_numbers) == self.planned

    async def run(self, items: list[Planned], sizes: dict[int, int]) -> None:
        self.planned = len(items)
        by_number = {item.number: item for item in items}
        writer: Writer | None = None
        item: Planned | None = None
        received = 0
        started = 0.0
        limit = self.account.max_message_size
        if self.quarantine is not None:
            # Once per poll, before any copy exists: prepare() removes this
            # account's files in tmp/, which later would include copies in flight.
            await self.quarantine.prepare(self.account.name)
        try:
            async for event in self.session.retrieve([i.number for i in items], sizes):
                if isinstance(event, pop3.MessageData):
                    received += len(event.data)
                    self.result.received += len(event.data)
                    if received > limit:
                        raise pop3.RemoteProtocolError(
                            f"message {item.number if item else '?'} exceeds "
                            f"max_message_size ({limit} bytes) although LIST announced "
                            f"{item.size if item else '?'} bytes"
                        )
                    if writer is not None:
                        try:
                            writer.write(event.data)
                        except DeliveryError as exc:
                            self._fail(writer, item, exc)
                            writer = None
                elif isinstance(event, pop3.MessageStart):
                    item = by_number[event.command.msg]
                    received = 0
                    started = time.monotonic()
                    self.unsettled += 1
                    writer = None
                    try:
                        writer = self.destination.open(self._info(item))
                        if self.quarantine is not None:
                            writer = _Tee(writer, self.quarantine.open(self._info(item)))
                        if self.account.add_headers:
                            writer.write(self._headers(item))
                    except DeliveryError as exc:
                        # Also releases what open() already created (a spool file).
                        self._fail(writer, item, exc)
                        writer = None
                elif isinstance(event, pop3.MessageEnd):
                    # From here the message belongs to the batch: a failure
                    # while committing an earlier window must not abort it.
                    finished, writer = writer, None
                    if finished is not None and item is not None:
                        try:
                            staged = finished.finish()
                        except DeliveryError as exc:
                            self._fail(finished, item, exc)
                        else:
                            if isinstance(finished, _Tee):
                                self._copies[item.key] = finished.copy
                            self._batch.append((item, staged, started))
                            self._batch_bytes += staged.size
                            await self._maybe_commit()
                    item = None
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        finally:
            # Whatever happened on the wire, messages received in full are
            # still worth making durable.
            await self._drain_commits()

    def _info(self, item: Planned) -> MessageInfo:
        return MessageInfo(self.account.name, item.uid, item.key, item.size)

    def _headers(self, item: Planned) -> bytes:
        account = self.account
        return trace_headers(
            account.add_headers,
            host=account.host,
            tls=account.tls,
            username=account.username,
            uid=item.uid,
            key=item.key,
        )

    def _fail(self, writer: Writer | None, item: Planned | None, exc: DeliveryError) -> None:
        if writer is not None:
            writer.abort()
        self.result.failed += 1
        permanent = isinstance(exc, PermanentDeliveryError)
        if permanent and item is not None:
            self.set_aside.append((item.uid, f"{PERMANENT_FAILURE}: {exc}"[:500], item.size))
        log.warning(
            "delivery failed",
            uid=item.uid if item else None,
            destination=self.destination.name,
            error=str(exc),
            permanent=permanent,
            next_try="in a day, or after `gpopd retry`" if permanent else "next poll",
        )

    async def _settle_copies(
        self, batch: list[tuple[Planned, Staged, float]], results: list[CommitResult]
    ) -> None:
        """Keep in quarantine the copies of messages refused for good; drop the rest."""
        keep: list[tuple[Planned, Staged]] = []
        for (item, _, _), outcome in zip(batch, results, strict=True):
            copy = self._copies.pop(item.key, None)
            if copy is None:
                continue
            if isinstance(outcome.error, PermanentDeliveryError) and copy.staged is not None:
                keep.append((item, copy.staged))
            else:
                copy.abort()
        if not keep or self.quarantine is None:
            return
        for (item, _), outcome in zip(
            keep, await self.quarantine.commit([s for _, s in keep]), strict=True
        ):
            if outcome.error is None:
                log.warning("message quarantined", uid=item.uid, path=str(self.quarantine.path))
            else:
                log.error("could not quarantine", uid=item.uid, error=str(outcome.error))

    async def _maybe_commit(self) -> None:
        # A destination that cannot recognise its own earlier deliveries
        # (SMTP, LMTP, MDA) commits one message at a time, so a crash can
        # duplicate at most the message in flight.
        grouped = self.destination.exactly_once and self.quarantine is None
        window = MAX_COMMIT_WINDOW if grouped else 1
        in_flight = MAX_COMMITS_IN_FLIGHT if grouped else 1
        for task in [task for task in self._commits if task.done()]:
            self._commits.remove(task)
            task.result()  # re-raises a store failure: stop the poll
        if self._commits:
            if len(self._batch) < window and self._batch_bytes < MAX_COMMIT_BYTES:
                return  # a running commit will be followed by a bigger one
            while len(self._commits) >= in_flight:
                await self._commits.pop(0)
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        self._commits.append(asyncio.create_task(self._commit_batch(batch)))

    async def _drain_commits(self) -> None:
        # Every running commit is waited for, even after one failed: none
        # may outlive the poll.
        error: BaseException | None = None
        while self._commits:
            try:
                await self._commits.pop(0)
            except BaseException as exc:
                error = error or exc
        if error is not None:
            raise error
        if self._batch:
            batch, self._batch, self._batch_bytes = self._batch, [], 0
            await self._commit_batch(batch)

    async def _commit_batch(self, batch: list[tuple[Planned, Staged, float]]) -> None:
        results = await self.destination.commit([staged for _, staged, _ in batch])
        done: list[tuple[Planned, Staged, float]] = []
        for (item, staged, started), outcome in zip(batch, results, strict=True):
            if outcome.error is None:
                done.append((item, staged, started))
                if warning := getattr(outcome, "warning", None):
                    log.warning(
                        "delivered with refusals",
                        uid=item.uid,
                        destination=self.destination.name,
                        warning=warning,
                    )
            else:
                self._fail(None, item, outcome.error)
        await self._settle_copies(batch, results)
        if done:
            await self.db.call(
                self.db.store.mark_delivered,
                self.account.name,
                [(item.uid, item.key, staged.size) for item, staged, _ in done],
            )
            failpoint("after-store-commit")
        now = time.monotonic()
        with logs.written_together():
            for item, staged, started in done:
                self.unsettled -= 1
                self.delivered_numbers.append(item.number)
                self.result.delivered += 1
                self.result.bytes += staged.size
                log.info(
                    "message delivered",
                    uid=item.uid,
                    size=staged.size,
                    destination=self.destination.name,
                    seconds=round(now - started, 4),
                )
