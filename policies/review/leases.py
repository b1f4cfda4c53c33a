"""Leases: which reviewer holds an item, until when, and what expiry gives back.

``claim`` gives one reviewer an item for ``lease_s`` seconds; an expired lease puts the item
back in the queue (with a ``lease_expired`` audit event). No item is ever held by two
reviewers: SQLite serialises every writer; on PostgreSQL the rows a claim reads are locked
(``FOR UPDATE``; the "next item" skips rows another node is claiming, ``SKIP LOCKED``).

Double labels (``policies/review/double_labels.py``): a reviewer never claims an item they
already labelled, and an item whose two labels disagree goes only to an adjudicator (an admin).

Order of the next item: overdue items (past their SLA) first, then by priority (the value of a
review: ``policies.costs.review_value``), then oldest first.
"""

from __future__ import annotations

import uuid
from typing import Any

from policies.review.double_labels import labels_of
from policies.review.items import ReviewItem, audit, locked_row, read_item
from visionroute.errors import Conflict, InputError, NotFound, PermissionDenied
from visionroute.state import Connection, Database

MAX_LEASE_S = 86400.0


def check_lease_s(lease_s: float) -> float:
    if not 0 < lease_s <= MAX_LEASE_S:
        raise InputError(f"lease_s must be in (0, {MAX_LEASE_S:.0f}], got {lease_s}", field="lease_s")
    return lease_s


def require_live_lease(item: ReviewItem, reviewer: str, lease_token: str, now: float) -> None:
    """Conflict unless ``reviewer`` holds ``item`` under ``lease_token`` and the lease is live."""
    if item.lease_token != lease_token or item.lease_owner != reviewer:
        raise Conflict(
            f"lease token does not match the current lease of item {item.id}; claim it again",
            field="lease_token",
        )
    if not item.is_leased(now):
        raise Conflict(
            f"the lease on item {item.id} expired {now - item.lease_expires_at:.0f} s ago; claim it again",
            field="lease_token",
        )


class Leases:
    def __init__(self, database: Database) -> None:
        self.database = database

    def claim(
        self,
        reviewer: str,
        *,
        lease_s: float,
        now: float,
        item_id: str | None = None,
        tenant: str | None = None,
        adjudicator: bool = False,
    ) -> ReviewItem | None:
        """Lease the given item, or the most valuable unleased pending one; None if none waits.

        ``adjudicator`` (an admin) may also take items whose two labels disagree."""
        if not reviewer:
            raise InputError("reviewer must be a non-empty name", field="reviewer")
        check_lease_s(lease_s)
        with self.database.write() as db:
            requeue_expired(db, now)
            if item_id is not None:
                item = self._claimable(db, item_id, reviewer, tenant, now, adjudicator)
            else:
                item = next_claimable(db, now, tenant, reviewer, adjudicator)
                if item is None:
                    return None
            token = uuid.uuid4().hex
            db.execute(
                "UPDATE items SET lease_owner = ?, lease_token = ?, lease_expires_at = ? WHERE id = ?",
                (reviewer, token, now + lease_s, item.id),
            )
            audit(db, item.id, reviewer, "claim", item.lease_owner, {"lease_s": lease_s})
            return read_item(db, item.id)

    @staticmethod
    def _claimable(
        db: Connection, item_id: str, reviewer: str, tenant: str | None, now: float, adjudicator: bool = False
    ) -> ReviewItem:
        """The named item, locked, if ``reviewer`` may claim it: pending, not leased by another,
        not labelled by them already, and (two labels in dispute) only for an adjudicator."""
        row = locked_row(db, item_id)
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
        if item.labels_wanted > 1:
            if reviewer in labels_of(db, item_id):
                raise Conflict(
                    f"reviewer {reviewer!r} already labelled item {item_id}; its next label must be another"
                    " reviewer's",
                    field="item_id",
                )
            if item.needs_adjudication and not adjudicator:
                raise PermissionDenied(
                    f"item {item_id}'s two labels disagree: only an admin may claim it to decide",
                    field="item_id",
                )
        return item

    def release(self, item_id: str, *, reviewer: str, lease_token: str) -> ReviewItem:
        """Give a leased item back unlabelled (a reviewer skips it)."""
        with self.database.write() as db:
            row = locked_row(db, item_id)
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
            audit(db, item_id, reviewer, "release", {"lease_owner": reviewer}, None)
            return read_item(db, item_id)


def next_claimable(
    db: Connection, now: float, tenant: str | None, reviewer: str | None = None, adjudicator: bool = False
) -> ReviewItem | None:
    """The most valuable unleased pending item, locked; on PostgreSQL an item another node is
    claiming right now is passed over (SKIP LOCKED), so concurrent claimers get different items.
    Never one ``reviewer`` labelled already; one in dispute only for an ``adjudicator``."""
    query = (
        "SELECT * FROM items WHERE status = 'pending' AND (lease_expires_at IS NULL OR lease_expires_at <= ?)"
    )
    params: list[Any] = [now]
    if tenant is not None:
        query += " AND tenant = ?"
        params.append(tenant)
    if reviewer is not None:
        query += " AND NOT EXISTS (SELECT 1 FROM item_labels l WHERE l.item_id = items.id AND l.reviewer = ?)"
        params.append(reviewer)
    if not adjudicator:
        query += " AND needs_adjudication = 0"
    order = " ORDER BY (sla_due_at IS NOT NULL AND sla_due_at <= ?) DESC, priority DESC, created_at LIMIT 1"
    row = db.execute(query + order + db.dialect.skip_locked, [*params, now]).fetchone()
    return None if row is None else ReviewItem.from_row(row)


def requeue_expired(db: Connection, now: float) -> int:
    """Clear leases that ran out (the item is claimable again) and say so in the audit log.

    On PostgreSQL the expired rows are locked, and rows another claimer is requeueing or
    claiming are skipped: clearing them from a stale read could wipe a lease just granted."""
    rows = db.execute(
        "SELECT id, lease_owner, lease_expires_at FROM items WHERE status = 'pending' AND lease_owner IS NOT NULL"
        " AND lease_expires_at IS NOT NULL AND lease_expires_at <= ? ORDER BY id" + db.dialect.skip_locked,
        (now,),
    ).fetchall()
    for row in rows:
        db.execute(
            "UPDATE items SET lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL WHERE id = ?",
            (row["id"],),
        )
        audit(
            db,
            row["id"],
            "service",
            "lease_expired",
            {"lease_owner": row["lease_owner"], "lease_expires_at": row["lease_expires_at"]},
            None,
        )
    return len(rows)
