"""`gpopd poll` killed with SIGKILL at random moments loses and duplicates nothing."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpopd.store import Store
from tests.support.certs import TestPKI
from tests.support.corpus import expected_delivery, mixed_corpus
from tests.support.dovecot import TEST_USERS, Dovecot
from tests.support.gpopd_config import AccountSpec, maildir_contents, write_config

# Each round adds fresh mail so that every kill can land in the middle of real work.
MESSAGES_AT_START = 300
MESSAGES_PER_ROUND = 12
CI_KILLS = 50
SLOW_KILLS = 500


def kill_loop(dovecot: Dovecot, pki: TestPKI, tmp_path: Path, *, keep: bool, kills: int) -> None:
    seed = int(os.environ.get("GPOPD_CRASH_SEED", random.randrange(1 << 30)))
    print(f"crash test seed: {seed} (set GPOPD_CRASH_SEED to repeat)")
    rng = random.Random(seed)
    sent: list[bytes] = mixed_corpus(MESSAGES_AT_START + kills * MESSAGES_PER_ROUND, seed=seed)
    dovecot.add_messages("alice", sent[:MESSAGES_AT_START])
    added = MESSAGES_AT_START
    spec = AccountSpec(
        "alice",
        dovecot.pop3s_port,
        "alice",
        TEST_USERS["alice"],
        tmp_path / "Maildir",
        ca_file=pki.ca_file,
        keep=keep,
    )
    config = write_config(tmp_path, [spec])
    command = [sys.executable, "-m", "gpopd", "poll", "--config", str(config)]
    outcomes: dict[str, int] = {}
    for _ in range(kills):
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.15, 1.5))
        child.send_signal(signal.SIGKILL)
        code = child.wait(timeout=30)
        outcome = "killed" if code == -signal.SIGKILL else f"exit {code}"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        dovecot.add_messages("alice", sent[added : added + MESSAGES_PER_ROUND])
        added += MESSAGES_PER_ROUND
    print(f"kill rounds: {outcomes}")
    assert outcomes.get("killed", 0) >= kills // 2, f"too few kills landed: {outcomes}"

    final = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]

    delivered = maildir_contents(tmp_path / "Maildir")
    expected = sorted(expected_delivery(m) for m in sent[:added])
    assert len(delivered) == len(expected), "lost or duplicated messages"
    assert delivered == expected
    with Store(tmp_path / "state") as store:
        assert store.pending("alice") == {}
        assert len(store.delivered_uids("alice")) == added
    assert not any((tmp_path / "Maildir" / "tmp").iterdir()), "orphaned tmp files left"
    if not keep:
        assert dovecot.message_count("alice") == 0
    else:
        assert dovecot.message_count("alice") == added


@pytest.mark.parametrize("keep", [True, False], ids=["keep", "delete"])
def test_sigkill_during_polls(dovecot: Dovecot, pki: TestPKI, tmp_path: Path, keep: bool) -> None:
    """50 SIGKILLs at random moments, then a clean poll: every message exactly once."""
    kill_loop(dovecot, pki, tmp_path, keep=keep, kills=CI_KILLS)


@pytest.mark.slow
@pytest.mark.parametrize("keep", [True, False], ids=["keep", "delete"])
def test_sigkill_during_polls_long(
    dovecot: Dovecot, pki: TestPKI, tmp_path: Path, keep: bool
) -> None:
    """500 SIGKILLs per mode: the same guarantee over a long run."""
    kill_loop(dovecot, pki, tmp_path, keep=keep, kills=SLOW_KILLS)
