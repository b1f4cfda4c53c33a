"""Labels made outside the queue (Label Studio), recorded as the queue's own labels.

Each annotation is checked and written in its own transaction, so one refusal never stops the
rest. Refused, with the field and the reason: an unknown item (erased, another tenant's,
another queue's); an item whose version changed since the export (labelled meanwhile, its
answer or image changed, its image purged); an item a reviewer holds a lease on now; a label
outside the task's label set; an annotation with no reviewer (``label_studio.reviewer_of``).
Importing the same file again is a no-op: an item already holding the same label from the same
reviewer answers ``unchanged``. The stored label has the shape the review page gives
(``router/services/review.py`` ``label_from``): ``confirm`` when the annotation equals the
cascade's answer, else ``correct`` (or ``reject``), so audits and exports read both alike.

An imported label takes the queue's own label path (policies/review/double_labels.py): it is a
row of ``item_labels`` (role ``single``, or ``first``/``second`` of a double-labelled item), so
reviewer error rates (policies/reviewer_quality.py) count it like a label given in the queue. On
a double-labelled item the first label leaves the item pending for a second, different reviewer
(in the queue or a later import); the second labels the item when it agrees and sends it to an
admin when it does not. An import never adjudicates: an item whose two labels disagree is
refused (an admin decides it in the queue), and a reviewer's second, different label of the same
item is refused.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from policies.review.double_labels import labels_of, record_double, store_label
from policies.review.items import ReviewItem, audit, locked_row, read_item
from policies.review.label_studio import BOXES, Outcome, StudioAnnotation, item_version
from policies.review.labels import validate_label
from visionroute.errors import InputError
from visionroute.state import Connection, Database

SAME_BOX_PX = 1.0  # a box moved less than this (percent round trip) is the proposed box


def _same_boxes(boxes: list[dict[str, Any]], proposed: list[dict[str, Any]]) -> bool:
    proposed = [row for row in proposed if row.get("xyxy")]
    if len(boxes) != len(proposed):
        return False
    key = lambda row: (str(row.get("label")), [float(v) for v in row["xyxy"]])  # noqa: E731
    return all(
        a[0] == b[0] and all(abs(u - v) < SAME_BOX_PX for u, v in zip(a[1], b[1], strict=True))
        for a, b in zip(sorted(map(key, boxes)), sorted(map(key, proposed)), strict=True)
    )


def label_of(annotation: StudioAnnotation, item: ReviewItem, label_set: list[str] | None) -> dict[str, Any]:
    """The queue's label for an annotation of ``item``."""
    confirm = {
        "verdict": "confirm",
        "label": item.proposed[0].get("label") if item.proposed else None,
        "boxes": item.proposed,
    }
    if annotation.rejected:
        return {"verdict": "reject", "label": None, "boxes": None}
    if annotation.kind == BOXES or annotation.boxes:
        if annotation.classes:
            raise InputError(
                f"a box task's annotation chose classes {list(annotation.classes)}; label the boxes",
                field="result",
            )
        boxes = [
            {
                "label": name,
                "class_id": label_set.index(name) if label_set and name in label_set else -1,
                "confidence": 1.0,
                "xyxy": list(xyxy),
            }
            for name, xyxy in annotation.boxes
        ]
        return (
            confirm
            if _same_boxes(boxes, item.proposed)
            else {"verdict": "correct", "label": None, "boxes": boxes}
        )
    if len(annotation.classes) != 1:
        raise InputError(
            f"choose exactly one class (or 'reject'), got {list(annotation.classes)}", field="result"
        )
    (chosen,) = annotation.classes
    if item.proposed and item.proposed[0].get("label") == chosen:
        return confirm
    return {"verdict": "correct", "label": chosen, "boxes": None}


def _label_set(db: Connection, task: str) -> list[str] | None:
    row = db.execute("SELECT labels_json FROM label_sets WHERE task = ?", (task,)).fetchone()
    return json.loads(row["labels_json"]) if row else None


def _what_changed(item: ReviewItem) -> str:
    if item.status == "labelled":
        return f"it was labelled {item.label} by {item.labelled_by}"
    if item.status == "expired" or item.image_deleted_at is not None:
        return "its image was purged"
    return "its answer or image changed"


class LabelImport:
    def __init__(self, database: Database) -> None:
        self.database = database

    def apply(
        self,
        read: Iterable[StudioAnnotation | Outcome],
        *,
        tenant: str | None = None,
        now: float | None = None,
    ) -> list[Outcome]:
        """Record every annotation (``label_studio.parse_export``); outcomes in the same order."""
        return [
            entry if isinstance(entry, Outcome) else self.record(entry, tenant=tenant, now=now)
            for entry in read
        ]

    def record(
        self, annotation: StudioAnnotation, *, tenant: str | None = None, now: float | None = None
    ) -> Outcome:
        """One annotation, checked and written in one transaction (tenant: only that tenant's items)."""
        now = time.time() if now is None else now

        def refused(field: str | None, reason: str) -> Outcome:
            return Outcome(
                "refused", annotation.task_id, annotation.item_id, field, reason, annotation.reviewer
            )

        try:
            with self.database.write() as db:
                row = locked_row(db, annotation.item_id)
                if row is None or (tenant is not None and row["tenant"] != tenant):
                    return refused(
                        "data.visionroute_item_id",
                        f"no review item {annotation.item_id!r} here (erased, another tenant's, or another queue's)",
                    )
                item = ReviewItem.from_row(row)
                label = label_of(annotation, item, _label_set(db, item.task))
                given = labels_of(db, item.id).get(annotation.reviewer)
                if (given is not None and given[1] == label) or (
                    item.status == "labelled"
                    and item.label == label
                    and item.labelled_by == annotation.reviewer
                ):
                    return Outcome(
                        "unchanged", annotation.task_id, item.id, reviewer=annotation.reviewer
                    )  # imported before: re-importing the same file changes nothing
                if given is not None:
                    return refused(
                        "completed_by",
                        f"{annotation.reviewer!r} already labelled item {item.id} {given[1]}; "
                        "a reviewer gives one label per item",
                    )
                current = item_version(item)
                if current != annotation.item_version:
                    return refused(
                        "data.visionroute_item_version",
                        f"item {item.id} changed since it was exported (version {annotation.item_version},"
                        f" now {current}): {_what_changed(item)}; export it again to label it",
                    )
                if item.status != "pending":
                    return refused(
                        "data.visionroute_item_id",
                        f"item {item.id} is {item.status}"
                        + (f" by {item.labelled_by} as {item.label}" if item.label else "")
                        + "; only pending items take an imported label",
                    )
                if item.is_leased(now):
                    return refused(
                        "data.visionroute_item_id",
                        f"item {item.id} is claimed by {item.lease_owner} in the review queue for another"
                        f" {item.lease_expires_at - now:.0f} s; import again once they label or release it",
                    )
                if item.needs_adjudication:
                    return refused(
                        "data.visionroute_item_id",
                        f"item {item.id}'s two labels disagree: an admin decides it in the review queue",
                    )
                validate_label(db, item.task, label)
                note = None
                if item.labels_wanted > 1:
                    record_double(db, item, annotation.reviewer, label, now, adjudicator=False)
                    after = read_item(db, item.id)
                    note = (
                        "the second of two labels; they agree"
                        if after.status == "labelled"
                        else "the second of two labels; they disagree: an admin decides"
                        if after.needs_adjudication
                        else "the first of two labels; a second reviewer labels it next"
                    )
                else:
                    db.execute(
                        "UPDATE items SET status = 'labelled', label_json = ?, labelled_by = ?, labelled_at = ?,"
                        " lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL WHERE id = ?",
                        (json.dumps(label), annotation.reviewer, now, item.id),
                    )
                    store_label(db, item.id, annotation.reviewer, label, "single", now)
                audit(
                    db,
                    item.id,
                    annotation.reviewer,
                    "label_import",
                    item.label,
                    {
                        "label": label,
                        "source": "label-studio",
                        "task_id": annotation.task_id,
                        "annotation_id": annotation.annotation_id,
                    },
                )
                return Outcome(
                    "imported", annotation.task_id, item.id, reason=note, reviewer=annotation.reviewer
                )
        except InputError as exc:
            return refused(exc.field, exc.reason)


def summary(outcomes: list[Outcome]) -> dict[str, Any]:
    """Counts by status, and every task that was refused or skipped with its reason."""
    counts: Mapping[str, int] = Counter(outcome.status for outcome in outcomes)
    return {
        "tasks": len(outcomes),
        **{status: counts.get(status, 0) for status in ("imported", "unchanged", "skipped", "refused")},
        "not_imported": [o.to_dict() for o in outcomes if o.status in ("refused", "skipped")],
    }
