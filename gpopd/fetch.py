"""One poll of one account, in the order that makes delivery safe.

For every new message:

1. its (uid, key) is recorded as *pending* before any byte of it can reach
   the destination, so a crash leaves a trace to recover from;
2. RETR streams it through the engine into the destination's spool;
3. the destination makes it durable (group commit: a window of messages,
   one directory fsync);
4. the store records it as delivered (one SQLite commit per window);
5. only then, and only with ``keep: false``, DELE, and QUIT at the end.

A crash before 4 leaves a pending row; the next poll asks the destination
whether the key is already there (Maildir file names carry it) and records
it instead of storing it twice.  Anything that goes wrong keeps the message
on the server.  When a message was read but not durably delivered, the
session is dropped without QUIT: servers such as Gmail mark every message
retrieved in a QUIT-ended session as downloaded, even without DELE.

This module plans each session and runs the polls; steps 2 to 4 are
``gpopd.transfer``, connecting and logging in ``gpopd.login``.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import structlog
from structlog.contextvars import bound_contextvars

from gpopd import gmail, pop3
from gpopd.config import Account, Settings
from gpopd.delivery import build_account_destination
from gpopd.delivery.base import Destination, message_key
from gpopd.errors import (
    DeliveryError,
    GpopdError,
    StoreError,
    TransportError,
)
from gpopd.failpoints import failpoint
from gpopd.login import BEARER_METHODS, TokenSource, open_session, token_manager
from gpopd.session import Mailbox, TraceHook, login_delay
from gpopd.store import AccountLock, Store
from gpopd.transfer import Planned, Transfer

# Includes the names of gpopd.login that the daemon, the CLI and serverinfo
# import from here.
__all__ = [
    "BEARER_METHODS",
    "PERMANENT_RETRY_AFTER",
    "TOO_LARGE",
    "PollResult",
    "ProgressHook",
    "StoreWorker",
    "TokenSource",
    "open_session",
    "outcome_of",
    "plan_poll",
    "poll_account",
    "poll_once",
    "protocol_tracer",
    "token_manager",
]

T = TypeVar("T")

log = structlog.get_logger("gpopd.fetch")


class StoreWorker:
    """Runs every call of one ``Store`` on one thread, in order."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="gpopd-store")

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def close(self) -> None:
        await self.call(self.store.close)
        self._executor.shutdown(wait=True)


@dataclass(slots=True)
class PollResult:
    account: str
    outcome: str = "running"
    listed: int = 0
    new: int = 0
    delivered: int = 0
    skipped: int = 0
    deleted: int = 0
    failed: int = 0
    oversized: int = 0
    recovered: int = 0
    bytes: int = 0
    sessions: int = 0
    received: int = 0  # bytes read from the server so far, for progress displays
    login_delay: float | None = None
    seconds: float = 0.0
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


@dataclass(slots=True)
class _Plan:
    fetch: list[Planned] = field(default_factory=list)
    delete_known: list[int] = field(default_factory=list)
    skipped: int = 0
    set_aside: int = 0
    oversized: list[Planned] = field(default_factory=list)
    duplicates: int = 0


TOO_LARGE = "too large"
# A message a destination refused for good is tried again after this long
# (or at once after `gpopd retry`), never at every poll.
PERMANENT_RETRY_AFTER = 86400.0


def plan_poll(
    account: Account,
    mailbox: Mailbox,
    delivered: Collection[str],
    *,
    set_aside: Mapping[str, str] | None = None,
    delivered_at: Mapping[str, float] | None = None,
    now: float = 0.0,
) -> _Plan:
    """Decide which messages to fetch and which known ones to delete.

    UIDs should be unique but may be hashes of the content, so two identical
    messages can share one; the n-th occurrence within a listing is tracked as
    ``"<uid> <n>"`` (a space cannot occur in a UID), so each is fetched once.

    ``set_aside`` (UID -> reason) are messages left on the server on purpose
    and reported before: they are counted, not fetched or reported again,
    except a message set aside as too large that the current
    ``max_message_size`` admits.  ``delivered_at`` (UID -> time) with
    ``delete_after`` selects known messages old enough to delete.
    """
    plan = _Plan()
    set_aside = set_aside or {}
    expiry = (
        now - account.delete_after
        if account.keep and account.delete_after is not None and delivered_at is not None
        else None
    )
    seen: Counter[str] = Counter()
    limit = account.max_messages_per_poll
    for number, raw_uid in mailbox.uids:
        seen[raw_uid] += 1
        uid = raw_uid if seen[raw_uid] == 1 else f"{raw_uid} {seen[raw_uid]}"
        if seen[raw_uid] > 1:
            plan.duplicates += 1
        if uid in delivered:
            plan.skipped += 1
            expired = expiry is not None and (delivered_at or {}).get(uid, now) <= expiry
            if not account.keep or expired:
                plan.delete_known.append(number)
            continue
        item = Planned(number, uid, message_key(account.name, uid), mailbox.sizes[number])
        reason = set_aside.get(uid)
        if reason is not None and not (
            reason == TOO_LARGE and item.size <= account.max_message_size
        ):
            plan.set_aside += 1
            continue
        if item.size > account.max_message_size:
            plan.oversized.append(item)
            continue
        if limit is not None and len(plan.fetch) >= limit:
            continue
        plan.fetch.append(item)
    return plan


async def _recover(account: Account, destination: Destination, db: StoreWorker) -> int:
    """Settle rows left pending by an interrupted poll."""
    pending = await db.call(db.store.pending, account.name)
    if not pending:
        return 0
    found = await destination.find_delivered(account.name, pending.keys())
    if found:
        await db.call(
            db.store.mark_delivered, account.name, [(pending[key], key, 0) for key in found]
        )
    rest = set(pending) - found
    if rest:
        await db.call(db.store.clear_pending, account.name, rest)
    log.info("recovered interrupted poll", already_delivered=len(found), refetch=len(rest))
    return len(found)


async def _poll(
    account: Account,
    db: StoreWorker,
    destination: Destination,
    result: PollResult,
    trace: TraceHook | None,
    *,
    tokens: TokenSource | None = None,
) -> None:
    await destination.prepare(account.name)
    result.recovered = await _recover(account, destination, db)
    if gmail.is_recent_mode(account.username):
        log.info(
            "recent mode: the server lists the last 30 days at every session; "
            "the UID store makes each message count once"
        )
    for _ in range(account.max_sessions_per_poll):
        result.sessions += 1
        if not await _session(account, db, destination, result, trace, tokens=tokens):
            return
        log.info("the server offered a full batch: starting the next session at once")
    log.warning(
        "max_sessions_per_poll reached with messages still waiting; the next poll goes on",
        max_sessions_per_poll=account.max_sessions_per_poll,
    )


def _full_batch(account: Account, mailbox: Mailbox, plan: _Plan, transfer: Transfer) -> bool:
    """Whether the session returned a full batch that was entirely fetched.

    Gmail lists only its oldest ~250 unpopped messages per session and the
    next ones only after QUIT; so while a session lists many and everything
    it offered went through, another session finds more.  Not in recent
    mode (it lists the same 30 days every time), and not when the listing
    held messages delivered before: a batching server lists only what it
    has not handed out, so a server that does is showing its whole mailbox.
    """
    threshold = account.batch_threshold
    return (
        threshold is not None
        and mailbox.count >= threshold
        and not gmail.is_recent_mode(account.username)
        and plan.skipped == 0
        and len(plan.fetch) > 0
        and transfer.fetched_all
        and (account.max_messages_per_poll is None)
    )


async def _session(
    account: Account,
    db: StoreWorker,
    destination: Destination,
    result: PollResult,
    trace: TraceHook | None,
    *,
    tokens: TokenSource | None,
) -> bool:
    """One POP3 session of a poll; returns whether another should follow."""
    delivered = await db.call(db.store.delivered_uids, account.name)
    now = time.time()
    set_aside = await db.call(db.store.skipped_uids, account.name, now)
    delivered_at = (
        await db.call(db.store.delivered_times, account.name)
        if account.keep and account.delete_after is not None
        else None
    )
    session = await open_session(account, trace, tokens)
    transport = session.transport
    # LOGIN-DELAY spaces the next poll: as announced before login until the
    # CAPA asked with the listing replaces it, also when the listing fails.
    result.login_delay = login_delay(session.capabilities)
    try:
        mailbox = await session.mailbox()
        result.login_delay = login_delay(session.capabilities)
        if account.keep and result.sessions == 1 and session.capabilities.get("EXPIRE") == ("0",):
            # Gmail: a QUIT-ended session marks its messages popped whatever
            # the client does, so they will not be listed again.
            log.info(
                "the server lists a retrieved message only once (EXPIRE 0), whatever keep says"
            )
        plan = plan_poll(
            account,
            mailbox,
            delivered,
            set_aside=set_aside,
            delivered_at=delivered_at,
            now=now,
        )
        result.listed += mailbox.count
        result.new += len(plan.fetch)
        result.skipped += plan.skipped + plan.set_aside
        result.oversized += len(plan.oversized)
        if plan.duplicates:
            log.warning("server lists duplicate UIDs", duplicates=plan.duplicates)
        for item in plan.oversized:
            log.warning(
                "message larger than max_message_size left on the server",
                uid=item.uid,
                size=item.size,
                max_message_size=account.max_message_size,
                hint="reported once; raise max_message_size or run `gpopd retry` to fetch it",
            )
        if plan.oversized:
            await db.call(
                db.store.mark_skipped,
                account.name,
                [(item.uid, TOO_LARGE, item.size, None) for item in plan.oversized],
            )
        if plan.fetch:
            await db.call(db.store.add_pending, account.name, [(i.uid, i.key) for i in plan.fetch])
        transfer = Transfer(account, session, destination, db, result)
        try:
            await transfer.run(plan.fetch, mailbox.sizes)
        finally:
            if transfer.set_aside:
                retry_at = time.time() + PERMANENT_RETRY_AFTER
                await db.call(
                    db.store.mark_skipped,
                    account.name,
                    [(uid, why, size, retry_at) for uid, why, size in transfer.set_aside],
                )
        if transfer.unsettled:
            # Read but not delivered: never QUIT (see the module docstring).
            transport.abort()
            return False
        numbers = sorted(plan.delete_known + ([] if account.keep else transfer.delivered_numbers))
        if numbers:
            await session.delete(numbers)
            failpoint("after-dele")
            result.deleted += len(numbers)
        failpoint("before-quit")
        await session.quit()
        return _full_batch(account, mailbox, plan, transfer)
    except BaseException:
        transport.abort()
        raise


def outcome_of(exc: BaseException) -> str:
    if isinstance(exc, TransportError):
        return "network-error"
    if isinstance(exc, pop3.ProtocolError):
        return "protocol-error"
    if isinstance(exc, StoreError):
        return "store-error"
    if isinstance(exc, DeliveryError):
        return "delivery-error"
    if isinstance(exc, GpopdError):
        return type(exc).__name__
    return "internal-error"


async def poll_account(
    account: Account,
    db: StoreWorker,
    state_dir: Path,
    *,
    destination: Destination | None = None,
    trace: TraceHook | None = None,
    result: PollResult | None = None,
    tokens: TokenSource | None = None,
) -> PollResult:
    """Poll one account once; never raises for the account's own failures.

    ``result`` may be passed in to watch the poll's progress while it runs.
    """
    result = result if result is not None else PollResult(account.name)
    started = time.monotonic()
    with bound_contextvars(account=account.name, session=secrets.token_hex(4)):
        poll_id = await db.call(db.store.poll_started, account.name, time.time())
        dest = destination or build_account_destination(account, state_dir)
        try:
            with AccountLock(state_dir, account.name):
                await _poll(account, db, dest, result, trace, tokens=tokens)
            result.outcome = "ok" if result.failed == 0 else "delivery-error"
        except asyncio.CancelledError:
            result.outcome = "cancelled"
            raise
        except (GpopdError, pop3.ProtocolError, OSError) as exc:
            result.outcome = outcome_of(exc)
            result.error = exc
        except Exception as exc:
            result.outcome = "internal-error"
            result.error = exc
            log.exception("internal error while polling")
        finally:
            result.seconds = time.monotonic() - started
            if destination is None:
                await dest.close()
            await _record(db, poll_id, result)
            _summary(account, result)
    return result


async def _record(db: StoreWorker, poll_id: int, result: PollResult) -> None:
    try:
        await db.call(
            db.store.poll_finished,
            poll_id,
            finished_at=time.time(),
            outcome=result.outcome,
            new=result.new,
            delivered=result.delivered,
            skipped=result.skipped,
            bytes=result.bytes,
            error=str(result.error) if result.error else None,
        )
    except StoreError as exc:
        log.error("could not record the poll in the state database", error=str(exc))


def _summary(account: Account, result: PollResult) -> None:
    fields: dict[str, Any] = {
        "host": account.host,
        "listed": result.listed,
        "new": result.new,
        "delivered": result.delivered,
        "skipped": result.skipped,
        "deleted": result.deleted,
        "failed": result.failed,
        "oversized": result.oversized,
        "bytes": result.bytes,
        "sessions": result.sessions,
        "seconds": round(result.seconds, 3),
        "outcome": result.outcome,
    }
    if result.error is not None:
        fields["error"] = str(result.error)
        log.error("poll finished", **fields)
    else:
        log.info("poll finished", **fields)


def protocol_tracer() -> TraceHook:
    """A ``--trace`` hook: each POP3 command and reply as a log line."""
    trace_log = structlog.get_logger("gpopd.trace")

    def trace(direction: str, line: str) -> None:
        trace_log.info("pop3", direction=direction, line=line)

    return trace


ProgressHook = Callable[[Sequence[PollResult], bool], None]


async def poll_once(
    settings: Settings,
    names: Sequence[str] | None = None,
    *,
    trace: TraceHook | None = None,
    progress: ProgressHook | None = None,
    tokens: TokenSource | None = None,
) -> list[PollResult]:
    """Poll the named accounts (default: all) once, concurrently.

    At most ``max_sessions`` sessions at once, and ``max_sessions_per_host``
    to one host (the host's slot is taken first, as the scheduler does).
    """
    db = StoreWorker(Store(settings.state_dir))
    if tokens is None and any(a.auth in BEARER_METHODS for a in settings.accounts.values()):
        tokens = token_manager(settings.state_dir)
    overall = asyncio.Semaphore(settings.max_sessions)
    per_host: dict[str, asyncio.Semaphore] = {}

    accounts = [settings.accounts[name] for name in (names or settings.accounts)]
    results = [PollResult(account.name) for account in accounts]

    async def one(account: Account, result: PollResult) -> PollResult:
        host = per_host.setdefault(
            account.host.lower(), asyncio.Semaphore(settings.max_sessions_per_host)
        )
        async with host, overall:
            return await poll_account(
                account, db, settings.state_dir, trace=trace, result=result, tokens=tokens
            )

    async def show() -> None:
        assert progress is not None  # noqa: S101 - only started with a hook
        while True:
            progress(results, False)
            await asyncio.sleep(0.25)

    ticker = asyncio.create_task(show()) if progress is not None else None
    try:
        return list(
            await asyncio.gather(*(one(a, r) for a, r in zip(accounts, results, strict=True)))
        )
    finally:
        if ticker is not None:
            ticker.cancel()
            progress(results, True)  # type: ignore[misc]
        await db.close()
