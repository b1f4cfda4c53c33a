"""Export: review items in the formats labelling and training tools read.

- ``calibration`` (``export_calibration``): ``OUT/images/`` + ``labels.csv`` (image,label,metadata...)
  for ``visionroute calibrate --images OUT/images --labels OUT/labels.csv``, ``labels.jsonl`` with
  every label (boxes too), and ``traces.jsonl`` (with ``ground_truth``) for ``visionroute eval
  --traces``; ``csv`` writes the first two alone (classes), ``jsonl`` the last two.
- ``label-studio``: per task, ``label-studio-<task>.json`` (import tasks, the cascade's answer as
  a pre-annotation) and ``label-studio-<task>.xml`` (the labelling interface), images in
  ``images/`` (policies/review/label_studio.py); pending items by default.
- ``coco``: per box task, ``coco-<task>.json`` (images, annotations with ``bbox`` [x, y, width,
  height] in pixels, categories: the task's label set) over ``images/``.

Rejected items, items whose image was purged or withheld, and (COCO) class tasks' items are
counted, not written.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from policies.review import label_studio
from policies.review.blobs import BlobStore, DatabaseBlobs
from policies.review.items import STATUSES, ReviewItem
from visionroute.errors import InputError
from visionroute.state import Database

CSV_COLUMNS = ["image", "label", "request_id", "item_id", "tenant", "task", "kind", "verdict", "labelled_by"]
FORMATS = ("calibration", "csv", "jsonl", "label-studio", "coco")
# Label Studio serves files under LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT at this path (docs/review.md).
LOCAL_FILES_URL = "/data/local-files/?d=images/"


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


def coco_annotations(
    item: ReviewItem, image_id: int, first_id: int, category_ids: dict[str, int]
) -> list[dict[str, Any]]:
    """The reviewer's boxes of one item as COCO annotations (bbox: x, y, width, height in pixels)."""
    rows = []
    for n, box in enumerate((item.label or {}).get("boxes") or []):
        x1, y1, x2, y2 = (float(v) for v in box["xyxy"])
        rows.append(
            {
                "id": first_id + n,
                "image_id": image_id,
                "category_id": category_ids[str(box["label"])],
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": (x2 - x1) * (y2 - y1),
                "iscrowd": 0,
            }
        )
    return rows


class Export:
    def __init__(self, database: Database, blobs: BlobStore | DatabaseBlobs) -> None:
        self.database = database
        self.blobs = blobs

    def items(self, *, status: str | None, task: str | None, tenant: str | None) -> list[ReviewItem]:
        """Items of one status (None: all), task and tenant (None: all), labelled ones in the order
        they were labelled, the rest oldest first."""
        if status is not None and status not in STATUSES:
            raise InputError(
                f"unknown status {status!r}; expected one of {list(STATUSES)} or all", field="status"
            )
        query, params = "SELECT * FROM items WHERE 1 = 1", []
        for column, value in (("status", status), ("task", task), ("tenant", tenant)):
            if value is not None:
                query, params = query + f" AND {column} = ?", [*params, value]
        with self.database.read() as db:
            rows = db.execute(query + " ORDER BY labelled_at, created_at, id", params).fetchall()
        return [ReviewItem.from_row(row) for row in rows]

    def labelled_items(self, *, task: str | None, tenant: str | None) -> list[ReviewItem]:
        """Labelled items (of one task and tenant, or all), in the order they were labelled."""
        return self.items(status="labelled", task=task, tenant=tenant)

    def export(
        self,
        out_dir: str | Path,
        format_name: str,
        *,
        task: str | None = None,
        tenant: str | None = None,
        status: str | None = "pending",
        image_url: str = LOCAL_FILES_URL,
    ) -> dict[str, Any]:
        """Write ``format_name`` (one of ``FORMATS``) into ``out_dir``; a summary with the counts.
        ``status`` and ``image_url`` apply to ``label-studio`` (the others take labelled items)."""
        if format_name == "calibration":
            return self.export_calibration(out_dir, task=task, tenant=tenant)
        if format_name in ("csv", "jsonl"):
            return self._export_labelled(
                out_dir,
                task=task,
                tenant=tenant,
                csv_part=format_name == "csv",
                jsonl_part=format_name == "jsonl",
            )
        if format_name == "label-studio":
            return self.export_label_studio(
                out_dir, task=task, tenant=tenant, status=status, image_url=image_url
            )
        if format_name == "coco":
            return self.export_coco(out_dir, task=task, tenant=tenant)
        raise InputError(
            f"unknown export format {format_name!r}; expected one of {list(FORMATS)}", field="format"
        )

    def export_calibration(
        self, out_dir: str | Path, *, task: str | None = None, tenant: str | None = None
    ) -> dict[str, Any]:
        """Write reviewed items as a labelled set: ``images/`` + ``labels.csv`` (image,label,metadata...)
        for ``visionroute calibrate --images OUT/images --labels OUT/labels.csv``, ``labels.jsonl``
        with every label (boxes too), and ``traces.jsonl`` (with ``ground_truth``) for
        ``visionroute eval --traces``. Rejected items and items whose image was purged have no
        usable image label and are counted, not written.
        """
        return self._export_labelled(out_dir, task=task, tenant=tenant, csv_part=True, jsonl_part=True)

    def _export_labelled(
        self, out_dir: str | Path, *, task: str | None, tenant: str | None, csv_part: bool, jsonl_part: bool
    ) -> dict[str, Any]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if csv_part:
            (out / "images").mkdir(exist_ok=True)
        items = self.labelled_items(task=task, tenant=tenant)
        counts = {
            "labelled": len(items),
            "written": 0,
            "no_class_label": 0,
            "image_purged": 0,
            "image_withheld": 0,
        }
        with ExitStack() as files:
            labels_csv = files.enter_context((out / "labels.csv").open("w", newline="")) if csv_part else None
            labels_jsonl = files.enter_context((out / "labels.jsonl").open("w")) if jsonl_part else None
            traces = files.enter_context((out / "traces.jsonl").open("w")) if jsonl_part else None
            writer = csv.DictWriter(labels_csv, fieldnames=CSV_COLUMNS) if labels_csv else None
            if writer:
                writer.writeheader()
            for item in items:
                if labels_jsonl:
                    labels_jsonl.write(json.dumps(label_record(item)) + "\n")
                class_label = (item.label or {}).get("label")
                if class_label is None:
                    counts["no_class_label"] += 1
                    continue
                if traces:
                    traces.write(json.dumps(trace_record(item, class_label)) + "\n")
                if not writer:
                    counts["written"] += 1
                    continue
                missing = self._missing_image(item)
                if missing:
                    counts[missing] += 1
                    continue
                name = self._write_image(item, out / "images")
                writer.writerow(csv_row(item, name, class_label))
                counts["written"] += 1
        files_written = (["images/", "labels.csv"] if csv_part else []) + (
            ["labels.jsonl", "traces.jsonl"] if jsonl_part else []
        )
        return {"out": str(out), "files": files_written, **counts}

    def export_label_studio(
        self,
        out_dir: str | Path,
        *,
        task: str | None = None,
        tenant: str | None = None,
        status: str | None = "pending",
        image_url: str = LOCAL_FILES_URL,
    ) -> dict[str, Any]:
        """Per task: Label Studio import tasks (``label-studio-<task>.json``) with the cascade's
        answer as a prediction, and the labelling interface (``label-studio-<task>.xml``);
        ``data.image`` is ``image_url`` + the image's file name in ``images/``."""
        out = Path(out_dir)
        (out / "images").mkdir(parents=True, exist_ok=True)
        items = self.items(status=status, task=task, tenant=tenant)
        counts = {"items": len(items), "written": 0, "image_purged": 0, "image_withheld": 0}
        files: list[str] = []
        for task_name, group in self._with_images(items, counts):
            kind = label_studio.answer_kind(group)
            tasks = [
                label_studio.task(
                    item, image_url=image_url + self._write_image(item, out / "images"), kind=kind, size=size
                )
                for item, size in group
            ]
            labels = self._label_names(task_name, [item for item, _ in group])
            (out / f"label-studio-{task_name}.json").write_text(json.dumps(tasks, indent=1))
            (out / f"label-studio-{task_name}.xml").write_text(label_studio.label_config(kind, labels))
            files += [f"label-studio-{task_name}.json", f"label-studio-{task_name}.xml"]
            counts["written"] += len(tasks)
        return {"out": str(out), "files": files, **counts}

    def export_coco(
        self, out_dir: str | Path, *, task: str | None = None, tenant: str | None = None
    ) -> dict[str, Any]:
        """Per box task, the reviewers' boxes as a COCO detection set (``coco-<task>.json``)."""
        out = Path(out_dir)
        (out / "images").mkdir(parents=True, exist_ok=True)
        items = self.labelled_items(task=task, tenant=tenant)
        counts = {"labelled": len(items), "written": 0, "rejected": 0, "class_task": 0}
        counts.update(image_purged=0, image_withheld=0)
        files: list[str] = []
        usable = [item for item in items if (item.label or {}).get("boxes") is not None]
        counts["rejected"] = sum(1 for item in items if (item.label or {}).get("verdict") == "reject")
        counts["class_task"] = len(items) - len(usable) - counts["rejected"]  # a class chosen, no boxes
        for task_name, group in self._with_images(usable, counts):
            if label_studio.answer_kind(group) != label_studio.BOXES:
                counts["class_task"] += len(group)  # a classifier's whole-image rows are no boxes
                continue
            names = self._label_names(task_name, [item for item, _ in group])
            category_ids = {name: n + 1 for n, name in enumerate(names)}
            images, annotations = [], []
            for image_id, (item, size) in enumerate(group, start=1):
                name = self._write_image(item, out / "images")
                width, height = size or (None, None)
                images.append(
                    {
                        "id": image_id,
                        "file_name": f"images/{name}",
                        "width": width,
                        "height": height,
                        "visionroute_item_id": item.id,
                    }
                )
                annotations += coco_annotations(item, image_id, len(annotations) + 1, category_ids)
            document = {
                "info": {"description": f"VisionRoute review labels, task {task_name}", "version": "1.0"},
                "images": images,
                "annotations": annotations,
                "categories": [
                    {"id": n, "name": name, "supercategory": task_name} for name, n in category_ids.items()
                ],
            }
            (out / f"coco-{task_name}.json").write_text(json.dumps(document, indent=1))
            files.append(f"coco-{task_name}.json")
            counts["written"] += len(images)
        return {"out": str(out), "files": files, **counts}

    # -- shared pieces ------------------------------------------------------------------------

    def _with_images(
        self, items: list[ReviewItem], counts: dict[str, int]
    ) -> Iterator[tuple[str, list[tuple[ReviewItem, tuple[int, int] | None]]]]:
        """Items by task, each with its stored image's size (read now, not kept: an export may
        hold thousands); items without a stored image are counted in ``counts`` and left out."""
        by_task: dict[str, list[tuple[ReviewItem, tuple[int, int] | None]]] = {}
        for item in items:
            missing = self._missing_image(item)
            if missing:
                counts[missing] += 1
                continue
            size = label_studio.image_size(item, self.blobs.get(item.shown_ref))
            by_task.setdefault(item.task, []).append((item, size))
        yield from by_task.items()

    def _label_names(self, task: str, items: list[ReviewItem]) -> list[str]:
        """The task's label set, then any other label its items' answers and labels name (a
        label set replaced by a new model's keeps the old labels exportable)."""
        with self.database.read() as db:
            row = db.execute("SELECT labels_json FROM label_sets WHERE task = ?", (task,)).fetchone()
        seen: dict[str, None] = dict.fromkeys(json.loads(row["labels_json"]) if row else [])
        for item in items:
            rows = list(item.proposed) + list((item.label or {}).get("boxes") or [])
            names = [row.get("label") for row in rows] + [(item.label or {}).get("label")]
            seen.update((str(name), None) for name in names if name is not None)
        return list(seen)

    @staticmethod
    def _missing_image(item: ReviewItem) -> str | None:
        if item.image_deleted_at is not None:
            return "image_purged"
        if item.image_withheld is not None or item.shown_ref is None:
            return "image_withheld"
        return None

    def _write_image(self, item: ReviewItem, folder: Path) -> str:
        """The item's shown image as ``<item id>.<format>`` in ``folder``; returns the name."""
        from PIL import Image

        data = self.blobs.get(item.shown_ref)
        suffix = (Image.open(io.BytesIO(data)).format or "bin").lower().replace("jpeg", "jpg")
        name = f"{item.id}.{suffix}"
        (folder / name).write_bytes(data)
        return name
