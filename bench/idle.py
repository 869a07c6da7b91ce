"""`gpopd run` with many accounts: CPU and memory between polls.

    python bench/idle.py [--accounts 1000] [--idle 60]

Starts a private Dovecot on 127.0.0.1 with one user per account (a few
messages each), starts `gpopd run` with every account polling every 10
minutes, waits until every account finished its first poll (that round's
wall time is reported), then measures the daemon's CPU time and RSS over an
idle window. Targets: idle CPU under 2% of one core, RSS under 150 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.manyaccounts import start_accounts
from tests.support.gpopd_config import write_config

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--idle", type=float, default=60.0, help="idle window, seconds")
    parser.add_argument("--messages", type=int, default=2, help="messages per mailbox")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="gpopd-idle-"))
    dovecot, specs = start_accounts(work, args.accounts, args.messages)
    daemon: subprocess.Popen[bytes] | None = None
    try:
        config = write_config(work / "config", specs, max_sessions=64, max_sessions_per_host=64)
        log_path = work / "daemon.log"
        with log_path.open("wb") as log_file:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "gpopd", "run", "--config", str(config)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        started = time.monotonic()
        polled = 0
        while polled < args.accounts:
            time.sleep(0.5)
            if daemon.poll() is not None:
                raise SystemExit(f"daemon exited: {log_path.read_text()[-2000:]}")
            polled = sum(
                1 for line in log_path.read_text().splitlines() if '"poll finished"' in line
            )
            if time.monotonic() - started > 600:
                raise SystemExit(f"only {polled} accounts polled after 600 s")
        round_seconds = time.monotonic() - started
        failed = [
            line
            for line in log_path.read_text().splitlines()
            if '"poll finished"' in line and '"outcome": "ok"' not in line
        ]
        delivered = sum(len(list((spec.maildir / "new").iterdir())) for spec in specs)
        time.sleep(2.0)  # let the last commits and logs settle
        cpu_before, wall_before = cpu_seconds(daemon.pid), time.monotonic()
        peak_rss = rss_mb(daemon.pid)
        while time.monotonic() - wall_before < args.idle:
            time.sleep(1.0)
            peak_rss = max(peak_rss, rss_mb(daemon.pid))
        idle_cpu = cpu_seconds(daemon.pid) - cpu_before
        idle_wall = time.monotonic() - wall_before
        report = {
            "accounts": args.accounts,
            "first_round_seconds": round(round_seconds, 2),
            "failed_polls": len(failed),
            "messages_delivered": delivered,
            "messages_expected": args.accounts * args.messages,
            "idle_window_seconds": round(idle_wall, 1),
            "idle_cpu_percent_of_one_core": round(100 * idle_cpu / idle_wall, 3),
            "rss_mb": round(peak_rss, 1),
        }
        print(json.dumps(report, indent=2))
        ok = (
            not failed
            and delivered == args.accounts * args.messages
            and report["idle_cpu_percent_of_one_core"] < 2.0
            and report["rss_mb"] < 150
        )
        return 0 if ok else 1
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=60)
        dovecot.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
