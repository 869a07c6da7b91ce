"""When each account is polled.

One asyncio task per account.  Each task sleeps until its account is due,
takes a session slot, runs one poll, and computes the next due time from the
outcome.  The scheduler knows nothing of POP3: it receives plain jobs (name,
host, interval) and a poll function that returns a ``PollReport``.

Theory of operation
-------------------
* Cadence: the next turn counts from the start of the session that just ran.
  Turns that come while the account is still polling are skipped, not
  queued: never two polls of one account at once, no burst to catch up.
* Spread: a random jitter of up to ``jitter`` (10 %) of the delay is added so
  accounts configured alike drift apart.  The first poll after start waits up
  to ``min(jitter * interval, 5 s)`` so a thousand accounts do not connect in
  the same millisecond.
* Backoff: each consecutive failure doubles the delay, starting from the
  account's interval, up to ``max_backoff`` (1 h); a success resets it.
  Jitter comes on top of the cap, so accounts that failed together (a
  provider outage) do not all return in the same second.
* LOGIN-DELAY (RFC 2449 §6.8) is a floor under every delay, counted from the
  end of the poll since the login happened somewhere inside it.
* Needs a person ([AUTH], [SYS/PERM]): fast retries cannot help and may get
  the account locked, so it is retried at the cap only and logged at error
  level once until a success.
* Limits: the per-host semaphore is taken first, then the global one.  A task
  waiting for a global slot then holds only a slot of its own host, so a
  crowded host cannot fill the global pool with waiters; one fixed order
  means no cycle, hence no deadlock.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Protocol

import structlog
from structlog.contextvars import bound_contextvars

DEFAULT_MAX_SESSIONS = 32
DEFAULT_MAX_SESSIONS_PER_HOST = 8
DEFAULT_MAX_BACKOFF = 3600.0
DEFAULT_JITTER = 0.10
DEFAULT_STUCK_AFTER = 3600.0
# Upper bound of the random delay before the first poll of a job.
FIRST_POLL_SPREAD = 5.0
# Account tasks are started this many per event-loop iteration (at start
# and when a reload adds accounts).  Each task's first step (setting up its
# wait) costs about 0.15 ms; started all at once, 1,000 of them ran in one
# loop iteration of 146-182 ms during which no timer or socket was served
# (bench/scale.py).
LAUNCH_BATCH = 64
# 2**64 intervals exceeds any cap; a larger exponent would overflow a float.
_MAX_DOUBLINGS = 64


class Outcome(enum.Enum):
    """How one poll ended, as far as scheduling is concerned."""

    OK = "ok"
    BUSY = "busy"  # [IN-USE], [LOGIN-DELAY], [SYS/TEMP], network errors, timeouts
    NEEDS_PERSON = "needs-person"  # [AUTH], [SYS/PERM], bad credentials
    FAILED = "failed"  # anything else; backs off like BUSY


@dataclass(frozen=True, slots=True)
class PollReport:
    """The result of one poll: the outcome, the server's LOGIN-DELAY if it
    advertised one, and a short human-readable detail."""

    outcome: Outcome
    login_delay: float | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Job:
    """One account to poll every ``interval`` seconds on ``host``."""

    name: str
    host: str
    interval: float

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a job needs a name")
        if not (self.interval > 0 and math.isfinite(self.interval)):
            raise ValueError(f"job {self.name!r}: interval must be a positive number of seconds")


@dataclass(frozen=True, slots=True)
class AccountState:
    """A snapshot of one account's schedule, for ``gpopd status``."""

    name: str
    host: str
    interval: float
    consecutive_failures: int
    last_outcome: Outcome | None
    last_detail: str
    polling: bool  # from its turn (queueing for a slot included) until the poll returns
    next_due: float | None  # monotonic; None while polling or before start
    poll_started: float | None  # monotonic time the running session got its slots
    login_delay: float | None


PollFn = Callable[[str], Awaitable[PollReport]]


class Clock(Protocol):
    """Time as the scheduler sees it; tests substitute a fake one."""

    def monotonic(self) -> float: ...

    async def sleep_until(self, deadline: float, wake: asyncio.Event) -> None:
        """Return once ``monotonic() >= deadline`` or ``wake`` is set.

        May return early; callers re-check the time and their state.
        """
        ...


class RealClock:
    """The monotonic clock of the event loop."""

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep_until(self, deadline: float, wake: asyncio.Event) -> None:
        timeout = deadline - time.monotonic()
        if timeout <= 0 or wake.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), timeout)


class _Phase(enum.Enum):
    WAITING = "waiting"  # sleeping until due
    QUEUED = "queued"  # due, waiting for a session slot
    POLLING = "polling"  # inside the poll function


@dataclass(slots=True, eq=False)
class _Account:
    """Mutable schedule of one account; owned by exactly one task at a time."""

    job: Job
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    phase: _Phase = _Phase.WAITING
    next_due: float | None = None
    session_started: float | None = None
    retired: bool = False
    # History, carried over when the task is restarted.
    failures: int = 0
    last_report: PollReport | None = None
    last_started: float | None = None
    last_ended: float | None = None
    login_delay: float | None = None
    alerted: bool = False

    def successor(self, job: Job) -> _Account:
        """A fresh record for a restarted task, keeping the history."""
        return _Account(
            job,
            failures=self.failures,
            last_report=self.last_report,
            last_started=self.last_started,
            last_ended=self.last_ended,
            login_delay=self.login_delay,
            alerted=self.alerted,
        )


class Scheduler:
    """Polls every job on its own schedule within global and per-host limits."""

    def __init__(
        self,
        poll: PollFn,
        *,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        max_sessions_per_host: int = DEFAULT_MAX_SESSIONS_PER_HOST,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        max_backoff: float = DEFAULT_MAX_BACKOFF,
        jitter: float = DEFAULT_JITTER,
        stuck_after: float = DEFAULT_STUCK_AFTER,
    ) -> None:
        if max_sessions < 1 or max_sessions_per_host < 1:
            raise ValueError("session limits must be at least 1")
        if max_backoff <= 0 or jitter < 0 or stuck_after <= 0:
            raise ValueError("max_backoff and stuck_after must be positive, jitter not negative")
        self._poll = poll
        self._clock: Clock = clock or RealClock()
        # Jitter only spreads load; it needs no cryptographic randomness.
        self._rng = rng or random.Random()  # noqa: S311
        self._max_backoff = max_backoff
        self._jitter = jitter
        self._stuck_after = stuck_after
        self._global = asyncio.Semaphore(max_sessions)
        self._per_host = max_sessions_per_host
        self._hosts: dict[str, asyncio.Semaphore] = {}
        self._accounts: dict[str, _Account] = {}
        # Removed accounts whose last poll is still running.
        self._retiring: dict[str, _Account] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._running = False
        self._crashed: set[str] = set()
        self._busy = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._log = structlog.get_logger("gpopd.scheduler")

    # ----------------------------------------------------------------- policy

    @staticmethod
    def delay_after(
        job: Job,
        report: PollReport,
        failures: int,
        rng: random.Random,
        *,
        max_backoff: float = DEFAULT_MAX_BACKOFF,
        jitter: float = DEFAULT_JITTER,
    ) -> float:
        """Seconds from the start of a poll to the next one.

        ``failures`` counts consecutive failures including this report (it is
        ignored after OK).  The result is never below the interval nor the
        report's LOGIN-DELAY, and is at most ``1 + jitter`` times the larger of
        the capped backoff, the interval and the LOGIN-DELAY.
        """
        interval = job.interval
        if report.outcome is Outcome.OK:
            base = interval
        elif report.outcome is Outcome.NEEDS_PERSON:
            base = max(interval, max_backoff)
        else:
            doublings = min(max(failures, 1), _MAX_DOUBLINGS)
            base = max(interval, min(max_backoff, interval * 2.0**doublings))
        if report.login_delay is not None:
            base = max(base, report.login_delay)
        return base + rng.uniform(0.0, jitter * base)

    @staticmethod
    def next_due_after(
        started: float, ended: float, delay: float, login_delay: float | None
    ) -> float:
        """The monotonic time of the next turn of a poll that ran from
        ``started`` to ``ended``, skipping turns that passed while it ran."""
        due = started + delay
        if due <= ended:
            due = started + (math.floor((ended - started) / delay) + 1) * delay
        if login_delay is not None:
            due = max(due, ended + login_delay)
        return due

    def _first_spread(self, job: Job) -> float:
        return self._rng.uniform(0.0, min(self._jitter * job.interval, FIRST_POLL_SPREAD))

    # ------------------------------------------------------------ public API

    def set_jobs(self, jobs: Iterable[Job]) -> None:
        """Make the job list exactly ``jobs``: new jobs are polled soon, removed
        ones stop (after their current poll, if one runs), changed ones keep
        their history and are rescheduled under the new interval and host."""
        wanted: dict[str, Job] = {}
        for job in jobs:
            if job.name in wanted:
                raise ValueError(f"duplicate job name {job.name!r}")
            wanted[job.name] = job
        for name in [n for n in self._accounts if n not in wanted]:
            self._retire(name)
        now = self._clock.monotonic()
        added: list[_Account] = []
        for name, job in wanted.items():
            acct = self._accounts.get(name)
            if acct is None and name in self._retiring:
                # Re-added before its last poll ended: keep the one task.
                acct = self._retiring.pop(name)
                acct.retired = False
                self._accounts[name] = acct
            if acct is None:
                acct = _Account(job)
                self._accounts[name] = acct
                added.append(acct)
            elif acct.job != job:
                self._change(acct, job, now)
        if self._running:
            self._launch_in_batches(added)

    async def start(self) -> None:
        """Start one task per job; each first poll comes within the spread."""
        if self._running:
            return
        self._running = True
        self._launch_in_batches(list(self._accounts.values()))

    async def stop(self) -> None:
        """Cancel every wait at once and return when running polls have ended.

        Running polls are let finish.  To bound that, cancel ``stop()`` (for
        example with ``asyncio.wait_for``): the running polls are then
        cancelled too, and ``stop()`` returns once they have unwound.
        """
        self._running = False
        for acct in [*self._accounts.values(), *self._retiring.values()]:
            if acct.task is not None and acct.phase is not _Phase.POLLING:
                acct.task.cancel()
        tasks = list(self._tasks)
        if not tasks:
            return
        try:
            await asyncio.wait(tasks)
        except asyncio.CancelledError:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
            raise

    def poll_all_now(self) -> None:
        """Make every account that is not polling due now (SIGUSR1)."""
        now = self._clock.monotonic()
        for acct in self._accounts.values():
            if acct.task is not None and not acct.task.done() and acct.phase is _Phase.WAITING:
                acct.next_due = now
                acct.wake.set()

    def next_poll(self, name: str) -> float | None:
        """Monotonic time of the account's next turn; None while it polls."""
        acct = self._accounts.get(name)
        if acct is None or acct.task is None or acct.phase is not _Phase.WAITING:
            return None
        return acct.next_due

    def state(self, name: str) -> AccountState | None:
        """A snapshot of the account's schedule, or None if it is unknown."""
        acct = self._accounts.get(name) or self._retiring.get(name)
        if acct is None:
            return None
        return AccountState(
            name=acct.job.name,
            host=acct.job.host,
            interval=acct.job.interval,
            consecutive_failures=acct.failures,
            last_outcome=acct.last_report.outcome if acct.last_report else None,
            last_detail=acct.last_report.detail if acct.last_report else "",
            polling=acct.phase is not _Phase.WAITING,
            next_due=self.next_poll(name),
            poll_started=acct.session_started,
            login_delay=acct.login_delay,
        )

    def idle(self) -> bool:
        """True when no account is polling or waiting for a session slot."""
        return self._busy == 0

    async def wait_idle(self) -> None:
        """Return once no account is polling or waiting for a session slot."""
        while not self.idle():
            await self._idle.wait()

    def healthy(self, now: float | None = None) -> bool:
        """False if a session has run longer than ``stuck_after`` or an
        account's task died; the watchdog stops pinging then."""
        if self._crashed:
            return False
        now = self._clock.monotonic() if now is None else now
        for acct in [*self._accounts.values(), *self._retiring.values()]:
            started = acct.session_started
            if started is not None and now - started > self._stuck_after:
                return False
        return True

    # -------------------------------------------------------------- internals

    def _retire(self, name: str) -> None:
        acct = self._accounts.pop(name)
        acct.retired = True
        if acct.task is None or acct.task.done():
            return
        if acct.phase is _Phase.POLLING:
            self._retiring[name] = acct
        else:
            acct.task.cancel()

    def _change(self, acct: _Account, job: Job, now: float) -> None:
        if acct.task is None or acct.task.done() or acct.phase is _Phase.POLLING:
            # Not started yet, or picks the new job up when its poll ends.
            acct.job = job
            return
        if acct.phase is _Phase.QUEUED:
            # It may be queued behind a host it no longer uses: restart it on
            # a fresh record (the old task's clean-up touches only the old
            # one) and let it queue again at once, under the new host.
            new = acct.successor(job)
            self._accounts[job.name] = new
            acct.retired = True
            acct.task.cancel()
            self._launch(new, now)
            return
        acct.job = job
        if acct.last_report is None or acct.last_started is None or acct.last_ended is None:
            return  # its first poll is still pending and comes within seconds
        delay = self._delay(acct.job, acct.last_report, acct.failures)
        due = self.next_due_after(acct.last_started, acct.last_ended, delay, acct.login_delay)
        # Already past due under the new interval: poll soon, but spread out
        # so a reload does not make every account connect at once.
        acct.next_due = max(due, now + self._first_spread(acct.job))
        acct.wake.set()

    def _delay(self, job: Job, report: PollReport, failures: int) -> float:
        return self.delay_after(
            job, report, failures, self._rng, max_backoff=self._max_backoff, jitter=self._jitter
        )

    def _launch_in_batches(self, accts: list[_Account]) -> None:
        """Start the tasks of ``accts``, LAUNCH_BATCH of them per loop iteration.

        The rest is handed to the next iteration, after the first steps of
        this batch.  Accounts removed or already started by then are skipped;
        after stop() nothing more is started.
        """
        if not self._running:
            return
        now = self._clock.monotonic()
        launched = 0
        for index, acct in enumerate(accts):
            removed = self._accounts.get(acct.job.name) is not acct
            running = acct.task is not None and not acct.task.done()
            if removed or running:
                continue
            if launched == LAUNCH_BATCH:
                asyncio.get_running_loop().call_soon(self._launch_in_batches, accts[index:])
                return
            self._launch(acct, now + self._first_spread(acct.job))
            launched += 1

    def _launch(self, acct: _Account, due: float) -> None:
        acct.retired = False
        acct.phase = _Phase.WAITING
        acct.next_due = due
        task = asyncio.create_task(self._run(acct), name=f"gpopd-account-{acct.job.name}")
        acct.task = task
        self._tasks.add(task)
        task.add_done_callback(partial(self._task_done, acct))

    def _task_done(self, acct: _Account, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        name = acct.job.name
        if self._retiring.get(name) is acct:
            del self._retiring[name]
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._crashed.add(name)
            self._log.error("account task died", account=name, exc_info=exc)

    async def _run(self, acct: _Account) -> None:
        while True:
            await self._wait_turn(acct)
            await self._turn(acct)
            if acct.retired or not self._running:
                return

    async def _wait_turn(self, acct: _Account) -> None:
        # set_jobs and poll_all_now move next_due and set wake; re-read it.
        while True:
            due = acct.next_due
            if due is None or self._clock.monotonic() >= due:
                return
            acct.wake.clear()
            await self._clock.sleep_until(due, acct.wake)

    def _host_slot(self, host: str) -> asyncio.Semaphore:
        # DNS names are case-insensitive.
        return self._hosts.setdefault(host.lower(), asyncio.Semaphore(self._per_host))

    async def _turn(self, acct: _Account) -> None:
        name = acct.job.name
        acct.phase = _Phase.QUEUED
        self._busy += 1
        self._idle.clear()
        try:
            with bound_contextvars(account=name):
                # Host first, then global: see the module docstring.
                async with self._host_slot(acct.job.host), self._global:
                    acct.phase = _Phase.POLLING
                    started = acct.session_started = self._clock.monotonic()
                    report = await self._call_poll(name)
                    ended = self._clock.monotonic()
                self._record(acct, report, started, ended)
        finally:
            acct.phase = _Phase.WAITING
            acct.session_started = None
            self._busy -= 1
            if self._busy == 0:
                self._idle.set()

    async def _call_poll(self, name: str) -> PollReport:
        try:
            return await self._poll(name)
        except Exception as exc:
            # The poll function should report failures, not raise them; if it
            # does anyway the account must still be retried, not lost.
            self._log.exception("poll raised")
            return PollReport(Outcome.FAILED, detail=f"{type(exc).__name__}: {exc}")

    def _record(self, acct: _Account, report: PollReport, started: float, ended: float) -> None:
        previous_failures = acct.failures
        if report.outcome is Outcome.OK:
            acct.failures = 0
            # A successful session saw the current CAPA: trust its answer,
            # including the absence of LOGIN-DELAY.
            acct.login_delay = report.login_delay
        else:
            acct.failures += 1
            if report.login_delay is not None:
                acct.login_delay = report.login_delay
        effective = replace(report, login_delay=acct.login_delay)
        acct.last_report = effective
        acct.last_started = started
        acct.last_ended = ended
        delay = self._delay(acct.job, effective, acct.failures)
        acct.next_due = self.next_due_after(started, ended, delay, acct.login_delay)
        self._log_outcome(acct, report, previous_failures, acct.next_due - ended)

    def _log_outcome(
        self, acct: _Account, report: PollReport, previous_failures: int, seconds: float
    ) -> None:
        if report.outcome is Outcome.OK:
            if previous_failures:
                self._log.info("recovered", failures=previous_failures)
            acct.alerted = False
            return
        fields = {"seconds": round(seconds, 1), "failures": acct.failures, "detail": report.detail}
        if report.outcome is not Outcome.NEEDS_PERSON:
            self._log.info("backing off", outcome=report.outcome.value, **fields)
        elif acct.alerted:
            self._log.info("still needs a person", **fields)
        else:
            acct.alerted = True
            self._log.error("needs a person", **fields)
