"""Account policies: message limits, oversized mail, delete_after, and the CLI around them."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

from structlog.testing import capture_logs

from gpopd.config import load_config
from gpopd.fetch import PollResult, poll_once
from gpopd.store import Store
from tests.support.corpus import expected_delivery, mixed_corpus
from tests.support.fakepop import FakePop3
from tests.support.gpopd_config import AccountSpec, maildir_contents, write_config

MESSAGES = mixed_corpus(5, seed=41)


def spec(server: FakePop3, tmp_path: Path, **extra: object) -> AccountSpec:
    return AccountSpec(
        "alice",
        server.port,
        server.user,
        server.password,
        tmp_path / "Maildir",
        tls="none",
        keep=True,
        extra={"timeout": "5s", **extra},
    )


async def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "gpopd", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def poll(tmp_path: Path, account: AccountSpec) -> PollResult:
    [result] = await poll_once(load_config(write_config(tmp_path, [account]), environ={}))
    return result


async def test_max_messages_per_poll_takes_the_backlog_in_steps(tmp_path: Path) -> None:
    """max_messages_per_poll: 2 fetches 2, 2, then 1 message over three polls."""
    async with FakePop3(MESSAGES) as server:
        counts = [
            (await poll(tmp_path, spec(server, tmp_path, max_messages_per_poll=2))).delivered
            for _ in range(4)
        ]
    assert counts == [2, 2, 1, 0]
    assert maildir_contents(tmp_path / "Maildir") == sorted(map(expected_delivery, MESSAGES))


async def test_oversized_message_is_reported_once_then_fetched_after_retry(
    tmp_path: Path,
) -> None:
    """A message over max_message_size stays on the server, is warned about once, and
    `gpopd retry` plus a larger limit brings it in."""
    big = MESSAGES[0] + b"x" * 200_000 + b"\n"
    messages = [big, *MESSAGES[1:]]
    async with FakePop3(messages) as server:
        assert max(map(len, MESSAGES)) < 100_000
        account = spec(server, tmp_path, max_message_size=100_000)
        with capture_logs() as first_logs:
            first = await poll(tmp_path, account)
        with capture_logs() as second_logs:
            second = await poll(tmp_path, account)
        assert (first.delivered, first.oversized) == (len(messages) - 1, 1)
        assert (second.delivered, second.oversized) == (0, 0)
        warned = [e for e in first_logs + second_logs if "max_message_size" in e["event"]]
        assert len(warned) == 1
        assert "RETR 1" not in server.commands

        done = await run_cli("retry", "alice", "--config", str(tmp_path / "gpopd.yaml"))
        assert done.returncode == 0, done.stderr
        third = await poll(tmp_path, spec(server, tmp_path, max_message_size=1_000_000))
    assert third.delivered == 1
    assert maildir_contents(tmp_path / "Maildir") == sorted(map(expected_delivery, messages))


async def test_delete_after_removes_only_old_deliveries(tmp_path: Path) -> None:
    """With keep: true and delete_after, messages delivered long enough ago are DELE'd."""
    async with FakePop3(MESSAGES) as server:
        account = spec(server, tmp_path, delete_after="1h")
        first = await poll(tmp_path, account)
        assert (first.delivered, first.deleted) == (5, 0)
        with Store(tmp_path / "state") as store:
            # Pretend two of them were delivered two hours ago.
            store.forget("alice", ["uid-00001", "uid-00002"])
            store.mark_delivered(
                "alice",
                [("uid-00001", "k" * 32, 1), ("uid-00002", "k" * 32, 1)],
                at=time.time() - 7200,
            )
        second = await poll(tmp_path, account)
    assert second.deleted == 2
    assert server.deleted == {1, 2}


async def test_status_shows_the_last_poll(tmp_path: Path) -> None:
    """`gpopd status --json` reports the last poll's outcome and deliveries from the database."""
    async with FakePop3(MESSAGES) as server:
        await poll(tmp_path, spec(server, tmp_path))
    done = await run_cli("status", "--json", "--config", str(tmp_path / "gpopd.yaml"))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    text = json.dumps(report)
    assert "alice" in text
    assert '"ok"' in text
    assert "fake-secret-pw" not in done.stdout + done.stderr
