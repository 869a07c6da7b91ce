"""The state database: which UIDs are delivered, which are in flight, poll history.

SQLite in WAL mode with ``synchronous=FULL``: a commit that returned is
on disk, also across a power loss.  The rule the rest of gpopd builds on
is that a UID is recorded as delivered only after its delivery is
durable, and DELE'd only after that record is committed.

Rows in ``skipped`` are messages left on the server on purpose (too
large, refused by the destination for good...): fetch does not try them
again at every poll, only once their ``retry_after`` has passed, or after
``gpopd retry`` cleared them.  The ``daemon`` and ``schedule`` tables exist
for ``gpopd status``, which reads them from another process while the
daemon writes (WAL lets readers and one writer work side by side).

Rows in ``pending`` are written before a message is delivered and
removed in the same transaction that records it delivered; rows still
there at the next poll belong to a poll that died, and the destination
decides (``find_delivered``) which of them arrived.

The class is synchronous; the caller runs it in one worker thread and
serialises access (a lock here only guards against misuse).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from gpopd.accountlock import AccountLock, make_state_dir
from gpopd.errors import StoreError
from gpopd.privatefs import open_private
from gpopd.storeschema import MIGRATIONS, SCHEMA_VERSION

__all__ = ["DB_NAME", "POLL_HISTORY_KEEP", "SCHEMA_VERSION", "AccountLock", "Store"]

DB_NAME = "gpopd.db"
BUSY_TIMEOUT_MS = 5000
# Enough for weeks of status history at a one-minute interval; older rows
# only cost space.
POLL_HISTORY_KEEP = 1000

_POLL_COLUMNS = (
    "id",
    "account",
    "started_at",
    "finished_at",
    "outcome",
    "new",
    "delivered",
    "skipped",
    "bytes",
    "error",
)


class Store:
    """The state database in ``state_dir/gpopd.db``.

    ``readonly=True`` is for looking at the state of another process
    (``gpopd status``): it never creates the directory or the database (a
    mistyped path or the wrong user must not leave a root-owned database
    behind for the daemon), never migrates, and refuses every write.
    """

    def __init__(self, state_dir: Path, *, readonly: bool = False) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / DB_NAME
        self.readonly = readonly
        self._lock = threading.RLock()
        if readonly:
            if not self.path.is_file():
                raise StoreError(f"no state database at {self.path} (gpopd has not run yet?)")
        else:
            try:
                make_state_dir(self.state_dir)
                # SQLite gives its -wal and -shm files the database file's mode,
                # so creating that one 0600 first keeps all three private.
                os.close(open_private(self.path, os.O_RDWR | os.O_CREAT))
            except OSError as exc:
                raise StoreError(f"cannot create the state database {self.path}: {exc}") from exc
        try:
            if readonly:
                uri = f"file:{urllib.parse.quote(str(self.path))}?mode=ro"
                self._db = sqlite3.connect(
                    uri, uri=True, isolation_level=None, check_same_thread=False
                )
            else:
                self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the state database {self.path}: {exc}") from exc
        try:
            # Set first: every later statement may meet the daemon's write lock.
            self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if readonly:
                self._check_readable()
            else:
                self._db.execute("PRAGMA journal_mode = WAL")
                self._db.execute("PRAGMA synchronous = FULL")
                self._db.execute("PRAGMA foreign_keys = ON")
                self._migrate()
        except sqlite3.Error as exc:
            self._db.close()
            raise StoreError(f"cannot open the state database {self.path}: {exc}") from exc
        except StoreError:
            self._db.close()
            raise

    # -- life cycle -------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            try:
                self._db.close()
            except sqlite3.Error as exc:
                raise StoreError(f"closing {self.path} failed: {exc}") from exc

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        return int(self._query("PRAGMA user_version")[0][0])

    # -- delivered UIDs ---------------------------------------------------

    def delivered_uids(self, account: str) -> set[str]:
        rows = self._query("SELECT uid FROM delivered WHERE account = ?", (account,))
        return {uid for (uid,) in rows}

    def is_delivered(self, account: str, uid: str) -> bool:
        row = self._query_one(
            "SELECT 1 FROM delivered WHERE account = ? AND uid = ?", (account, uid)
        )
        return row is not None

    def delivered_since(self, account: str, uid: str) -> float | None:
        """Return when ``uid`` was recorded as delivered (epoch seconds), if it was."""
        row = self._query_one(
            "SELECT delivered_at FROM delivered WHERE account = ? AND uid = ?", (account, uid)
        )
        return None if row is None else float(row[0])

    def delivered_times(self, account: str) -> dict[str, float]:
        """Return UID -> delivery time (epoch seconds) of ``account`` (for ``delete_after``)."""
        rows = self._query("SELECT uid, delivered_at FROM delivered WHERE account = ?", (account,))
        return {str(uid): float(at) for uid, at in rows}

    def delivered_count(self, account: str) -> int:
        row = self._query_one("SELECT count(*) FROM delivered WHERE account = ?", (account,))
        return int(row[0]) if row else 0

    def mark_delivered(
        self,
        account: str,
        items: Iterable[tuple[str, str, int]],
        *,
        at: float | None = None,
    ) -> None:
        """Record ``(uid, key, size)`` items as delivered and drop their pending rows.

        One transaction for the whole window; marking a UID twice keeps the
        first record.
        """
        rows = list(items)
        if not rows:
            return
        now = time.time() if at is None else at
        with self._transaction() as db:
            self._ensure_account(db, account)
            db.executemany(
                "INSERT OR IGNORE INTO delivered (account, uid, key, size, delivered_at)"
                " VALUES (?, ?, ?, ?, ?)",
                [(account, uid, key, size, now) for uid, key, size in rows],
            )
            db.executemany(
                "DELETE FROM pending WHERE account = ? AND key = ?",
                [(account, key) for _, key, _ in rows],
            )
            # A message skipped earlier and delivered now is no longer skipped.
            db.executemany(
                "DELETE FROM skipped WHERE account = ? AND uid = ?",
                [(account, uid) for uid, _, _ in rows],
            )

    def forget(self, account: str, uids: Iterable[str]) -> None:
        with self._transaction() as db:
            db.executemany(
                "DELETE FROM delivered WHERE account = ? AND uid = ?",
                [(account, uid) for uid in uids],
            )

    # -- pending deliveries -----------------------------------------------

    def add_pending(self, account: str, items: Iterable[tuple[str, str]]) -> None:
        """Record ``(uid, key)`` items about to be delivered, in one transaction."""
        rows = list(items)
        if not rows:
            return
        now = time.time()
        with self._transaction() as db:
            self._ensure_account(db, account)
            db.executemany(
                "INSERT OR REPLACE INTO pending (account, key, uid, added_at) VALUES (?, ?, ?, ?)",
                [(account, key, uid, now) for uid, key in rows],
            )

    def pending(self, account: str) -> dict[str, str]:
        """Return the pending deliveries of ``account`` as key -> UID."""
        rows = self._query("SELECT key, uid FROM pending WHERE account = ?", (account,))
        return {str(key): str(uid) for key, uid in rows}

    def clear_pending(self, account: str, keys: Iterable[str]) -> None:
        with self._transaction() as db:
            db.executemany(
                "DELETE FROM pending WHERE account = ? AND key = ?",
                [(account, key) for key in keys],
            )

    # -- poll history -----------------------------------------------------

    def poll_started(self, account: str, started_at: float) -> int:
        """Record the start of a poll and return its id."""
        with self._transaction() as db:
            self._ensure_account(db, account)
            cursor = db.execute(
                "INSERT INTO poll (account, started_at) VALUES (?, ?)", (account, started_at)
            )
            poll_id = cursor.lastrowid
            # Ids are shared by all accounts: prune below this account's own
            # POLL_HISTORY_KEEP-th newest poll (NULL, so nothing, if fewer).
            db.execute(
                "DELETE FROM poll WHERE account = ? AND id < ("
                " SELECT id FROM poll WHERE account = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (account, account, POLL_HISTORY_KEEP - 1),
            )
        if poll_id is None:
            raise StoreError(f"recording a poll of {account} returned no id")
        return poll_id

    def poll_finished(
        self,
        poll_id: int,
        *,
        finished_at: float,
        outcome: str,
        new: int,
        delivered: int,
        skipped: int,
        bytes: int,
        error: str | None,
    ) -> None:
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE poll SET finished_at = ?, outcome = ?, new = ?, delivered = ?,"
                " skipped = ?, bytes = ?, error = ? WHERE id = ?",
                (finished_at, outcome, new, delivered, skipped, bytes, error, poll_id),
            )
            if cursor.rowcount != 1:
                raise StoreError(f"no poll with id {poll_id} to finish")

    def last_poll(self, account: str) -> dict[str, Any] | None:
        history = self.poll_history(account, limit=1)
        return history[0] if history else None

    def poll_history(self, account: str, limit: int = 20) -> list[dict[str, Any]]:
        """Return the latest ``limit`` polls of ``account``, newest first."""
        rows = self._query(
            "SELECT id, account, started_at, finished_at, outcome, new, delivered, skipped,"
            " bytes, error FROM poll WHERE account = ? ORDER BY id DESC LIMIT ?",
            (account, limit),
        )
        return [dict(zip(_POLL_COLUMNS, row, strict=True)) for row in rows]

    def polls_since(self, account: str, since: float) -> dict[str, Any]:
        """Count the polls of ``account`` that started at or after ``since``.

        Returns ``polls``, ``ok``, ``failed`` (finished with any outcome but
        ``ok`` or ``cancelled``), ``delivered`` and ``bytes``, and
        ``truncated``: True when pruning (POLL_HISTORY_KEEP) may have removed
        polls after ``since``, so that the counts are a lower bound.
        """
        row = self._query_one(
            "SELECT count(*), count(*) FILTER (WHERE outcome = 'ok'),"
            " count(*) FILTER (WHERE outcome NOT IN ('ok', 'cancelled')),"
            " coalesce(sum(delivered), 0), coalesce(sum(bytes), 0)"
            " FROM poll WHERE account = ? AND started_at >= ?",
            (account, since),
        )
        polls, ok, failed, delivered, size = row if row else (0, 0, 0, 0, 0)
        oldest = self._query_one(
            "SELECT count(*), min(started_at) FROM poll WHERE account = ?", (account,)
        )
        kept, first = oldest if oldest else (0, None)
        truncated = kept >= POLL_HISTORY_KEEP and first is not None and first > since
        return {
            "polls": int(polls),
            "ok": int(ok),
            "failed": int(failed),
            "delivered": int(delivered),
            "bytes": int(size),
            "truncated": bool(truncated),
        }

    # -- the running daemon and its schedule --------------------------------

    def daemon_started(self, pid: int, started_at: float, version: str) -> None:
        """Record the daemon now using this state directory (replacing any older record)."""
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO daemon (id, pid, started_at, version, heartbeat_at)"
                " VALUES (1, ?, ?, ?, ?)",
                (pid, started_at, version, started_at),
            )

    def daemon_heartbeat(self, at: float) -> None:
        with self._transaction() as db:
            db.execute("UPDATE daemon SET heartbeat_at = ? WHERE id = 1", (at,))

    def daemon_stopped(self, pid: int | None = None) -> None:
        """Forget the daemon record; with ``pid``, only if it is still that daemon's."""
        with self._transaction() as db:
            if pid is None:
                db.execute("DELETE FROM daemon")
            else:
                db.execute("DELETE FROM daemon WHERE pid = ?", (pid,))

    def daemon_info(self) -> dict[str, Any] | None:
        """Return ``pid``, ``started_at``, ``version``, ``heartbeat_at``, or None."""
        row = self._query_one("SELECT pid, started_at, version, heartbeat_at FROM daemon")
        if row is None:
            return None
        return dict(zip(("pid", "started_at", "version", "heartbeat_at"), row, strict=True))

    def set_schedule(
        self,
        account: str,
        next_poll_at: float | None,
        interval: float | None,
        consecutive_failures: int,
    ) -> None:
        self.set_schedules([(account, next_poll_at, interval, consecutive_failures)])

    def set_schedules(self, items: Iterable[tuple[str, float | None, float | None, int]]) -> None:
        """Record (account, next_poll_at, interval, consecutive_failures) in one transaction."""
        rows = list(items)
        if not rows:
            return
        now = time.time()
        with self._transaction() as db:
            for account, next_poll_at, interval, failures in rows:
                self._ensure_account(db, account)
                db.execute(
                    "INSERT OR REPLACE INTO schedule (account, next_poll_at, interval,"
                    " consecutive_failures, updated_at) VALUES (?, ?, ?, ?, ?)",
                    (account, next_poll_at, interval, failures, now),
                )

    def schedules(self) -> dict[str, dict[str, Any]]:
        """Return account -> ``next_poll_at``, ``interval``, ``consecutive_failures``,
        ``updated_at``."""
        rows = self._query(
            "SELECT account, next_poll_at, interval, consecutive_failures, updated_at"
            " FROM schedule ORDER BY account"
        )
        keys = ("next_poll_at", "interval", "consecutive_failures", "updated_at")
        return {str(row[0]): dict(zip(keys, row[1:], strict=True)) for row in rows}

    # -- messages left on the server on purpose ------------------------------

    def mark_skipped(
        self, account: str, items: Iterable[tuple[str, str, int | None, float | None]]
    ) -> None:
        """Record ``(uid, reason, size, retry_after)`` items; a UID keeps its ``first_at``.

        ``retry_after`` None means "until cleared" (``gpopd retry``).
        """
        rows = list(items)
        if not rows:
            return
        now = time.time()
        with self._transaction() as db:
            self._ensure_account(db, account)
            db.executemany(
                "INSERT INTO skipped (account, uid, reason, size, first_at, retry_after)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (account, uid) DO UPDATE SET"
                " reason = excluded.reason, size = excluded.size,"
                " retry_after = excluded.retry_after",
                [(account, uid, reason, size, now, retry) for uid, reason, size, retry in rows],
            )

    def skipped_uids(self, account: str, now: float) -> dict[str, str]:
        """Return UID -> reason for the skipped messages not yet due for another try."""
        rows = self._query(
            "SELECT uid, reason FROM skipped WHERE account = ?"
            " AND (retry_after IS NULL OR retry_after > ?)",
            (account, now),
        )
        return {str(uid): str(reason) for uid, reason in rows}

    def clear_skipped(self, account: str, uids: Iterable[str] | None = None) -> None:
        """Forget skipped messages of ``account``: the given UIDs, or all of them."""
        with self._transaction() as db:
            if uids is None:
                db.execute("DELETE FROM skipped WHERE account = ?", (account,))
            else:
                db.executemany(
                    "DELETE FROM skipped WHERE account = ? AND uid = ?",
                    [(account, uid) for uid in uids],
                )

    # -- accounts -----------------------------------------------------------

    def accounts(self) -> list[str]:
        return [name for (name,) in self._query("SELECT name FROM account ORDER BY name")]

    # -- internals --------------------------------------------------------

    def _check_version(self) -> int:
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {version}, newer than this gpopd"
                f" understands ({SCHEMA_VERSION}); upgrade gpopd or restore a backup"
            )
        return version

    def _check_readable(self) -> None:
        if self._check_version() < SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has an older schema version; it is upgraded the next time"
                " gpopd polls or starts (gpopd poll, gpopd run)"
            )

    def _migrate(self) -> None:
        version = self._check_version()
        for step in range(version, SCHEMA_VERSION):
            with self._transaction() as db:
                MIGRATIONS[step](db)
                # user_version lives in the database header, so it changes
                # in the same transaction as the schema.
                db.execute(f"PRAGMA user_version = {step + 1}")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        if self.readonly:
            raise StoreError(f"{self.path} is open read-only")
        with self._lock:
            db = self._db
            try:
                # IMMEDIATE takes the write lock up front, so a busy database
                # waits in BEGIN (busy_timeout) rather than failing mid-way.
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: cannot begin a transaction: {exc}") from exc
            try:
                yield db
                db.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"{self.path}: {exc}") from exc
                raise

    def _query(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._db.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: {exc}") from exc

    def _query_one(self, sql: str, params: tuple[object, ...] = ()) -> tuple[Any, ...] | None:
        rows = self._query(sql, params)
        return rows[0] if rows else None

    @staticmethod
    def _ensure_account(db: sqlite3.Connection, account: str) -> None:
        db.execute("INSERT OR IGNORE INTO account (name) VALUES (?)", (account,))
