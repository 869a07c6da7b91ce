"""Tests of the state database and the account lock."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpopd import store as store_module
from gpopd.errors import StoreError
from gpopd.store import DB_NAME, SCHEMA_VERSION, AccountLock, Store

ROOT = Path(__file__).resolve().parents[1]
ALICE = "alice"
BOB = "bob"


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def store(state_dir: Path) -> Iterator[Store]:
    with Store(state_dir) as opened:
        yield opened


@pytest.fixture
def umask_zero() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        text=True,
        capture_output=True,
        check=False,
        timeout=60,
    )


# -- files, modes, schema -------------------------------------------------------


@pytest.mark.usefixtures("umask_zero")
def test_state_dir_and_database_files_are_private_even_with_umask_zero(state_dir: Path) -> None:
    """The state directory is created 0700 and the database and its WAL 0600 under umask 0."""
    with Store(state_dir) as opened:
        opened.mark_delivered(ALICE, [("u1", "k1", 10)])
        assert mode(state_dir) == 0o700
        assert mode(state_dir / DB_NAME) == 0o600
        wal = state_dir / f"{DB_NAME}-wal"
        assert wal.exists()
        assert mode(wal) == 0o600


def test_missing_parents_of_the_state_dir_are_created(tmp_path: Path) -> None:
    """A state directory several levels below an existing one is created with its parents."""
    deep = tmp_path / "a" / "b" / "state"
    with Store(deep) as opened:
        opened.add_pending(ALICE, [("u", "k")])
    assert (deep / DB_NAME).is_file()
    assert mode(deep) == 0o700


def test_schema_version_is_recorded(store: Store, state_dir: Path) -> None:
    """A new database carries the current schema version in PRAGMA user_version."""
    assert store.schema_version == SCHEMA_VERSION >= 1
    raw = sqlite3.connect(state_dir / DB_NAME)
    try:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        raw.close()


def test_connection_is_durable_and_checks_foreign_keys(store: Store) -> None:
    """The connection runs with synchronous=FULL, foreign keys on and a 5 s busy timeout."""
    db = store._db
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert db.execute("PRAGMA busy_timeout").fetchone()[0] == 5000


def test_migration_steps_run_in_order_on_an_older_database(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening a database of an older schema version applies each later migration once."""
    Store(state_dir).close()

    def add_note_column(db: sqlite3.Connection) -> None:
        db.execute("ALTER TABLE delivered ADD COLUMN note TEXT")

    monkeypatch.setattr(store_module, "MIGRATIONS", (*store_module.MIGRATIONS, add_note_column))
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with Store(state_dir) as opened:
        assert opened.schema_version == SCHEMA_VERSION + 1
        columns = [row[1] for row in opened._db.execute("PRAGMA table_info(delivered)")]
        assert "note" in columns
    # A second open must not run the step again (ALTER TABLE would fail).
    with Store(state_dir) as opened:
        assert opened.schema_version == SCHEMA_VERSION + 1


def test_newer_schema_version_is_refused(state_dir: Path) -> None:
    """A database written by a newer gpopd is refused rather than misread."""
    Store(state_dir).close()
    raw = sqlite3.connect(state_dir / DB_NAME)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    raw.close()
    with pytest.raises(StoreError, match="newer than this gpopd"):
        Store(state_dir)


def test_corrupt_database_raises_store_error(state_dir: Path) -> None:
    """A file that is not a database gives StoreError, not a bare sqlite3 error."""
    state_dir.mkdir()
    (state_dir / DB_NAME).write_bytes(b"this is not an SQLite database at all" * 100)
    with pytest.raises(StoreError):
        Store(state_dir)


# -- delivered and pending ------------------------------------------------------


def test_delivered_round_trip(store: Store) -> None:
    """UIDs marked delivered come back per account with their delivery time."""
    store.mark_delivered(ALICE, [("u1", "k1", 100), ("u2", "k2", 200)], at=1000.0)
    store.mark_delivered(BOB, [("u1", "kb1", 5)], at=2000.0)
    assert store.delivered_uids(ALICE) == {"u1", "u2"}
    assert store.delivered_uids(BOB) == {"u1"}
    assert store.delivered_uids("nobody") == set()
    assert store.is_delivered(ALICE, "u2")
    assert not store.is_delivered(ALICE, "u3")
    assert store.delivered_since(ALICE, "u1") == 1000.0
    assert store.delivered_since(BOB, "u1") == 2000.0
    assert store.delivered_since(ALICE, "missing") is None


def test_uids_are_stored_exactly(store: Store) -> None:
    """UIDs with odd but legal characters and non-ASCII text round-trip unchanged."""
    uids = {"GmailId17f0a1b2c3d4e5f6", "a'b\"c;--", "x" * 300, "ünï\u00e7ødé", "%2F/.."}
    store.mark_delivered(ALICE, [(uid, f"k{i}", 1) for i, uid in enumerate(uids)])
    assert store.delivered_uids(ALICE) == uids


def test_mark_delivered_is_idempotent_and_keeps_the_first_record(store: Store) -> None:
    """Marking a UID again changes nothing: the first delivery time stays."""
    store.mark_delivered(ALICE, [("u1", "k1", 100)], at=1.0)
    store.mark_delivered(ALICE, [("u1", "k1", 100)], at=2.0)
    store.mark_delivered(ALICE, [("u1", "k1", 100), ("u1", "k1", 100)], at=3.0)
    assert store.delivered_uids(ALICE) == {"u1"}
    assert store.delivered_since(ALICE, "u1") == 1.0
    count = store._db.execute("SELECT count(*) FROM delivered").fetchone()[0]
    assert count == 1


def test_pending_round_trip_and_clear(store: Store) -> None:
    """Pending rows map key to UID per account and can be cleared selectively."""
    store.add_pending(ALICE, [("u1", "k1"), ("u2", "k2"), ("u3", "k3")])
    store.add_pending(BOB, [("u1", "kb1")])
    assert store.pending(ALICE) == {"k1": "u1", "k2": "u2", "k3": "u3"}
    store.clear_pending(ALICE, ["k1", "k3", "unknown"])
    assert store.pending(ALICE) == {"k2": "u2"}
    assert store.pending(BOB) == {"kb1": "u1"}
    store.add_pending(ALICE, [("u2", "k2")])  # a retry of the same message
    assert store.pending(ALICE) == {"k2": "u2"}


def test_mark_delivered_removes_exactly_its_pending_rows(store: Store) -> None:
    """Delivered messages leave pending; the rest of the window and other accounts stay."""
    store.add_pending(ALICE, [("u1", "k1"), ("u2", "k2"), ("u3", "k3")])
    store.add_pending(BOB, [("u1", "k1")])
    store.mark_delivered(ALICE, [("u1", "k1", 10), ("u3", "k3", 30)])
    assert store.pending(ALICE) == {"k2": "u2"}
    assert store.pending(BOB) == {"k1": "u1"}
    assert store.delivered_uids(ALICE) == {"u1", "u3"}


def test_mark_delivered_is_one_transaction(store: Store, state_dir: Path) -> None:
    """If removing the pending rows fails, no UID of the window is recorded as delivered."""
    store.add_pending(ALICE, [("u1", "k1"), ("u2", "k2")])
    raw = sqlite3.connect(state_dir / DB_NAME)
    raw.execute(
        "CREATE TRIGGER refuse BEFORE DELETE ON pending WHEN old.key = 'k2'"
        " BEGIN SELECT RAISE(ABORT, 'refused'); END"
    )
    raw.commit()
    raw.close()
    with pytest.raises(StoreError, match="refused"):
        store.mark_delivered(ALICE, [("u1", "k1", 10), ("u2", "k2", 20)])
    assert store.delivered_uids(ALICE) == set()
    assert store.pending(ALICE) == {"k1": "u1", "k2": "u2"}
    # The connection is usable again after the rollback.
    store.mark_delivered(ALICE, [("u1", "k1", 10)])
    assert store.delivered_uids(ALICE) == {"u1"}


def test_forget_drops_only_the_given_uids(store: Store) -> None:
    """forget() removes delivered rows of one account and leaves everything else."""
    store.mark_delivered(ALICE, [("u1", "k1", 1), ("u2", "k2", 1)])
    store.mark_delivered(BOB, [("u1", "kb1", 1)])
    store.forget(ALICE, ["u1", "never-seen"])
    assert store.delivered_uids(ALICE) == {"u2"}
    assert store.delivered_uids(BOB) == {"u1"}


def test_empty_batches_are_no_ops(store: Store) -> None:
    """Empty item lists neither fail nor create an account."""
    store.mark_delivered(ALICE, [])
    store.add_pending(ALICE, [])
    store.clear_pending(ALICE, [])
    store.forget(ALICE, [])
    assert store.accounts() == []


def test_closed_store_raises_store_error(state_dir: Path) -> None:
    """Using a closed store raises StoreError."""
    opened = Store(state_dir)
    opened.close()
    with pytest.raises(StoreError):
        opened.delivered_uids(ALICE)


# -- crash safety -----------------------------------------------------------------


def test_committed_rows_survive_a_store_that_was_never_closed(state_dir: Path) -> None:
    """A second Store on the same directory sees what a still-open first one committed."""
    first = Store(state_dir)
    first.add_pending(ALICE, [("u2", "k2")])
    first.mark_delivered(ALICE, [("u1", "k1", 10)])
    second = Store(state_dir)
    try:
        assert second.delivered_uids(ALICE) == {"u1"}
        assert second.pending(ALICE) == {"k2": "u2"}
    finally:
        second.close()
        first.close()


def test_committed_rows_survive_a_killed_process(state_dir: Path) -> None:
    """Rows committed by a process that dies without closing the store are there afterwards."""
    result = run_python(
        f"""
        import os
        from pathlib import Path
        from gpopd.store import Store
        s = Store(Path({str(state_dir)!r}))
        s.add_pending("alice", [("u1", "k1"), ("u2", "k2")])
        s.mark_delivered("alice", [("u1", "k1", 10)])
        started = s.poll_started("alice", 5.0)
        os._exit(0)
        """
    )
    assert result.returncode == 0, result.stderr
    # The process left its WAL behind un-checkpointed; opening must recover from it.
    assert (state_dir / f"{DB_NAME}-wal").exists()
    with Store(state_dir) as reopened:
        assert reopened.delivered_uids(ALICE) == {"u1"}
        assert reopened.pending(ALICE) == {"k2": "u2"}
        last = reopened.last_poll(ALICE)
        assert last is not None
        assert last["started_at"] == 5.0
        assert last["finished_at"] is None


# -- poll history -----------------------------------------------------------------


def test_poll_history_records_and_orders_polls(store: Store) -> None:
    """Finished polls come back newest first with every counter, limited on request."""
    first = store.poll_started(ALICE, 100.0)
    store.poll_finished(
        first,
        finished_at=101.0,
        outcome="ok",
        new=3,
        delivered=3,
        skipped=0,
        bytes=4096,
        error=None,
    )
    second = store.poll_started(ALICE, 200.0)
    store.poll_finished(
        second,
        finished_at=202.5,
        outcome="auth",
        new=0,
        delivered=0,
        skipped=0,
        bytes=0,
        error="PASS failed: -ERR [AUTH] Username and password not accepted.",
    )
    store.poll_started(BOB, 300.0)
    assert second > first
    history = store.poll_history(ALICE)
    assert [poll["id"] for poll in history] == [second, first]
    assert history[1] == {
        "id": first,
        "account": ALICE,
        "started_at": 100.0,
        "finished_at": 101.0,
        "outcome": "ok",
        "new": 3,
        "delivered": 3,
        "skipped": 0,
        "bytes": 4096,
        "error": None,
    }
    assert store.last_poll(ALICE) == history[0]
    assert history[0]["error"].startswith("PASS failed")
    assert store.poll_history(ALICE, limit=1) == [history[0]]
    assert store.last_poll("nobody") is None


def test_unfinished_poll_is_the_last_poll(store: Store) -> None:
    """A poll that started and never finished shows as the last poll with no outcome."""
    store.poll_started(ALICE, 10.0)
    last = store.last_poll(ALICE)
    assert last is not None
    assert last["finished_at"] is None
    assert last["outcome"] is None


def test_finishing_an_unknown_poll_fails(store: Store) -> None:
    """poll_finished() with an id that was never started raises StoreError."""
    with pytest.raises(StoreError, match="no poll with id 999"):
        store.poll_finished(
            999,
            finished_at=1.0,
            outcome="ok",
            new=0,
            delivered=0,
            skipped=0,
            bytes=0,
            error=None,
        )


def test_old_poll_history_is_pruned(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the newest POLL_HISTORY_KEEP polls of an account are kept."""
    monkeypatch.setattr(store_module, "POLL_HISTORY_KEEP", 3)
    bob = store.poll_started(BOB, 0.0)
    ids = []
    for n in range(6):
        ids.append(store.poll_started(ALICE, float(n)))
        store.poll_started("carol", float(n))  # interleaved ids of another account
    assert [poll["id"] for poll in store.poll_history(ALICE, limit=100)] == ids[:2:-1]
    assert len(store.poll_history("carol", limit=100)) == 3
    assert [poll["id"] for poll in store.poll_history(BOB)] == [bob]


def test_accounts_lists_every_account_seen(store: Store) -> None:
    """accounts() names each account that has a delivery, a pending row or a poll, sorted."""
    store.poll_started("carol", 1.0)
    store.mark_delivered(BOB, [("u", "k", 1)])
    store.add_pending(ALICE, [("u", "k")])
    store.mark_delivered(ALICE, [("u", "k", 1)])
    assert store.accounts() == [ALICE, BOB, "carol"]


# -- account lock -----------------------------------------------------------------


@pytest.mark.usefixtures("umask_zero")
def test_account_lock_files_are_private(state_dir: Path) -> None:
    """The lock directory is 0700 and the lock file 0600 and holds the holder's pid."""
    with AccountLock(state_dir, ALICE) as lock:
        assert lock.held
        assert mode(state_dir / "locks") == 0o700
        assert mode(lock.path) == 0o600
        assert lock.path.read_text().strip() == str(os.getpid())
    assert not lock.held


def test_account_lock_excludes_a_second_holder_in_the_same_process(state_dir: Path) -> None:
    """flock is per open file description, so a second lock in one process is refused."""
    with AccountLock(state_dir, ALICE):
        second = AccountLock(state_dir, ALICE)
        with pytest.raises(StoreError, match=rf"account alice .*another .* \(pid {os.getpid()}\)"):
            second.acquire()
        assert not second.held
        # Other accounts are independent.
        with AccountLock(state_dir, BOB):
            pass
    with AccountLock(state_dir, ALICE) as again:
        assert again.held


def test_account_lock_excludes_another_process(state_dir: Path) -> None:
    """A lock held by another process is refused with that process's pid, and freed when it dies."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\n"
            "from pathlib import Path\n"
            "from gpopd.store import AccountLock\n"
            f"lock = AccountLock(Path({str(state_dir)!r}), 'alice')\n"
            "lock.acquire()\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()\n",
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreError, match=rf"\(pid {holder.pid}\)"):
            AccountLock(state_dir, ALICE).acquire()
    finally:
        holder.kill()
        holder.wait(timeout=30)
        assert holder.stdin is not None
        holder.stdin.close()
        assert holder.stdout is not None
        holder.stdout.close()
    with AccountLock(state_dir, ALICE) as lock:
        assert lock.held


def test_account_lock_name_cannot_escape_the_lock_directory(state_dir: Path) -> None:
    """An account name with slashes still gives a lock file inside locks/."""
    with AccountLock(state_dir, "../../etc/passwd") as lock:
        assert lock.path.parent == state_dir / "locks"
        assert lock.path.is_file()
    assert not (state_dir.parent / "etc").exists()


def test_account_lock_cannot_be_acquired_twice_by_one_object(state_dir: Path) -> None:
    """Acquiring a lock object that is already held is a programming error."""
    lock = AccountLock(state_dir, ALICE)
    lock.acquire()
    try:
        with pytest.raises(RuntimeError):
            lock.acquire()
    finally:
        lock.release()
    lock.release()  # idempotent
    assert not lock.held
