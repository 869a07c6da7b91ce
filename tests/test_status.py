"""Tests of the state the daemon records for ``gpopd status`` and of the status report."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpopd import status
from gpopd import store as store_module
from gpopd.accountlock import pid_alive
from gpopd.errors import StoreError
from gpopd.status import (
    AccountStatus,
    DaemonState,
    DaemonStatus,
    PollCounts,
    collect,
    daemon_status,
    format_span,
    render_json,
    render_text,
)
from gpopd.store import DB_NAME, SCHEMA_VERSION, Store

ROOT = Path(__file__).resolve().parents[1]
NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def store(state_dir: Path) -> Iterator[Store]:
    with Store(state_dir) as opened:
        yield opened


def finished_poll(
    store: Store,
    account: str,
    started: float,
    *,
    outcome: str = "ok",
    delivered: int = 0,
    size: int = 0,
    error: str | None = None,
) -> int:
    poll_id = store.poll_started(account, started)
    store.poll_finished(
        poll_id,
        finished_at=started + 2,
        outcome=outcome,
        new=delivered,
        delivered=delivered,
        skipped=0,
        bytes=size,
        error=error,
    )
    return poll_id


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(child.stdout)


# -- schema migration -------------------------------------------------------------


def test_version_1_database_is_upgraded_and_keeps_its_rows(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database written by the first schema gains the new tables and keeps every row."""
    with monkeypatch.context() as patch:
        patch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:1])
        patch.setattr(store_module, "SCHEMA_VERSION", 1)
        with Store(state_dir) as old:
            old._db.execute("INSERT INTO account VALUES ('alice')")
            old._db.execute("INSERT INTO delivered VALUES ('alice', 'u1', 'k1', 10, 5.0)")
            old.add_pending("alice", [("u2", "k2")])
            finished_poll(old, "alice", 100.0, delivered=1, size=10)
            assert old.schema_version == 1
    with Store(state_dir) as upgraded:
        assert upgraded.schema_version == SCHEMA_VERSION == 2
        assert upgraded.delivered_times("alice") == {"u1": 5.0}
        assert upgraded.pending("alice") == {"k2": "u2"}
        last = upgraded.last_poll("alice")
        assert last is not None
        assert last["delivered"] == 1
        tables = {row[0] for row in upgraded._db.execute("SELECT name FROM sqlite_master")}
        assert {"daemon", "schedule", "skipped"} <= tables
        upgraded.daemon_started(1, 2.0, "x")
        assert upgraded.daemon_info() is not None


# -- daemon record ----------------------------------------------------------------


def test_daemon_record_life_cycle(store: Store) -> None:
    """The daemon row is created, beats, is replaced by a newer daemon and removed on stop."""
    assert store.daemon_info() is None
    store.daemon_started(100, 10.0, "0.1.0")
    assert store.daemon_info() == {
        "pid": 100,
        "started_at": 10.0,
        "version": "0.1.0",
        "heartbeat_at": 10.0,
    }
    store.daemon_heartbeat(25.0)
    info = store.daemon_info()
    assert info is not None
    assert info["heartbeat_at"] == 25.0
    store.daemon_started(200, 30.0, "0.2.0")
    assert store._db.execute("SELECT count(*) FROM daemon").fetchone()[0] == 1
    info = store.daemon_info()
    assert info is not None
    assert (info["pid"], info["version"]) == (200, "0.2.0")
    store.daemon_stopped(pid=100)  # an older daemon stopping late removes nothing
    assert store.daemon_info() is not None
    store.daemon_stopped(pid=200)
    assert store.daemon_info() is None
    store.daemon_started(300, 40.0, "0.2.0")
    store.daemon_stopped()
    assert store.daemon_info() is None


def test_schedule_round_trip(store: Store) -> None:
    """set_schedule() stores one row per account, replaced on every call."""
    store.set_schedule("alice", 100.0, 600.0, 0)
    store.set_schedule("bob", None, None, 3)
    store.set_schedule("alice", 700.0, 600.0, 1)
    schedules = store.schedules()
    assert sorted(schedules) == ["alice", "bob"]
    assert schedules["alice"]["next_poll_at"] == 700.0
    assert schedules["alice"]["interval"] == 600.0
    assert schedules["alice"]["consecutive_failures"] == 1
    assert schedules["bob"]["next_poll_at"] is None
    assert schedules["bob"]["consecutive_failures"] == 3
    assert abs(schedules["bob"]["updated_at"] - time.time()) < 60
    assert store.accounts() == ["alice", "bob"]


# -- counters -----------------------------------------------------------------------


def test_polls_since_counts_only_later_polls(store: Store) -> None:
    """polls_since() counts polls started at or after the mark, by outcome, with sums."""
    finished_poll(store, "alice", 50.0, delivered=9, size=900)  # before the daemon started
    finished_poll(store, "alice", 100.0, delivered=2, size=200)
    finished_poll(store, "alice", 200.0, outcome="network-error", error="boom")
    finished_poll(store, "alice", 300.0, outcome="cancelled")
    finished_poll(store, "alice", 400.0, outcome="delivery-error", delivered=1, size=50)
    finished_poll(store, "bob", 500.0, delivered=7, size=700)
    store.poll_started("alice", 600.0)  # still running
    assert store.polls_since("alice", 100.0) == {
        "polls": 5,
        "ok": 1,
        "failed": 2,
        "delivered": 3,
        "bytes": 250,
        "truncated": False,
    }
    assert store.polls_since("nobody", 0.0) == {
        "polls": 0,
        "ok": 0,
        "failed": 0,
        "delivered": 0,
        "bytes": 0,
        "truncated": False,
    }


def test_polls_since_says_when_pruning_cut_the_history(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When pruned history starts after the mark, the counts are flagged as lower bounds."""
    monkeypatch.setattr(store_module, "POLL_HISTORY_KEEP", 3)
    for n in range(5):
        finished_poll(store, "alice", 100.0 + n, delivered=1)
    counts = store.polls_since("alice", 100.0)
    assert counts["polls"] == 3
    assert counts["truncated"] is True
    assert store.polls_since("alice", 102.0)["truncated"] is False


def test_delivered_times_and_count(store: Store) -> None:
    """delivered_times() maps each UID of one account to its delivery time."""
    store.mark_delivered("alice", [("u1", "k1", 1), ("u2", "k2", 1)], at=10.0)
    store.mark_delivered("alice", [("u3", "k3", 1)], at=20.0)
    store.mark_delivered("bob", [("u1", "kb", 1)], at=30.0)
    assert store.delivered_times("alice") == {"u1": 10.0, "u2": 10.0, "u3": 20.0}
    assert store.delivered_times("nobody") == {}
    assert store.delivered_count("alice") == 3
    assert store.delivered_count("nobody") == 0


# -- skipped messages ---------------------------------------------------------------


def test_skipped_messages_until_retry_after(store: Store) -> None:
    """Skipped UIDs are listed until their retry time; None means until cleared."""
    store.mark_skipped(
        "alice",
        [
            ("big", "too large", 10**9, None),
            ("later", "temporary failure", 100, 500.0),
            ("due", "temporary failure", 100, 400.0),
        ],
    )
    store.mark_skipped("bob", [("big", "too large", 5, None)])
    assert store.skipped_uids("alice", 450.0) == {"big": "too large", "later": "temporary failure"}
    assert store.skipped_uids("alice", 10.0**12) == {"big": "too large"}
    assert store.skipped_uids("bob", 450.0) == {"big": "too large"}


def test_skipping_again_keeps_the_first_time_and_updates_the_rest(store: Store) -> None:
    """Marking a skipped UID again updates reason and retry time but keeps first_at."""
    store.mark_skipped("alice", [("u", "temporary failure", 100, 500.0)])
    first = store._db.execute("SELECT first_at FROM skipped").fetchone()[0]
    time.sleep(0.01)
    store.mark_skipped("alice", [("u", "refused for good", 100, None)])
    row = store._db.execute("SELECT reason, first_at, retry_after FROM skipped").fetchall()
    assert row == [("refused for good", first, None)]


def test_clear_skipped_one_or_all(store: Store) -> None:
    """clear_skipped() drops the given UIDs, or every UID of one account with None."""
    store.mark_skipped("alice", [("a", "r", 1, None), ("b", "r", 1, None), ("c", "r", 1, None)])
    store.mark_skipped("bob", [("a", "r", 1, None)])
    store.clear_skipped("alice", ["a", "unknown"])
    assert set(store.skipped_uids("alice", 0.0)) == {"b", "c"}
    store.clear_skipped("alice")
    assert store.skipped_uids("alice", 0.0) == {}
    assert store.skipped_uids("bob", 0.0) == {"a": "r"}


def test_delivering_a_skipped_message_unskips_it(store: Store) -> None:
    """A UID delivered after being skipped no longer counts as skipped."""
    store.mark_skipped("alice", [("u1", "temporary failure", 10, None), ("u2", "r", 1, None)])
    store.mark_delivered("alice", [("u1", "k1", 10)])
    assert store.skipped_uids("alice", 0.0) == {"u2": "r"}


def test_empty_skip_batch_is_a_no_op(store: Store) -> None:
    """An empty list of skipped items neither fails nor creates an account."""
    store.mark_skipped("alice", [])
    store.clear_skipped("alice", [])
    assert store.accounts() == []


# -- several processes on one database ----------------------------------------------


def test_stores_open_while_another_holds_the_write_lock(state_dir: Path) -> None:
    """A second Store, read-write or read-only, opens and reads while the first is mid-write."""
    writer = Store(state_dir)
    writer.mark_delivered("alice", [("u1", "k1", 1)])
    try:
        with writer._transaction() as db:
            db.execute("INSERT INTO account (name) VALUES ('uncommitted')")
            started = time.monotonic()
            with Store(state_dir) as second, Store(state_dir, readonly=True) as reader:
                assert second.delivered_uids("alice") == {"u1"}
                assert reader.delivered_uids("alice") == {"u1"}
                assert "uncommitted" not in reader.accounts()
            # Neither open waited for the lock (the busy timeout is 5 s).
            assert time.monotonic() - started < 2
    finally:
        writer.close()


def test_readonly_store_reads_while_another_process_writes(state_dir: Path) -> None:
    """A read-only Store sees what a daemon process committed while that process holds a write."""
    code = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from gpopd.store import Store
        s = Store(Path(sys.argv[1]))
        s.daemon_started(4242, 1.0, "test")
        s.mark_delivered("alice", [("u1", "k1", 1)])
        with s._transaction() as db:
            db.execute("INSERT INTO account (name) VALUES ('uncommitted')")
            print("writing", flush=True)
            sys.stdin.read()
        """
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(state_dir)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "writing"
        with Store(state_dir, readonly=True) as reader:
            info = reader.daemon_info()
            assert info is not None
            assert info["pid"] == 4242
            assert reader.delivered_uids("alice") == {"u1"}
            assert reader.accounts() == ["alice"]
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
        assert holder.stdout is not None
        holder.stdout.close()
    assert holder.returncode == 0


def test_readonly_store_creates_nothing(tmp_path: Path) -> None:
    """Opening a missing state database read-only fails and leaves no directory behind."""
    missing = tmp_path / "nowhere" / "state"
    with pytest.raises(StoreError, match="no state database"):
        Store(missing, readonly=True)
    assert not (tmp_path / "nowhere").exists()


def test_readonly_store_refuses_writes(state_dir: Path) -> None:
    """Every write through a read-only Store raises StoreError and changes nothing."""
    Store(state_dir).close()
    with Store(state_dir, readonly=True) as reader:
        with pytest.raises(StoreError, match="read-only"):
            reader.mark_delivered("alice", [("u", "k", 1)])
        with pytest.raises(StoreError, match="read-only"):
            reader.daemon_started(1, 1.0, "x")
    with Store(state_dir) as check:
        assert check.accounts() == []


def test_readonly_store_refuses_an_older_schema(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read-only open of a database not yet upgraded explains how it gets upgraded."""
    with monkeypatch.context() as patch:
        patch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:1])
        patch.setattr(store_module, "SCHEMA_VERSION", 1)
        Store(state_dir).close()
    with pytest.raises(StoreError, match="older schema"):
        Store(state_dir, readonly=True)
    raw = sqlite3.connect(state_dir / DB_NAME)
    try:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == 1
    finally:
        raw.close()


# -- daemon status --------------------------------------------------------------------


def test_daemon_status_states(store: Store) -> None:
    """No record, a live pid with a fresh or stale heartbeat and a dead pid give four states."""
    assert daemon_status(store, NOW) == DaemonStatus(DaemonState.NOT_RUNNING)
    store.daemon_started(os.getpid(), NOW - 3600, "0.1.0")
    store.daemon_heartbeat(NOW - 10)
    current = daemon_status(store, NOW)
    assert current.state is DaemonState.RUNNING
    assert current.running
    assert (current.pid, current.started_at, current.version) == (os.getpid(), NOW - 3600, "0.1.0")
    store.daemon_heartbeat(NOW - status.HEARTBEAT_STALE_AFTER - 1)
    assert daemon_status(store, NOW).state is DaemonState.NOT_RESPONDING
    assert not daemon_status(store, NOW).running
    assert daemon_status(store, NOW, stale_after=10**6).running
    store.daemon_started(dead_pid(), NOW - 60, "0.1.0")
    assert daemon_status(store, NOW).state is DaemonState.DEAD


def test_pid_alive() -> None:
    """pid_alive() is true for this process and false for a reaped child and for 0."""
    assert pid_alive(os.getpid())
    assert not pid_alive(dead_pid())
    assert not pid_alive(0)


# -- account status -------------------------------------------------------------------


def test_collect_reads_everything_from_the_store(store: Store) -> None:
    """collect() reports the last finished poll, schedule, counters and backlog per account."""
    store.daemon_started(os.getpid(), NOW - 1000, "0.1.0")
    finished_poll(store, "alice", NOW - 5000, delivered=7, size=7000)
    finished_poll(store, "alice", NOW - 500, delivered=2, size=300)
    finished_poll(store, "alice", NOW - 200, outcome="AuthError", error="PASS failed")
    store.poll_started("alice", NOW - 5)
    store.set_schedule("alice", NOW + 420, 600.0, 1)
    store.mark_delivered("alice", [("u1", "k1", 1), ("u2", "k2", 1)])
    store.add_pending("alice", [("u3", "k3")])
    store.mark_skipped("alice", [("big", "too large", 10**9, None), ("old", "r", 1, NOW - 1)])

    [alice, carol] = collect(store, NOW, ["alice", "carol"])
    assert alice == AccountStatus(
        name="alice",
        last_poll_at=NOW - 200,
        last_finished_at=NOW - 198,
        outcome="AuthError",
        error="PASS failed",
        last_delivered=0,
        last_bytes=0,
        polling_since=NOW - 5,
        next_poll_at=NOW + 420,
        interval=600.0,
        consecutive_failures=1,
        since_start=PollCounts(polls=3, ok=1, failed=1, delivered=2, bytes=300),
        total_delivered=2,
        pending=1,
        skipped=1,
    )
    assert carol == AccountStatus(name="carol", since_start=PollCounts())


def test_collect_without_names_lists_every_known_account(store: Store) -> None:
    """Without names, collect() covers accounts with polls or only a schedule, sorted."""
    finished_poll(store, "bob", NOW - 10)
    store.set_schedule("alice", NOW + 10, 60.0, 0)
    reports = collect(store, NOW, None)
    assert [acc.name for acc in reports] == ["alice", "bob"]
    assert all(acc.since_start is None for acc in reports)  # no daemon record


def test_format_span() -> None:
    """Durations read as seconds, minutes, hours and minutes, or days and hours."""
    assert format_span(45) == "45s"
    assert format_span(180) == "3m"
    assert format_span(239) == "3m"
    assert format_span(3600) == "1h"
    assert format_span(7500) == "2h 5m"
    assert format_span(3 * 86400 + 4 * 3600 + 59) == "3d 4h"
    assert format_span(-420) == "7m"


def sample() -> tuple[DaemonStatus, list[AccountStatus]]:
    daemon = DaemonStatus(DaemonState.RUNNING, 4321, NOW - 7200, "0.1.0", NOW - 5)
    accounts = [
        AccountStatus(
            "alice",
            last_poll_at=NOW - 182,
            last_finished_at=NOW - 180,
            outcome="ok",
            last_delivered=3,
            last_bytes=2048,
            next_poll_at=NOW + 420,
            interval=600.0,
            since_start=PollCounts(12, 11, 1, 40, 10_000),
            total_delivered=500,
            pending=0,
            skipped=2,
        ),
        AccountStatus(
            "bob",
            last_poll_at=NOW - 60,
            last_finished_at=NOW - 59,
            outcome="AuthError",
            error="PASS failed: -ERR [AUTH] Web login required:\r\n" + "x" * 200,
            next_poll_at=NOW + 3000,
            consecutive_failures=4,
            since_start=PollCounts(4, 0, 4, 0, 0, truncated=True),
        ),
        AccountStatus("carol"),
    ]
    return daemon, accounts


def test_render_text_is_a_readable_table() -> None:
    """The text report gives ages, outcomes, next polls and one-line truncated errors."""
    daemon, accounts = sample()
    text = render_text(daemon, accounts, NOW)
    lines = text.splitlines()
    assert lines[0] == "gpopd 0.1.0: daemon running, pid 4321, up 2h, heartbeat 5s ago"
    alice = next(line for line in lines if line.startswith("alice ") and "ago" in line)
    assert alice.split() == ["alice", "3m", "ago", "ok", "3", "(2.0", "KiB)", "in", "7m"]
    bob = next(line for line in lines if line.startswith("bob ") and "ago" in line)
    assert "59s ago" in bob
    assert "AuthError (x4)" in bob
    assert "in 50m" in bob
    assert bob.endswith("...")
    assert "Web login required: xxx" in bob
    assert "x" * 100 not in bob
    carol = next(line for line in lines if line.startswith("carol ") and "never" in line)
    assert carol.split() == ["carol", "never", "-", "-", "-"]
    counters = next(line for line in lines if line.startswith("bob ") and "ago" not in line)
    assert counters.split()[:5] == ["bob", "4+", "0+", "4+", "0+"]
    assert "\r" not in text
    assert all(len(line) < 160 for line in lines)


def test_render_text_without_a_running_daemon_shows_no_next_poll() -> None:
    """When the daemon is not running, no account claims a next poll time."""
    _, accounts = sample()
    text = render_text(DaemonStatus(DaemonState.NOT_RUNNING), accounts, NOW)
    assert text.splitlines()[0] == "gpopd: daemon not running"
    assert "in 7m" not in text
    dead = DaemonStatus(DaemonState.DEAD, 99, NOW - 100, "0.1.0", NOW - 100)
    assert "crashed or killed" in render_text(dead, accounts, NOW)


def test_render_json_is_stable_and_uses_utc_iso_times() -> None:
    """The JSON report has sorted keys, ISO 8601 UTC times and every counter."""
    daemon, accounts = sample()
    text = render_json(daemon, accounts)
    document = json.loads(text)
    assert text == json.dumps(document, sort_keys=True, indent=2) + "\n"
    assert document["format"] == 1
    assert document["daemon"] == {
        "state": "running",
        "running": True,
        "pid": 4321,
        "started_at": "2023-11-14T20:13:20Z",
        "version": "0.1.0",
        "heartbeat_at": "2023-11-14T22:13:15Z",
    }
    alice, bob, carol = document["accounts"]
    assert alice["last_poll"] == {
        "started_at": "2023-11-14T22:10:18Z",
        "finished_at": "2023-11-14T22:10:20Z",
        "outcome": "ok",
        "error": None,
        "delivered": 3,
        "bytes": 2048,
    }
    assert alice["next_poll_at"] == "2023-11-14T22:20:20Z"
    assert alice["since_start"]["delivered"] == 40
    assert (alice["total_delivered"], alice["pending"], alice["skipped"]) == (500, 0, 2)
    assert bob["last_poll"]["error"].startswith("PASS failed: -ERR [AUTH] Web login required:\r\n")
    assert bob["since_start"]["truncated"] is True
    assert carol["last_poll"] is None
    assert carol["since_start"] is None
    assert set(carol) == set(alice)
