"""Labels: each task's label set, and recording a reviewer's label under a live lease.

A task's label set (the model's class names) is registered when its items are queued; a label
naming a class outside it is refused. ``submit`` is idempotent: the same label twice is one
label; another label for a labelled item is a Conflict.
"""

from __future__ import annotations

import json
from typing import Any

from policies.review.double_labels import labels_of, record_double, store_label
from policies.review.items import ReviewItem, audit, locked_row, read_item
from policies.review.leases import require_live_lease
from visionroute.errors import Conflict, InputError, NotFound
from visionroute.state import Connection, Database


def register_label_set(db: Connection, task: str, labels: list[str], now: float) -> None:
    row = db.execute("SELECT labels_json FROM label_sets WHERE task = ?", (task,)).fetchone()
    if row is None or json.loads(row["labels_json"]) != labels:
        db.execute(
            "INSERT INTO label_sets (task, labels_json, updated_at) VALUES (?, ?, ?) ON CONFLICT (task)"
            " DO UPDATE SET labels_json = excluded.labels_json, updated_at = excluded.updated_at",
            (task, json.dumps(labels), now),
        )


def validate_label(db: Connection, task: str, label: dict[str, Any]) -> None:
    """InputError when ``label`` (its class, or a box's) is outside the task's label set."""
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


class Labels:
    def __init__(self, database: Database) -> None:
        self.database = database

    def label_set(self, task: str) -> list[str] | None:
        with self.database.read() as db:
            row = db.execute("SELECT labels_json FROM label_sets WHERE task = ?", (task,)).fetchone()
        return json.loads(row["labels_json"]) if row else None

    def submit(
        self,
        item_id: str,
        *,
        reviewer: str,
        lease_token: str,
        label: dict[str, Any],
        now: float,
        tenant: str | None = None,
        adjudicator: bool = False,
    ) -> ReviewItem:
        """Record a label under a live lease. Repeating the same label is a no-op success.

        ``adjudicator``: the reviewer may decide an item whose two labels disagree (an admin)."""
        with self.database.write() as db:
            row = locked_row(db, item_id)
            if row is None or (tenant is not None and row["tenant"] != tenant):
                raise NotFound(f"no review item {item_id!r}", field="item_id")
            item = ReviewItem.from_row(row)
            given = labels_of(db, item_id).get(reviewer) if item.labels_wanted > 1 else None
            if given is not None:  # this reviewer's label of a double-labelled item is in
                if given[1] == label:
                    return item  # idempotent retry
                raise Conflict(
                    f"reviewer {reviewer!r} already labelled item {item_id} {given[1]}", field="label"
                )
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
            validate_label(db, item.task, label)
            require_live_lease(item, reviewer, lease_token, now)
            if item.labels_wanted > 1:
                record_double(db, item, reviewer, label, now, adjudicator=adjudicator)
                return read_item(db, item_id)
            db.execute(
                "UPDATE items SET status = 'labelled', label_json = ?, labelled_by = ?, labelled_at = ?,"
                " lease_token = NULL, lease_expires_at = NULL WHERE id = ?",
                (json.dumps(label), reviewer, now, item_id),
            )
            store_label(db, item_id, reviewer, label, "single", now)
            audit(db, item_id, reviewer, "label", item.label, label)
            return read_item(db, item_id)
