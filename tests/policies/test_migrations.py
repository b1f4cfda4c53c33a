"""Versioned schema migrations: databases written before versioning migrate in place with their
rows intact, a newer database is refused, a failed migration changes nothing; on SQLite files
and on PostgreSQL schemas alike."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import sqlite3

import pytest

from policies.budgets import MIGRATIONS as BUDGET_MIGRATIONS
from policies.budgets import BudgetLedger
from policies.review_queue import ITEM_COLUMNS, MIGRATIONS, STORE, ReviewQueue
from tests.support.race_workers import open_queue_at_the_barrier
from visionroute.errors import ConfigError
from visionroute.migrations import Migration, migrate, schema_version, sql_statements
from visionroute.state import Database, PostgresDatabase, SqliteDatabase, StateConfig

# The review queue's DDL exactly as the release before versioning created it: SCHEMA, then the
# columns its _migrate added at every open (ADDED_COLUMNS).
V1_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY,
    request_id TEXT UNIQUE NOT NULL,
    tenant TEXT NOT NULL,
    task TEXT NOT NULL,
    image_sha256 TEXT NOT NULL,
    created_at REAL NOT NULL,
    priority REAL NOT NULL DEFAULT 0,
    reason TEXT NOT NULL,
    proposed_json TEXT NOT NULL,
    trace_json TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    lease_owner TEXT,
    lease_token TEXT,
    lease_expires_at REAL,
    label_json TEXT,
    labelled_by TEXT,
    labelled_at REAL
);
CREATE INDEX IF NOT EXISTS items_queue ON items (status, priority DESC, created_at);
CREATE TABLE IF NOT EXISTS label_sets (
    task TEXT PRIMARY KEY,
    labels_json TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    item_id TEXT NOT NULL,
    at REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    previous_json TEXT,
    new_json TEXT
);
"""
V1_ADDED_COLUMNS = (
    "ALTER TABLE items ADD COLUMN kind TEXT NOT NULL DEFAULT 'review'",
    "ALTER TABLE items ADD COLUMN sla_due_at REAL",
    "ALTER TABLE items ADD COLUMN image_deleted_at REAL",
)
V1_BUDGETS_SCHEMA = """
CREATE TABLE IF NOT EXISTS reservations (
    id TEXT NOT NULL, budget TEXT NOT NULL, window_start REAL NOT NULL, window_end REAL NOT NULL,
    units REAL NOT NULL, state TEXT NOT NULL, created_at REAL NOT NULL, request_id TEXT,
    PRIMARY KEY (id, budget)
);
CREATE INDEX IF NOT EXISTS reservations_window ON reservations (budget, window_start);
CREATE TABLE IF NOT EXISTS usage (
    tenant TEXT NOT NULL, feature TEXT NOT NULL, tier TEXT NOT NULL, units REAL NOT NULL,
    calls INTEGER NOT NULL, PRIMARY KEY (tenant, feature, tier)
);
"""
IMAGE = b"\x89PNG old image"
SHA = hashlib.sha256(IMAGE).hexdigest()


@pytest.fixture(params=["sqlite", "postgres"])
def database(request, tmp_path):
    """An empty database on each backend (PostgreSQL: a schema in a fresh database)."""
    if request.param == "sqlite":
        db: Database = SqliteDatabase(tmp_path / "x.sqlite3")
    else:
        db = PostgresDatabase(request.getfixturevalue("postgres_dsn"), "migrations_test")
    yield db
    db.close()


def table_names(database: Database) -> set[str]:
    with database.read() as conn:
        if conn.dialect.name == "sqlite":
            rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        else:
            rows = conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
            ).fetchall()
    return {row[0] for row in rows}


def version_of(database: Database, store: str) -> int:
    with database.read() as conn:
        return schema_version(conn, store)


def old_database(root, *, added_columns: bool = True) -> None:
    """A review directory as the unversioned release left it: three items in various states."""
    root.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(root / "review.sqlite3")
    db.executescript(V1_SCHEMA)
    if added_columns:
        for statement in V1_ADDED_COLUMNS:
            db.execute(statement)
    rows = [
        ("i1", "req-1", "acme", "classify", 100.0, 0.9, "pending", None, None, None),
        ("i2", "req-2", "acme", "classify", 101.0, 0.2, "pending", "ann", "tok", 9e9),
        ("i3", "req-3", "globex", "text", 102.0, 0.5, "labelled", None, None, None),
    ]
    for item_id, request_id, tenant, task, created, priority, status, owner, token, expires in rows:
        db.execute(
            "INSERT INTO items (id, request_id, tenant, task, image_sha256, created_at, priority, reason,"
            " proposed_json, trace_json, status, lease_owner, lease_token, lease_expires_at, label_json,"
            " labelled_by, labelled_at) VALUES (?, ?, ?, ?, ?, ?, ?, 'unsure', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                item_id,
                request_id,
                tenant,
                task,
                SHA,
                created,
                priority,
                json.dumps([{"label": "cat"}]),
                json.dumps({"request_id": request_id, "steps": []}),
                status,
                owner,
                token,
                expires,
                json.dumps({"verdict": "confirm", "label": "cat"}) if status == "labelled" else None,
                "gus" if status == "labelled" else None,
                103.0 if status == "labelled" else None,
            ),
        )
        db.execute(
            "INSERT INTO audit (item_id, at, actor, action, previous_json, new_json) VALUES (?, ?, 'service', 'enqueue', 'null', '{}')",
            (item_id, created),
        )
    if added_columns:
        db.execute("UPDATE items SET kind = 'audit', sla_due_at = 500.0 WHERE id = 'i3'")
    db.execute(
        "INSERT INTO label_sets (task, labels_json, updated_at) VALUES ('classify', '[\"cat\", \"dog\"]', 1.0)"
    )
    db.commit()
    db.close()
    (root / "images" / SHA[:2]).mkdir(parents=True)
    (root / "images" / SHA[:2] / SHA).write_bytes(IMAGE)


def dump(path) -> dict[str, list[tuple]]:
    """Every row of the old release's tables, in its columns (later versions add columns)."""
    db = sqlite3.connect(path)
    try:
        columns = {"items": ITEM_COLUMNS, "audit": "*", "label_sets": "*"}
        return {
            table: db.execute(f"SELECT {columns[table]} FROM {table} ORDER BY 1").fetchall()
            for table in ("items", "audit", "label_sets")
        }
    finally:
        db.close()


def test_an_unversioned_database_migrates_in_place_with_every_row_intact(tmp_path):
    root = tmp_path / "review"
    old_database(root)
    before = dump(root / "review.sqlite3")
    queue = ReviewQueue(root)
    assert (queue.schema.from_version, queue.schema.to_version) == (0, len(MIGRATIONS))
    assert dump(root / "review.sqlite3") == before  # the same rows, columns and values
    items = {item.id: item for item in queue.iter_all()}
    assert (
        items["i2"].lease_owner == "ann" and items["i3"].kind == "audit" and items["i3"].sla_due_at == 500.0
    )
    assert items["i3"].label == {"verdict": "confirm", "label": "cat"}
    assert queue.label_set("classify") == ["cat", "dog"]
    assert queue.image("i1") == IMAGE
    # Version 2 in force: another tenant may reuse a request id; the same tenant's retry may not.
    globex = queue.enqueue(
        request_id="req-1",
        image_bytes=b"globex image",
        image_sha256=hashlib.sha256(b"globex image").hexdigest(),
        tenant="globex",
        task="classify",
        reason="unsure",
        proposed=[],
        trace={},
    )
    assert globex.id != "i1" and globex.tenant == "globex"
    retry = queue.enqueue(
        request_id="req-1",
        image_bytes=IMAGE,
        image_sha256=SHA,
        tenant="acme",
        task="classify",
        reason="unsure",
        proposed=[],
        trace={},
    )
    assert retry.id == "i1"
    db = sqlite3.connect(root / "review.sqlite3")
    versions = db.execute("SELECT store, version FROM schema_version ORDER BY version").fetchall()
    assert versions == [(STORE, version) for version in range(1, len(MIGRATIONS) + 1)]
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    index_names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"items_queue", "items_tenant_queue"} <= index_names
    # Reopening is a no-op.
    assert ReviewQueue(root).schema.applied == []


def test_a_database_from_before_the_added_columns_also_migrates(tmp_path):
    root = tmp_path / "review"
    old_database(root, added_columns=False)
    queue = ReviewQueue(root)
    items = {item.id: item for item in queue.iter_all()}
    assert set(items) == {"i1", "i2", "i3"}
    assert {item.kind for item in items.values()} == {"review"}
    assert all(item.sla_due_at is None and item.image_deleted_at is None for item in items.values())


def test_a_database_newer_than_the_code_is_refused_naming_both_versions(tmp_path):
    root = tmp_path / "review"
    ReviewQueue(root)
    db = sqlite3.connect(root / "review.sqlite3")
    db.execute("INSERT INTO schema_version VALUES ('review_queue', 7, 'from the future', 0)")
    db.commit()
    db.close()
    with pytest.raises(ConfigError) as error:
        ReviewQueue(root)
    assert error.value.field == "schema_version"
    assert "version 7" in error.value.reason and f"up to {len(MIGRATIONS)}" in error.value.reason
    assert "review.sqlite3" in error.value.reason


def test_a_failing_migration_leaves_the_database_at_its_old_version(database):
    first = Migration(1, "a table", "CREATE TABLE a (x INTEGER);")
    assert migrate(database, "thing", [first]).to_version == 1
    with database.write() as conn:
        conn.execute("INSERT INTO a VALUES (1)")
    broken = Migration(
        2, "half works", "CREATE TABLE b (y INTEGER); DROP TABLE a; INSERT INTO nowhere VALUES (1);"
    )
    with pytest.raises(Exception, match="nowhere"):
        migrate(database, "thing", [first, broken])
    assert version_of(database, "thing") == 1
    tables = table_names(database)
    assert "b" not in tables and "a" in tables  # the whole of version 2 rolled back
    with database.read() as conn:
        assert [tuple(row) for row in conn.execute("SELECT x FROM a").fetchall()] == [(1,)]


def test_stores_keep_their_own_versions_in_one_table(database):
    migrate(database, "one", [Migration(1, "t1", "CREATE TABLE t1 (x TEXT);")])
    migrate(
        database,
        "two",
        [Migration(1, "t2", "CREATE TABLE t2 (x TEXT);"), Migration(2, "t3", "CREATE TABLE t3 (x TEXT);")],
    )
    assert (version_of(database, "one"), version_of(database, "two")) == (1, 2)


def test_migrations_must_be_numbered_in_order(tmp_path):
    database = SqliteDatabase(tmp_path / "x.sqlite3")
    with pytest.raises(ValueError, match=r"1, 2, 3.*\[1, 3\]"):
        migrate(database, "x", [Migration(1, "a", "SELECT 1;"), Migration(3, "c", "SELECT 1;")])


def test_a_dialect_may_have_its_own_text_for_a_version(database):
    migration = Migration(
        1, "x", "CREATE TABLE generic (x TEXT);", dialect_sql={"postgres": "CREATE TABLE own (x TEXT);"}
    )
    migrate(database, "thing", [migration])
    expected = "own" if database.dialect.name == "postgres" else "generic"
    assert {"generic", "own"} & table_names(database) == {expected}


def test_scripts_split_into_statements_but_not_inside_strings_or_triggers():
    script = """
        CREATE TABLE t (note TEXT DEFAULT 'a;b');  -- a comment; with a semicolon
        CREATE TRIGGER tr AFTER INSERT ON t BEGIN UPDATE t SET note = 'x;y'; END;
        INSERT INTO t VALUES ('c;d')
    """
    statements = list(sql_statements(script))
    assert len(statements) == 3 and statements[1].endswith("END;")
    db = sqlite3.connect(":memory:")
    for statement in statements:
        db.execute(statement)
    assert db.execute("SELECT note FROM t").fetchall() == [("x;y",)]  # the trigger ran whole


def test_many_processes_opening_a_new_queue_at_once_migrate_it_once(tmp_path, state):
    n = 6
    ctx = mp.get_context("spawn")  # real processes, each its own interpreter and connections
    barrier, out = ctx.Barrier(n), ctx.Queue()
    processes = [
        ctx.Process(target=open_queue_at_the_barrier, args=(str(tmp_path / "review"), state, barrier, out))
        for _ in range(n)
    ]
    for process in processes:
        process.start()
    try:
        reports = [out.get(timeout=180) for _ in processes]
    finally:
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    errors = [detail for kind, detail in reports if kind == "error"]
    assert not errors, errors
    applied = [detail for _, detail in reports]
    # one migrated, five found it done
    assert sorted(map(len, applied)) == [0] * (n - 1) + [len(MIGRATIONS)], applied
    assert [process.exitcode for process in processes] == [0] * n


def test_the_budget_ledger_is_versioned_and_keeps_an_unversioned_ledgers_rows(tmp_path):
    path = tmp_path / "budgets.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(V1_BUDGETS_SCHEMA)
    db.execute("INSERT INTO usage VALUES ('acme', 'classify', 'onnx', 3.0, 3)")
    db.commit()
    db.close()
    ledger = BudgetLedger(path)
    latest = len(BUDGET_MIGRATIONS)
    assert ledger.schema.applied == list(range(1, latest + 1))
    assert sqlite3.connect(path).execute("SELECT * FROM usage").fetchall() == [
        ("acme", "classify", "onnx", 3.0, 3)
    ]
    db = sqlite3.connect(path)
    db.execute("INSERT INTO schema_version VALUES ('budget_ledger', ?, 'from the future', 0)", (latest + 1,))
    db.commit()
    db.close()
    with pytest.raises(ConfigError, match=f"version {latest + 1}.*up to {latest}"):
        BudgetLedger(path)


def postgres_review_versions(dsn: str) -> list[tuple]:
    import psycopg

    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT store, version FROM visionroute_review.schema_version ORDER BY version"
        ).fetchall()


def test_the_review_migrations_run_on_postgresql(tmp_path, postgres_dsn):
    import psycopg

    queue = ReviewQueue(tmp_path, state=StateConfig(backend="postgres"))
    try:
        assert (queue.schema.from_version, queue.schema.to_version) == (0, len(MIGRATIONS))
        assert postgres_review_versions(postgres_dsn) == [(STORE, v) for v in range(1, len(MIGRATIONS) + 1)]
        with psycopg.connect(postgres_dsn) as conn:
            types = dict(
                conn.execute(
                    "SELECT column_name, data_type FROM information_schema.columns"
                    " WHERE table_schema = 'visionroute_review' AND table_name IN ('items', 'images')"
                    " AND column_name IN ('created_at', 'data')"
                ).fetchall()
            )
        # REAL would be 4 bytes here and round a Unix time to minutes.
        assert types == {"created_at": "double precision", "data": "bytea"}
        # Version 2 in force: request ids are unique per tenant, not across tenants.
        for tenant in ("acme", "globex"):
            queue.enqueue(
                request_id="same",
                image_bytes=IMAGE,
                image_sha256=SHA,
                tenant=tenant,
                task="classify",
                reason="unsure",
                proposed=[],
                trace={},
            )
        assert {item.tenant for item in queue.iter_all()} == {"acme", "globex"}
        assert not (tmp_path / "review.sqlite3").exists()  # nothing went to the embedded default
    finally:
        queue.close()
    reopened = ReviewQueue(tmp_path, state=StateConfig(backend="postgres"))
    assert reopened.schema.applied == []
    reopened.close()


def test_a_postgresql_store_newer_than_the_code_is_refused_naming_both_versions(tmp_path, postgres_dsn):
    import psycopg

    ReviewQueue(tmp_path, state=StateConfig(backend="postgres")).close()
    with psycopg.connect(postgres_dsn) as conn:
        conn.execute(
            "INSERT INTO visionroute_review.schema_version VALUES (%s, 7, 'from the future', 0)", (STORE,)
        )
    with pytest.raises(ConfigError) as error:
        ReviewQueue(tmp_path, state=StateConfig(backend="postgres"))
    assert error.value.field == "schema_version"
    assert "version 7" in error.value.reason and f"up to {len(MIGRATIONS)}" in error.value.reason
    assert "visionroute_review" in error.value.reason
