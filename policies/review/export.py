"""Export: reviewed items as a labelled set for calibration and evaluation.

``OUT/images/`` + ``OUT/labels.csv`` (image,label,metadata...) for ``visionroute calibrate
--images OUT/images --labels OUT/labels.csv``, ``labels.jsonl`` with every label (boxes too),
and ``traces.jsonl`` (with ``ground_truth``) for ``visionroute eval --traces``.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from policies.review.blobs import BlobStore, DatabaseBlobs
from policies.review.items import ReviewItem
from visionroute.state import Database

CSV_COLUMNS = ["image", "label", "request_id", "item_id", "tenant", "task", "kind", "verdict", "labelled_by"]


def label_record(item: ReviewItem) -> dict[str, Any]:
    """One line of ``labels.jsonl``: the label as given (boxes too) beside the proposed answer."""
    return {
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


def trace_record(item: ReviewItem, class_label: str) -> dict[str, Any]:
    """One line of ``traces.jsonl``: the item's trace with the reviewer's class as ground truth."""
    return {**item.trace, "ground_truth": class_label, "metadata": {"tenant": item.tenant, "kind": item.kind}}


def csv_row(item: ReviewItem, image_name: str, class_label: str) -> dict[str, Any]:
    return {
        "image": image_name,
        "label": class_label,
        "request_id": item.request_id,
        "item_id": item.id,
        "tenant": item.tenant,
        "task": item.task,
        "kind": item.kind,
        "verdict": item.label.get("verdict"),
        "labelled_by": item.labelled_by,
    }


class Export:
    def __init__(self, database: Database, blobs: BlobStore | DatabaseBlobs) -> None:
        self.database = database
        self.blobs = blobs

    def labelled_items(self, *, task: str | None, tenant: str | None) -> list[ReviewItem]:
        """Labelled items (of one task and tenant, or all), in the order they were labelled."""
        query, params = "SELECT * FROM items WHERE status = 'labelled'", []
        if task is not None:
            query, params = query + " AND task = ?", [*params, task]
        if tenant is not None:
            query, params = query + " AND tenant = ?", [*params, tenant]
        with self.database.read() as db:
            rows = db.execute(query + " ORDER BY labelled_at", params).fetchall()
        return [ReviewItem.from_row(row) for row in rows]

    def export_calibration(
        self, out_dir: str | Path, *, task: str | None = None, tenant: str | None = None
    ) -> dict[str, Any]:
        """Write reviewed items as a labelled set: ``images/`` + ``labels.csv`` (image,label,metadata...)
        for ``visionroute calibrate --images OUT/images --labels OUT/labels.csv``, ``labels.jsonl``
        with every label (boxes too), and ``traces.jsonl`` (with ``ground_truth``) for
        ``visionroute eval --traces``. Rejected items and items whose image was purged have no
        usable image label and are counted, not written.
        """
        out = Path(out_dir)
        (out / "images").mkdir(parents=True, exist_ok=True)
        items = self.labelled_items(task=task, tenant=tenant)
        counts = {
            "labelled": len(items),
            "written": 0,
            "no_class_label": 0,
            "image_purged": 0,
            "image_withheld": 0,
        }
        with (
            (out / "labels.csv").open("w", newline="") as labels_csv,
            (out / "labels.jsonl").open("w") as labels_jsonl,
            (out / "traces.jsonl").open("w") as traces,
        ):
            writer = csv.DictWriter(labels_csv, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            for item in items:
                labels_jsonl.write(json.dumps(label_record(item)) + "\n")
                class_label = (item.label or {}).get("label")
                if class_label is None:
                    counts["no_class_label"] += 1
                    continue
                traces.write(json.dumps(trace_record(item, class_label)) + "\n")
                if item.image_deleted_at is not None:
                    counts["image_purged"] += 1
                    continue
                if item.image_withheld is not None:
                    counts["image_withheld"] += 1
                    continue
                name = self._write_image(item, out / "images")
                writer.writerow(csv_row(item, name, class_label))
                counts["written"] += 1
        return {"out": str(out), **counts}

    def _write_image(self, item: ReviewItem, folder: Path) -> str:
        """The item's shown image as ``<item id>.<format>`` in ``folder``; returns the name."""
        from PIL import Image

        data = self.blobs.get(item.shown_ref)
        suffix = (Image.open(io.BytesIO(data)).format or "bin").lower().replace("jpeg", "jpg")
        name = f"{item.id}.{suffix}"
        (folder / name).write_bytes(data)
        return name
