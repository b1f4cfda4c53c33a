"""The human-review queue: items, label sets and audit in a state database, images by sha256.

Where it lives (``visionroute.state``): a SQLite file (WAL) under ``root`` with images as fsynced
files under ``root/images`` (one node), or the PostgreSQL schema ``<prefix>_review`` with images
in its ``images`` table, so every node reads every image (a cluster). Images are keyed by the
sha256 of the bytes actually stored (the privacy-redacted image: policies/image_redaction.py)
within the tenant's scope (policies/review_blobs.py); ``image_sha256`` names the request's file.

Durability rule: ``enqueue`` returns only after the image is durable (the file fsynced, or the
``images`` row written in the item's own transaction) and the row is committed, so an
acknowledged item survives a crash and always has its image. Enqueue is idempotent on
(``tenant``, ``request_id``, ``kind``): a client retry after a lost response never makes a
second item, and another tenant's request that happens to reuse the id gets an item of its own.
The same id with another image (or task) within a tenant is not a retry: 409, never an item
answered for an image it does not hold.

The schema is versioned (``MIGRATIONS``, applied at open by visionroute/migrations.py).

Leases: ``claim`` gives one reviewer an item for ``lease_s`` seconds; an expired lease puts the
item back in the queue (with a ``lease_expired`` audit event). No item is ever held by two
reviewers: SQLite serialises every writer; on PostgreSQL the rows a claim reads are locked
(``FOR UPDATE``; the "next item" skips rows another node is claiming, ``SKIP LOCKED``).
``submit_label`` is idempotent: the same label twice is one label; a label naming a class
outside the task's label set is refused.

Order: overdue items (past their SLA) first, then by priority, the value of a review
(``policies.costs.review_value``: uncertainty x the cost of an error), then oldest first.

Retention: ``purge_images`` deletes stored images older than a TTL; the rows, labels and audit
log stay. Erasure: ``erase`` removes items with their images and derived records, audited. ``export_calibration`` writes reviewed items as a labelled set that
``visionroute calibrate --images --labels`` reads.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sqlite3
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from policies.audit_sampling import is_error
from policies.review_blobs import LEGACY_SCOPE, BlobRef, BlobStore, DatabaseBlobs, blob_scope, check_sha256
from visionroute.errors import Conflict, InputError, NotFound
from visionroute.migrations import Migration, migrate
from visionroute.state import Connection, Row, StateConfig, StateUnavailable, open_database

STORE = "review_queue"
ITEM_COLUMNS = (
    "id, request_id, tenant, task, image_sha256, created_at, priority, reason, proposed_json, trace_json,"
    " status, lease_owner, lease_token, lease_expires_at, label_json, labelled_by, labelled_at, kind,"
    " sla_due_at, image_deleted_at"
)
# The schema, one version at a time (visionroute/migrations.py applies them at open). Plain SQL;
# a new version is a new entry at the end, never an edit of one already released.
MIGRATIONS = (
    Migration(
        1,
        "items, label sets and the audit log (request_id unique across all tenants)",
        """
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
            labelled_at REAL,
            kind TEXT NOT NULL DEFAULT 'review',
            sla_due_at REAL,
            image_deleted_at REAL
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
        """,
    ),
    Migration(
        2,
        "request ids are unique per (tenant, request_id, kind), not across tenants",
        # SQLite cannot drop a UNIQUE constraint: rebuild the table (its rows keep their ids).
        f"""
        CREATE TABLE items_v2 (
            id TEXT PRIMARY KEY,
            request_id TEXT NOT NULL,
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
            labelled_at REAL,
            kind TEXT NOT NULL DEFAULT 'review',
            sla_due_at REAL,
            image_deleted_at REAL,
            UNIQUE (tenant, request_id, kind)
        );
        INSERT INTO items_v2 ({ITEM_COLUMNS}) SELECT {ITEM_COLUMNS} FROM items;
        DROP TABLE items;
        ALTER TABLE items_v2 RENAME TO items;
        CREATE INDEX items_queue ON items (status, priority DESC, created_at);
        CREATE INDEX items_tenant_queue ON items (tenant, status, priority DESC, created_at);
        """,
    ),
    Migration(
        3,
        "image bytes in the database, so every node reads them (SQLite keeps its fsynced files)",
        """
        CREATE TABLE IF NOT EXISTS images (
            sha256 TEXT PRIMARY KEY,
            data BLOB NOT NULL,
            created_at REAL NOT NULL
        );
        """,
        # A version on both backends, so one number describes a review store everywhere.
        dialect_sql={"sqlite": "SELECT 1;"},
    ),
    Migration(
        4,
        "privacy: blobs keyed by the bytes stored within the tenant's scope; withheld and kept originals",
        # Old items keep their blobs in the legacy scope '' (stored_sha256 NULL says so).
        """
        ALTER TABLE items ADD COLUMN stored_sha256 TEXT;
        ALTER TABLE items ADD COLUMN image_withheld TEXT;
        ALTER TABLE items ADD COLUMN original_kept INTEGER NOT NULL DEFAULT 0;
        CREATE INDEX items_tenant_image ON items (tenant, image_sha256);
        """,
        dialect_sql={
            "postgres": """
            ALTER TABLE items ADD COLUMN stored_sha256 TEXT;
            ALTER TABLE items ADD COLUMN image_withheld TEXT;
            ALTER TABLE items ADD COLUMN original_kept INTEGER NOT NULL DEFAULT 0;
            CREATE INDEX items_tenant_image ON items (tenant, image_sha256);
            ALTER TABLE images ADD COLUMN scope TEXT NOT NULL DEFAULT '';
            ALTER TABLE images DROP CONSTRAINT images_pkey;
            ALTER TABLE images ADD PRIMARY KEY (scope, sha256);
            """
        },
    ),
)

# Columns added before the schema was versioned (the first release lacked them): a database
# with no recorded version gets any it lacks before version 1 is recorded.
UNVERSIONED_COLUMNS = {
    "kind": "TEXT NOT NULL DEFAULT 'review'",  # review | audit (a sampled auto-accept) | budget
    "sla_due_at": "REAL",
    "image_deleted_at": "REAL",
}
STATUSES = ("pending", "labelled", "expired")
KINDS = ("review", "audit", "budget", "shadow")  # shadow: a rollout candidate's unserved accept


@dataclass(frozen=True)
class ReviewItem:
    id: str
    request_id: str
    tenant: str
    task: str
    image_sha256: str
    created_at: float
    priority: float
    reason: str
    proposed: list[dict[str, Any]]
    trace: dict[str, Any]
    status: str
    lease_owner: str | None
    lease_token: str | None
    lease_expires_at: float | None
    label: dict[str, Any] | None
    labelled_by: str | None
    labelled_at: float | None
    kind: str = "review"
    sla_due_at: float | None = None
    image_deleted_at: float | None = None
    stored_sha256: str | None = None  # the bytes stored (the redacted image); None: legacy or withheld
    image_withheld: str | None = None  # why no image was stored (a privacy detector failed)
    original_kept: bool = False  # the unredacted file is stored too (privacy keep_original)

    @classmethod
    def from_row(cls, row: Row | sqlite3.Row) -> ReviewItem:
        return cls(
            id=row["id"],
            request_id=row["request_id"],
            tenant=row["tenant"],
            task=row["task"],
            image_sha256=row["image_sha256"],
            created_at=row["created_at"],
            priority=row["priority"],
            reason=row["reason"],
            proposed=json.loads(row["proposed_json"]),
            trace=json.loads(row["trace_json"]),
            status=row["status"],
            lease_owner=row["lease_owner"],
            lease_token=row["lease_token"],
            lease_expires_at=row["lease_expires_at"],
            label=json.loads(row["label_json"]) if row["label_json"] else None,
            labelled_by=row["labelled_by"],
            labelled_at=row["labelled_at"],
            kind=row["kind"],
            sla_due_at=row["sla_due_at"],
            image_deleted_at=row["image_deleted_at"],
            stored_sha256=row["stored_sha256"],
            image_withheld=row["image_withheld"],
            original_kept=bool(row["original_kept"]),
        )

    @property
    def blob_refs(self) -> list[BlobRef]:
        """Every blob stored for this item: the image shown, and the kept original if any."""
        if self.stored_sha256 is None:
            return [] if self.image_withheld else [BlobRef(LEGACY_SCOPE, self.image_sha256)]
        refs = [BlobRef(blob_scope(self.tenant), self.stored_sha256)]
        if self.original_kept and self.image_sha256 != self.stored_sha256:
            refs.append(BlobRef(blob_scope(self.tenant), self.image_sha256))
        return refs

    @property
    def shown_ref(self) -> BlobRef | None:
        """The blob a reviewer sees (None: no image was stored)."""
        if self.stored_sha256 is None:
            return None if self.image_withheld else BlobRef(LEGACY_SCOPE, self.image_sha256)
        return BlobRef(blob_scope(self.tenant), self.stored_sha256)

    def is_leased(self, now: float) -> bool:
        return self.lease_expires_at is not None and self.lease_expires_at > now

    def public_dict(self, now: float | None = None) -> dict[str, Any]:
        """Everything but the lease token, which only the claiming reviewer gets."""
        now = time.time() if now is None else now
        data = {k: v for k, v in self.__dict__.items() if k != "lease_token"}
        data["age_s"] = round(now - self.created_at, 3)
        data["is_leased"] = self.is_leased(now)
        data["is_overdue"] = self.is_overdue(now)
        data["image_available"] = self.image_deleted_at is None and self.image_withheld is None
        return data

    def is_overdue(self, now: float) -> bool:
        return self.status == "pending" and self.sla_due_at is not None and self.sla_due_at <= now


class ReviewQueue:
    """Thread-safe and multi-process safe; on PostgreSQL, safe across nodes too.

    ``state`` chooses the backend (None: the SQLite file ``root/review.sqlite3``).
    """

    def __init__(
        self, root: str | Path, *, default_lease_s: float = 300.0, state: StateConfig | None = None
    ) -> None:
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "review.sqlite3"
        self.default_lease_s = default_lease_s
        self.database = open_database(state, "review", self.db_path)
        self.blobs: BlobStore | DatabaseBlobs = (
            BlobStore(self.root / "images")
            if self.database.dialect.name == "sqlite"
            else DatabaseBlobs(self.database)
        )
        try:
            self.schema = migrate(self.database, STORE, MIGRATIONS, adopt_unversioned=self._adopt_unversioned)
        except BaseException:
            self.database.close()
            raise

    def close(self) -> None:
        self.database.close()

    @staticmethod
    def _adopt_unversioned(db: Connection) -> None:
        """A database from before versioning: add the columns its release did not have yet."""
        if db.dialect.name != "sqlite":
            return  # PostgreSQL stores were versioned from their first day
        have = {row["name"] for row in db.execute("PRAGMA table_info(items)")}
        if not have:
            return  # a new database: version 1 creates everything
        for column, spec in UNVERSIONED_COLUMNS.items():
            if column not in have:
                db.execute(f"ALTER TABLE items ADD COLUMN {column} {spec}")

    @staticmethod
    def _audit(db: Connection, item_id: str, actor: str, action: str, previous: Any, new: Any) -> None:
        db.execute(
            "INSERT INTO audit (item_id, at, actor, action, previous_json, new_json) VALUES (?, ?, ?, ?, ?, ?)",
            (item_id, time.time(), actor, action, json.dumps(previous), json.dumps(new)),
        )

    @staticmethod
    def _locked_item(db: Connection, item_id: str) -> Row | None:
        """One item, locked for the rest of the transaction on PostgreSQL (waits for a claim,
        label or release of it on another node, then reads what that one committed)."""
        return db.execute("SELECT * FROM items WHERE id = ?" + db.dialect.for_update, (item_id,)).fetchone()

    # -- writers ---------------------------------------------------------------------------

    def enqueue(
        self,
        *,
        request_id: str,
        image_bytes: bytes | None,
        image_sha256: str,
        tenant: str,
        task: str,
        reason: str,
        proposed: list[dict[str, Any]],
        trace: dict[str, Any],
        priority: float = 0.0,
        kind: str = "review",
        sla_s: float | None = None,
        label_set: tuple[str, ...] | list[str] | None = None,
        original_bytes: bytes | None = None,
        image_withheld: str | None = None,
    ) -> ReviewItem:
        """Store the image, then the row; returns the existing item on a retry (the same tenant,
        request id and kind, with the same image and task); Conflict when those differ.

        ``image_bytes`` is what is stored and shown for the item: the request's file, or its
        redaction (policies/image_redaction.py). It is keyed by its own sha256 in the tenant's
        scope; ``image_sha256`` names the request's file (the retry check compares it).
        ``original_bytes`` (privacy ``keep_original``) stores the unredacted file too.
        ``image_bytes=None`` queues the item with no image; ``image_withheld`` says why.
        ``label_set`` (the model's class names) registers what labels the task accepts.
        """
        if kind not in KINDS:
            raise InputError(f"kind must be one of {list(KINDS)}, got {kind!r}", field="kind")
        check_sha256(image_sha256)
        if image_bytes is None and not image_withheld:
            raise InputError("an item without an image needs image_withheld (the reason)", field="image")
        if original_bytes is not None and hashlib.sha256(original_bytes).hexdigest() != image_sha256:
            raise InputError("original_bytes do not hash to image_sha256", field="image_sha256")
        key = (tenant, request_id, kind)
        lookup = "SELECT * FROM items WHERE tenant = ? AND request_id = ? AND kind = ?"
        with self.database.read() as db:
            existing = db.execute(lookup, key).fetchone()
        if existing is not None:  # a retry: nothing to write
            return self._retried(existing, image_sha256, task)
        stored_sha256 = None if image_bytes is None else hashlib.sha256(image_bytes).hexdigest()
        blobs: dict[BlobRef, bytes] = {}
        if image_bytes is not None:
            blobs[BlobRef(blob_scope(tenant), stored_sha256)] = image_bytes
        if original_bytes is not None:
            blobs.setdefault(BlobRef(blob_scope(tenant), image_sha256), original_bytes)
        item_id = uuid.uuid4().hex
        now = time.time()
        if isinstance(self.blobs, BlobStore):
            # The file's fsync outside SQLite's one write lock, so enqueues do not queue behind
            # each other's disk flushes; the put inside the transaction then only finds it there
            # (or rewrites it, if a purge removed it in between).
            for ref, data in blobs.items():
                self.blobs.put(ref, data)
        with self.database.write() as db:
            for ref in sorted(blobs):
                db.dialect.lock(db, ref.lock_key())
            # ON CONFLICT, not a check first: on PostgreSQL a concurrent retry on another node
            # may insert between a check and this insert.
            inserted = db.execute(
                "INSERT INTO items (id, request_id, tenant, task, image_sha256, created_at, priority, reason,"
                " proposed_json, trace_json, kind, sla_due_at, stored_sha256, image_withheld, original_kept)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (tenant, request_id, kind) DO NOTHING RETURNING id",
                (
                    item_id,
                    request_id,
                    tenant,
                    task,
                    image_sha256,
                    now,
                    priority,
                    reason,
                    json.dumps(proposed),
                    json.dumps(trace),
                    kind,
                    now + sla_s if sla_s else None,
                    stored_sha256,
                    image_withheld if image_bytes is None else None,
                    int(original_bytes is not None),
                ),
            ).fetchone()
            if inserted is None:  # a concurrent retry won the race
                return self._retried(db.execute(lookup, key).fetchone(), image_sha256, task)
            for ref, data in blobs.items():
                self.blobs.put(ref, data, db)  # durable before the row commits
            if label_set:
                self._register_label_set(db, task, list(label_set), now)
            self._audit(
                db,
                item_id,
                "service",
                "enqueue",
                None,
                {"reason": reason, "kind": kind, "priority": priority},
            )
            row = db.execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone()
        return ReviewItem.from_row(row)

    @staticmethod
    def _retried(row: Row, image_sha256: str, task: str) -> ReviewItem:
        item = ReviewItem.from_row(row)
        if item.image_sha256 != image_sha256 or item.task != task:
            raise Conflict(
                f"request id {item.request_id!r} already queued item {item.id} for tenant {item.tenant!r}"
                f" (task {item.task!r}, image sha256 {item.image_sha256[:12]}...); this request has task"
                f" {task!r} and image sha256 {image_sha256[:12]}...: a retry must resend the same"
                " request, anything else needs a new request id",
                field="request_id",
            )
        return item

    def claim(
        self,
        reviewer: str,
        *,
        item_id: str | None = None,
        tenant: str | None = None,
        lease_s: float | None = None,
    ) -> ReviewItem | None:
        """Lease the given item, or the most valuable unleased pending one; None if none waits."""
        if not reviewer:
            raise InputError("reviewer must be a non-empty name", field="reviewer")
        lease_s = self.default_lease_s if lease_s is None else lease_s
        if not 0 < lease_s <= 86400:
            raise InputError(f"lease_s must be in (0, 86400], got {lease_s}", field="lease_s")
        now = time.time()
        with self.database.write() as db:
            self._requeue_expired(db, now)
            if item_id is not None:
                row = self._locked_item(db, item_id)
                if row is None or (tenant is not None and row["tenant"] != tenant):
                    raise NotFound(f"no review item {item_id!r}", field="item_id")
                item = ReviewItem.from_row(row)
                if item.status != "pending":
                    raise Conflict(f"item {item_id} is already {item.status}", field="item_id")
                if item.is_leased(now) and item.lease_owner != reviewer:
                    raise Conflict(
                        f"item {item_id} is leased by {item.lease_owner} for another "
                        f"{item.lease_expires_at - now:.0f} s",
                        field="item_id",
                    )
            else:
                item = self._next_claimable(db, now, tenant)
                if item is None:
                    return None
            token = uuid.uuid4().hex
            db.execute(
                "UPDATE items SET lease_owner = ?, lease_token = ?, lease_expires_at = ? WHERE id = ?",
                (reviewer, token, now + lease_s, item.id),
            )
            self._audit(db, item.id, reviewer, "claim", item.lease_owner, {"lease_s": lease_s})
            row = db.execute("SELECT * FROM items WHERE id = ?", (item.id,)).fetchone()
        return ReviewItem.from_row(row)

    @staticmethod
    def _next_claimable(db: Connection, now: float, tenant: str | None) -> ReviewItem | None:
        """The most valuable unleased pending item, locked; on PostgreSQL an item another node is
        claiming right now is passed over (SKIP LOCKED), so concurrent claimers get different items."""
        query = "SELECT * FROM items WHERE status = 'pending' AND (lease_expires_at IS NULL OR lease_expires_at <= ?)"
        params: list[Any] = [now]
        if tenant is not None:
            query += " AND tenant = ?"
            params.append(tenant)
        order = (
            " ORDER BY (sla_due_at IS NOT NULL AND sla_due_at <= ?) DESC, priority DESC, created_at LIMIT 1"
        )
        row = db.execute(query + order + db.dialect.skip_locked, [*params, now]).fetchone()
        return None if row is None else ReviewItem.from_row(row)

    def submit_label(
        self,
        item_id: str,
        *,
        reviewer: str,
        lease_token: str,
        label: dict[str, Any],
        tenant: str | None = None,
    ) -> ReviewItem:
        """Record a label under a live lease. Repeating the same label is a no-op success."""
        now = time.time()
        with self.database.write() as db:
            row = self._locked_item(db, item_id)
            if row is None or (tenant is not None and row["tenant"] != tenant):
                raise NotFound(f"no review item {item_id!r}", field="item_id")
            item = ReviewItem.from_row(row)
            if item.status == "labelled":
                if item.label == label:
                    return item  # idempotent retry
                raise Conflict(
                    f"item {item_id} was already labelled {item.label} by {item.labelled_by}", field="label"
                )
            if item.status != "pending":
                raise Conflict(
                    f"item {item_id} is {item.status} (its image was purged); it can no longer be labelled",
                    field="item_id",
                )
            self._validate_label(db, item.task, label)
            if item.lease_token != lease_token or item.lease_owner != reviewer:
                raise Conflict(
                    f"lease token does not match the current lease of item {item_id}; claim it again",
                    field="lease_token",
                )
            if not item.is_leased(now):
                raise Conflict(
                    f"the lease on item {item_id} expired {now - item.lease_expires_at:.0f} s ago; claim it again",
                    field="lease_token",
                )
            db.execute(
                "UPDATE items SET status = 'labelled', label_json = ?, labelled_by = ?, labelled_at = ?,"
                " lease_token = NULL, lease_expires_at = NULL WHERE id = ?",
                (json.dumps(label), reviewer, now, item_id),
            )
            self._audit(db, item_id, reviewer, "label", item.label, label)
            row = db.execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone()
        return ReviewItem.from_row(row)

    @staticmethod
    def _register_label_set(db: Connection, task: str, labels: list[str], now: float) -> None:
        row = db.execute("SELECT labels_json FROM label_sets WHERE task = ?", (task,)).fetchone()
        if row is None or json.loads(row["labels_json"]) != labels:
            db.execute(
                "INSERT INTO label_sets (task, labels_json, updated_at) VALUES (?, ?, ?) ON CONFLICT (task)"
                " DO UPDATE SET labels_json = excluded.labels_json, updated_at = excluded.updated_at",
                (task, json.dumps(labels), now),
            )

    def _validate_label(self, db: Connection, task: str, label: dict[str, Any]) -> None:
        row = db.execute("SELECT labels_json FROM label_sets WHERE task = ?", (task,)).fetchone()
        if row is None:
            return  # the task's model declared no label set: nothing to check against
        allowed = set(json.loads(row["labels_json"]))
        names = [label.get("label")] + [box.get("label") for box in (label.get("boxes") or [])]
        bad = sorted({str(n) for n in names if n is not None and n not in allowed})
        if bad:
            examples = sorted(allowed)[:8]
            raise InputError(
                f"labels {bad} are not in task {task!r}'s label set of {len(allowed)} names (e.g. {examples});"
                f" GET /v1/review/labels/{task} lists them",
                field="label",
            )

    def _requeue_expired(self, db: Connection, now: float) -> int:
        """Clear leases that ran out (the item is claimable again) and say so in the audit log.

        On PostgreSQL the expired rows are locked, and rows another claimer is requeueing or
        claiming are skipped: clearing them from a stale read could wipe a lease just granted."""
        rows = db.execute(
            "SELECT id, lease_owner, lease_expires_at FROM items WHERE status = 'pending' AND lease_owner IS NOT NULL"
            " AND lease_expires_at IS NOT NULL AND lease_expires_at <= ? ORDER BY id"
            + db.dialect.skip_locked,
            (now,),
        ).fetchall()
        for row in rows:
            db.execute(
                "UPDATE items SET lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL WHERE id = ?",
                (row["id"],),
            )
            self._audit(
                db,
                row["id"],
                "service",
                "lease_expired",
                {"lease_owner": row["lease_owner"], "lease_expires_at": row["lease_expires_at"]},
                None,
            )
        return len(rows)

    def release(self, item_id: str, *, reviewer: str, lease_token: str) -> ReviewItem:
        """Give a leased item back unlabelled (a reviewer skips it)."""
        with self.database.write() as db:
            row = self._locked_item(db, item_id)
            if row is None:
                raise NotFound(f"no review item {item_id!r}", field="item_id")
            item = ReviewItem.from_row(row)
            if item.lease_token != lease_token or item.lease_owner != reviewer:
                raise Conflict(
                    f"lease token does not match the current lease of item {item_id}", field="lease_token"
                )
            db.execute(
                "UPDATE items SET lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL WHERE id = ?",
                (item_id,),
            )
            self._audit(db, item_id, reviewer, "release", {"lease_owner": reviewer}, None)
            row = db.execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone()
        return ReviewItem.from_row(row)

    def purge_images(self, ttl_s: float, *, now: float | None = None) -> dict[str, int]:
        """Delete stored images of items older than ``ttl_s``; rows, labels and audit stay.

        A pending item whose image is gone can no longer be reviewed: it becomes ``expired``.
        A blob shared by several items (the same bytes in one tenant's scope) goes when no
        remaining item needs it. The images go in the same transaction (serialised with
        enqueues of the same blob), so a concurrent enqueue never ends up with an item whose
        image was just deleted. On PostgreSQL an item being claimed or labelled right now is
        left for the next purge.
        """
        if not ttl_s > 0:
            raise InputError(f"ttl_s must be > 0, got {ttl_s}", field="image_ttl_s")
        now = time.time() if now is None else now
        with self.database.write() as db:
            rows = db.execute(
                "SELECT * FROM items WHERE image_deleted_at IS NULL AND created_at < ?"
                " ORDER BY id" + db.dialect.skip_locked,
                (now - ttl_s,),
            ).fetchall()
            purged = [ReviewItem.from_row(row) for row in rows]
            for item in purged:
                status = "expired" if item.status == "pending" else item.status
                self._drop_image(db, item, now, status)
                self._audit(
                    db,
                    item.id,
                    "service",
                    "image_purged",
                    {"status": item.status},
                    {"status": status, "ttl_s": ttl_s},
                )
            deleted = self._delete_unneeded_blobs(db, {ref for item in purged for ref in item.blob_refs})
        return {"items": len(rows), "images_deleted": deleted}

    @staticmethod
    def _drop_image(db: Connection, item: ReviewItem, now: float, status: str) -> None:
        db.execute(
            "UPDATE items SET image_deleted_at = ?, status = ?, lease_owner = NULL, lease_token = NULL,"
            " lease_expires_at = NULL WHERE id = ?",
            (now, status, item.id),
        )

    def _delete_unneeded_blobs(self, db: Connection, candidates: set[BlobRef]) -> int:
        """Delete the candidate blobs that no item with a live image refers to (locked first)."""
        for ref in sorted(candidates):  # sorted: two purges never deadlock
            db.dialect.lock(db, ref.lock_key())
        still_needed = {
            ref
            for row in db.execute("SELECT * FROM items WHERE image_deleted_at IS NULL")
            for ref in ReviewItem.from_row(row).blob_refs
            if ref in candidates
        }
        return sum(self.blobs.delete(ref, db) for ref in sorted(candidates - still_needed))

    def image(self, item_id: str) -> bytes:
        """The image a reviewer sees: the stored (redacted) one."""
        item = self.get(item_id)
        if item.image_deleted_at is not None:
            raise NotFound(
                f"the image of item {item_id} was deleted by the retention policy at {item.image_deleted_at:.0f}; "
                "its label and audit log remain",
                field="image",
            )
        if item.image_withheld is not None:
            raise NotFound(
                f"the image of item {item_id} was not stored: {item.image_withheld}", field="image"
            )
        return self.blobs.get(item.shown_ref)

    def original_image(self, item_id: str) -> bytes:
        """The unredacted file, stored only under the privacy policy's ``keep_original: true``."""
        item = self.get(item_id)
        if not item.original_kept or item.image_deleted_at is not None:
            raise NotFound(f"item {item_id} has no stored original image", field="image")
        return self.blobs.get(BlobRef(blob_scope(item.tenant), item.image_sha256))

    def live_blob_refs(self) -> list[BlobRef]:
        """Every blob an item with a live image refers to (``visionroute db copy`` moves these)."""
        return sorted(
            {ref for item in self.iter_all() if item.image_deleted_at is None for ref in item.blob_refs}
        )

    # -- erasure -------------------------------------------------------------------------------

    def record_event(self, item_id: str, actor: str, action: str, new: Any) -> None:
        """An audit event of the service's own (e.g. an erasure's summary under ``erasure:<id>``)."""
        with self.database.write() as db:
            self._audit(db, item_id, actor, action, None, new)

    def find_items(
        self, tenant: str, *, request_key: str | None = None, image_sha256: str | None = None
    ) -> list[ReviewItem]:
        """A tenant's items of one subject (policies/privacy_erase.py): those whose request id is
        ``request_key`` or starts with ``request_key + ":"``, or whose request file is ``image_sha256``."""
        if (request_key is None) == (image_sha256 is None):
            raise InputError("give exactly one of request_key and image_sha256", field="subject")
        if image_sha256 is not None:
            check_sha256(image_sha256)
            query, params = "image_sha256 = ?", [image_sha256]
        else:
            # A range, not LIKE: '_' in a key is no wildcard, and the unique index serves it.
            query, params = (
                "(request_id = ? OR (request_id >= ? AND request_id < ?))",
                [
                    request_key,
                    request_key + ":",
                    request_key + ";",  # ';' sorts right after ':'
                ],
            )
        with self.database.read() as db:
            rows = db.execute(
                f"SELECT * FROM items WHERE tenant = ? AND {query} ORDER BY created_at", [tenant, *params]
            ).fetchall()
        return [ReviewItem.from_row(row) for row in rows]

    def erase(self, item_ids: Iterable[str], *, actor: str, reason: str) -> dict[str, Any]:
        """Remove items and everything stored for them; an ``erased`` audit event each remains.

        Gone: their images (the shown and any kept original), their rows (trace, proposed
        answer, label) and the payloads of their earlier audit events (who did what, and when,
        stays). An image is erased wherever it is stored: another item of the tenant holding
        the same blob loses its image too (``image_erased`` in its audit log; pending becomes
        expired). One transaction: all of it happens or none.
        """
        ids = sorted(set(item_ids))
        now = time.time()
        with self.database.write() as db:
            items = [ReviewItem.from_row(row) for i in ids if (row := self._locked_item(db, i)) is not None]
            refs = {ref for item in items for ref in item.blob_refs if item.image_deleted_at is None}
            for ref in sorted(refs):
                db.dialect.lock(db, ref.lock_key())
            erased = {item.id for item in items}
            shas = sorted({ref.sha256 for ref in refs})
            marks = ", ".join("?" for _ in shas)
            candidates = (
                db.execute(
                    f"SELECT * FROM items WHERE image_deleted_at IS NULL AND (image_sha256 IN ({marks})"
                    f" OR stored_sha256 IN ({marks})) ORDER BY id" + db.dialect.for_update,
                    [*shas, *shas],
                ).fetchall()
                if shas
                else []
            )
            sharing = [
                other
                for row in candidates
                if (other := ReviewItem.from_row(row)).id not in erased and refs & set(other.blob_refs)
            ]
            for other in sharing:
                status = "expired" if other.status == "pending" else other.status
                self._drop_image(db, other, now, status)
                self._audit(db, other.id, actor, "image_erased", {"status": other.status}, {"status": status})
            deleted = sum(self.blobs.delete(ref, db) for ref in sorted(refs))
            for item in items:
                db.execute("DELETE FROM items WHERE id = ?", (item.id,))
                db.execute(
                    "UPDATE audit SET previous_json = NULL, new_json = NULL WHERE item_id = ?", (item.id,)
                )
                self._audit(db, item.id, actor, "erased", None, {"reason": reason, "kind": item.kind})
        return {
            "items": [item.id for item in items],
            "not_found": sorted(set(ids) - erased),
            "images_deleted": deleted,
            "other_items_lost_image": [other.id for other in sharing],
            "tenants": sorted({item.tenant for item in items}),
            "request_ids": sorted({item.request_id for item in items}),
            "image_sha256": sorted({item.image_sha256 for item in items}),
        }

    # -- readers ---------------------------------------------------------------------------

    def get(self, item_id: str, *, tenant: str | None = None) -> ReviewItem:
        with self.database.read() as db:
            row = db.execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone()
        if row is None or (tenant is not None and row["tenant"] != tenant):
            raise NotFound(f"no review item {item_id!r}", field="item_id")
        return ReviewItem.from_row(row)

    def list_items(
        self, *, status: str | None = "pending", tenant: str | None = None, limit: int = 50, offset: int = 0
    ) -> list[ReviewItem]:
        if status is not None and status not in STATUSES:
            raise InputError(f"status must be one of {list(STATUSES)}, got {status!r}", field="status")
        if not 1 <= limit <= 1000:
            raise InputError(f"limit must be in [1, 1000], got {limit}", field="limit")
        if offset < 0:
            raise InputError(f"offset must be >= 0, got {offset}", field="offset")
        query, params = "SELECT * FROM items WHERE 1 = 1", []
        if status is not None:
            query += " AND status = ?"
            params.append(status)
        if tenant is not None:
            query += " AND tenant = ?"
            params.append(tenant)
        query += " ORDER BY (sla_due_at IS NOT NULL AND sla_due_at <= ?) DESC, priority DESC, created_at LIMIT ? OFFSET ?"
        with self.database.read() as db:
            rows = db.execute(query, [*params, time.time(), limit, offset]).fetchall()
        return [ReviewItem.from_row(row) for row in rows]

    def audit_log(self, item_id: str) -> list[dict[str, Any]]:
        with self.database.read() as db:
            rows = db.execute("SELECT * FROM audit WHERE item_id = ? ORDER BY id", (item_id,)).fetchall()
        return [dict(row) for row in rows]

    def stats(self, *, tenant: str | None = None) -> dict[str, float]:
        """Pending depth, oldest age, overdue and leased counts: of one tenant, or of all (None)."""
        now = time.time()
        query = (
            # COUNT(CASE ...), not SUM(condition): PostgreSQL cannot sum booleans.
            "SELECT COUNT(*) AS depth, MIN(created_at) AS oldest,"
            " COUNT(CASE WHEN sla_due_at IS NOT NULL AND sla_due_at <= ? THEN 1 END) AS overdue,"
            " COUNT(CASE WHEN lease_expires_at IS NOT NULL AND lease_expires_at > ? THEN 1 END) AS leased"
            " FROM items WHERE status = 'pending'"
        )
        params: list[Any] = [now, now]
        if tenant is not None:
            query += " AND tenant = ?"
            params.append(tenant)
        with self.database.read() as db:
            row = db.execute(query, params).fetchone()
        oldest = row["oldest"]
        return {
            "depth": row["depth"],
            "oldest_age_s": now - oldest if oldest else 0.0,
            "overdue": row["overdue"],
            "leased": row["leased"],
        }

    def label_set(self, task: str) -> list[str] | None:
        with self.database.read() as db:
            row = db.execute("SELECT labels_json FROM label_sets WHERE task = ?", (task,)).fetchone()
        return json.loads(row["labels_json"]) if row else None

    def audit_outcomes(self, task: str, window_items: int, *, tenant: str | None = None) -> tuple[int, int]:
        """(errors, labelled) over the latest ``window_items`` labelled audit samples of a task
        (of one tenant's requests, or of all with None)."""
        query = "SELECT label_json, proposed_json FROM items WHERE kind = 'audit' AND status = 'labelled' AND task = ?"
        params: list[Any] = [task]
        if tenant is not None:
            query += " AND tenant = ?"
            params.append(tenant)
        with self.database.read() as db:
            rows = db.execute(
                query + " ORDER BY labelled_at DESC LIMIT ?", [*params, window_items]
            ).fetchall()
        errors = sum(is_error(json.loads(r["label_json"]), json.loads(r["proposed_json"])) for r in rows)
        return errors, len(rows)

    def export_calibration(
        self, out_dir: str | Path, *, task: str | None = None, tenant: str | None = None
    ) -> dict[str, Any]:
        """Write reviewed items as a labelled set: ``images/`` + ``labels.csv`` (image,label,metadata...)
        for ``visionroute calibrate --images OUT/images --labels OUT/labels.csv``, ``labels.jsonl``
        with every label (boxes too), and ``traces.jsonl`` (with ``ground_truth``) for
        ``visionroute eval --traces``. Rejected items and items whose image was purged have no
        usable image label and are counted, not written.
        """
        from PIL import Image

        out = Path(out_dir)
        (out / "images").mkdir(parents=True, exist_ok=True)
        query, params = "SELECT * FROM items WHERE status = 'labelled'", []
        if task is not None:
            query, params = query + " AND task = ?", [*params, task]
        if tenant is not None:
            query, params = query + " AND tenant = ?", [*params, tenant]
        with self.database.read() as db:
            rows = db.execute(query + " ORDER BY labelled_at", params).fetchall()
        counts = {
            "labelled": len(rows),
            "written": 0,
            "no_class_label": 0,
            "image_purged": 0,
            "image_withheld": 0,
        }
        columns = [
            "image",
            "label",
            "request_id",
            "item_id",
            "tenant",
            "task",
            "kind",
            "verdict",
            "labelled_by",
        ]
        with (
            (out / "labels.csv").open("w", newline="") as labels_csv,
            (out / "labels.jsonl").open("w") as labels_jsonl,
            (out / "traces.jsonl").open("w") as traces,
        ):
            writer = csv.DictWriter(labels_csv, fieldnames=columns)
            writer.writeheader()
            for item in map(ReviewItem.from_row, rows):
                record = {
                    "item_id": item.id,
                    "request_id": item.request_id,
                    "tenant": item.tenant,
                    "task": item.task,
                    "kind": item.kind,
                    "label": item.label,
                    "proposed": item.proposed,
                    "labelled_by": item.labelled_by,
                    "labelled_at": item.labelled_at,
                }
                labels_jsonl.write(json.dumps(record) + "\n")
                class_label = (item.label or {}).get("label")
                if class_label is None:
                    counts["no_class_label"] += 1
                    continue
                traces.write(
                    json.dumps(
                        {
                            **item.trace,
                            "ground_truth": class_label,
                            "metadata": {"tenant": item.tenant, "kind": item.kind},
                        }
                    )
                    + "\n"
                )
                if item.image_deleted_at is not None:
                    counts["image_purged"] += 1
                    continue
                if item.image_withheld is not None:
                    counts["image_withheld"] += 1
                    continue
                data = self.blobs.get(item.shown_ref)
                suffix = (Image.open(io.BytesIO(data)).format or "bin").lower().replace("jpeg", "jpg")
                name = f"{item.id}.{suffix}"
                (out / "images" / name).write_bytes(data)
                writer.writerow(
                    {
                        "image": name,
                        "label": class_label,
                        "request_id": item.request_id,
                        "item_id": item.id,
                        "tenant": item.tenant,
                        "task": item.task,
                        "kind": item.kind,
                        "verdict": item.label.get("verdict"),
                        "labelled_by": item.labelled_by,
                    }
                )
                counts["written"] += 1
        return {"out": str(out), **counts}

    def is_writable(self) -> bool:
        try:
            with self.database.write() as db:
                db.execute("SELECT 1")
            return True
        except (sqlite3.Error, StateUnavailable):
            return False

    def iter_all(self) -> Iterator[ReviewItem]:
        # Read whole, then yield: a pooled connection must not stay out while the caller iterates.
        with self.database.read() as db:
            rows = db.execute("SELECT * FROM items ORDER BY created_at").fetchall()
        yield from map(ReviewItem.from_row, rows)
