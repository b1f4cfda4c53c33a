"""SQLite the way every VisionRoute store uses it: WAL, durable commits, explicit transactions.

The review queue, the budget ledger and the search index's metadata all keep state that must
survive a crash once acknowledged, and all are opened by several threads and processes.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tenacity import retry, retry_if_exception, stop_after_delay, wait_random_exponential


def connect(path: str | Path, *, rows_as_dicts: bool = False) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, fsync on commit."""
    db = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    if rows_as_dicts:
        db.row_factory = sqlite3.Row
    _use_wal(db)  # readers never block the writer
    db.execute("PRAGMA synchronous=FULL")  # a committed write survives power loss
    db.execute("PRAGMA busy_timeout=30000")
    return db


def _is_locked(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)


# Switching a new file to WAL needs its exclusive lock, and SQLite answers "database is locked" at
# once (no busy wait) while another process is opening or switching the same file: retry it.
@retry(
    retry=retry_if_exception(_is_locked),
    stop=stop_after_delay(30),
    wait=wait_random_exponential(multiplier=0.01, max=0.5),
    reraise=True,
)
def _use_wal(db: sqlite3.Connection) -> None:
    db.execute("PRAGMA journal_mode=WAL")


@contextmanager
def immediate_transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """Take the write lock up front (no upgrade deadlocks); roll back on any exception."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


class PerThreadConnections:
    """One connection per thread: sqlite3 connections must not be shared across threads."""

    def __init__(self, path: str | Path, *, rows_as_dicts: bool = False) -> None:
        self.path = Path(path)
        self.rows_as_dicts = rows_as_dicts
        self._local = threading.local()

    def get(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = connect(self.path, rows_as_dicts=self.rows_as_dicts)
        return db
