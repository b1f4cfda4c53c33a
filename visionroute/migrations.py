"""Versioned schema migrations for the durable stores: ordered plain SQL, applied at open.

Each store (the review queue, the budget ledger) lists its ``Migration``s: versions 1, 2, 3...
in order, each a plain SQL script. ``migrate`` runs when a store opens: it takes the write
lock, reads the store's version from the ``schema_version`` table, applies every newer
migration and records it, all in ONE transaction, so a crash or a failing statement leaves the
database exactly at its old version. Any number of processes may open a store at once: the
first one migrates, the others find the work done.

A database whose version is newer than the code knows is refused (``ConfigError`` naming both
versions): an older VisionRoute must not write to a schema it does not understand.

Backend-neutral: a migration runs on a ``visionroute.state.Database`` (SQLite file or
PostgreSQL schema). Its SQL is written once in SQLite's portable subset; on PostgreSQL the DDL
types are translated (``state.postgres_ddl``) and a migration may give a dialect its own text
for one version (e.g. SQLite's table rebuild vs PostgreSQL's ``ALTER TABLE ... DROP
CONSTRAINT``). ``schema_version`` is keyed by store name, so several stores may share one
database. On PostgreSQL the migrating transaction holds an advisory lock per store, which
serialises concurrent openers as SQLite's write lock does.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from visionroute.errors import ConfigError
from visionroute.state import Connection, Database, postgres_ddl

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


def run_script(conn: Connection, script: str) -> None:
    """Each statement on its own (not executescript: it COMMITs first, which would break the
    one-transaction rule), with PostgreSQL's column types where the connection is PostgreSQL."""
    if conn.dialect.name == "postgres":
        script = postgres_ddl(script)
    for statement in sql_statements(script):
        conn.execute(statement)


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


def schema_version(conn: Connection, store: str) -> int:
    """The store's recorded version (0: none recorded)."""
    row = conn.execute("SELECT MAX(version) FROM schema_version WHERE store = ?", (store,)).fetchone()
    return int(row[0]) if row is not None and row[0] is not None else 0


def migrate(
    database: Database,
    store: str,
    migrations: Sequence[Migration],
    *,
    adopt_unversioned: Callable[[Any], None] | None = None,
) -> MigrationResult:
    """Bring ``store`` in ``db`` to the latest of ``migrations`` in one transaction.

    ``adopt_unversioned`` runs first (same transaction) on a database with no recorded version:
    a store whose schema predates versioning uses it to bring an old database up to its
    version 1 (which is written ``CREATE ... IF NOT EXISTS``, so on such a database it changes
    nothing and is simply recorded). Errors name the database's location.
    """
    check_order(migrations)
    latest = len(migrations)
    with database.write() as tx:
        tx.dialect.lock(tx, f"migrate:{store}")
        run_script(tx, SCHEMA_VERSION_TABLE)
        current = schema_version(tx, store)
        if current > latest:
            where = f" ({database.location})"
            raise ConfigError(
                f"the {store} database{where} is at schema version {current}, but this VisionRoute "
                f"knows versions up to {latest}; run the VisionRoute release that wrote it (or newer), "
                "or restore a backup made by this one",
                field="schema_version",
            )
        if current == 0 and adopt_unversioned is not None:
            adopt_unversioned(tx)
        for migration in migrations[current:]:
            run_script(tx, migration.sql_for(tx.dialect.name))
            tx.execute(
                "INSERT INTO schema_version (store, version, description, applied_at) VALUES (?, ?, ?, ?)",
                (store, migration.version, migration.description, time.time()),
            )
    return MigrationResult(store, current, max(current, latest))
