"""`gpopd run` polling three accounts every second while mail keeps arriving.

The daemon's resident memory (VmRSS) and open file descriptors are sampled
once a second; after a warm-up neither may grow, and at the end every
message must be in its Maildir exactly once.  CI runs a minute; the slow run
lasts ``GPOPD_SOAK_SECONDS`` (default 30 minutes).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.certs import TestPKI
from tests.support.corpus import expected_delivery, small_corpus
from tests.support.dovecot import DovecotFactory
from tests.support.gpopd_config import AccountSpec, write_config

USERS = {"alice": "alice-soak-pw", "bob": "bob-soak-pw", "carol": "carol-soak-pw"}
KEEP = {"alice": False, "bob": False, "carol": True}
CI_SECONDS = 45.0
SLOW_SECONDS = 1800.0
SECONDS_VARIABLE = "GPOPD_SOAK_SECONDS"
MAIL_EVERY = 0.4  # seconds between new messages (to a random account)
SAMPLE_EVERY = 1.0
MAX_RSS_GROWTH = 0.05
# Each account may hold a session (socket, lock, spool file, directory) at
# the moment of a sample; a leak shows as a rising floor instead.
FD_SLACK = 4
SETTLE_SECONDS = 60.0


@dataclass
class Sample:
    at: float
    rss_kb: int
    fds: int


@dataclass
class Soak:
    seconds: float
    samples: list[Sample] = field(default_factory=list)
    expected: dict[str, Counter[str]] = field(
        default_factory=lambda: {user: Counter() for user in USERS}
    )

    @property
    def warm_up(self) -> float:
        return min(20.0, self.seconds / 3)

    def quarters(self) -> list[Sample]:
        """The samples at the end of each quarter of the run."""
        return [self.samples[len(self.samples) * n // 4 - 1] for n in range(1, 5)]

    def window(self, first: bool) -> list[Sample]:
        """About ten seconds of samples right after the warm-up, or at the end."""
        after = [s for s in self.samples if s.at >= self.warm_up]
        span = max(5, min(len(after) // 4, 60))
        return after[:span] if first else after[-span:]


def digest(message: bytes) -> str:
    return hashlib.sha256(message).hexdigest()


def sample(pid: int, at: float) -> Sample:
    with open(f"/proc/{pid}/status") as status:
        rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return Sample(at, rss, len(os.listdir(f"/proc/{pid}/fd")))


def delivered(maildir: Path) -> Counter[str]:
    found: Counter[str] = Counter()
    for sub in ("new", "cur"):
        if (maildir / sub).is_dir():
            found.update(digest(entry.read_bytes()) for entry in (maildir / sub).iterdir())
    return found


def soak(dovecot_factory: DovecotFactory, pki: TestPKI, tmp_path: Path, seconds: float) -> None:
    dovecot = dovecot_factory(users=USERS)
    specs = [
        AccountSpec(
            user,
            dovecot.pop3s_port,
            user,
            password,
            tmp_path / f"Maildir-{user}",
            ca_file=pki.ca_file,
            keep=KEEP[user],
            extra={"poll_interval": "1s"},
        )
        for user, password in USERS.items()
    ]
    config = write_config(tmp_path, specs)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPOPD_")}
    log_path = tmp_path / "daemon.log"
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    result = Soak(seconds)
    with log_path.open("wb") as log_file:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "gpopd", "run", "--config", str(config)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        started = time.monotonic()
        next_mail = next_sample = started
        count = 0
        while (now := time.monotonic()) - started < seconds:
            assert daemon.poll() is None, log_path.read_text()[-3000:]
            if now >= next_mail:
                user = rng.choice(list(USERS))
                size = rng.randint(2_000, 60_000)
                [message] = small_corpus(1, seed=seed + count, size=size)
                dovecot.add_messages(user, [message])
                result.expected[user][digest(expected_delivery(message))] += 1
                count += 1
                next_mail += MAIL_EVERY
            if now >= next_sample:
                result.samples.append(sample(daemon.pid, now - started))
                next_sample += SAMPLE_EVERY
            time.sleep(max(0.0, min(next_mail, next_sample) - time.monotonic()))
        settle = time.monotonic() + SETTLE_SECONDS
        while any(delivered(spec.maildir) != result.expected[spec.name] for spec in specs) and (
            time.monotonic() < settle
        ):
            time.sleep(0.5)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=40) == 0, log_path.read_text()[-3000:]
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()

    polls: dict[str, Counter[str]] = {user: Counter() for user in USERS}
    for line in log_path.read_text().splitlines():
        record = json.loads(line)
        assert record.get("level") not in ("critical", "exception"), record
        if record.get("event") == "poll finished":
            polls[record["account"]][record["outcome"]] += 1
    first, last = result.window(first=True), result.window(first=False)
    rss_before = statistics.median(s.rss_kb for s in first)
    rss_after = statistics.median(s.rss_kb for s in last)
    fds_before = min(s.fds for s in first)
    fds_after = min(s.fds for s in last)
    growth = (rss_after - rss_before) / rss_before
    print(
        f"soak {seconds:.0f}s (warm-up {result.warm_up:.0f}s), seed {seed}: "
        f"{count} messages; polls { ({u: dict(c) for u, c in polls.items()}) }; "
        f"RSS {rss_before / 1024:.1f} MB -> {rss_after / 1024:.1f} MB ({growth:+.2%}), "
        f"max {max(s.rss_kb for s in result.samples) / 1024:.1f} MB, "
        f"by quarter {[round(q.rss_kb / 1024, 1) for q in result.quarters()]} MB; "
        f"fds {fds_before} -> {fds_after}, max {max(s.fds for s in result.samples)}"
    )

    for spec in specs:
        assert delivered(spec.maildir) == result.expected[spec.name], f"{spec.name}: lost or dup"
        held = dovecot.message_count(spec.name)
        assert held == (sum(result.expected[spec.name].values()) if spec.keep else 0)
        outcomes = polls[spec.name]
        assert set(outcomes) == {"ok"}, outcomes
        # Polled about once a second (1 s interval plus up to 10 % jitter).
        assert outcomes["ok"] >= seconds / 2, outcomes
    assert growth < MAX_RSS_GROWTH, (rss_before, rss_after)
    assert fds_after <= fds_before
    assert max(s.fds for s in result.samples if s.at >= result.warm_up) <= (
        fds_before + FD_SLACK * len(USERS)
    )


def test_daemon_soak_one_minute(
    dovecot_factory: DovecotFactory, pki: TestPKI, tmp_path: Path
) -> None:
    """45 s of 1 s polls on 3 accounts: RSS and fds flat, every message delivered once."""
    soak(dovecot_factory, pki, tmp_path, CI_SECONDS)


@pytest.mark.slow
def test_daemon_soak_long(dovecot_factory: DovecotFactory, pki: TestPKI, tmp_path: Path) -> None:
    """GPOPD_SOAK_SECONDS (30 minutes by default) of the same: no growth, no loss."""
    soak(dovecot_factory, pki, tmp_path, float(os.environ.get(SECONDS_VARIABLE, SLOW_SECONDS)))
