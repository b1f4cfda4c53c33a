"""``visionroute db status|migrate|copy``: the durable stores' schemas, and moving to PostgreSQL.

- ``status``: each store's schema version in the database next to the version this release
  knows (nothing is changed; a store never opened shows version 0).
- ``migrate``: bring every store to this release's schema (the service also does this when
  it opens a store; run it ahead of a rolling deploy so no replica waits on the lock).
- ``copy --from A.yaml --to B.yaml``: move a SQLite deployment's state (review queue and its
  images, audit log, label sets, budget ledger, search metadata and operation log) into the
  PostgreSQL that B's ``state:`` names. Refuses a destination that already holds rows. Every
  table is verified by row count and a checksum of its canonical rows, every image by its
  sha256; the command fails (exit 2) on any difference.

Imports stay inside the functions: ``--help`` starts without the stores' dependencies.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from router.serve_config import REPO_CONFIG, app_config
from visionroute.errors import ConfigError


@dataclass(frozen=True)
class StoreSpec:
    """One durable store: how to open it from an AppConfig, and its migrations."""

    name: str  # the database name: the SQLite file's role, the PostgreSQL schema suffix
    store: str  # its key in schema_version
    sqlite_path: Callable[[Any], Path]
    open: Callable[[Any], Any]  # AppConfig -> the store object (migrates on open)
    migrations: Callable[[], tuple]


def _review(config: Any) -> Any:
    from policies.review_queue import ReviewQueue

    return ReviewQueue(config.review.path, default_lease_s=config.review.lease_s, state=config.state)


def _budgets(config: Any) -> Any:
    from policies.budgets import BudgetLedger

    return BudgetLedger(config.review.path / "budgets.sqlite3", state=config.state)


def _rollouts(config: Any) -> Any:
    from policies.rollout_store import RolloutStore

    return RolloutStore(config.review.path / "rollouts.sqlite3", state=config.state)


def _search(config: Any) -> Any:
    from retrieval.store import MetadataStore

    return MetadataStore(config.retrieval.index_dir / "items.sqlite", state=config.state, name="search")


def _migrations(module: str) -> Callable[[], tuple]:
    def load() -> tuple:
        import importlib

        return tuple(importlib.import_module(module).MIGRATIONS)

    return load


STORES = (
    StoreSpec(
        "review",
        "review_queue",
        lambda c: c.review.path / "review.sqlite3",
        _review,
        _migrations("policies.review_queue"),
    ),
    StoreSpec(
        "budgets",
        "budget_ledger",
        lambda c: c.review.path / "budgets.sqlite3",
        _budgets,
        _migrations("policies.budgets"),
    ),
    StoreSpec(
        "rollouts",
        "rollouts",
        lambda c: c.review.path / "rollouts.sqlite3",
        _rollouts,
        _migrations("policies.rollout_store"),
    ),
    StoreSpec(
        "search",
        "search_index",
        lambda c: c.retrieval.index_dir / "items.sqlite",
        _search,
        _migrations("retrieval.store"),
    ),
)


def _recorded_version(spec: StoreSpec, config: Any) -> int:
    from visionroute.migrations import schema_version
    from visionroute.state import open_database

    if config.state.backend == "sqlite" and not spec.sqlite_path(config).exists():
        return 0
    database = open_database(config.state, spec.name, spec.sqlite_path(config))
    try:
        with database.read() as conn:
            try:
                return schema_version(conn, spec.store)
            except Exception as error:  # no schema_version table yet: a store never opened
                if "schema_version" in str(error):
                    return 0
                raise
    finally:
        database.close()


def _cmd_status(args) -> int:
    config = app_config(args.config)
    rows = []
    for spec in STORES:
        known = len(spec.migrations())
        recorded = _recorded_version(spec, config)
        state = "current" if recorded == known else ("not created" if recorded == 0 else "needs migrate")
        if recorded > known:
            state = "NEWER than this release: do not start it on this database"
        rows.append(
            {"store": spec.name, "database_version": recorded, "release_version": known, "state": state}
        )
    where = config.state.backend
    print(json.dumps({"backend": where, "stores": rows}, indent=2))
    return 0 if all(r["database_version"] <= r["release_version"] for r in rows) else 2


def _cmd_migrate(args) -> int:
    config = app_config(args.config)
    for spec in STORES:
        before = _recorded_version(spec, config)
        store = spec.open(config)
        print(f"{spec.name}: schema version {before} -> {store.schema.to_version}")
        _close(store)
    return 0


def _close(store: Any) -> None:
    close = getattr(store, "close", None)
    if close is not None:
        close()


# -- copy ----------------------------------------------------------------------------------------


def _canonical(value: Any) -> str:
    """One text per value whatever the backend returned (REAL 1.0 vs BIGINT 1, bytes vs memoryview)."""
    if value is None:
        return "\N{EMPTY SET}"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "x" + bytes(value).hex()
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, (int, float)):
        number = float(value)
        if number.is_integer() and abs(number) < 2**53:
            return str(int(number))
        return repr(number)
    return "s" + str(value)


def table_digest(rows: Iterable[Any]) -> tuple[int, str]:
    """(row count, sha256 of the sorted canonical rows): equal on both backends iff equal data."""
    lines = sorted("\x1f".join(_canonical(v) for v in row) for row in rows)
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode() + b"\x1e")
    return len(lines), digest.hexdigest()


def _sqlite_tables(conn: Any) -> list[str]:
    """Tables in dependency order (a table after the tables its foreign keys name)."""
    names = [
        r[0]
        for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            " AND name != 'schema_version' ORDER BY name"
        )
    ]
    parents = {n: {r[2] for r in conn.execute(f'PRAGMA foreign_key_list("{n}")')} & set(names) for n in names}
    ordered: list[str] = []
    while len(ordered) < len(names):
        ready = [n for n in names if n not in ordered and parents[n] <= set(ordered)]
        if not ready:
            raise ConfigError(f"circular foreign keys among {names}", field="copy")
        ordered.extend(ready)
    return ordered


def _columns(conn: Any, table: str, backend: str) -> list[str]:
    if backend == "sqlite":
        return [r[1] for r in conn.execute(f'PRAGMA table_info("{table}")')]
    rows = conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema()"
        " AND table_name = ? ORDER BY ordinal_position",
        (table,),
    )
    return [r[0] for r in rows]


def _copy_store(spec: StoreSpec, source_config: Any, dest_config: Any, out: list[dict]) -> None:
    source_store = spec.open(source_config)  # both at this release's schema before copying
    dest_store = spec.open(dest_config)
    source, dest = source_store.database, dest_store.database
    try:
        with source.read() as src:
            tables = _sqlite_tables(src.raw)
        with dest.read() as dst:
            for table in tables:
                if (
                    _columns(dst, table, "postgres")
                    and dst.execute(f'SELECT 1 FROM "{table}" LIMIT 1').fetchone()
                ):
                    raise ConfigError(
                        f"{spec.name}.{table} in {dest.location} already holds rows; copy only into an "
                        "empty database (or drop its schema first)",
                        field="copy.to",
                    )
        with source.read() as src, dest.write() as dst:
            for table in tables:
                dest_columns = set(_columns(dst, table, "postgres"))
                if not dest_columns:
                    continue  # a table this backend keeps elsewhere
                columns = [c for c in _columns(src.raw, table, "sqlite") if c in dest_columns]
                quoted = ", ".join(f'"{c}"' for c in columns)
                marks = ", ".join("?" for _ in columns)
                rows = src.execute(f'SELECT {quoted} FROM "{table}"').fetchall()
                dst.executemany(
                    f'INSERT INTO "{table}" ({quoted}) VALUES ({marks})', [tuple(r) for r in rows]
                )
            # Identity columns continue after the copied ids.
            for table, column in dst.execute(
                "SELECT table_name, column_name FROM information_schema.columns"
                " WHERE table_schema = current_schema() AND is_identity = 'YES'"
            ).fetchall():
                dst.execute(
                    f'SELECT setval(pg_get_serial_sequence(?, ?), COALESCE((SELECT MAX("{column}") FROM "{table}"), 0) + 1, false)',
                    (table, column),
                )
        if spec.name == "review":
            _copy_images(source_store, dest_store, out)
        with source.read() as src, dest.read() as dst:
            for table in tables:
                dest_columns = set(_columns(dst, table, "postgres"))
                if not dest_columns:
                    continue
                columns = ", ".join(f'"{c}"' for c in _columns(src.raw, table, "sqlite") if c in dest_columns)
                expected = table_digest(src.execute(f'SELECT {columns} FROM "{table}"'))
                found = table_digest(dst.execute(f'SELECT {columns} FROM "{table}"'))
                out.append(
                    {
                        "store": spec.name,
                        "table": table,
                        "rows": expected[0],
                        "sha256": expected[1][:16],
                        "verified": expected == found,
                    }
                )
    finally:
        _close(source_store)
        _close(dest_store)


def _copy_images(source_queue: Any, dest_queue: Any, out: list[dict]) -> None:
    """Every blob an item with a live image refers to (its tenant scope and the sha256 of the
    bytes stored), checked against that sha256 on both sides."""
    wanted = source_queue.live_blob_refs()
    copied = verified = 0
    missing = []
    for ref in wanted:
        try:
            data = source_queue.blobs.get(ref)
        except Exception:
            missing.append(ref.sha256)
            continue
        if hashlib.sha256(data).hexdigest() != ref.sha256:
            missing.append(ref.sha256)
            continue
        dest_queue.blobs.put(ref, data)
        copied += 1
        verified += hashlib.sha256(dest_queue.blobs.get(ref)).hexdigest() == ref.sha256
    out.append(
        {
            "store": "review",
            "table": "images",
            "rows": copied,
            "sha256": "per image",
            "verified": verified == copied and not missing,
            "missing_or_corrupt": missing,
        }
    )


def _cmd_copy(args) -> int:
    source = app_config(args.source)
    dest = app_config(args.dest)
    if source.state.backend != "sqlite":
        raise ConfigError(
            f"{args.source}: copy reads a SQLite deployment (state.backend: sqlite)", field="copy.from"
        )
    if dest.state.backend != "postgres":
        raise ConfigError(
            f"{args.dest}: copy writes to PostgreSQL (state.backend: postgres)", field="copy.to"
        )
    out: list[dict] = []
    for spec in STORES:
        if not spec.sqlite_path(source).exists():
            print(
                f"{spec.name}: no SQLite database at {spec.sqlite_path(source)}; nothing to copy",
                file=sys.stderr,
            )
            continue
        print(f"{spec.name}: copying ...", file=sys.stderr)
        _copy_store(spec, source, dest, out)
    print(json.dumps({"copied": out}, indent=2))
    bad = [f"{r['store']}.{r['table']}" for r in out if not r["verified"]]
    if bad:
        print(f"copy NOT verified for {bad}: do not switch to the PostgreSQL config", file=sys.stderr)
        return 2
    print(
        f"copy verified: {sum(r['rows'] for r in out)} rows and images; switch to {args.dest}",
        file=sys.stderr,
    )
    return 0


def register(subparsers, bench) -> None:
    db = subparsers.add_parser(
        "db", help="the durable stores: schema status, migrate, copy SQLite -> PostgreSQL"
    )
    db_sub = db.add_subparsers(dest="db_command", required=True)
    status = db_sub.add_parser("status", help="each store's schema version vs this release's")
    status.add_argument(
        "--config", type=Path, default=REPO_CONFIG, help="a Ray Serve config (default: %(default)s)"
    )
    status.set_defaults(func=_cmd_status)
    migrate = db_sub.add_parser("migrate", help="bring every store to this release's schema")
    migrate.add_argument(
        "--config", type=Path, default=REPO_CONFIG, help="a Ray Serve config (default: %(default)s)"
    )
    migrate.set_defaults(func=_cmd_migrate)
    copy = db_sub.add_parser("copy", help="move a SQLite deployment's state into PostgreSQL, verified")
    copy.add_argument(
        "--from", dest="source", type=Path, required=True, help="the SQLite deployment's serve config"
    )
    copy.add_argument(
        "--to", dest="dest", type=Path, required=True, help="the PostgreSQL deployment's serve config"
    )
    copy.set_defaults(func=_cmd_copy)
