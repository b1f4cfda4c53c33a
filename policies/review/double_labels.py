"""Double labels: a drawn share of items is labelled by two different reviewers.

Which items: ``wants_two_labels`` draws an item at ``review.double_label_fraction`` (a hash of
its request id, so a retried request draws the same) when it is queued; the item then has
``labels_wanted = 2``. Every label is one row of ``item_labels`` (item, reviewer, label, role).

The flow of a double-labelled item:

- the first label (role ``first``) is stored and the item stays pending, claimable by anyone
  but that reviewer (``leases``: a reviewer never claims an item they labelled);
- the second label (role ``second``): when it gives the same answer as the first
  (``same_answer``) the item is labelled with it; when they disagree the item stays pending with
  ``needs_adjudication`` and only an admin who gave neither label may claim it;
- the admin's label (role ``adjudication``) is the item's label.

The item's ``status`` turns ``labelled`` only at agreement or adjudication, so the audit
estimate, exports and production certification read one final label per item, never a label a
second reviewer disputes. ``judged_labels`` reads every label with what decided its item, for
the reviewer error rates (``policies/reviewer_quality.py``).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

from policies.audit_sampling import is_sampled
from policies.review.items import ReviewItem, audit
from visionroute.errors import Conflict, PermissionDenied
from visionroute.state import Connection

ROLES = ("single", "first", "second", "adjudication")


def wants_two_labels(request_id: str, fraction: float) -> bool:
    """Is this item drawn for double labelling? Independent of the audit draw (another key)."""
    return is_sampled(f"double-label:{request_id}", fraction)


def answer_of(label: dict[str, Any] | None, proposed: list[dict[str, Any]]) -> tuple[Any, ...]:
    """What a label says the right answer is: ('reject',) or ('answer', top label, box classes).

    A confirm says the proposed answer; a correct says its own label and boxes. Box classes are
    a sorted tuple (positions are not compared: two reviewers never draw the same pixels), or
    None when the label gives no boxes."""
    if not label or label.get("verdict") == "reject":
        return ("reject",)
    if label.get("verdict") == "confirm":
        top, boxes = (proposed[0].get("label") if proposed else None), proposed
    else:
        top, boxes = label.get("label"), label.get("boxes")
    classes = None if boxes is None else tuple(sorted(str(box.get("label")) for box in boxes))
    return ("answer", top, classes)


def same_answer(a: dict[str, Any] | None, b: dict[str, Any] | None, proposed: list[dict[str, Any]]) -> bool:
    """Do two labels give the same answer? The same verdict kind and top label, and the same box
    classes where both give boxes (one label with no boxes does not contradict the other's)."""
    answer_a, answer_b = answer_of(a, proposed), answer_of(b, proposed)
    if answer_a[0] != answer_b[0] or answer_a[0] == "reject":
        return answer_a[0] == answer_b[0]
    if answer_a[1] != answer_b[1]:
        return False
    return answer_a[2] is None or answer_b[2] is None or Counter(answer_a[2]) == Counter(answer_b[2])


def labels_of(db: Connection, item_id: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """reviewer -> (role, label) for every label the item has."""
    rows = db.execute(
        "SELECT reviewer, role, label_json FROM item_labels WHERE item_id = ? ORDER BY labelled_at",
        (item_id,),
    ).fetchall()
    return {row["reviewer"]: (row["role"], json.loads(row["label_json"])) for row in rows}


def store_label(
    db: Connection, item_id: str, reviewer: str, label: dict[str, Any], role: str, now: float
) -> None:
    db.execute(
        "INSERT INTO item_labels (item_id, reviewer, label_json, labelled_at, role) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT (item_id, reviewer) DO NOTHING",
        (item_id, reviewer, json.dumps(label), now, role),
    )


def finish(db: Connection, item_id: str, reviewer: str, label: dict[str, Any], now: float) -> None:
    """The item's final label (a single label, an agreed pair, or an adjudication)."""
    db.execute(
        "UPDATE items SET status = 'labelled', label_json = ?, labelled_by = ?, labelled_at = ?,"
        " needs_adjudication = 0, lease_token = NULL, lease_expires_at = NULL WHERE id = ?",
        (json.dumps(label), reviewer, now, item_id),
    )


def record_double(
    db: Connection,
    item: ReviewItem,
    reviewer: str,
    label: dict[str, Any],
    now: float,
    *,
    adjudicator: bool,
) -> None:
    """One label of a double-labelled item (the caller holds its row lock and checked the lease)."""
    prior = labels_of(db, item.id)
    if reviewer in prior:  # the queue never hands it back to them; a stale lease could
        raise Conflict(f"reviewer {reviewer!r} already labelled item {item.id}", field="reviewer")
    if item.needs_adjudication:
        if not adjudicator:
            raise PermissionDenied(
                f"item {item.id}'s two labels disagree: an admin's label decides it", field="reviewer"
            )
        store_label(db, item.id, reviewer, label, "adjudication", now)
        finish(db, item.id, reviewer, label, now)
        audit(db, item.id, reviewer, "adjudicate", {r: lab for r, (_, lab) in prior.items()}, label)
        return
    if not prior:
        store_label(db, item.id, reviewer, label, "first", now)
        db.execute("UPDATE items SET lease_token = NULL, lease_expires_at = NULL WHERE id = ?", (item.id,))
        audit(db, item.id, reviewer, "label", None, {"label": label, "of": "first of two"})
        return
    store_label(db, item.id, reviewer, label, "second", now)
    (first_reviewer, (_, first_label)), *_ = prior.items()
    if same_answer(first_label, label, item.proposed):
        finish(db, item.id, reviewer, label, now)
        audit(db, item.id, reviewer, "label", None, {"label": label, "of": "second of two", "agrees": True})
    else:
        db.execute(
            "UPDATE items SET needs_adjudication = 1, lease_token = NULL, lease_expires_at = NULL WHERE id = ?",
            (item.id,),
        )
        audit(
            db,
            item.id,
            reviewer,
            "disagreement",
            {first_reviewer: first_label},
            {reviewer: label, "next": "an admin's label decides"},
        )


@dataclass(frozen=True)
class JudgedLabel:
    """One reviewer's label and what decided its item (for ``policies.reviewer_quality``)."""

    item_id: str
    reviewer: str
    role: str  # single | first | second | adjudication
    kind: str  # the item's kind (review, audit, ...)
    label: dict[str, Any]
    proposed: list[dict[str, Any]]
    final: dict[str, Any] | None  # the item's label, once agreed or adjudicated
    adjudicated: bool  # the final label is an admin's (the pair disagreed)
    disputed: bool  # the pair disagreed and no admin has decided yet


def judged_labels(db: Connection, tenant: str | None = None) -> list[JudgedLabel]:
    """Every label in ``item_labels`` (of ``tenant``'s items, or all) with its item's outcome."""
    query = (
        "SELECT l.item_id, l.reviewer, l.role, l.label_json, i.kind, i.proposed_json, i.label_json AS final_json,"
        " i.status, i.needs_adjudication FROM item_labels l JOIN items i ON i.id = l.item_id"
    )
    params: list[Any] = []
    if tenant is not None:
        query += " WHERE i.tenant = ?"
        params.append(tenant)
    rows = db.execute(query + " ORDER BY l.item_id, l.labelled_at", params).fetchall()
    adjudicated = {row["item_id"] for row in rows if row["role"] == "adjudication"}
    return [
        JudgedLabel(
            item_id=row["item_id"],
            reviewer=row["reviewer"],
            role=row["role"],
            kind=row["kind"],
            label=json.loads(row["label_json"]),
            proposed=json.loads(row["proposed_json"]),
            final=json.loads(row["final_json"])
            if row["status"] == "labelled" and row["final_json"]
            else None,
            adjudicated=row["item_id"] in adjudicated,
            disputed=bool(row["needs_adjudication"]),
        )
        for row in rows
    ]
