"""SQLite: item metadata, the live vectors, and the log of index operations since the snapshot.

One transaction writes an item's row, its tags and its log entries, so an acknowledged write
is durable as a whole (WAL, ``synchronous=FULL``) and a crash leaves either all of it or none.
A vector's FAISS label is the sequence number of the log entry that added it: labels are never
reused, so a re-added (upserted) item never collides with its own tombstone in HNSW.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrieval.schemas import ItemMetadata, SearchFilters
from visionroute.sqlite import connect, immediate_transaction

SCHEMA = """
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


def _blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, np.float32).tobytes()


def _unblob(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, np.float32)


class MetadataStore:
    """Not thread-safe by itself: ``VectorIndex`` serialises every call under its lock."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        # One transaction per write; a commit is on disk before we acknowledge it.
        self.db = connect(self.path)
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # settings -------------------------------------------------------------------------------
    def get_setting(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_settings(self, values: dict[str, str]) -> None:
        with self._transaction():
            self.db.executemany(
                "INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                list(values.items()),
            )

    # writes ---------------------------------------------------------------------------------
    def _transaction(self):
        return immediate_transaction(self.db)

    def upsert(
        self, item_id: int | None, vector: np.ndarray, metadata: ItemMetadata
    ) -> tuple[int, int, int | None]:
        """Store the item; returns (item id, new label, replaced label or None). One transaction."""
        blob = _blob(vector)
        with self._transaction() as db:
            old_label = None
            if item_id is not None:
                row = db.execute("SELECT label FROM items WHERE id = ?", (item_id,)).fetchone()
                old_label = row[0] if row else None
            if old_label is not None:
                db.execute("INSERT INTO oplog (op, label) VALUES ('remove', ?)", (old_label,))
            label = db.execute(
                "INSERT INTO oplog (op, label, vector) VALUES ('add', -1, ?)", (blob,)
            ).lastrowid
            db.execute("UPDATE oplog SET label = seq WHERE seq = ?", (label,))
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
            columns = "label, tenant, source, created_at, image_sha256, review_item_id, extra, vector"
            if old_label is not None:
                db.execute(
                    "UPDATE items SET (" + columns + ") = (?, ?, ?, ?, ?, ?, ?, ?) WHERE id = ?",
                    (*values, item_id),
                )
                db.execute("DELETE FROM item_tags WHERE item_id = ?", (item_id,))
            elif item_id is not None:
                db.execute(
                    "INSERT INTO items (id, " + columns + ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (item_id, *values),
                )
            else:
                item_id = db.execute(
                    "INSERT INTO items (" + columns + ") VALUES (?, ?, ?, ?, ?, ?, ?, ?)", values
                ).lastrowid
            db.executemany(
                "INSERT OR IGNORE INTO item_tags (item_id, tag) VALUES (?, ?)",
                [(item_id, tag) for tag in metadata.tags],
            )
        return int(item_id), int(label), old_label

    def delete(self, item_id: int) -> int | None:
        """Remove the item; returns its label, or None when there is no such item."""
        with self._transaction() as db:
            row = db.execute("SELECT label FROM items WHERE id = ?", (item_id,)).fetchone()
            if row is None:
                return None
            db.execute("INSERT INTO oplog (op, label) VALUES ('remove', ?)", (row[0],))
            db.execute("DELETE FROM items WHERE id = ?", (item_id,))
        return int(row[0])

    # the operation log ----------------------------------------------------------------------
    def ops_after(self, seq: int) -> Iterator[Op]:
        rows = self.db.execute("SELECT seq, op, label, vector FROM oplog WHERE seq > ? ORDER BY seq", (seq,))
        for s, op, label, blob in rows:
            yield Op(s, op, label, None if blob is None else _unblob(blob))

    def last_seq(self) -> int:
        row = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'oplog'").fetchone()
        return int(row[0]) if row else 0

    def truncate_log(self, through_seq: int) -> None:
        """Drop entries a durable snapshot already contains."""
        with self._transaction() as db:
            db.execute("DELETE FROM oplog WHERE seq <= ?", (through_seq,))

    # reads ----------------------------------------------------------------------------------
    def count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM items").fetchone()[0])

    def live_labels(self) -> np.ndarray:
        return np.array([r[0] for r in self.db.execute("SELECT label FROM items")], np.int64)

    def iter_vectors(self, batch: int = 10_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(labels, vectors) of every live item, in batches (for rebuilds)."""
        cursor = self.db.execute("SELECT label, vector FROM items ORDER BY label")
        while rows := cursor.fetchmany(batch):
            yield np.array([r[0] for r in rows], np.int64), np.stack([_unblob(r[1]) for r in rows])

    def get(self, item_id: int) -> tuple[Item, np.ndarray] | None:
        row = self.db.execute(
            "SELECT " + _ITEM_COLUMNS + ", vector FROM items WHERE id = ?", (item_id,)
        ).fetchone()
        if row is None:
            return None
        item = self._items_from_rows([row[:-1]])[0]
        return item, _unblob(row[-1])

    def items_by_label(self, labels: list[int]) -> dict[int, Item]:
        if not labels:
            return {}
        marks = ",".join("?" * len(labels))
        rows = self.db.execute(
            "SELECT " + _ITEM_COLUMNS + f" FROM items WHERE label IN ({marks})", labels
        ).fetchall()
        return {item.label: item for item in self._items_from_rows(rows)}

    def _items_from_rows(self, rows: list[tuple]) -> list[Item]:
        ids = [r[0] for r in rows]
        tags: dict[int, list[str]] = {i: [] for i in ids}
        if ids:
            marks = ",".join("?" * len(ids))
            for item_id, tag in self.db.execute(
                f"SELECT item_id, tag FROM item_tags WHERE item_id IN ({marks}) ORDER BY tag", ids
            ):
                tags[item_id].append(tag)
        items = []
        for item_id, label, tenant, source, created_at, sha, review_id, extra in rows:
            metadata = ItemMetadata(
                tenant=tenant,
                tags=tags[item_id],
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
        rows = self.db.execute(f"SELECT {columns} FROM items WHERE {where}", args).fetchall()
        labels = np.array([r[0] for r in rows], np.int64)
        if not with_vectors:
            return labels, None
        vectors = np.stack([_unblob(r[1]) for r in rows]) if rows else None
        return labels, vectors

    def item_ids(self, filters: SearchFilters) -> list[int]:
        where, args = _where(filters)
        return [int(r[0]) for r in self.db.execute(f"SELECT id FROM items WHERE {where} ORDER BY id", args)]

    def count_matching(self, filters: SearchFilters) -> int:
        where, args = _where(filters)
        return int(self.db.execute(f"SELECT COUNT(*) FROM items WHERE {where}", args).fetchone()[0])


_ITEM_COLUMNS = "id, label, tenant, source, created_at, image_sha256, review_item_id, extra"


def _one_or_many(column: str, value: str | list[str], clauses: list[str], args: list) -> None:
    values = [value] if isinstance(value, str) else list(value)
    clauses.append(f"{column} IN ({','.join('?' * len(values))})" if values else "0")
    args.extend(values)


def _where(filters: SearchFilters) -> tuple[str, list]:
    clauses: list[str] = []
    args: list = []
    if filters.tenant is not None:
        _one_or_many("tenant", filters.tenant, clauses, args)
    if filters.source is not None:
        _one_or_many("source", filters.source, clauses, args)
    if filters.tags_any is not None:
        marks = ",".join("?" * len(filters.tags_any))
        clauses.append(
            f"id IN (SELECT item_id FROM item_tags WHERE tag IN ({marks}))" if filters.tags_any else "0"
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
        clauses.append(f"id IN ({','.join('?' * len(filters.ids))})" if filters.ids else "0")
        args.extend(filters.ids)
    return (" AND ".join(clauses) or "1"), args
