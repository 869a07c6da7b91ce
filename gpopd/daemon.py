"""``gpopd run``: the long-running service.

Wiring only: configuration, the state store, the scheduler, signals and
sd_notify.  Signals are handled inside the event loop
(``loop.add_signal_handler``), so a handler never interrupts a commit:

* SIGTERM/SIGINT: ``STOPPING=1``, no new polls; running polls get
  ``STOP_GRACE`` seconds to finish, then are cancelled.  A cancelled poll
  drops its connection without QUIT (the server deletes nothing) and still
  commits every message it had received whole, so nothing is lost or half
  delivered.  A second signal exits at once; the state on disk is
  crash-safe at every instant.
* SIGHUP: re-read and validate the configuration (``RELOADING=1``); apply it
  if valid, otherwise log every problem and keep running on the old one;
  reopen the log file; ``READY=1``.
* SIGUSR1: poll every account now.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import os
import signal
import time
from collections.abc import Callable, Collection, Coroutine, Mapping
from pathlib import Path

import structlog

from gpopd import __version__, logs, pop3
from gpopd.config import Settings, load_config
from gpopd.errors import (
    EX_OK,
    EX_SOFTWARE,
    AuthError,
    ConfigError,
    MailboxBusyError,
    RateLimitedError,
    ServerError,
    StoreError,
    TlsError,
    TransportError,
)
from gpopd.fetch import (
    BEARER_METHODS,
    PollResult,
    StoreWorker,
    TokenSource,
    poll_account,
    token_manager,
)
from gpopd.scheduler import Job, Outcome, PollReport, Scheduler
from gpopd.sdnotify import Notifier
from gpopd.session import TraceHook
from gpopd.store import Store

# Must stay below the unit's TimeoutStopSec (30 s) so systemd never has to
# SIGKILL a clean shutdown.
STOP_GRACE = 20.0
# How often the daemon tells the state database it is alive (gpopd status
# calls a daemon silent for much longer "not responding").
HEARTBEAT_INTERVAL = 30.0

log = structlog.get_logger("gpopd.daemon")


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_malloc_trim = _load_malloc_trim()


def _trim_heap() -> None:
    """Give the C heap's free pages back to the kernel after a poll.

    Each poll allocates and frees TLS buffers, SQLite pages and sockets in C;
    glibc keeps the freed pages, scattered, so a daemon's RSS crept up over
    hours while the Python heap stayed flat.
    """
    if _malloc_trim is not None:
        _malloc_trim(0)


def _freeze_long_lived() -> None:
    """Collect garbage, then exempt what is left from every later collection.

    Called once the configuration is loaded and the scheduler set up, and
    after each reload (the imports are frozen before the first load, without
    a collection, which would walk them all): modules, classes and the
    configuration live as long as the daemon (or until the next reload),
    yet each full collection walked all of them.  With 1,000 accounts
    (bench/scale.py, two runs each) a round had two or three full
    collections of 60-132 ms, the event loop standing still meanwhile;
    frozen, one during the configuration load (71-87 ms, before any poll)
    and at most one more (61 ms).  Collecting first keeps garbage (a load
    leaves about 100 objects in cycles) out of the frozen set, where it
    could never be freed.  A frozen object is still freed when its last
    reference goes, as the previous configuration is after a reload.
    """
    gc.collect()
    gc.freeze()


def report_for(result: PollResult) -> PollReport:
    """Translate a poll's result into what the scheduler needs to know."""
    error = result.error
    detail = str(error) if error is not None else ""
    if result.ok:
        outcome = Outcome.OK
    elif isinstance(error, AuthError | TlsError) or (
        isinstance(error, ServerError) and (error.code or "").upper().startswith("SYS/PERM")
    ):
        # Bad credentials, a disabled mailbox or a certificate that does not
        # verify: retrying quickly cannot help.
        outcome = Outcome.NEEDS_PERSON
    elif isinstance(error, MailboxBusyError | TransportError | pop3.ProtocolError):
        outcome = Outcome.BUSY
    else:
        outcome = Outcome.FAILED
    delay = result.login_delay
    if isinstance(error, RateLimitedError):
        # Gmail's "exceeded POP command or bandwidth limits": an hour at least.
        delay = max(delay or 0.0, error.retry_after)
    return PollReport(outcome, login_delay=delay, detail=detail)


def jobs_for(settings: Settings) -> list[Job]:
    return [Job(acc.name, acc.host, acc.poll_interval) for acc in settings.accounts.values()]


class Daemon:
    def __init__(
        self,
        config_path: Path,
        environ: Mapping[str, str],
        *,
        notifier: Notifier | None = None,
        trace: TraceHook | None = None,
        once: bool = False,
        configure_logs: Callable[[Settings], None] | None = None,
    ) -> None:
        self.config_path = config_path
        self.environ = environ
        self.notifier = notifier if notifier is not None else Notifier(environ)
        self.trace = trace
        self.once = once
        self.configure_logs = configure_logs
        self.settings: Settings | None = None
        self.results: dict[str, PollResult] = {}
        self._db: StoreWorker | None = None
        self._tokens: TokenSource | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._scheduler: Scheduler | None = None
        self._stop = asyncio.Event()
        self._signals = 0
        self._tasks: set[asyncio.Task[object]] = set()
        self.started = time.time()

    # ------------------------------------------------------------------ run
    async def run(self) -> int:
        """Run until a stop signal (or, with ``once``, one poll of every account)."""
        gc.freeze()  # the imports; see _freeze_long_lived
        settings = await asyncio.to_thread(load_config, self.config_path, environ=self.environ)
        if self.configure_logs is not None:
            self.configure_logs(settings)
        self.settings = settings
        self._db = StoreWorker(Store(settings.state_dir))
        await self._db.call(self._db.store.daemon_started, os.getpid(), time.time(), __version__)
        self._start_token_refresh(settings)
        scheduler = Scheduler(
            self._poll,
            max_sessions=settings.max_sessions,
            max_sessions_per_host=settings.max_sessions_per_host,
        )
        self._scheduler = scheduler
        scheduler.set_jobs(jobs_for(settings))
        _freeze_long_lived()
        loop = asyncio.get_running_loop()
        self._install_signals(loop)
        try:
            await scheduler.start()
            self.notifier.ready(self._status_line())
            log.info(
                "gpopd started",
                version=__version__,
                accounts=len(settings.accounts),
                config=str(self.config_path),
                pid=os.getpid(),
            )
            if self.notifier.watchdog_interval:
                self._spawn(self._watchdog(self.notifier.watchdog_interval))
            self._spawn(self._heartbeat())
            await self._stop.wait()
            self.notifier.stopping()
            log.info("stopping", grace_seconds=STOP_GRACE)
            try:
                await asyncio.wait_for(scheduler.stop(), STOP_GRACE)
            except TimeoutError:
                log.warning("polls still running at the end of the grace period were cancelled")
        finally:
            self._remove_signals(loop)
            for task in list(self._tasks):
                task.cancel()
            with contextlib.suppress(StoreError):
                await self._db.call(self._db.store.daemon_stopped, os.getpid())
            await self._db.close()
        log.info("gpopd stopped")
        return EX_OK

    def _start_token_refresh(self, settings: Settings) -> None:
        """Keep OAuth2 access tokens fresh ahead of expiry, in the background."""
        if self._refresher is not None:
            self._refresher.cancel()
            self._refresher = None
        accounts = [a for a in settings.accounts.values() if a.auth in BEARER_METHODS]
        if not accounts:
            return
        if self._tokens is None:
            self._tokens = token_manager(settings.state_dir, self.environ)
        self._refresher = asyncio.create_task(self._tokens.run_background(accounts))
        self._tasks.add(self._refresher)
        self._refresher.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------- polling
    async def _poll(self, name: str) -> PollReport:
        settings, db = self.settings, self._db
        if settings is None or db is None:
            raise RuntimeError("poll before the daemon started")
        account = settings.accounts.get(name)
        if account is None:  # removed by a reload while it waited for a slot
            return PollReport(Outcome.OK)
        result = await poll_account(
            account, db, settings.state_dir, trace=self.trace, tokens=self._tokens
        )
        self.results[name] = result
        _trim_heap()
        # The scheduler decides the next turn right after this returns.
        asyncio.get_running_loop().call_soon(self._spawn, self._save_schedule([name]))
        self.notifier.status(self._status_line())
        if self.once and set(self.results) >= set(settings.accounts):
            self._stop.set()
        return report_for(result)

    def _status_line(self) -> str:
        settings = self.settings
        total = len(settings.accounts) if settings else 0
        failing = sum(1 for r in self.results.values() if not r.ok)
        delivered = sum(r.delivered for r in self.results.values())
        return (
            f"{total} account(s); {len(self.results)} polled, {failing} failing; "
            f"last polls delivered {delivered} message(s)"
        )

    async def _save_schedule(self, names: Collection[str]) -> None:
        scheduler, db = self._scheduler, self._db
        if scheduler is None or db is None:
            return
        now_wall, now_mono = time.time(), time.monotonic()
        rows = []
        for name in names:
            state = scheduler.state(name)
            if state is None:
                continue
            due = None if state.next_due is None else now_wall + (state.next_due - now_mono)
            rows.append((name, due, state.interval, state.consecutive_failures))
        try:
            await db.call(db.store.set_schedules, rows)  # one transaction for all
        except StoreError as exc:
            log.warning("could not record the schedule", error=str(exc))

    async def _heartbeat(self) -> None:
        # Each account's schedule is saved after its polls; here only once at
        # start, so that an idle daemon costs one small commit per interval.
        if self.settings is not None:
            await self._save_schedule(list(self.settings.accounts))
        while True:
            db = self._db
            if db is not None:
                try:
                    await db.call(db.store.daemon_heartbeat, time.time())
                except StoreError as exc:
                    log.warning("could not record the heartbeat", error=str(exc))
            await asyncio.sleep(HEARTBEAT_INTERVAL)

    async def _watchdog(self, interval: float) -> None:
        # Runs on the event loop: a blocked loop stops the pings, and so does
        # a poll stuck past the scheduler's deadline.
        while True:
            await asyncio.sleep(interval)
            if self._scheduler is not None and self._scheduler.healthy():
                self.notifier.watchdog()

    # ------------------------------------------------------------- signals
    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_signal_handler(signal.SIGTERM, self._on_stop_signal, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self._on_stop_signal, "SIGINT")
        loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal)
        loop.add_signal_handler(signal.SIGUSR1, self._on_poll_now_signal)

    def _remove_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(sig)

    def _on_stop_signal(self, name: str) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second stop signal: exiting at once", signal=name)
            os._exit(EX_SOFTWARE)
        log.info("stop requested", signal=name)
        self._stop.set()

    def _on_reload_signal(self) -> None:
        self._spawn(self.reload())

    def _on_poll_now_signal(self) -> None:
        log.info("poll of every account requested (SIGUSR1)")
        if self._scheduler is not None:
            self._scheduler.poll_all_now()

    def _spawn(self, coro: Coroutine[object, object, object]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -------------------------------------------------------------- reload
    async def reload(self) -> bool:
        """Re-read the configuration; apply it only if it is valid."""
        self.notifier.reloading()
        log.info("reloading the configuration", config=str(self.config_path))
        logs.reopen_log_file()
        try:
            settings = await asyncio.to_thread(load_config, self.config_path, environ=self.environ)
        except ConfigError as exc:
            log.error(
                "configuration reload failed; still running on the previous configuration",
                problems=exc.problems,
            )
            self.notifier.ready(self._status_line())
            return False
        if self.configure_logs is not None:
            self.configure_logs(settings)
        old = self.settings
        if old is not None and settings.state_dir != old.state_dir:
            log.warning("state_dir changes take effect at the next restart")
            settings = settings.model_copy(update={"state_dir": old.state_dir})
        added = set(settings.accounts) - set(old.accounts if old else ())
        removed = set(old.accounts if old else ()) - set(settings.accounts)
        self.settings = settings
        for name in removed:
            self.results.pop(name, None)
        if self._scheduler is not None:
            self._scheduler.set_jobs(jobs_for(settings))
        _freeze_long_lived()
        self._start_token_refresh(settings)
        log.info(
            "configuration reloaded",
            accounts=len(settings.accounts),
            added=sorted(added),
            removed=sorted(removed),
        )
        self.notifier.ready(self._status_line())
        return True
