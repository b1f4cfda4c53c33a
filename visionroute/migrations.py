"""Versioned schema migrations for the durable stores: ordered plain SQL, applied at open.

Each store (the review queue, the budget ledger) lists its ``Migration``s: versions 1, 2, 3...
in order, each a plain SQL script. ``migrate`` runs when a store opens: it takes the write
lock, reads the store's version from the ``schema_version`` table, applies every newer
migration and records it, all in ONE transaction, so a crash or a failing statement leaves the
database exactly at its old version. Any number of processes may open a store at once: the
first one migrates, the others find the work done.

A database whose version is newer than the code knows is refused (``ConfigError`` naming both
versions): an older VisionRoute must not write to a schema it does not understand.

Backend-neutral on purpose, so a PostgreSQL store can reuse it: the SQL is standard where it
can be (a migration may give a dialect its own text for one version, e.g. SQLite's table
rebuild vs PostgreSQL's ``ALTER TABLE ... DROP CONSTRAINT``), ``schema_version`` is keyed by
store name (several stores may share one PostgreSQL database), and everything specific to a
backend (its placeholder, how to open the locking transaction, how to run a script) is one
``Dialect`` value. ``SQLITE`` is the one in use.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from visionroute.errors import ConfigError
from visionroute.sqlite import immediate_transaction

SCHEMA_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    store TEXT NOT NULL,
    version INTEGER NOT NULL,
    description TEXT NOT NULL,
    applied_at REAL NOT NULL,
    PRIMARY KEY (store, version)
)
"""


@dataclass(frozen=True)
class Migration:
    """One schema version: the SQL that takes a store from ``version - 1`` to ``version``."""

    version: int
    description: str
    sql: str
    dialect_sql: Mapping[str, str] = field(default_factory=dict)

    def sql_for(self, dialect: str) -> str:
        return self.dialect_sql.get(dialect, self.sql)


@dataclass(frozen=True)
class Dialect:
    """What differs between backends: the parameter placeholder, the transaction that holds
    the write lock for the whole migration, and how a multi-statement script is executed."""

    name: str
    placeholder: str
    transaction: Callable[[Any], AbstractContextManager[Any]]
    run_script: Callable[[Any, str], None]


def sql_statements(script: str) -> Iterator[str]:
    """The complete statements of a script (``;`` inside strings or triggers stays put)."""
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \t\r\n;"):
                yield pending.strip()
            pending = ""
    if pending.strip(" \t\r\n;"):
        raise ValueError(f"incomplete SQL statement at the end of a migration: {pending.strip()[:80]!r}")


def _run_sqlite_script(db: sqlite3.Connection, script: str) -> None:
    # Not executescript: it COMMITs first, which would break the one-transaction rule.
    for statement in sql_statements(script):
        db.execute(statement)


SQLITE = Dialect("sqlite", "?", immediate_transaction, _run_sqlite_script)


@dataclass(frozen=True)
class MigrationResult:
    store: str
    from_version: int
    to_version: int

    @property
    def applied(self) -> list[int]:
        return list(range(self.from_version + 1, self.to_version + 1))


def check_order(migrations: Sequence[Migration]) -> None:
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise ValueError(f"migrations must be numbered 1, 2, 3... in order; got {versions}")


def schema_version(db: Any, store: str, dialect: Dialect = SQLITE) -> int:
    """The store's recorded version (0: none recorded)."""
    row = db.execute(
        f"SELECT MAX(version) FROM schema_version WHERE store = {dialect.placeholder}", (store,)
    ).fetchone()
    return int(row[0]) if row is not None and row[0] is not None else 0


def migrate(
    db: Any,
    store: str,
    migrations: Sequence[Migration],
    *,
    dialect: Dialect = SQLITE,
    location: str = "",
    adopt_unversioned: Callable[[Any], None] | None = None,
) -> MigrationResult:
    """Bring ``store`` in ``db`` to the latest of ``migrations`` in one transaction.

    ``adopt_unversioned`` runs first (same transaction) on a database with no recorded version:
    a store whose schema predates versioning uses it to bring an old database up to its
    version 1 (which is written ``CREATE ... IF NOT EXISTS``, so on such a database it changes
    nothing and is simply recorded). ``location`` names the database in errors.
    """
    check_order(migrations)
    latest = len(migrations)
    mark = dialect.placeholder
    with dialect.transaction(db) as tx:
        dialect.run_script(tx, SCHEMA_VERSION_TABLE)
        current = schema_version(tx, store, dialect)
        if current > latest:
            where = f" ({location})" if location else ""
            raise ConfigError(
                f"the {store} database{where} is at schema version {current}, but this VisionRoute "
                f"knows versions up to {latest}; run the VisionRoute release that wrote it (or newer), "
                "or restore a backup made by this one",
                field="schema_version",
            )
        if current == 0 and adopt_unversioned is not None:
            adopt_unversioned(tx)
        for migration in migrations[current:]:
            dialect.run_script(tx, migration.sql_for(dialect.name))
            tx.execute(
                f"INSERT INTO schema_version (store, version, description, applied_at)"
                f" VALUES ({mark}, {mark}, {mark}, {mark})",
                (store, migration.version, migration.description, time.time()),
            )
    return MigrationResult(store, current, max(current, latest))
