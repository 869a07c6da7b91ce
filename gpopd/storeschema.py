"""The state database's schema, as the migrations that build it.

``MIGRATIONS[n]`` takes a database from ``PRAGMA user_version`` n to n + 1;
``Store`` runs the missing steps, each in its own transaction, when it opens
a database for writing.  A step, once released, is never changed: databases
in the field were built by it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

__all__ = ["MIGRATIONS", "SCHEMA_VERSION"]


def _schema_1(db: sqlite3.Connection) -> None:
    db.execute("CREATE TABLE account (name TEXT PRIMARY KEY) WITHOUT ROWID")
    db.execute(
        """CREATE TABLE delivered (
            account TEXT NOT NULL REFERENCES account(name),
            uid TEXT NOT NULL,
            key TEXT NOT NULL,
            size INTEGER NOT NULL,
            delivered_at REAL NOT NULL,
            PRIMARY KEY (account, uid)
        ) WITHOUT ROWID"""
    )
    db.execute(
        """CREATE TABLE pending (
            account TEXT NOT NULL REFERENCES account(name),
            key TEXT NOT NULL,
            uid TEXT NOT NULL,
            added_at REAL NOT NULL,
            PRIMARY KEY (account, key)
        ) WITHOUT ROWID"""
    )
    db.execute(
        """CREATE TABLE poll (
            id INTEGER PRIMARY KEY,
            account TEXT NOT NULL REFERENCES account(name),
            started_at REAL NOT NULL,
            finished_at REAL,
            outcome TEXT,
            new INTEGER NOT NULL DEFAULT 0,
            delivered INTEGER NOT NULL DEFAULT 0,
            skipped INTEGER NOT NULL DEFAULT 0,
            bytes INTEGER NOT NULL DEFAULT 0,
            error TEXT
        )"""
    )
    db.execute("CREATE INDEX poll_by_account ON poll (account, id)")


def _schema_2(db: sqlite3.Connection) -> None:
    # At most one row: the daemon that uses this state directory now.
    db.execute(
        """CREATE TABLE daemon (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            pid INTEGER NOT NULL,
            started_at REAL NOT NULL,
            version TEXT NOT NULL,
            heartbeat_at REAL NOT NULL
        )"""
    )
    db.execute(
        """CREATE TABLE schedule (
            account TEXT PRIMARY KEY REFERENCES account(name),
            next_poll_at REAL,
            interval REAL,
            consecutive_failures INTEGER NOT NULL DEFAULT 0,
            updated_at REAL NOT NULL
        ) WITHOUT ROWID"""
    )
    db.execute(
        """CREATE TABLE skipped (
            account TEXT NOT NULL REFERENCES account(name),
            uid TEXT NOT NULL,
            reason TEXT NOT NULL,
            size INTEGER,
            first_at REAL NOT NULL,
            retry_after REAL,
            PRIMARY KEY (account, uid)
        ) WITHOUT ROWID"""
    )


MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_schema_1, _schema_2)
SCHEMA_VERSION = len(MIGRATIONS)
