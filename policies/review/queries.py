"""Reading the queue: one item, a page of items, an item's audit log, depth and audit outcomes."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from policies.audit_sampling import is_error
from policies.review.items import STATUSES, ReviewItem
from visionroute.errors import InputError, NotFound
from visionroute.state import Database


class ReviewReads:
    def __init__(self, database: Database) -> None:
        self.database = database

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

    def iter_all(self) -> Iterator[ReviewItem]:
        # Read whole, then yield: a pooled connection must not stay out while the caller iterates.
        with self.database.read() as db:
            rows = db.execute("SELECT * FROM items ORDER BY created_at").fetchall()
        yield from map(ReviewItem.from_row, rows)

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
