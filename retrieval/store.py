"""The search index's durable state: item metadata, the live vectors, and the operation log.

One transaction writes an item's row, its tags and its log entries, so an acknowledged write
is durable as a whole and a crash leaves either all of it or none. A vector's FAISS label is
the sequence number of the log entry that added it: labels are never reused, so a re-added
(upserted) item never collides with its own tombstone in HNSW.

The state lives in a ``visionroute.state.Database``: the SQLite file ``items.sqlite`` of an
index directory (one node) or the PostgreSQL schema ``<prefix>_<name>`` (shared by every
replica of the index, on any node). The ``items`` table holds every live vector, so it is a
full snapshot by itself: FAISS files are caches a replica can always rebuild from it.

Replicas follow the log (``ops_after``): each records in ``replicas`` the last entry it has
applied, and ``truncate_log`` never drops an entry a live replica still needs. The highest
entry ever dropped is kept in ``log_state``: a replica behind it has missed operations and must
rebuild from ``items``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.schemas import ItemMetadata, SearchFilters
from visionroute.errors import ConfigError
from visionroute.migrations import Migration, migrate
from visionroute.state import Connection, Database, StateConfig, open_database

STORE = "search_index"

# Version 1 is the schema every release before versioning created (``IF NOT EXISTS``, so on
# such a file it changes nothing and is simply recorded).
SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    label INTEGER NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    source TEXT,
    created_at REAL NOT NULL,
    image_sha256 TEXT,
    review_item_id TEXT,
    extra TEXT NOT NULL,
    vector BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS items_tenant ON items (tenant, created_at);
CREATE INDEX IF NOT EXISTS items_source ON items (source);
CREATE INDEX IF NOT EXISTS items_review ON items (review_item_id);
CREATE INDEX IF NOT EXISTS items_sha256 ON items (image_sha256);
CREATE TABLE IF NOT EXISTS item_tags (
    item_id INTEGER NOT NULL REFERENCES items (id) ON DELETE CASCADE,
    tag TEXT NOT NULL,
    PRIMARY KEY (item_id, tag)
);
CREATE INDEX IF NOT EXISTS item_tags_tag ON item_tags (tag, item_id);
CREATE TABLE IF NOT EXISTS oplog (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    op TEXT NOT NULL CHECK (op IN ('add', 'remove')),
    label INTEGER NOT NULL,
    vector BLOB
);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

_REPLICAS_TABLES = """
CREATE TABLE replicas (
    replica_id TEXT PRIMARY KEY,
    applied_seq INTEGER NOT NULL,
    heartbeat_at REAL NOT NULL
);
CREATE TABLE log_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    truncated_through INTEGER NOT NULL
);
"""

# A SQLite file from before version 2 may have truncated its log already: with AUTOINCREMENT
# (no gaps) the dropped prefix ends just below the oldest entry left, or at the last entry
# ever written when the log is empty. A PostgreSQL schema is always new here.
# ``log_state`` stays empty until a first truncation, so a new schema holds no rows at all
# (``visionroute db copy`` fills only empty ones).
SCHEMA_V2_SQLITE = (
    _REPLICAS_TABLES
    + """
INSERT INTO log_state (id, truncated_through)
SELECT 1, dropped FROM (SELECT COALESCE(
    (SELECT MIN(seq) - 1 FROM oplog),
    (SELECT seq FROM sqlite_sequence WHERE name = 'oplog'),
    0) AS dropped) AS previous
WHERE dropped > 0;
"""
)
SCHEMA_V2 = _REPLICAS_TABLES

MIGRATIONS = (
    Migration(1, "items, tags, operation log and settings", SCHEMA_V1),
    Migration(
        2,
        "replicas (applied log entry, heartbeat) and the log's truncation point",
        SCHEMA_V2,
        dialect_sql={"sqlite": SCHEMA_V2_SQLITE},
    ),
)

V1_ITEM_COLUMNS = {
    "id",
    "label",
    "tenant",
    "source",
    "created_at",
    "image_sha256",
    "review_item_id",
    "extra",
    "vector",
}

_ITEM_COLUMNS = "id, label, tenant, source, created_at, image_sha256, review_item_id, extra"
_WRITE_COLUMNS = (
    "label",
    "tenant",
    "source",
    "created_at",
    "image_sha256",
    "review_item_id",
    "extra",
    "vector",
)
BATCH = 10_000
FORGET_AFTER_TIMEOUTS = 10  # a replica silent this many timeouts long loses its row


@dataclass(frozen=True)
class Op:
    seq: int
    op: str  # "add" | "remove"
    label: int
    vector: np.ndarray | None


@dataclass(frozen=True)
class Item:
    id: int
    label: int
    metadata: ItemMetadata


@dataclass(frozen=True)
class Written:
    """A committed write: the item, its log entries, and the last seq before them (a
    follower that had applied exactly that one may apply these directly)."""

    item_id: int
    ops: list[Op]
    previous_seq: int


@dataclass(frozen=True)
class ReplicaRow:
    replica_id: str
    applied_seq: int
    heartbeat_at: float


def _blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, np.float32).tobytes()


def _unblob(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, np.float32)


def _ints(values: Any) -> list[int]:
    # numpy integers are not SQL parameters for sqlite3 or psycopg.
    return [int(v) for v in values]


def _returned(conn: Connection, sql: str, params: tuple) -> int:
    # fetchall, not fetchone: SQLite finishes a RETURNING statement only once it is read out.
    return int(conn.execute(sql, params).fetchall()[0][0])


def _adopt_unversioned(conn: Connection) -> None:
    """A file from before versioning holds exactly version 1; anything else is refused."""
    if conn.dialect.name != "sqlite":
        return
    have = {row["name"] for row in conn.execute("PRAGMA table_info(items)")}
    if have and have != V1_ITEM_COLUMNS:
        raise ConfigError(
            f"the search index database has an items table with columns {sorted(have)}, "
            f"expected {sorted(V1_ITEM_COLUMNS)}; it was not written by VisionRoute",
            field="retrieval.index_dir",
        )


class StoreReader:
    """The read queries, on one connection: a plain autocommit one, or a consistent view
    (``MetadataStore.consistent_view``) whose reads all see the same committed state."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    # the log --------------------------------------------------------------------------------
    def log_bounds(self) -> tuple[int, int]:
        """(last seq ever written, highest seq ever truncated)."""
        row = self.conn.execute(
            "SELECT (SELECT MAX(seq) FROM oplog), (SELECT truncated_through FROM log_state WHERE id = 1)"
        ).fetchone()
        truncated = int(row[1] or 0)
        return max(int(row[0] or 0), truncated), truncated

    def last_seq(self) -> int:
        return self.log_bounds()[0]

    def truncated_through(self) -> int:
        return self.log_bounds()[1]

    def ops_after(self, seq: int, batch: int = 1000) -> Iterator[Op]:
        """Log entries after ``seq`` in order, read in pages (keyset, so memory stays bounded)."""
        while True:
            rows = self.conn.execute(
                "SELECT seq, op, label, vector FROM oplog WHERE seq > ? ORDER BY seq LIMIT ?",
                (int(seq), batch),
            ).fetchall()
            for s, op, label, blob in rows:
                yield Op(int(s), op, int(label), None if blob is None else _unblob(blob))
            if len(rows) < batch:
                return
            seq = rows[-1][0]

    def count_ops_after(self, seq: int) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM oplog WHERE seq > ?", (int(seq),)).fetchone()[0])

    # items ----------------------------------------------------------------------------------
    def count(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM items").fetchone()[0])

    def live_labels(self) -> np.ndarray:
        return np.array([r[0] for r in self.conn.execute("SELECT label FROM items")], np.int64)

    def iter_vectors(self, batch: int = BATCH) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(labels, vectors) of every live item by label, in keyset pages (for rebuilds)."""
        after = None
        while True:
            if after is None:
                rows = self.conn.execute(
                    "SELECT label, vector FROM items ORDER BY label LIMIT ?", (batch,)
                ).fetchall()
            else:
                rows = self.conn.execute(
                    "SELECT label, vector FROM items WHERE label > ? ORDER BY label LIMIT ?", (after, batch)
                ).fetchall()
            if not rows:
                return
            yield np.array([r[0] for r in rows], np.int64), np.stack([_unblob(r[1]) for r in rows])
            if len(rows) < batch:
                return
            after = int(rows[-1][0])

    def get(self, item_id: int) -> tuple[Item, np.ndarray] | None:
        row = self.conn.execute(
            "SELECT " + _ITEM_COLUMNS + ", vector FROM items WHERE id = ?", (int(item_id),)
        ).fetchone()
        if row is None:
            return None
        item = self._items_from_rows([row[:-1]])[0]
        return item, _unblob(row[-1])

    def items_by_label(self, labels: list[int]) -> dict[int, Item]:
        if not len(labels):
            return {}
        marks = ",".join("?" * len(labels))
        rows = self.conn.execute(
            "SELECT " + _ITEM_COLUMNS + f" FROM items WHERE label IN ({marks})", _ints(labels)
        ).fetchall()
        return {item.label: item for item in self._items_from_rows(rows)}

    def _items_from_rows(self, rows: list) -> list[Item]:
        ids = [int(r[0]) for r in rows]
        tags: dict[int, list[str]] = {i: [] for i in ids}
        if ids:
            marks = ",".join("?" * len(ids))
            for item_id, tag in self.conn.execute(
                f"SELECT item_id, tag FROM item_tags WHERE item_id IN ({marks}) ORDER BY tag", ids
            ):
                tags[int(item_id)].append(tag)
        items = []
        for item_id, label, tenant, source, created_at, sha, review_id, extra in rows:
            metadata = ItemMetadata(
                tenant=tenant,
                tags=tags[int(item_id)],
                source=source,
                created_at=created_at,
                image_sha256=sha,
                review_item_id=review_id,
                extra=json.loads(extra),
            )
            items.append(Item(int(item_id), int(label), metadata))
        return items

    def matching(self, filters: SearchFilters, *, with_vectors: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Labels (and vectors) of the live items that satisfy every filter."""
        where, args = _where(filters)
        columns = "label, vector" if with_vectors else "label"
        rows = self.conn.execute(f"SELECT {columns} FROM items WHERE {where}", args).fetchall()
        labels = np.array([r[0] for r in rows], np.int64)
        if not with_vectors:
            return labels, None
        vectors = np.stack([_unblob(r[1]) for r in rows]) if rows else None
        return labels, vectors

    def item_ids(self, filters: SearchFilters) -> list[int]:
        where, args = _where(filters)
        return [int(r[0]) for r in self.conn.execute(f"SELECT id FROM items WHERE {where} ORDER BY id", args)]

    def ids_of_images(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """The lowest item id of each (tenant, image_sha256) stored, in one query for them all."""
        shas = sorted({sha for _, sha in keys if sha is not None})
        if not shas:
            return {}
        wanted = set(keys)
        found: dict[tuple[str, str], int] = {}
        marks = ",".join("?" * len(shas))
        rows = self.conn.execute(
            f"SELECT tenant, image_sha256, id FROM items WHERE image_sha256 IN ({marks}) ORDER BY id", shas
        )
        for tenant, sha, item_id in rows:
            if (tenant, sha) in wanted:
                found.setdefault((tenant, sha), int(item_id))
        return found

    def count_matching(self, filters: SearchFilters) -> int:
        where, args = _where(filters)
        return int(self.conn.execute(f"SELECT COUNT(*) FROM items WHERE {where}", args).fetchone()[0])

    # settings and replicas ------------------------------------------------------------------
    def get_setting(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def replicas(self) -> list[ReplicaRow]:
        rows = self.conn.execute(
            "SELECT replica_id, applied_seq, heartbeat_at FROM replicas ORDER BY replica_id"
        ).fetchall()
        return [ReplicaRow(r[0], int(r[1]), float(r[2])) for r in rows]


class MetadataStore:
    """Items, tags, settings, the operation log and the replicas following it.

    Thread-safe: every call takes a connection of its own (SQLite: one per thread; PostgreSQL:
    from the store's pool). ``name`` names the index: its PostgreSQL schema
    (``<schema_prefix>_<name>``) and its write lock; ``path`` is its SQLite file.
    """

    def __init__(self, path: str | Path, state: StateConfig | None = None, name: str = "search") -> None:
        self.path = Path(path)
        self.name = name
        self.database: Database = open_database(state, name, self.path)
        try:
            self.schema = migrate(self.database, STORE, MIGRATIONS, adopt_unversioned=_adopt_unversioned)
            if self.backend == "postgres":
                self._align_sequences()
        except BaseException:
            self.database.close()
            raise

    @property
    def backend(self) -> str:
        return self.database.dialect.name

    def close(self) -> None:
        self.database.close()

    def _align_sequences(self) -> None:
        """PostgreSQL's identities must start after every id and seq already used, whatever put
        the rows there (``visionroute db copy`` from SQLite, whose log may be truncated): a
        reused seq would be a reused FAISS label, and seqs below the log's end are never read."""
        with self._writer() as conn:
            used_seq = StoreReader(conn).last_seq()
            max_label = conn.execute("SELECT MAX(label) FROM items").fetchone()[0]
            _sequence_past(conn, "oplog_seq_seq", max(used_seq, int(max_label or 0)))
            max_id = conn.execute("SELECT MAX(id) FROM items").fetchone()[0]
            if max_id is not None:
                _sequence_past(conn, "items_id_seq", int(max_id))

    # connections ----------------------------------------------------------------------------
    @contextmanager
    def _reader(self) -> Iterator[StoreReader]:
        with self.database.read() as conn:
            yield StoreReader(conn)

    @contextmanager
    def _writer(self) -> Iterator[Connection]:
        """A write transaction holding this index's write lock.

        On PostgreSQL two writers could otherwise take log seqs 7 and 8 and commit 8 first: a
        follower reading ``seq > 6`` then would apply 8, record 8 as applied and never see 7.
        Taking the lock before the first seq is drawn makes seq order commit order (SQLite's
        BEGIN IMMEDIATE already serialises all writers of the file)."""
        with self.database.write() as conn:
            conn.dialect.lock(conn, f"search-write:{self.name}")
            yield conn

    @contextmanager
    def consistent_view(self) -> Iterator[StoreReader]:
        """Reads that all see one committed state (a rebuild's vectors and its log seq), without
        blocking writers: SQLite's deferred read transaction (a WAL snapshot), PostgreSQL's
        REPEATABLE READ."""
        with self.database.read() as conn:
            if conn.dialect.name == "sqlite":
                conn.execute("BEGIN")
                try:
                    yield StoreReader(conn)
                finally:
                    conn.execute("COMMIT")
            else:
                with conn.raw.transaction():
                    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    yield StoreReader(conn)

    # settings -------------------------------------------------------------------------------
    def get_setting(self, key: str) -> str | None:
        with self._reader() as reader:
            return reader.get_setting(key)

    def set_settings(self, values: dict[str, str]) -> None:
        with self._writer() as conn:
            conn.executemany(
                "INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                list(values.items()),
            )

    def settings_once(self, values: dict[str, str]) -> dict[str, str]:
        """Record the settings not recorded yet; returns every one of ``values``' keys as stored
        (the first opener's values win: they say what the index holds)."""
        with self._writer() as conn:
            for key, value in values.items():
                conn.execute(
                    "INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
                    (key, value),
                )
            marks = ",".join("?" * len(values))
            rows = conn.execute(
                f"SELECT key, value FROM settings WHERE key IN ({marks})", list(values)
            ).fetchall()
        return {r[0]: r[1] for r in rows}

    # writes ---------------------------------------------------------------------------------
    def upsert(
        self, item_id: int | None, vector: np.ndarray, metadata: ItemMetadata
    ) -> tuple[int, int, int | None]:
        """Store the item; returns (item id, new label, replaced label or None). One transaction."""
        written = self.upsert_logged(item_id, vector, metadata)
        ops = written.ops
        return written.item_id, ops[-1].label, ops[0].label if len(ops) == 2 else None

    def upsert_logged(self, item_id: int | None, vector: np.ndarray, metadata: ItemMetadata) -> Written:
        """``upsert`` returning the log entries it wrote (a follower applies them in seq order)."""
        return self.upsert_many_logged([(item_id, vector, metadata)])[0]

    def upsert_many_logged(
        self, entries: Sequence[tuple[int | None, np.ndarray, ItemMetadata]]
    ) -> list[Written]:
        """Store many items in ONE transaction (one durable write, one fsync): each entry's
        ``Written`` in order, chained (each one's ``previous_seq`` is the seq before its ops)."""
        written: list[Written] = []
        with self._writer() as conn:
            previous_seq = StoreReader(conn).last_seq()
            for item_id, vector, metadata in entries:
                one = _upsert_in(conn, item_id, vector, metadata, previous_seq)
                written.append(one)
                previous_seq = one.ops[-1].seq
        return written

    def delete(self, item_id: int) -> int | None:
        """Remove the item; returns its label, or None when there is no such item."""
        written = self.delete_logged(item_id)
        return None if written is None else written.ops[0].label

    def delete_logged(self, item_id: int) -> Written | None:
        """``delete`` returning the log entry it wrote (None: no such item, nothing written)."""
        with self._writer() as conn:
            row = conn.execute("SELECT label FROM items WHERE id = ?", (int(item_id),)).fetchone()
            if row is None:
                return None
            previous_seq = StoreReader(conn).last_seq()
            label = int(row[0])
            seq = _returned(
                conn, "INSERT INTO oplog (op, label) VALUES ('remove', ?) RETURNING seq", (label,)
            )
            # Explicit: SQLite enforces ON DELETE CASCADE only with a per-connection pragma.
            conn.execute("DELETE FROM item_tags WHERE item_id = ?", (int(item_id),))
            conn.execute("DELETE FROM items WHERE id = ?", (int(item_id),))
        return Written(int(item_id), [Op(seq, "remove", label, None)], previous_seq)

    # the operation log ----------------------------------------------------------------------
    def ops_after(self, seq: int) -> Iterator[Op]:
        with self._reader() as reader:
            yield from reader.ops_after(seq)

    def last_seq(self) -> int:
        with self._reader() as reader:
            return reader.last_seq()

    def truncated_through(self) -> int:
        with self._reader() as reader:
            return reader.truncated_through()

    def log_bounds(self) -> tuple[int, int]:
        with self._reader() as reader:
            return reader.log_bounds()

    def count_ops_after(self, seq: int) -> int:
        with self._reader() as reader:
            return reader.count_ops_after(seq)

    def truncate_log(self, through_seq: int, *, replica_timeout_s: float | None = None) -> int:
        """Drop entries through ``through_seq`` that no live replica still needs; returns the
        seq actually truncated through.

        A replica is live when its heartbeat is at most ``replica_timeout_s`` old (None: every
        registered replica counts, however old); the log keeps everything after the lowest
        applied seq among them. A replica that timed out finds its next entries gone and
        rebuilds from ``items`` instead (see ``truncated_through``)."""
        with self._writer() as conn:
            if replica_timeout_s is None:
                row = conn.execute("SELECT MIN(applied_seq) FROM replicas").fetchone()
            else:
                # Rows of replicas long gone (restarted elsewhere under another id) are dropped;
                # one that does come back re-registers, and truncated_through tells it to rebuild.
                conn.execute(
                    "DELETE FROM replicas WHERE heartbeat_at < ?",
                    (time.time() - FORGET_AFTER_TIMEOUTS * replica_timeout_s,),
                )
                row = conn.execute(
                    "SELECT MIN(applied_seq) FROM replicas WHERE heartbeat_at >= ?",
                    (time.time() - replica_timeout_s,),
                ).fetchone()
            floor = int(through_seq) if row is None or row[0] is None else min(int(through_seq), int(row[0]))
            newest, truncated = StoreReader(conn).log_bounds()
            floor = min(floor, newest)  # never past what was written: last_seq would move
            if floor <= truncated:
                return truncated
            conn.execute("DELETE FROM oplog WHERE seq <= ?", (floor,))
            conn.execute(
                "INSERT INTO log_state (id, truncated_through) VALUES (1, ?) "
                "ON CONFLICT (id) DO UPDATE SET truncated_through = excluded.truncated_through",
                (floor,),
            )
        return floor

    # replicas -------------------------------------------------------------------------------
    def heartbeat(self, replica_id: str, applied_seq: int, at: float | None = None) -> None:
        """Record that ``replica_id`` is alive and has applied the log through ``applied_seq``."""
        # Under the write lock: a truncation then sees this row or runs wholly before it.
        with self._writer() as conn:
            conn.execute(
                "INSERT INTO replicas (replica_id, applied_seq, heartbeat_at) VALUES (?, ?, ?) "
                "ON CONFLICT (replica_id) DO UPDATE SET applied_seq = excluded.applied_seq, "
                "heartbeat_at = excluded.heartbeat_at",
                (replica_id, int(applied_seq), time.time() if at is None else float(at)),
            )

    def forget_replica(self, replica_id: str) -> None:
        with self._writer() as conn:
            conn.execute("DELETE FROM replicas WHERE replica_id = ?", (replica_id,))

    def replicas(self) -> list[ReplicaRow]:
        with self._reader() as reader:
            return reader.replicas()

    # reads ----------------------------------------------------------------------------------
    def count(self) -> int:
        with self._reader() as reader:
            return reader.count()

    def live_labels(self) -> np.ndarray:
        with self._reader() as reader:
            return reader.live_labels()

    def iter_vectors(self, batch: int = BATCH) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        with self._reader() as reader:
            yield from reader.iter_vectors(batch)

    def get(self, item_id: int) -> tuple[Item, np.ndarray] | None:
        with self._reader() as reader:
            return reader.get(item_id)

    def items_by_label(self, labels: list[int]) -> dict[int, Item]:
        with self._reader() as reader:
            return reader.items_by_label(labels)

    def matching(self, filters: SearchFilters, *, with_vectors: bool) -> tuple[np.ndarray, np.ndarray | None]:
        with self._reader() as reader:
            return reader.matching(filters, with_vectors=with_vectors)

    def item_ids(self, filters: SearchFilters) -> list[int]:
        with self._reader() as reader:
            return reader.item_ids(filters)

    def ids_of_images(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
        with self._reader() as reader:
            return reader.ids_of_images(keys)

    def count_matching(self, filters: SearchFilters) -> int:
        with self._reader() as reader:
            return reader.count_matching(filters)


def _upsert_in(
    conn: Connection, item_id: int | None, vector: np.ndarray, metadata: ItemMetadata, previous_seq: int
) -> Written:
    """One item's upsert inside the caller's write transaction (under the index's write lock)."""
    vector = np.ascontiguousarray(vector, np.float32)
    blob = _blob(vector)
    ops: list[Op] = []
    old_label = None
    if item_id is not None:
        row = conn.execute("SELECT label FROM items WHERE id = ?", (int(item_id),)).fetchone()
        old_label = int(row[0]) if row else None
    if old_label is not None:
        seq = _returned(
            conn, "INSERT INTO oplog (op, label) VALUES ('remove', ?) RETURNING seq", (old_label,)
        )
        ops.append(Op(seq, "remove", old_label, None))
    label = _returned(
        conn, "INSERT INTO oplog (op, label, vector) VALUES ('add', -1, ?) RETURNING seq", (blob,)
    )
    conn.execute("UPDATE oplog SET label = seq WHERE seq = ?", (label,))
    ops.append(Op(label, "add", label, vector))
    values = (
        label,
        metadata.tenant,
        metadata.source,
        metadata.created_at,
        metadata.image_sha256,
        metadata.review_item_id,
        json.dumps(metadata.extra),
        blob,
    )
    columns = ", ".join(_WRITE_COLUMNS)
    marks = ", ".join("?" * len(_WRITE_COLUMNS))
    if old_label is not None:
        assignments = ", ".join(f"{c} = ?" for c in _WRITE_COLUMNS)
        conn.execute(f"UPDATE items SET {assignments} WHERE id = ?", (*values, int(item_id)))
        conn.execute("DELETE FROM item_tags WHERE item_id = ?", (int(item_id),))
    elif item_id is not None:
        conn.execute(f"INSERT INTO items (id, {columns}) VALUES (?, {marks})", (int(item_id), *values))
        _advance_item_ids(conn, int(item_id))
    else:
        item_id = _returned(conn, f"INSERT INTO items ({columns}) VALUES ({marks}) RETURNING id", values)
    if metadata.tags:
        conn.executemany(
            "INSERT INTO item_tags (item_id, tag) VALUES (?, ?) ON CONFLICT (item_id, tag) DO NOTHING",
            [(int(item_id), tag) for tag in metadata.tags],
        )
    return Written(int(item_id), ops, previous_seq)


def _advance_item_ids(conn: Connection, item_id: int) -> None:
    """After an insert with an explicit id, PostgreSQL's identity must move past it (SQLite's
    AUTOINCREMENT does so by itself), or a later insert without an id would collide with it."""
    if conn.dialect.name == "postgres":
        _sequence_past(conn, "items_id_seq", item_id)


def _sequence_past(conn: Connection, sequence: str, used: int) -> None:
    """Make PostgreSQL's ``sequence`` hand out values above ``used`` (left alone when it
    already does). Callers hold the index's write lock, so reading and setting cannot race."""
    conn.execute(
        f"SELECT setval('{sequence}', ?) FROM {sequence} "
        "WHERE ? >= last_value + CASE WHEN is_called THEN 1 ELSE 0 END",  # the next value is not above it
        (used, used),
    ).fetchall()


def _one_or_many(column: str, value: str | list[str], clauses: list[str], args: list) -> None:
    values = [value] if isinstance(value, str) else list(value)
    clauses.append(f"{column} IN ({','.join('?' * len(values))})" if values else "1 = 0")
    args.extend(values)


def _where(filters: SearchFilters) -> tuple[str, list]:
    """A WHERE clause both backends accept (PostgreSQL has no integer truth values: ``1 = 0``)."""
    clauses: list[str] = []
    args: list = []
    if filters.tenant is not None:
        _one_or_many("tenant", filters.tenant, clauses, args)
    if filters.source is not None:
        _one_or_many("source", filters.source, clauses, args)
    if filters.tags_any is not None:
        marks = ",".join("?" * len(filters.tags_any))
        clauses.append(
            f"id IN (SELECT item_id FROM item_tags WHERE tag IN ({marks}))" if filters.tags_any else "1 = 0"
        )
        args.extend(filters.tags_any)
    if filters.tags_all:
        tags = sorted(set(filters.tags_all))
        marks = ",".join("?" * len(tags))
        clauses.append(
            f"id IN (SELECT item_id FROM item_tags WHERE tag IN ({marks}) GROUP BY item_id HAVING COUNT(*) = ?)"
        )
        args.extend([*tags, len(tags)])
    if filters.created_after is not None:
        clauses.append("created_at >= ?")
        args.append(filters.created_after)
    if filters.created_before is not None:
        clauses.append("created_at < ?")
        args.append(filters.created_before)
    if filters.in_review is not None:
        clauses.append("review_item_id IS NOT NULL" if filters.in_review else "review_item_id IS NULL")
    if filters.review_item_ids is not None:
        _one_or_many("review_item_id", filters.review_item_ids, clauses, args)
    if filters.image_sha256 is not None:
        _one_or_many("image_sha256", filters.image_sha256, clauses, args)
    if filters.ids is not None:
        clauses.append(f"id IN ({','.join('?' * len(filters.ids))})" if filters.ids else "1 = 0")
        args.extend(_ints(filters.ids))
    return (" AND ".join(clauses) or "1 = 1"), args
