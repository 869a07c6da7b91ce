"""The fan-out ledger: which destination of a list already accepted which message.

When ``delivery:`` lists several destinations, a message counts as delivered
only once every one of them accepted it.  A destination that accepted it
while another one failed must not get it again when the message is fetched
again at the next poll; the ledger remembers who has it.  It is a small
SQLite file next to the state database (``state_dir/fanout.db``, WAL,
``synchronous=FULL``): a row is on disk before the fan-out reports that
destination as done.

Rows are ``(account, key, child)``; ``child`` is a destination's identity
(its kind and target, see ``gpopd.delivery.fanout.destination_identity``)
or ``route:`` plus a route's identity for the routing destination.  Each
commit that involves a key refreshes the time of its rows; rows untouched
for ``LEDGER_KEEP`` are removed when an account's ledger is loaded.  A
message that still fails is tried at every poll (or daily, after a permanent
refusal), so its rows stay fresh; a delivered message's rows expire.

Every connection of every ledger lives on one worker thread: SQLite
connections must stay on the thread that made them, and one thread also
serialises the writes of concurrent polls without ``SQLITE_BUSY`` waits.
"""

from __future__ import annotations

import asyncio
import functools
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from gpopd.errors import StoreError

__all__ = ["LEDGER_KEEP", "LEDGER_NAME", "ROUTE_PREFIX", "Ledger"]

LEDGER_NAME = "fanout.db"
LEDGER_KEEP = 30 * 86400.0
ROUTE_PREFIX = "route:"
BUSY_TIMEOUT_MS = 5000

T = TypeVar("T")

_thread = ThreadPoolExecutor(1, thread_name_prefix="gpopd-ledger")

_SCHEMA = """CREATE TABLE IF NOT EXISTS accepted (
    account TEXT NOT NULL,
    key TEXT NOT NULL,
    child TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (account, key, child)
) WITHOUT ROWID"""


class Ledger:
    """The ledger of one account, loaded into memory by ``load()`` for one poll."""

    def __init__(self, state_dir: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(state_dir) / LEDGER_NAME
        self._clock = clock
        self._db: sqlite3.Connection | None = None
        self._account: str | None = None
        self._rows: dict[str, set[str]] = {}

    @property
    def account(self) -> str | None:
        """The account loaded, or ``None`` before ``load()``."""
        return self._account

    async def load(self, account: str) -> None:
        """Read ``account``'s rows, after removing those older than ``LEDGER_KEEP``."""
        self._rows = await self._call(self._load, account, self._clock() - LEDGER_KEEP)
        self._account = account

    def accepted(self, key: str) -> frozenset[str]:
        """The identities of the destinations known to hold ``key``."""
        if self._account is None:
            raise RuntimeError("the ledger is not loaded: call prepare() first")
        return frozenset(self._rows.get(key, ()))

    def route(self, key: str) -> str | None:
        """The identity of the route ``key`` last took, if recorded."""
        for child in self._rows.get(key, ()):
            if child.startswith(ROUTE_PREFIX):
                return child[len(ROUTE_PREFIX) :]
        return None

    async def record(self, pairs: Iterable[tuple[str, str]], touch: Iterable[str] = ()) -> None:
        """Durably add ``(key, child)`` rows and refresh every row of the ``touch`` keys."""
        pairs = list(pairs)
        keys = {key for key, _ in pairs} | set(touch)
        if not keys:
            return
        account = self._loaded()
        await self._call(self._write, account, pairs, keys, self._clock())
        for key, child in pairs:
            self._rows.setdefault(key, set()).add(child)

    async def set_routes(self, choices: Iterable[tuple[str, str]]) -> None:
        """Durably record, per key, the one route it takes (replacing an earlier one)."""
        choices = [(key, ROUTE_PREFIX + route) for key, route in choices]
        if not choices:
            return
        account = self._loaded()
        await self._call(self._write, account, choices, set(), self._clock(), True)
        for key, child in choices:
            rows = self._rows.setdefault(key, set())
            rows.difference_update({c for c in rows if c.startswith(ROUTE_PREFIX)})
            rows.add(child)

    async def close(self) -> None:
        """Close the connection; a later ``load()`` opens it again."""
        if self._db is not None:
            await self._call(self._close)
        self._account = None
        self._rows = {}

    # -- on the ledger thread ----------------------------------------------------

    def _loaded(self) -> str:
        if self._account is None:
            raise RuntimeError("the ledger is not loaded: call prepare() first")
        return self._account

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(_thread, functools.partial(fn, *args))
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"fan-out ledger {self.path}: {exc}") from exc

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Created 0600 before SQLite opens it: its -wal and -shm files
            # take the database file's permissions.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.close(fd)
            db = sqlite3.connect(self.path, isolation_level=None)
            try:
                db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                db.execute("PRAGMA journal_mode = WAL")
                db.execute("PRAGMA synchronous = FULL")
                db.execute(_SCHEMA)
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

    def _load(self, account: str, expired_before: float) -> dict[str, set[str]]:
        db = self._connect()
        with db:
            db.execute("BEGIN IMMEDIATE")
            db.execute(
                "DELETE FROM accepted WHERE account = ? AND at < ?", (account, expired_before)
            )
        rows: dict[str, set[str]] = {}
        for key, child in db.execute(
            "SELECT key, child FROM accepted WHERE account = ?", (account,)
        ):
            rows.setdefault(key, set()).add(child)
        return rows

    def _write(
        self,
        account: str,
        pairs: list[tuple[str, str]],
        keys: set[str],
        now: float,
        replace_route: bool = False,
    ) -> None:
        db = self._connect()
        with db:
            db.execute("BEGIN IMMEDIATE")
            if replace_route:
                db.executemany(
                    "DELETE FROM accepted WHERE account = ? AND key = ? AND child LIKE 'route:%'",
                    [(account, key) for key, _ in pairs],
                )
            db.executemany(
                "INSERT OR REPLACE INTO accepted (account, key, child, at) VALUES (?, ?, ?, ?)",
                [(account, key, child, now) for key, child in pairs],
            )
            db.executemany(
                "UPDATE accepted SET at = ? WHERE account = ? AND key = ?",
                [(now, account, key) for key in sorted(keys)],
            )

    def _close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()
