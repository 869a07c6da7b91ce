"""The scheduler, driven by a fake clock: no test sleeps in real time beyond a few ms."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import LogCapture, capture_logs

from gpopd.scheduler import (
    LAUNCH_BATCH,
    Job,
    Outcome,
    PollReport,
    RealClock,
    Scheduler,
)

OK = PollReport(Outcome.OK)
BUSY = PollReport(Outcome.BUSY, detail="[IN-USE] locked")
NEEDS_PERSON = PollReport(Outcome.NEEDS_PERSON, detail="[AUTH] Username and password not accepted.")


async def settle() -> None:
    """Let every runnable task run until the loop is quiet."""
    for _ in range(50):
        await asyncio.sleep(0)


class FakeClock:
    """A clock that only moves when a test calls ``advance``."""

    def __init__(self) -> None:
        self.now = 0.0
        self._seq = itertools.count()
        self._waiters: list[tuple[float, int, asyncio.Future[None]]] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep_until(self, deadline: float, wake: asyncio.Event) -> None:
        if deadline <= self.now or wake.is_set():
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (deadline, next(self._seq), fut))
        waker = asyncio.ensure_future(wake.wait())
        either: set[asyncio.Future[Any]] = {fut, waker}
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            fut.cancel()
            waker.cancel()

    def sleepers(self) -> int:
        return sum(1 for _, _, fut in self._waiters if not fut.done())

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking sleepers in deadline order."""
        target = self.now + seconds
        await settle()
        while self._waiters and self._waiters[0][0] <= target:
            deadline, _, fut = heapq.heappop(self._waiters)
            if fut.done():
                continue
            self.now = max(self.now, deadline)
            fut.set_result(None)
            await settle()
        self.now = target
        await settle()


class Poller:
    """A scripted poll function that records who was polled when."""

    def __init__(self, clock: FakeClock | None = None, hosts: dict[str, str] | None = None) -> None:
        self.clock = clock
        self.hosts = hosts or {}
        self.calls: list[tuple[str, float]] = []
        self.finished: list[str] = []
        self.cancelled: list[str] = []
        self.scripts: dict[str, list[PollReport | Exception]] = {}
        self.gates: dict[str, asyncio.Event] = {}
        self.in_flight: Counter[str] = Counter()
        self.max_in_flight = 0
        self.max_per_host: Counter[str] = Counter()

    def times(self, name: str) -> list[float]:
        return [t for n, t in self.calls if n == name]

    def count(self, name: str) -> int:
        return len(self.times(name))

    async def __call__(self, name: str) -> PollReport:
        self.calls.append((name, self.clock.now if self.clock else 0.0))
        host = self.hosts.get(name, "")
        self.in_flight[host] += 1
        self.max_per_host[host] = max(self.max_per_host[host], self.in_flight[host])
        self.max_in_flight = max(self.max_in_flight, self.in_flight.total())
        try:
            gate = self.gates.get(name) or self.gates.get("*")
            if gate is not None:
                await gate.wait()
            script = self.scripts.get(name)
            result = script.pop(0) if script else OK
            if isinstance(result, Exception):
                raise result
            self.finished.append(name)
            return result
        except asyncio.CancelledError:
            self.cancelled.append(name)
            raise
        finally:
            self.in_flight[host] -= 1


def gaps(times: list[float]) -> list[float]:
    return [round(b - a, 6) for a, b in itertools.pairwise(times)]


@pytest.fixture
def plain_structlog() -> Iterator[None]:
    """structlog's defaults for the test, so another test's configuration cannot filter."""
    old = structlog.get_config()
    structlog.reset_defaults()
    yield
    structlog.configure(**old)


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock at time zero."""
    return FakeClock()


@pytest.fixture
async def schedulers() -> AsyncIterator[list[Scheduler]]:
    """Collects schedulers and stops them (cancelling stuck polls) after the test."""
    made: list[Scheduler] = []
    yield made
    for sched in made:
        task = asyncio.create_task(sched.stop())
        await settle()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.fixture
def make(clock: FakeClock, schedulers: list[Scheduler]) -> Any:
    """Build a scheduler on the fake clock, jitter off and a seeded rng unless told otherwise."""

    def build(poller: Poller, **kwargs: Any) -> Scheduler:
        kwargs.setdefault("clock", clock)
        kwargs.setdefault("rng", random.Random(7))
        kwargs.setdefault("jitter", 0.0)
        sched = Scheduler(poller, **kwargs)
        schedulers.append(sched)
        return sched

    return build


# ------------------------------------------------------------ delay_after


def test_ok_delay_stays_within_jitter_bounds() -> None:
    """Over many seeded draws the delay after success lies in [interval, 1.1 * interval]."""
    rng = random.Random(1234)
    job = Job("a", "h", 600.0)
    delays = [Scheduler.delay_after(job, OK, 0, rng) for _ in range(5000)]
    assert all(600.0 <= d <= 660.0 for d in delays)
    # The jitter really spreads: both ends of the range are reached.
    assert min(delays) < 601.0
    assert max(delays) > 659.0


def test_backoff_doubles_and_caps_at_one_hour() -> None:
    """Each consecutive failure doubles the delay from the interval up to the 1 h cap."""
    rng = random.Random(0)
    job = Job("a", "h", 300.0)
    delays = [Scheduler.delay_after(job, BUSY, n, rng, jitter=0.0) for n in range(1, 7)]
    assert delays == [600.0, 1200.0, 2400.0, 3600.0, 3600.0, 3600.0]
    failed = PollReport(Outcome.FAILED)
    assert Scheduler.delay_after(job, failed, 2, rng, jitter=0.0) == 1200.0
    # Enormous failure counts neither overflow nor pass the cap.
    assert Scheduler.delay_after(job, BUSY, 10_000, rng, jitter=0.0) == 3600.0


def test_success_resets_backoff() -> None:
    """After OK the delay is the plain interval whatever the earlier failures."""
    job = Job("a", "h", 300.0)
    assert Scheduler.delay_after(job, OK, 0, random.Random(0), jitter=0.0) == 300.0


def test_capped_backoff_keeps_its_jitter() -> None:
    """At the cap the jitter still spreads delays across [3600, 3960] seconds."""
    rng = random.Random(99)
    job = Job("a", "h", 300.0)
    delays = [Scheduler.delay_after(job, BUSY, 9, rng) for _ in range(2000)]
    assert all(3600.0 <= d <= 3960.0 for d in delays)
    assert max(delays) - min(delays) > 300.0


def test_login_delay_above_interval_is_the_minimum() -> None:
    """A LOGIN-DELAY longer than the interval becomes the delay after success."""
    job = Job("a", "h", 60.0)
    report = PollReport(Outcome.OK, login_delay=300.0)
    assert Scheduler.delay_after(job, report, 0, random.Random(0), jitter=0.0) == 300.0
    delays = [Scheduler.delay_after(job, report, 0, random.Random(s)) for s in range(200)]
    assert all(300.0 <= d <= 330.0 for d in delays)


def test_needs_person_waits_for_the_cap() -> None:
    """NEEDS_PERSON is retried only at the cap, even on its first occurrence."""
    job = Job("a", "h", 300.0)
    delay = Scheduler.delay_after(job, NEEDS_PERSON, 1, random.Random(0), jitter=0.0)
    assert delay == 3600.0
    assert Scheduler.delay_after(job, NEEDS_PERSON, 1, random.Random(0), max_backoff=900.0) < 991


@given(
    interval=st.floats(min_value=1.0, max_value=86_400.0),
    failures=st.integers(min_value=0, max_value=500),
    outcome=st.sampled_from(list(Outcome)),
    login_delay=st.none() | st.floats(min_value=0.0, max_value=86_400.0),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_delay_is_bounded_for_any_input(
    interval: float, failures: int, outcome: Outcome, login_delay: float | None, seed: int
) -> None:
    """Every delay lies between its floor (interval, LOGIN-DELAY) and 1.1 x its cap."""
    report = PollReport(outcome, login_delay=login_delay)
    job = Job("a", "h", interval)
    delay = Scheduler.delay_after(job, report, failures, random.Random(seed))
    floor = max(interval, login_delay or 0.0)
    ceiling = max(interval, 3600.0, login_delay or 0.0) * 1.1
    assert floor <= delay <= ceiling


def test_turns_that_pass_while_polling_are_skipped() -> None:
    """A poll longer than the delay moves the next turn to the first one after it ended."""
    assert Scheduler.next_due_after(0.0, 10.0, 100.0, None) == 100.0
    assert Scheduler.next_due_after(0.0, 250.0, 100.0, None) == 300.0
    assert Scheduler.next_due_after(0.0, 300.0, 100.0, None) == 400.0
    # LOGIN-DELAY counts from the end of the poll, where the login surely was.
    assert Scheduler.next_due_after(0.0, 50.0, 300.0, 300.0) == 350.0


def test_jobs_are_validated() -> None:
    """A job without a name or with a non-positive interval is refused."""
    with pytest.raises(ValueError, match="interval"):
        Job("a", "h", 0.0)
    with pytest.raises(ValueError, match="interval"):
        Job("a", "h", float("nan"))
    with pytest.raises(ValueError, match="name"):
        Job("", "h", 60.0)


# ------------------------------------------------------- running scheduler


async def test_polls_every_interval(clock: FakeClock, make: Any) -> None:
    """With jitter off an account is polled at start and then exactly every interval."""
    poller = Poller(clock)
    sched = make(poller)
    sched.set_jobs([Job("a", "h", 100.0)])
    await sched.start()
    await clock.advance(350.0)
    assert poller.times("a") == [0.0, 100.0, 200.0, 300.0]
    assert sched.next_poll("a") == 400.0
    state = sched.state("a")
    assert state is not None
    assert state.last_outcome is Outcome.OK
    assert not state.polling


async def test_jittered_intervals_stay_in_bounds(clock: FakeClock, make: Any) -> None:
    """With the default jitter every gap lies in [interval, 1.1 * interval] and gaps differ."""
    poller = Poller(clock)
    sched = make(poller, jitter=0.10, rng=random.Random(5))
    sched.set_jobs([Job("a", "h", 100.0)])
    await sched.start()
    await clock.advance(5000.0)
    found = gaps(poller.times("a"))
    assert len(found) > 40
    assert all(100.0 <= g <= 110.0 for g in found)
    assert len(set(found)) > 30


async def test_first_polls_are_spread(clock: FakeClock, make: Any) -> None:
    """Many accounts make their first poll within 5 s of start, not all at the same instant."""
    poller = Poller(clock)
    sched = make(poller, jitter=0.10, rng=random.Random(3))
    sched.set_jobs([Job(f"acct{i}", "h", 600.0) for i in range(100)])
    await sched.start()
    await clock.advance(5.0)
    firsts = [t for _, t in poller.calls]
    assert len(firsts) == 100
    assert all(0.0 <= t <= 5.0 for t in firsts)
    assert len(set(firsts)) > 90


def watch_launches(total: int) -> list[int]:
    """How many tasks of accounts named acct* exist at each loop iteration, until ``total``.

    Call it just before the launches: the count starts at the next iteration.
    """
    loop = asyncio.get_running_loop()
    seen: list[int] = []

    def probe() -> None:
        tasks = asyncio.all_tasks(loop)
        seen.append(sum(1 for t in tasks if t.get_name().startswith("gpopd-account-acct")))
        if seen[-1] < total:
            loop.call_soon(probe)

    loop.call_soon(probe)
    return seen


async def test_start_lets_the_loop_run_between_batches_of_launches(
    clock: FakeClock, make: Any
) -> None:
    """start() launches account tasks a batch at a time, the event loop running between.

    Launched all at once, 1,000 tasks took their first steps in one loop
    iteration (146-182 ms in bench/scale.py) while no timer or socket was served.
    """
    total = 3 * LAUNCH_BATCH + 5
    poller = Poller(clock)
    sched = make(poller)
    sched.set_jobs([Job(f"acct{i}", "h", 600.0) for i in range(total)])
    seen = watch_launches(total)
    await sched.start()
    await settle()
    launched_per_iteration = [b - a for a, b in itertools.pairwise([0, *seen])]
    assert seen[-1] == total
    assert max(launched_per_iteration) <= LAUNCH_BATCH, launched_per_iteration
    await clock.advance(1.0)
    assert sorted(poller.finished) == sorted(f"acct{i}" for i in range(total))


async def test_accounts_added_by_a_reload_are_launched_in_batches(
    clock: FakeClock, make: Any
) -> None:
    """A reload that adds many accounts starts them a batch per loop iteration too."""
    total = 3 * LAUNCH_BATCH + 5
    poller = Poller(clock)
    sched = make(poller)
    sched.set_jobs([Job("first", "h", 600.0)])
    await sched.start()
    await settle()
    seen = watch_launches(total)
    sched.set_jobs([Job("first", "h", 600.0)] + [Job(f"acct{i}", "h", 600.0) for i in range(total)])
    await settle()
    launched_per_iteration = [b - a for a, b in itertools.pairwise([0, *seen])]
    assert seen[-1] == total
    assert max(launched_per_iteration) <= LAUNCH_BATCH, launched_per_iteration
    await clock.advance(1.0)
    assert sorted(poller.finished) == sorted(["first", *(f"acct{i}" for i in range(total))])


async def test_stop_during_start_launches_no_more(clock: FakeClock, make: Any) -> None:
    """A stop() that comes between two batches of start() ends the launching."""
    poller = Poller(clock)
    sched = make(poller, jitter=0.10)
    sched.set_jobs([Job(f"acct{i}", "h", 600.0) for i in range(3 * LAUNCH_BATCH)])
    starting = asyncio.create_task(sched.start())
    await asyncio.sleep(0)  # start() ran: one batch launched, the rest not yet
    await sched.stop()
    await starting
    launched = [t for t in asyncio.all_tasks() if t.get_name().startswith("gpopd-account-")]
    assert launched == []
    await clock.advance(10.0)
    assert poller.calls == []


async def test_accounts_removed_during_start_are_not_launched(clock: FakeClock, make: Any) -> None:
    """A reload between two batches of start() that drops accounts: they are never polled."""
    poller = Poller(clock)
    sched = make(poller, jitter=0.10)
    names = [f"acct{i}" for i in range(3 * LAUNCH_BATCH)]
    sched.set_jobs([Job(name, "h", 600.0) for name in names])
    starting = asyncio.create_task(sched.start())
    await asyncio.sleep(0)  # start() ran: one batch launched, the rest not yet
    kept = names[: 2 * LAUNCH_BATCH]
    sched.set_jobs([Job(name, "h", 600.0) for name in kept])
    await starting
    await clock.advance(10.0)
    assert sorted(poller.finished) == sorted(kept)


@pytest.mark.usefixtures("plain_structlog")
async def test_backoff_grows_then_resets_after_success(clock: FakeClock, make: Any) -> None:
    """Failures double the gap up to the cap; one success brings back the plain interval."""
    poller = Poller(clock)
    poller.scripts["a"] = [BUSY, BUSY, PollReport(Outcome.FAILED), BUSY, BUSY, OK]
    sched = make(poller, max_backoff=1000.0)
    sched.set_jobs([Job("a", "h", 100.0)])
    await sched.start()
    with capture_logs() as logs:
        await clock.advance(3700.0)
    assert gaps(poller.times("a")) == [200.0, 400.0, 800.0, 1000.0, 1000.0, 100.0, 100.0, 100.0]
    backing = [e for e in logs if e["event"] == "backing off"]
    assert [(e["seconds"], e["failures"]) for e in backing] == [
        (200.0, 1),
        (400.0, 2),
        (800.0, 3),
        (1000.0, 4),
        (1000.0, 5),
    ]
    assert all(e["log_level"] == "info" for e in backing)
    assert any(e["event"] == "recovered" and e["failures"] == 5 for e in logs)
    state = sched.state("a")
    assert state is not None
    assert state.consecutive_failures == 0


async def test_backoff_caps_at_one_hour_by_default(clock: FakeClock, make: Any) -> None:
    """Endless failures settle at one poll per hour."""
    poller = Poller(clock)
    poller.scripts["a"] = [BUSY] * 20
    sched = make(poller)
    sched.set_jobs([Job("a", "h", 300.0)])
    await sched.start()
    await clock.advance(6 * 3600.0)
    assert gaps(poller.times("a")) == [600.0, 1200.0, 2400.0, 3600.0, 3600.0, 3600.0, 3600.0]
    state = sched.state("a")
    assert state is not None
    assert state.consecutive_failures == 8


async def test_login_delay_is_kept_as_the_floor(clock: FakeClock, make: Any) -> None:
    """A server's LOGIN-DELAY stays the minimum gap, also after reports that carry none."""
    poller = Poller(clock)
    poller.scripts["a"] = [
        PollReport(Outcome.OK, login_delay=300.0),
        PollReport(Outcome.BUSY, detail="connection reset"),
        OK,
    ]
    sched = make(poller)
    sched.set_jobs([Job("a", "h", 60.0)])
    await sched.start()
    await clock.advance(800.0)
    # OK(300) -> 300; BUSY keeps the remembered 300 over its 120 s backoff;
    # an OK whose CAPA has no LOGIN-DELAY drops it again.
    assert gaps(poller.times("a"))[:4] == [300.0, 300.0, 60.0, 60.0]


async def test_login_delay_counts_from_the_end_of_a_long_poll(clock: FakeClock, make: Any) -> None:
    """When a poll outlasts its turn the next login still waits LOGIN-DELAY after it ended."""
    poller = Poller(clock)
    poller.scripts["a"] = [PollReport(Outcome.OK, login_delay=300.0)]
    gate = poller.gates["a"] = asyncio.Event()
    sched = make(poller)
    sched.set_jobs([Job("a", "h", 60.0)])
    await sched.start()
    await clock.advance(100.0)
    gate.set()
    await settle()
    del poller.gates["a"]
    assert sched.next_poll("a") == 400.0
    await clock.advance(300.0)
    assert poller.times("a") == [0.0, 400.0]


@pytest.mark.usefixtures("plain_structlog")
async def test_needs_person_logged_once_and_retried_at_cap(clock: FakeClock, make: Any) -> None:
    """An account that needs a person logs one error until a success, retrying hourly."""
    poller = Poller(clock)
    poller.scripts["a"] = [NEEDS_PERSON, NEEDS_PERSON, BUSY, NEEDS_PERSON, OK, NEEDS_PERSON]
    sched = make(poller)
    sched.set_jobs([Job("a", "h", 300.0)])
    await sched.start()
    with capture_logs() as logs:
        await clock.advance(5 * 3600.0 + 400.0)
    times = poller.times("a")
    # NP, NP -> cap; BUSY (3rd failure) -> 2400; NP -> cap; OK -> 300.
    assert gaps(times)[:5] == [3600.0, 3600.0, 2400.0, 3600.0, 300.0]
    errors = [e for e in logs if e["log_level"] == "error"]
    assert [e["event"] for e in errors] == ["needs a person", "needs a person"]
    assert errors[0]["detail"] == NEEDS_PERSON.detail
    assert errors[0]["seconds"] == 3600.0
    assert sum(e["event"] == "still needs a person" for e in logs) == 2


@pytest.mark.usefixtures("plain_structlog")
async def test_log_lines_carry_the_account(clock: FakeClock, make: Any) -> None:
    """Scheduler log lines are bound to the account through contextvars."""
    cap = LogCapture()
    structlog.configure(processors=[structlog.contextvars.merge_contextvars, cap])
    poller = Poller(clock)
    poller.scripts["alice"] = [NEEDS_PERSON]
    sched = make(poller)
    sched.set_jobs([Job("alice", "h", 300.0)])
    await sched.start()
    await clock.advance(1.0)
    assert [(e["event"], e.get("account")) for e in cap.entries] == [("needs a person", "alice")]


async def test_per_host_limit(clock: FakeClock, make: Any) -> None:
    """No more than max_sessions_per_host sessions run against one host at a time."""
    names = [f"u{i}" for i in range(10)]
    poller = Poller(clock, hosts=dict.fromkeys(names, "pop.example"))
    gate = poller.gates["*"] = asyncio.Event()
    sched = make(poller, max_sessions_per_host=3)
    sched.set_jobs([Job(n, "pop.example", 100.0) for n in names])
    await sched.start()
    await clock.advance(5.0)
    assert poller.in_flight["pop.example"] == 3
    assert all(s is not None and s.polling for s in map(sched.state, names))
    gate.set()
    await settle()
    assert poller.max_per_host["pop.example"] == 3
    assert sorted(poller.finished) == sorted(names)
    assert sched.idle()


async def test_host_limit_ignores_case(clock: FakeClock, make: Any) -> None:
    """Host names that differ only in case share one per-host limit."""
    poller = Poller(clock)
    poller.gates["*"] = asyncio.Event()
    sched = make(poller, max_sessions_per_host=1)
    sched.set_jobs([Job("a", "POP.example", 100.0), Job("b", "pop.EXAMPLE", 100.0)])
    await sched.start()
    await clock.advance(5.0)
    assert len(poller.calls) == 1


async def test_global_limit(clock: FakeClock, make: Any) -> None:
    """No more than max_sessions sessions run at once across all hosts."""
    names = [f"u{i}" for i in range(12)]
    poller = Poller(clock, hosts={n: f"host{n}" for n in names})
    gate = poller.gates["*"] = asyncio.Event()
    sched = make(poller, max_sessions=4)
    sched.set_jobs([Job(n, f"host{n}", 100.0) for n in names])
    await sched.start()
    await clock.advance(5.0)
    assert poller.in_flight.total() == 4
    gate.set()
    await settle()
    assert poller.max_in_flight == 4
    assert len(poller.finished) == 12


async def test_crowded_host_leaves_global_slots_to_others(clock: FakeClock, make: Any) -> None:
    """Accounts queued on a full host do not hold global slots that another host could use."""
    crowd = [f"c{i}" for i in range(6)]
    poller = Poller(clock)
    for name in crowd:
        poller.gates[name] = asyncio.Event()
    sched = make(poller, max_sessions=3, max_sessions_per_host=2)
    sched.set_jobs([*(Job(n, "busy.example", 100.0) for n in crowd), Job("x", "other", 100.0)])
    await sched.start()
    await clock.advance(1000.0)
    assert sum(poller.count(n) for n in crowd) == 2
    assert poller.count("x") == 11


async def test_stuck_account_does_not_delay_others(clock: FakeClock, make: Any) -> None:
    """A poll that never returns leaves other accounts on its host on schedule; health drops."""
    poller = Poller(clock)
    poller.gates["stuck"] = asyncio.Event()
    sched = make(poller, stuck_after=500.0)
    sched.set_jobs([Job("stuck", "h", 100.0), *(Job(f"ok{i}", "h", 100.0) for i in range(3))])
    await sched.start()
    await clock.advance(400.0)
    assert sched.healthy()
    await clock.advance(600.0)
    assert poller.count("stuck") == 1
    assert [poller.count(f"ok{i}") for i in range(3)] == [11, 11, 11]
    assert not sched.healthy()
    assert sched.healthy(now=450.0)
    state = sched.state("stuck")
    assert state is not None
    assert state.polling
    assert state.poll_started == 0.0


async def test_no_second_poll_while_polling(clock: FakeClock, make: Any) -> None:
    """Turns and poll-now requests during a running poll are skipped, not queued."""
    poller = Poller(clock)
    gate = poller.gates["a"] = asyncio.Event()
    sched = make(poller)
    sched.set_jobs([Job("a", "h", 100.0)])
    await sched.start()
    await clock.advance(350.0)
    sched.poll_all_now()
    await clock.advance(0.0)
    assert poller.count("a") == 1
    assert sched.next_poll("a") is None
    assert not sched.idle()
    gate.set()
    await settle()
    del poller.gates["a"]
    assert sched.next_poll("a") == 400.0
    await clock.advance(49.0)
    assert poller.count("a") == 1
    await clock.advance(1.0)
    assert poller.times("a") == [0.0, 400.0]


async def test_poll_all_now(clock: FakeClock, make: Any) -> None:
    """poll_all_now polls every waiting account at once, including backed-off ones."""
    poller = Poller(clock)
    poller.scripts["c"] = [BUSY]
    sched = make(poller)
    sched.set_jobs([Job(n, "h", 1000.0) for n in "abc"])
    await sched.start()
    await clock.advance(10.0)
    assert sched.next_poll("c") == 2000.0
    sched.poll_all_now()
    await clock.advance(0.0)
    assert [poller.times(n) for n in "abc"] == [[0.0, 10.0]] * 3
    assert sched.next_poll("a") == 1010.0


async def test_set_jobs_adds_removes_and_changes(clock: FakeClock, make: Any) -> None:
    """New jobs are polled soon, removed ones never again, changed ones on the new interval."""
    poller = Poller(clock)
    sched = make(poller)
    sched.set_jobs([Job("a", "h", 100.0)])
    await sched.start()
    await clock.advance(50.0)
    sched.set_jobs([Job("a", "h", 100.0), Job("b", "h", 100.0)])
    await clock.advance(10.0)
    assert poller.times("b") == [50.0]
    sched.set_jobs([Job("b", "h", 300.0)])
    await clock.advance(0.0)
    assert sched.state("a") is None
    assert sched.next_poll("b") == 350.0
    await clock.advance(1000.0)
    assert poller.times("a") == [0.0]
    assert poller.times("b") == [50.0, 350.0, 650.0, 950.0]


async def test_set_jobs_rejects_duplicates_without_changing_anything(
    clock: FakeClock, make: Any
) -> None:
    """A job list with a repeated name is refused and the running jobs stay as they were."""
    poller = Poller(clock)
    sched = make(poller)
    sched.set_jobs([Job("a", "h", 100.0)])
    await sched.start()
    with pytest.raises(ValueError, match="duplicate"):
        sched.set_jobs([Job("b", "h", 100.0), Job("b", "h", 200.0)])
    await clock.advance(150.0)
    assert poller.times("a") == [0.0, 100.0]
    assert sched.state("b") is None


async def test_removed_while_polling_finishes_then_stops(clock: FakeClock, make: Any) -> None:
    """An account removed mid-poll completes that poll and is never polled again."""
    poller = Poller(clock)
    gate = poller.gates["a"] = asyncio.Event()
    sched = make(poller)
    sched.set_jobs([Job("a", "h", 100.0)])
    await sched.start()
    await clock.advance(10.0)
    sched.set_jobs([])
    state = sched.state("a")
    assert state is not None
    assert state.polling
    gate.set()
    await clock.advance(1000.0)
    assert poller.finished == ["a"]
    assert poller.cancelled == []
    assert poller.count("a") == 1
    assert sched.state("a") is None


async def test_readded_while_polling_keeps_one_task(clock: FakeClock, make: Any) -> None:
    """Removing and re-adding an account mid-poll never runs two polls of it at once."""
    poller = Poller(clock)
    gate = poller.gates["a"] = asyncio.Event()
    sched = make(poller)
    sched.set_jobs([Job("a", "h", 100.0)])
    await sched.start()
    await clock.advance(10.0)
    sched.set_jobs([])
    sched.set_jobs([Job("a", "h", 200.0)])
    await clock.advance(10.0)
    assert poller.count("a") == 1
    gate.set()
    await settle()
    del poller.gates["a"]
    await clock.advance(400.0)
    assert poller.times("a") == [0.0, 200.0, 400.0]


async def test_changed_host_frees_a_queued_account(clock: FakeClock, make: Any) -> None:
    """An account queued behind a stuck host polls at once when moved to another host."""
    poller = Poller(clock)
    poller.gates["stuck"] = asyncio.Event()
    sched = make(poller, max_sessions_per_host=1)
    sched.set_jobs([Job("stuck", "old", 100.0), Job("mover", "old", 100.0)])
    await sched.start()
    await clock.advance(10.0)
    assert poller.count("mover") == 0
    sched.set_jobs([Job("stuck", "old", 100.0), Job("mover", "new", 100.0)])
    await clock.advance(0.0)
    assert poller.times("mover") == [10.0]
    state = sched.state("mover")
    assert state is not None
    assert state.host == "new"
    await clock.advance(100.0)
    assert poller.times("mover") == [10.0, 110.0]


@pytest.mark.usefixtures("plain_structlog")
async def test_failing_poll_function_is_contained(clock: FakeClock, make: Any) -> None:
    """A poll function that raises counts as FAILED and the account keeps its schedule."""
    poller = Poller(clock)
    poller.scripts["a"] = [RuntimeError("boom")]
    sched = make(poller)
    sched.set_jobs([Job("a", "h", 100.0), Job("b", "h", 100.0)])
    await sched.start()
    with capture_logs() as logs:
        await clock.advance(250.0)
    state = sched.state("a")
    assert state is not None
    assert state.last_outcome is Outcome.OK
    assert poller.times("a") == [0.0, 200.0]
    assert poller.times("b") == [0.0, 100.0, 200.0]
    assert any(e["event"] == "poll raised" and e["log_level"] == "error" for e in logs)
    assert sched.healthy()


async def test_stop_cancels_waits_at_once(clock: FakeClock, make: Any) -> None:
    """stop() returns without the clock moving when every account is only waiting."""
    poller = Poller(clock)
    sched = make(poller)
    sched.set_jobs([Job(n, "h", 1000.0) for n in "abc"])
    await sched.start()
    await clock.advance(1.0)
    assert clock.sleepers() == 3
    stopping = asyncio.create_task(sched.stop())
    await settle()
    assert stopping.done()
    assert clock.sleepers() == 0
    await clock.advance(5000.0)
    assert len(poller.calls) == 3


async def test_stop_lets_running_polls_finish(clock: FakeClock, make: Any) -> None:
    """stop() waits for a running poll to complete instead of cutting it off."""
    poller = Poller(clock)
    gate = poller.gates["a"] = asyncio.Event()
    sched = make(poller)
    sched.set_jobs([Job("a", "h", 100.0), Job("b", "h", 100.0)])
    await sched.start()
    await clock.advance(1.0)
    stopping = asyncio.create_task(sched.stop())
    await settle()
    assert not stopping.done()
    gate.set()
    await settle()
    assert stopping.done()
    assert poller.finished.count("a") == 1
    assert poller.cancelled == []
    await clock.advance(1000.0)
    assert poller.count("a") == 1


async def test_cancelling_stop_cancels_running_polls(clock: FakeClock, make: Any) -> None:
    """When the caller's deadline cancels stop(), running polls are cancelled and unwound."""
    poller = Poller(clock)
    poller.gates["a"] = asyncio.Event()
    sched = make(poller)
    sched.set_jobs([Job("a", "h", 100.0)])
    await sched.start()
    await clock.advance(1.0)
    stopping = asyncio.create_task(sched.stop())
    await settle()
    stopping.cancel()
    await asyncio.gather(stopping, return_exceptions=True)
    assert stopping.cancelled()
    assert poller.cancelled == ["a"]
    assert sched.idle()
    assert sched.healthy()


async def test_wait_idle_returns_when_polls_end(clock: FakeClock, make: Any) -> None:
    """wait_idle() blocks while a poll runs and returns once it has ended."""
    poller = Poller(clock)
    gate = poller.gates["a"] = asyncio.Event()
    sched = make(poller)
    sched.set_jobs([Job("a", "h", 100.0)])
    await sched.start()
    await clock.advance(1.0)
    waiting = asyncio.create_task(sched.wait_idle())
    await settle()
    assert not waiting.done()
    gate.set()
    await settle()
    assert waiting.done()
    assert sched.idle()


async def test_next_poll_and_state_before_start(make: Any) -> None:
    """Before start() jobs are known but have no deadline; unknown names give None."""
    sched = make(Poller())
    sched.set_jobs([Job("a", "h", 100.0)])
    assert sched.next_poll("a") is None
    state = sched.state("a")
    assert state is not None
    assert state.last_outcome is None
    assert sched.state("nobody") is None
    assert sched.next_poll("nobody") is None


async def test_real_clock_wakes_on_deadline_and_on_event() -> None:
    """RealClock.sleep_until returns at its deadline, and early when the event is set."""
    clock = RealClock()
    wake = asyncio.Event()
    deadline = clock.monotonic() + 0.005
    await asyncio.wait_for(clock.sleep_until(deadline, wake), 5.0)
    # The loop may wake up to its clock resolution early; the scheduler re-checks.
    assert clock.monotonic() >= deadline - 0.002
    asyncio.get_running_loop().call_soon(wake.set)
    start = clock.monotonic()
    await asyncio.wait_for(clock.sleep_until(start + 60.0, wake), 5.0)
    assert clock.monotonic() - start < 5.0


async def test_scheduler_runs_on_the_real_clock(schedulers: list[Scheduler]) -> None:
    """With the default clock a tiny interval yields repeated polls within milliseconds."""
    done = asyncio.Event()
    count = 0

    async def poll(name: str) -> PollReport:
        nonlocal count
        count += 1
        if count == 3:
            done.set()
        return OK

    sched = Scheduler(poll, jitter=0.0)
    schedulers.append(sched)
    sched.set_jobs([Job("a", "h", 0.002)])
    await sched.start()
    await asyncio.wait_for(done.wait(), 5.0)
    await sched.stop()
    assert count >= 3
