"""Where the durable stores keep their state: SQLite files (one node) or PostgreSQL (a cluster).

Every durable store (the review queue and its images, the budget ledger, the search index's
metadata and operation log) talks to a ``Database``, not to a driver:

- ``db.read()`` gives a connection for reads (autocommit);
- ``db.write()`` gives one inside a transaction, committed when the block ends and rolled
  back on any exception. On SQLite it holds the file's write lock from the start (``BEGIN
  IMMEDIATE``), which serialises every writer of every process. On PostgreSQL it is a plain
  transaction: a store that needs serialisation takes it explicitly and narrowly
  (``db.dialect.lock(conn, key)``: a transaction-scoped advisory lock; ``FOR UPDATE SKIP
  LOCKED`` for claims), so writers on different nodes only wait for the rows they share.

Stores write SQL once, with ``?`` placeholders and SQLite's portable subset (``ON CONFLICT``,
``RETURNING``); the PostgreSQL connection translates placeholders, and migrations' DDL is
translated by ``postgres_ddl`` (``REAL`` is 4 bytes in PostgreSQL and would round a Unix time
to minutes, so it becomes ``DOUBLE PRECISION``; ``INTEGER`` becomes ``BIGINT``, ``BLOB``
``BYTEA``). Rows answer both ``row[0]`` and ``row["name"]`` on both backends.

On PostgreSQL each store lives in its own schema (``search_path`` is set per pool), so stores
with the same table names share one database, and each store has its own small pool: the
connection budget is (stores x pool_max) per process, which docs/operations.md sizes.

A database that cannot be reached raises ``StateUnavailable`` (HTTP 503 with Retry-After,
gRPC UNAVAILABLE): the request is refused, never half-done, and the store works again once
the server is back (the pool reconnects).
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from visionroute.errors import BackendUnavailable, ConfigError
from visionroute.sqlite import connect as sqlite_connect
from visionroute.sqlite import immediate_transaction

Backend = Literal["sqlite", "postgres"]
RETRY_AFTER_S = 5.0


class StateConfig(BaseModel):
    """``state:`` in the app config: where every durable store lives."""

    model_config = ConfigDict(extra="forbid")

    backend: Backend = Field(
        "sqlite",
        description="sqlite: files under review.path / retrieval.index_dir (one node); postgres: shared",
    )
    dsn_env: str = Field(
        "VISIONROUTE_PG_DSN",
        min_length=1,
        description="environment variable holding the PostgreSQL DSN (never the DSN itself: it has a password)",
    )
    schema_prefix: str = Field(
        "visionroute",
        pattern=r"^[a-z_][a-z0-9_]{0,30}$",
        description="each store lives in the PostgreSQL schema <prefix>_<store>",
    )
    pool_min: int = Field(1, ge=0, le=64, description="connections each store's pool keeps open")
    pool_max: int = Field(4, ge=1, le=256, description="most connections each store's pool opens")
    pool_max_idle_s: float = Field(
        600.0,
        gt=0,
        le=86400,
        description="a connection above pool_min unused this long is closed (one per pool per period)",
    )
    connect_timeout_s: float = Field(
        5.0, gt=0, le=120, description="how long a request waits for a connection"
    )

    def dsn(self) -> str:
        """The DSN from the environment, or a ConfigError naming the setting."""
        value = os.environ.get(self.dsn_env, "").strip()
        if not value:
            raise ConfigError(
                f"state.backend is postgres but the environment variable {self.dsn_env} (state.dsn_env) is "
                "not set; set it to a PostgreSQL DSN such as postgresql://user:password@host:5432/visionroute",
                field="state.dsn_env",
            )
        return value


class StateUnavailable(BackendUnavailable):
    """The state database cannot be reached now (HTTP 503 with Retry-After, gRPC UNAVAILABLE)."""

    retry_after_s = RETRY_AFTER_S


# -- rows and connections ------------------------------------------------------------------------


class Row(Sequence):
    """A result row that answers ``row[0]``, ``row["name"]`` and ``keys()`` (like sqlite3.Row)."""

    __slots__ = ("_names", "_values")

    def __init__(self, names: tuple[str, ...], values: Sequence[Any]) -> None:
        self._names = names
        self._values = tuple(values)

    def __getitem__(self, key: int | str | slice) -> Any:  # type: ignore[override]
        if isinstance(key, str):
            try:
                return self._values[self._names.index(key)]
            except ValueError:
                raise IndexError(f"no column named {key!r}") from None
        return self._values[key]

    def __len__(self) -> int:
        return len(self._values)

    def keys(self) -> list[str]:
        return list(self._names)

    def __repr__(self) -> str:
        return f"Row({dict(zip(self._names, self._values))!r})"


def _row_factory(cursor: Any) -> Any:
    names = tuple(column.name for column in cursor.description or ())
    return lambda values: Row(names, values)


class Connection(Protocol):
    dialect: Dialect

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any: ...

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...


class _SqliteConnection:
    def __init__(self, db: sqlite3.Connection, dialect: Dialect) -> None:
        self.raw = db
        self.dialect = dialect

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.raw.execute(sql, tuple(params))

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self.raw.executemany(sql, [tuple(r) for r in rows])


_PLACEHOLDER = re.compile(r"\?")


def postgres_sql(sql: str) -> str:
    """``?`` placeholders to psycopg's ``%s`` (a literal ``%`` doubled). Our SQL has no ``?``
    inside string literals; values always travel as parameters."""
    return _PLACEHOLDER.sub("%s", sql.replace("%", "%%"))


class _PostgresConnection:
    def __init__(self, conn: Any, dialect: Dialect) -> None:
        self.raw = conn
        self.dialect = dialect

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.raw.execute(postgres_sql(sql), tuple(params))

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self.raw.cursor() as cursor:
            cursor.executemany(postgres_sql(sql), [tuple(r) for r in rows])


# -- dialects ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dialect:
    name: Backend

    def lock(self, conn: Connection, key: str) -> None:
        """Serialise the rest of this write transaction with every other one taking ``key``.
        SQLite's ``BEGIN IMMEDIATE`` already serialises all writers; PostgreSQL takes a
        transaction-scoped advisory lock. Take several keys in sorted order (no deadlock)."""
        if self.name == "postgres":
            conn.execute("SELECT pg_advisory_xact_lock(?)", (lock_id(key),))

    @property
    def skip_locked(self) -> str:
        """Appended to a claim's SELECT: on PostgreSQL, rows another transaction holds are
        passed over instead of waited for (SQLite has one writer, so nothing is held)."""
        return " FOR UPDATE SKIP LOCKED" if self.name == "postgres" else ""

    @property
    def for_update(self) -> str:
        return " FOR UPDATE" if self.name == "postgres" else ""


SQLITE_DIALECT = Dialect("sqlite")
POSTGRES_DIALECT = Dialect("postgres")


def lock_id(key: str) -> int:
    """A stable signed 64-bit advisory-lock id for a text key."""
    digest = zlib.crc32(key.encode()) << 32 | zlib.crc32(key[::-1].encode() + b"visionroute")
    return digest - (1 << 64) if digest >= 1 << 63 else digest


_DDL_TYPES = (
    (
        re.compile(r"\bINTEGER PRIMARY KEY AUTOINCREMENT\b", re.I),
        "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
    ),
    (re.compile(r"\bREAL\b", re.I), "DOUBLE PRECISION"),
    (re.compile(r"\bINTEGER\b", re.I), "BIGINT"),
    (re.compile(r"\bBLOB\b", re.I), "BYTEA"),
)


def postgres_ddl(sql: str) -> str:
    """SQLite DDL as PostgreSQL DDL: the column types that differ in size or name."""
    for pattern, replacement in _DDL_TYPES:
        sql = pattern.sub(replacement, sql)
    return sql


# -- databases -----------------------------------------------------------------------------------


class Database:
    """One store's database. ``read()`` and ``write()`` are context managers giving a Connection."""

    dialect: Dialect
    location: str

    def read(self) -> Any:
        raise NotImplementedError

    def write(self) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def ping(self) -> bool:
        """Whether the database answers a query now (readiness)."""
        try:
            with self.read() as conn:
                conn.execute("SELECT 1").fetchone()
            return True
        except (StateUnavailable, sqlite3.Error):
            return False


class SqliteDatabase(Database):
    """A SQLite file: one connection per thread (sqlite3 connections must not cross threads)."""

    dialect = SQLITE_DIALECT

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.location = str(self.path)
        self._local = threading.local()

    def _connection(self) -> _SqliteConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = _SqliteConnection(
                sqlite_connect(self.path, rows_as_dicts=True), self.dialect
            )
        return conn

    @contextmanager
    def read(self) -> Iterator[_SqliteConnection]:
        yield self._connection()

    @contextmanager
    def write(self) -> Iterator[_SqliteConnection]:
        conn = self._connection()
        with immediate_transaction(conn.raw):
            yield conn


def _unavailable(error: Exception, location: str) -> StateUnavailable:
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return StateUnavailable(
        f"the state database ({location}) cannot be reached: {detail[:200]}; retry shortly", field="state"
    )


class PostgresDatabase(Database):
    """A PostgreSQL schema reached through a psycopg connection pool (autocommit connections;
    ``write()`` opens a transaction)."""

    dialect = POSTGRES_DIALECT

    def __init__(self, dsn: str, schema: str, config: StateConfig | None = None) -> None:
        import psycopg
        from psycopg_pool import ConnectionPool

        config = config or StateConfig(backend="postgres")
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", schema):
            raise ConfigError(f"not a usable PostgreSQL schema name: {schema!r}", field="state.schema_prefix")
        self.schema = schema
        self.location = f"postgres schema {schema} at {_redacted(dsn)}"
        self._errors = (psycopg.OperationalError, psycopg.InterfaceError)
        self._create_schema(psycopg, dsn, config)
        self.pool = ConnectionPool(
            dsn,
            min_size=config.pool_min,
            max_size=config.pool_max,
            timeout=config.connect_timeout_s,
            kwargs={
                "autocommit": True,
                "row_factory": _row_factory,
                "options": f"-c search_path={schema}",
                "connect_timeout": max(1, int(config.connect_timeout_s)),
                **_application_name(dsn, schema),
            },
            max_idle=config.pool_max_idle_s,
            check=ConnectionPool.check_connection,  # a connection the server dropped is replaced
            open=False,
            name=schema,
        )
        self.pool.open(wait=False)

    def _create_schema(self, psycopg: Any, dsn: str, config: StateConfig) -> None:
        try:
            with psycopg.connect(
                dsn, autocommit=True, connect_timeout=max(1, int(config.connect_timeout_s))
            ) as conn:
                with conn.transaction():
                    # Concurrent CREATE SCHEMA IF NOT EXISTS can still collide: serialise it.
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_id("create-schema"),))
                    conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
        except psycopg.OperationalError as error:
            raise ConfigError(
                f"cannot connect to PostgreSQL at {_redacted(dsn)} (the DSN from state.dsn_env): "
                f"{_first_line(error)}",
                field="state.dsn_env",
            ) from None
        except psycopg.Error as error:  # e.g. the role may not create the schema
            raise ConfigError(
                f"cannot use the PostgreSQL schema {self.schema!r} at {_redacted(dsn)}: {_first_line(error)}; "
                "create it (CREATE SCHEMA ... AUTHORIZATION <role>) or grant the role CREATE on the "
                "database, or pick another state.schema_prefix",
                field="state.schema_prefix",
            ) from None

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        from psycopg_pool import PoolTimeout

        try:
            with self.pool.connection() as conn:
                yield conn
        except PoolTimeout as error:
            raise _unavailable(error, self.location) from None
        except self._errors as error:
            raise _unavailable(error, self.location) from None

    @contextmanager
    def read(self) -> Iterator[_PostgresConnection]:
        with self._connection() as conn:
            yield _PostgresConnection(conn, self.dialect)

    @contextmanager
    def write(self) -> Iterator[_PostgresConnection]:
        with self._connection() as conn, conn.transaction():
            yield _PostgresConnection(conn, self.dialect)

    def close(self) -> None:
        self.pool.close()


def _application_name(dsn: str, schema: str) -> dict[str, str]:
    """``application_name`` naming the store and this process (what pg_stat_activity shows, so
    an operator or the soak can tell each pool's connections apart); a DSN's own name wins."""
    from psycopg.conninfo import conninfo_to_dict

    if conninfo_to_dict(dsn).get("application_name"):
        return {}
    return {"application_name": f"visionroute pid={os.getpid()} store={schema}"[:63]}


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _redacted(dsn: str) -> str:
    """A DSN without its password (for messages and logs)."""
    dsn = re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", dsn)
    return re.sub(r"(password\s*=\s*)\S+", r"\1***", dsn, flags=re.I)


def open_database(config: StateConfig | None, store: str, sqlite_path: str | Path) -> Database:
    """The database for one store: the SQLite file at ``sqlite_path``, or the PostgreSQL schema
    ``<schema_prefix>_<store>`` when ``config.backend`` is postgres."""
    if config is None or config.backend == "sqlite":
        return SqliteDatabase(sqlite_path)
    schema = f"{config.schema_prefix}_{re.sub(r'[^a-z0-9_]', '_', store.lower())}"[:63]
    return PostgresDatabase(config.dsn(), schema, config)
