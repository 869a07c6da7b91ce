"""One daemon, many accounts: a full round of polls, event-loop lag and memory.

    python bench/scale.py [--accounts 1000] [--messages 2] [--sessions 64]

Starts a private Dovecot on 127.0.0.1 with one passwd-file user per account
(a few small messages each), then runs gpopd's daemon with every account in
one configuration, in a child process, until each account has been polled
once (``Daemon(once=True)``).  Inside the child, a ticker task wakes every
10 ms and records how late it was woken: the worst lateness is the longest
the event loop was kept from running its callbacks (on a loaded machine,
including the time the process waited for a CPU).  Every callback the loop
runs is timed, as asyncio's debug mode does with ``slow_callback_duration``
but without debug mode's other costs; the slowest are named in the report
(``--asyncio-debug`` turns on debug mode itself instead).  The child's peak
RSS is its own ``ru_maxrss``.

Targets: every account polled and every message delivered once, no
callback over 100 ms (maximum ticker lag under 100 ms), peak RSS bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TICK = 0.010
LAG_TARGET = 0.100
SLOW_CALLBACK = 0.100
ROUND_TIMEOUT = 900.0


class LagMeter:
    """How late a task that sleeps ``TICK`` at a time is woken."""

    def __init__(self) -> None:
        self.max_lag = 0.0
        self.over_target = 0
        self.ticks = 0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + TICK
            await asyncio.sleep(TICK)
            lag = loop.time() - due
            self.ticks += 1
            self.max_lag = max(self.max_lag, lag)
            if lag > LAG_TARGET:
                self.over_target += 1


def describe(handle: asyncio.Handle) -> str:
    """Name a callback without repr() of its arguments.

    repr(handle) renders the arguments, and a future's result among them: the
    wake-up after the daemon loaded its configuration rendered all 1,000
    accounts, 145 ms spent on the event loop by the measurement itself.
    """
    callback = getattr(handle, "_callback", None)
    while isinstance(callback, functools.partial):
        callback = callback.func
    owner = getattr(callback, "__self__", None)
    if isinstance(owner, asyncio.Task):
        coro = owner.get_coro()
        return f"task {owner.get_name()} {getattr(coro, '__qualname__', type(coro).__name__)}"
    name = getattr(callback, "__qualname__", None) or type(callback).__qualname__
    return f"{type(handle).__name__} {name}"


class CallbackTimer:
    """Times every callback of the event loop; keeps the slowest few."""

    KEEP = 8

    def __init__(self) -> None:
        self.over_target = 0
        self.slowest: list[tuple[float, str]] = []
        self._original = asyncio.events.Handle._run

    def install(self) -> None:
        timer = self
        original = self._original

        def timed_run(handle: asyncio.events.Handle) -> None:
            started = time.perf_counter()
            original(handle)
            elapsed = time.perf_counter() - started
            if elapsed > SLOW_CALLBACK:
                timer.over_target += 1
            if len(timer.slowest) < timer.KEEP or elapsed > timer.slowest[-1][0]:
                timer.slowest.append((elapsed, describe(handle)))
                timer.slowest.sort(reverse=True)
                del timer.slowest[timer.KEEP :]

        asyncio.events.Handle._run = timed_run  # type: ignore[method-assign,assignment]

    def uninstall(self) -> None:
        asyncio.events.Handle._run = self._original  # type: ignore[method-assign]


class SlowCallbacks(logging.Handler):
    """Collects asyncio's debug-mode "Executing ... took N seconds" warnings."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if text.startswith("Executing"):
            # The duration is at the end of the message.
            self.messages.append(text if len(text) < 400 else f"{text[:300]} ... {text[-60:]}")


async def _child_main(config: Path, debug: bool) -> dict[str, object]:
    from gpopd.daemon import Daemon

    loop = asyncio.get_running_loop()
    slow = SlowCallbacks()
    timer = CallbackTimer()
    if debug:
        loop.set_debug(True)
        loop.slow_callback_duration = SLOW_CALLBACK
        logging.getLogger("asyncio").addHandler(slow)
    else:
        timer.install()
    meter = LagMeter()
    ticker = asyncio.create_task(meter.run())
    daemon = Daemon(config, os.environ, once=True)
    started = time.monotonic()
    status = await asyncio.wait_for(daemon.run(), ROUND_TIMEOUT)
    seconds = time.monotonic() - started
    ticker.cancel()
    timer.uninstall()
    outcomes: dict[str, int] = {}
    for result in daemon.results.values():
        outcomes[result.outcome] = outcomes.get(result.outcome, 0) + 1
    return {
        "exit_status": status,
        "round_seconds": round(seconds, 2),
        "accounts_polled": len(daemon.results),
        "outcomes": outcomes,
        "delivered": sum(result.delivered for result in daemon.results.values()),
        "ticks": meter.ticks,
        "max_loop_lag_ms": round(meter.max_lag * 1000, 1),
        "ticks_over_100ms": meter.over_target,
        "slow_callbacks": len(slow.messages) if debug else timer.over_target,
        "slowest_callbacks": (
            slow.messages[:5]
            if debug
            else [f"{elapsed * 1000:.1f} ms {what}" for elapsed, what in timer.slowest]
        ),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def child(config: Path, debug: bool) -> int:
    report = asyncio.run(_child_main(config, debug))
    print("REPORT " + json.dumps(report), flush=True)
    return 0


def run(args: argparse.Namespace) -> int:
    from bench.manyaccounts import start_accounts
    from tests.support.gpopd_config import write_config

    work = Path(tempfile.mkdtemp(prefix="gpopd-scale-"))
    dovecot, specs = start_accounts(work, args.accounts, args.messages)
    try:
        config = write_config(
            work / "config",
            specs,
            max_sessions=args.sessions,
            max_sessions_per_host=args.sessions,
        )
        argv = [sys.executable, __file__, "--child", str(config)]
        if args.asyncio_debug:
            argv.append("--debug")
        log_path = work / "daemon.log"
        with log_path.open("wb") as log_file:
            done = subprocess.run(
                argv, stdout=subprocess.PIPE, stderr=log_file, check=False, timeout=ROUND_TIMEOUT
            )
        lines = [line for line in done.stdout.decode().splitlines() if line.startswith("REPORT ")]
        if done.returncode != 0 or not lines:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise SystemExit(f"daemon failed ({done.returncode}): {tail}")
        report = json.loads(lines[-1].removeprefix("REPORT "))
        delivered = sum(len(list((spec.maildir / "new").iterdir())) for spec in specs)
        report |= {
            "accounts": args.accounts,
            "sessions": args.sessions,
            "messages_expected": args.accounts * args.messages,
            "messages_in_maildirs": delivered,
            "asyncio_debug": args.asyncio_debug,
            "load_average": os.getloadavg(),
        }
        print(json.dumps(report, indent=2))
        ok = (
            report["accounts_polled"] == args.accounts
            and report["outcomes"] == {"ok": args.accounts}
            and delivered == args.accounts * args.messages
            and report["max_loop_lag_ms"] < LAG_TARGET * 1000
            and report["slow_callbacks"] == 0
        )
        return 0 if ok else 1
    finally:
        dovecot.stop()
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=2, help="messages per mailbox")
    parser.add_argument("--sessions", type=int, default=64, help="max_sessions (and per host)")
    parser.add_argument(
        "--asyncio-debug", action="store_true", help="asyncio's debug mode names slow callbacks"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        return child(args.child, args.debug)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
