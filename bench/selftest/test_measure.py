"""Measuring a child: CPU of its whole tree and the peak RSS of the tool alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench.measure import machine_busy_seconds, run_measured

BUSY = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"


def test_cpu_includes_grandchildren(tmp_path: Path) -> None:
    """CPU burnt by a process the tool starts and waits for is counted."""
    child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {BUSY!r}])"
    m = run_measured([sys.executable, "-c", child], cwd=tmp_path, log=tmp_path / "log")
    assert m.returncode == 0
    assert m.cpu >= 0.3


def test_peak_rss_is_the_tool_not_the_harness(tmp_path: Path) -> None:
    """A small tool started by a large harness reports its own small peak."""
    ballast = bytearray(300 * 1024 * 1024)
    ballast[::4096] = b"x" * len(ballast[::4096])
    m = run_measured(["true"], cwd=tmp_path, log=tmp_path / "log")
    del ballast
    assert m.rss_exact
    assert m.max_rss_mb < 20


def test_peak_rss_sees_what_the_tool_allocates(tmp_path: Path) -> None:
    """A tool that touches 100 MB reports a peak of at least that."""
    code = "b = bytearray(100 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096])"
    m = run_measured([sys.executable, "-c", code], cwd=tmp_path, log=tmp_path / "log")
    assert m.max_rss_mb >= 100


def test_exit_status_and_timeout(tmp_path: Path) -> None:
    """A failing tool's status is kept and a hung one is killed at the timeout."""
    failed = run_measured(["false"], cwd=tmp_path, log=tmp_path / "log")
    assert failed.returncode == 1
    hung = run_measured(["sleep", "30"], cwd=tmp_path, log=tmp_path / "log", timeout=0.5)
    assert hung.timed_out
    assert hung.wall < 10


def test_main_process_peak_leaves_out_children(tmp_path: Path) -> None:
    """A tool whose child touches 100 MB has a large tree peak but a small own peak."""
    alloc = "b = bytearray(100 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096])"
    code = f"import subprocess, sys, time; subprocess.run([sys.executable, '-c', {alloc!r}])"
    m = run_measured([sys.executable, "-c", code], cwd=tmp_path, log=tmp_path / "log")
    assert m.max_rss_mb >= 100
    assert 0 < m.main_rss_mb < 50


def test_main_process_peak_sees_own_growth(tmp_path: Path) -> None:
    """The sampled peak of the tool's own process follows what it allocates."""
    code = (
        "import time; b = bytearray(100 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096]);"
        " time.sleep(0.2)"
    )
    m = run_measured([sys.executable, "-c", code], cwd=tmp_path, log=tmp_path / "log")
    assert m.main_rss_mb >= 100


def test_machine_cpu_counts_processes_outside_the_tool(tmp_path: Path) -> None:
    """CPU burnt during the run by a process that is not the tool's is machine CPU."""
    burn = (
        "import sys, time\nprint('go', flush=True)\n"
        "end = time.monotonic() + 10\nwhile time.monotonic() < end: pass\n"
    )
    with subprocess.Popen([sys.executable, "-c", burn], stdout=subprocess.PIPE) as burner:
        try:
            assert burner.stdout is not None
            assert burner.stdout.readline() == b"go\n"
            m = run_measured(["sleep", "1"], cwd=tmp_path, log=tmp_path / "log")
        finally:
            burner.kill()
    assert m.cpu < 0.1
    assert m.machine_cpu is not None
    # The burner had a second of (most of) a core; the tool slept.
    assert m.machine_cpu >= 0.3


def test_machine_busy_leaves_out_idle_and_iowait(tmp_path: Path) -> None:
    """Busy is user, nice, system, irq, softirq and steal; idle and iowait are not."""
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 20 30 5000 700 5 6 7 40 0\ncpu0 50 10 15 2500 350 2 3 3 20 0\n")
    assert machine_busy_seconds(stat) == 168 / os.sysconf("SC_CLK_TCK")
    assert machine_busy_seconds(tmp_path / "missing") is None
    stat.write_text("intr 1 2 3\n")
    assert machine_busy_seconds(stat) is None
