"""``ReviewItem``, one row of the queue, and the row-level helpers every part writes with.

Every change to an item is audited in the same transaction (``audit``); a writer reads the
item it changes through ``locked_row`` (``FOR UPDATE`` on PostgreSQL: it waits for a claim,
label or release of it on another node, then reads what that one committed).
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from policies.review.blobs import LEGACY_SCOPE, BlobRef, blob_scope
from visionroute.state import Connection, Row

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
    audit_source: str | None = None  # policy | rollout | none (not an audit); None: unknown (old row)
    inclusion_probability: float | None = None  # P(this item was queued): 1 for a review; None: unknown
    labels_wanted: int = 1  # 2: drawn for double labelling (policies/review/double_labels.py)
    needs_adjudication: bool = False  # its two labels disagreed: an admin's label decides

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
            audit_source=row["audit_source"],
            inclusion_probability=row["inclusion_probability"],
            labels_wanted=int(row["labels_wanted"]),
            needs_adjudication=bool(row["needs_adjudication"]),
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


def audit(db: Connection, item_id: str, actor: str, action: str, previous: Any, new: Any) -> None:
    """Append one event to the item's audit log (in the caller's transaction)."""
    db.execute(
        "INSERT INTO audit (item_id, at, actor, action, previous_json, new_json) VALUES (?, ?, ?, ?, ?, ?)",
        (item_id, time.time(), actor, action, json.dumps(previous), json.dumps(new)),
    )


def locked_row(db: Connection, item_id: str) -> Row | None:
    """One item, locked for the rest of the transaction on PostgreSQL (waits for a claim,
    label or release of it on another node, then reads what that one committed)."""
    return db.execute("SELECT * FROM items WHERE id = ?" + db.dialect.for_update, (item_id,)).fetchone()


def read_item(db: Connection, item_id: str) -> ReviewItem:
    """The item as the caller's transaction left it (after a write to it)."""
    return ReviewItem.from_row(db.execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone())
