"""Run one command and measure it: wall time, CPU of its whole tree, peak RSS.

CPU is the change in ``getrusage(RUSAGE_CHILDREN)`` across the run, so it
counts every descendant that was waited for (fetchmail's MDA processes
included).

Peak RSS is ``ru_maxrss`` from ``wait4`` of the tool's own process.  Linux
folds the peaks of that process's reaped children into it (for fetchmail the
largest is fetchmail itself: procmail stays far smaller), and also the peak
of the memory the process had before ``exec``: started straight from this
harness, whose corpus made it hundreds of MB large, every tool would report
the harness's peak.  So the tool is started by GNU time (``/usr/bin/time``, a
small C program), which forks it, waits for it with ``wait4`` and writes its
``ru_maxrss``; what GNU time's own size adds is about 2 MB.  Without GNU time
the value comes from our own ``wait4`` and ``rss_exact`` is false.

For a tool whose children are not part of it (fetchmail's MDA), the peak of
the tool's process alone is sampled from ``VmHWM`` in ``/proc`` every few
milliseconds (``main_rss_kib``).  ``VmHWM`` never decreases, so a sample
misses at most the growth of the last interval before the exit.

The harness must start no other child while a measurement runs, or its CPU
would be counted too; long-lived helpers (Dovecot, the delay proxy) are not
reaped until the end and so never enter the delta.

Machine CPU is the busy time of every CPU of the machine across the run, from
``/proc/stat``: the tool, Dovecot, the delay proxy, the harness's own sampler
and anything else that ran.  With two cores, a run cannot take less wall time
than half of it; machine CPU minus the tool's CPU is, on a quiet machine,
what the server spent serving the tool.  It is counted in the kernel's ticks
(``USER_HZ``, 10 ms here).
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TIMEOUT = 900.0
GNU_TIME = Path("/usr/bin/time")
SAMPLE_INTERVAL = 0.005


@dataclass(frozen=True)
class Measurement:
    """What one run of one command cost."""

    returncode: int
    wall: float
    cpu_user: float
    cpu_sys: float
    max_rss_kib: int
    #: Sampled peak of the tool's own process, without its children.
    main_rss_kib: int
    timed_out: bool
    rss_exact: bool
    #: Busy CPU seconds of the whole machine across the run; None without /proc.
    machine_cpu: float | None = None

    @property
    def cpu(self) -> float:
        return self.cpu_user + self.cpu_sys

    @property
    def max_rss_mb(self) -> float:
        return self.max_rss_kib / 1024.0

    @property
    def main_rss_mb(self) -> float:
        return self.main_rss_kib / 1024.0


class PeakSampler(threading.Thread):
    """Follows ``VmHWM`` of one process until told to stop.

    With ``wrapped`` the process is the child of ``pid`` (the tool GNU time
    started), else ``pid`` itself.
    """

    def __init__(self, pid: int, *, wrapped: bool) -> None:
        super().__init__(daemon=True)
        self._pid = pid
        self._wrapped = wrapped
        self._done = threading.Event()
        self.peak_kib = 0

    def _find_tool(self) -> int | None:
        if not self._wrapped:
            return self._pid
        path = Path(f"/proc/{self._pid}/task/{self._pid}/children")
        with contextlib.suppress(OSError):
            children = path.read_text().split()
            if children:
                return int(children[0])
        return None

    def run(self) -> None:
        target = None
        while not self._done.is_set():
            target = target or self._find_tool()
            if target is not None:
                with contextlib.suppress(OSError):
                    for line in Path(f"/proc/{target}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            self.peak_kib = max(self.peak_kib, int(line.split()[1]))
                            break
            self._done.wait(SAMPLE_INTERVAL)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak_kib


def machine_busy_seconds(stat: Path = Path("/proc/stat")) -> float | None:
    """CPU seconds all CPUs have spent busy since boot; None if unknown.

    Busy is user, nice, system, irq, softirq and steal (guest time is part of
    user already); idle and iowait are not busy.
    """
    try:
        first = stat.read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if not first or first[0] != "cpu" or len(first) < 9:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in first[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def run_measured(
    argv: Sequence[str],
    *,
    cwd: Path,
    log: Path,
    env: Mapping[str, str] | None = None,
    uid: int | None = None,
    gid: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Measurement:
    """Run ``argv`` with stdout and stderr in ``log``; kill its group on timeout."""
    rss_file = log.with_suffix(".rss")
    use_time = GNU_TIME.is_file()
    if use_time:
        rss_file.write_text("")
        if uid is not None:
            os.chown(rss_file, uid, gid if gid is not None else -1)
        argv = [str(GNU_TIME), "--format=%M", f"--output={rss_file}", "--", *argv]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    machine_before = machine_busy_seconds()
    with log.open("wb") as out:
        start = time.perf_counter()
        process = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            user=uid,
            group=gid,
            extra_groups=[] if uid is not None else None,
        )
    expired = threading.Event()

    def kill() -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)

    def expire() -> None:
        expired.set()
        kill()

    timer = threading.Timer(timeout, expire)
    timer.start()
    sampler = PeakSampler(process.pid, wrapped=use_time)
    sampler.start()
    try:
        # Popen.wait() would reap with waitpid() and lose the rusage.
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
    except BaseException:
        # Interrupted (Ctrl-C): the tool runs in a session of its own and
        # would outlive the bench.
        kill()
        os.wait4(process.pid, 0)
        raise
    finally:
        timer.cancel()
        main_rss = sampler.stop()
    # Popen must not try to reap the process again.
    process.returncode = os.waitstatus_to_exitcode(status)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    machine_after = machine_busy_seconds()
    machine_cpu = None
    if machine_before is not None and machine_after is not None:
        machine_cpu = machine_after - machine_before
    max_rss = usage.ru_maxrss
    exact = False
    if use_time:
        try:
            max_rss = int(rss_file.read_text().split()[-1])
            exact = True
        except (OSError, ValueError, IndexError):
            pass
    return Measurement(
        returncode=process.returncode,
        wall=wall,
        cpu_user=after.ru_utime - before.ru_utime,
        cpu_sys=after.ru_stime - before.ru_stime,
        max_rss_kib=max_rss,
        main_rss_kib=main_rss,
        timed_out=expired.is_set(),
        rss_exact=exact,
        machine_cpu=machine_cpu,
    )
