"""Label Studio: review items out as import tasks with the cascade's answer as a pre-annotation,
and Label Studio's JSON export back in as annotations to record as labels.

Out: Label Studio's basic JSON task format with ``predictions`` (labelstud.io/guide/predictions).
One task per item: ``data.image`` is the image's URL and ``data.visionroute_*`` carries what the
import needs back (the item id, the item's version, the answer kind, the image size). The one
prediction is the cascade's answer: ``choices`` with the top class where every answer row covers
the whole image (a classifier), else ``rectanglelabels``, one per box, in Label Studio's image
units (x, y, width, height in percent of ``original_width`` x ``original_height``).
``label_config`` is the labelling interface whose names (``image``, ``label``, ``verdict``)
those results refer to.

In: Label Studio's JSON export (tasks with ``data`` and ``annotations[]`` holding ``result``,
``completed_by``, ``was_cancelled``; labelstud.io/guide/export). ``parse_export`` turns each task
into a ``StudioAnnotation`` or an ``Outcome`` saying why not (field and reason);
``policies/review/label_import.py`` records the annotations as labels.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any
from xml.sax.saxutils import quoteattr

from policies.review.items import ReviewItem
from visionroute.errors import InputError

CHOICES, BOXES = "choices", "boxes"  # the answer kinds: a class for the whole image, or boxes
IMAGE_NAME, LABEL_NAME, VERDICT_NAME = "image", "label", "verdict"  # the labelling config's tag names
REJECT = "reject"
MAX_REVIEWER_CHARS = 128
WHOLE_IMAGE_TOLERANCE_PX = 1.0
# What a label depends on: any change to these after an export makes the exported task stale.
VERSION_FIELDS = (
    "status",
    "label",
    "labelled_by",
    "proposed",
    "image_sha256",
    "stored_sha256",
    "image_deleted_at",
    "image_withheld",
)


def item_version(item: ReviewItem) -> str:
    """A short digest of what a label depends on (its status and label, the proposed answer,
    the stored image); leases are left out, so a claim and release in between do not count."""
    state = {name: getattr(item, name) for name in VERSION_FIELDS}
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()[:16]


def image_size(item: ReviewItem, image_bytes: bytes | None) -> tuple[int, int] | None:
    """(width, height) of the image a reviewer sees, else the request's file (the trace's
    ``input`` step); None when neither is known."""
    if image_bytes:
        from PIL import Image

        return Image.open(io.BytesIO(image_bytes)).size
    for step in item.trace.get("steps", []):
        details = step.get("details") or {}
        if step.get("stage") == "input" and details.get("width") and details.get("height"):
            return int(details["width"]), int(details["height"])
    return None


def is_whole_image(row: Mapping[str, Any], size: tuple[int, int] | None) -> bool:
    """A classifier's answer row: no box, or a box covering the whole image."""
    xyxy = row.get("xyxy")
    if not xyxy:
        return True
    if size is None:
        return False
    width, height = size
    tolerance = WHOLE_IMAGE_TOLERANCE_PX
    return (
        xyxy[0] <= tolerance
        and xyxy[1] <= tolerance
        and xyxy[2] >= width - tolerance
        and xyxy[3] >= height - tolerance
    )


def answer_kind(items_with_sizes: Iterable[tuple[ReviewItem, tuple[int, int] | None]]) -> str:
    """One task's kind: boxes if any answer row of any item is a real box, else choices."""
    for item, size in items_with_sizes:
        if any(not is_whole_image(row, size) for row in item.proposed):
            return BOXES
    return CHOICES


def _model_version(item: ReviewItem) -> str:
    for step in item.trace.get("steps", []):
        if str(step.get("stage", "")).startswith("onnx:"):
            return str(step.get("model_version") or step.get("model") or "visionroute")
    return "visionroute"


def _box_result(result_id: str, row: Mapping[str, Any], size: tuple[int, int]) -> dict[str, Any]:
    width, height = size
    x1, y1, x2, y2 = (float(v) for v in row["xyxy"])
    x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
    y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
    return {
        "id": result_id,
        "type": "rectanglelabels",
        "from_name": LABEL_NAME,
        "to_name": IMAGE_NAME,
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {
            "x": 100.0 * x1 / width,
            "y": 100.0 * y1 / height,
            "width": 100.0 * (x2 - x1) / width,
            "height": 100.0 * (y2 - y1) / height,
            "rotation": 0,
            "rectanglelabels": [str(row["label"])],
        },
        "score": float(row.get("confidence", 0.0)),
    }


def prediction(item: ReviewItem, kind: str, size: tuple[int, int] | None) -> dict[str, Any] | None:
    """The cascade's answer as one Label Studio prediction (None: no answer to show)."""
    rows = [row for row in item.proposed if row.get("label") is not None]
    if not rows:
        return None
    if kind == CHOICES:
        results = [
            {
                "id": f"{item.id}-0",
                "type": "choices",
                "from_name": LABEL_NAME,
                "to_name": IMAGE_NAME,
                "value": {"choices": [str(rows[0]["label"])]},
            }
        ]
    else:
        if size is None:
            return None  # boxes in percent need the image size
        results = [_box_result(f"{item.id}-{n}", row, size) for n, row in enumerate(rows) if row.get("xyxy")]
    return {
        "model_version": _model_version(item),
        "score": float(rows[0].get("confidence", 0.0)),
        "result": results,
    }


def task(item: ReviewItem, *, image_url: str, kind: str, size: tuple[int, int] | None) -> dict[str, Any]:
    """One Label Studio import task for ``item``."""
    data: dict[str, Any] = {
        IMAGE_NAME: image_url,
        "visionroute_item_id": item.id,
        "visionroute_item_version": item_version(item),
        "visionroute_kind": kind,
        "task": item.task,
        "tenant": item.tenant,
        "review_kind": item.kind,
        "reason": item.reason,
    }
    if size is not None:
        data["width"], data["height"] = size
    found = prediction(item, kind, size)
    return {"data": data, "predictions": [found] if found else []}


def label_config(kind: str, labels: Iterable[str]) -> str:
    """The Label Studio labelling interface for one task's items (Settings > Labeling Interface)."""
    if kind == CHOICES:
        options = "".join(f"\n    <Choice value={quoteattr(name)}/>" for name in labels)
        control = (
            f'  <Choices name="{LABEL_NAME}" toName="{IMAGE_NAME}" choice="single">{options}\n  </Choices>'
        )
    else:
        options = "".join(f"\n    <Label value={quoteattr(name)}/>" for name in labels)
        control = (
            f'  <RectangleLabels name="{LABEL_NAME}" toName="{IMAGE_NAME}">{options}\n  </RectangleLabels>'
        )
    return (
        "<View>\n"
        f'  <Image name="{IMAGE_NAME}" value="${IMAGE_NAME}"/>\n'
        f"{control}\n"
        f'  <Header value="Reject: the image cannot be labelled"/>\n'
        f'  <Choices name="{VERDICT_NAME}" toName="{IMAGE_NAME}" choice="single">\n'
        f'    <Choice value="{REJECT}"/>\n'
        "  </Choices>\n"
        "</View>\n"
    )


# -- in: a Label Studio JSON export ----------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What became of one exported task: imported, unchanged (already recorded), skipped (no
    annotation to import) or refused (``field`` and ``reason`` say why)."""

    status: str
    task_id: Any
    item_id: str | None
    field: str | None = None
    reason: str | None = None
    reviewer: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}


@dataclass(frozen=True)
class StudioAnnotation:
    """One task's annotation, read: who made it and what it says, in the image's pixels."""

    task_id: Any
    annotation_id: Any
    item_id: str
    item_version: str
    kind: str
    reviewer: str
    classes: tuple[str, ...]
    boxes: tuple[tuple[str, tuple[float, float, float, float]], ...]
    rejected: bool


def reviewer_of(annotation: Mapping[str, Any], reviewers: Mapping[str, str] | None) -> str:
    """The reviewer an annotation's ``completed_by`` names: a user id (the documented task
    format) or a user object ``{id, email, ...}`` (the JSON export). With a reviewer map, only
    users in it (by email or id); without, the email, else ``label-studio:<id>``."""
    who = annotation.get("completed_by")
    if isinstance(who, Mapping):
        user_id, email = who.get("id"), who.get("email") or None
        if not _is_scalar(user_id) or not (email is None or isinstance(email, str)):
            raise InputError(
                "completed_by's id must be a number or a string and its email a string",
                field="completed_by",
            )
    elif isinstance(who, (int, str)) and not isinstance(who, bool) and str(who).strip():
        user_id, email = who, None
    else:
        raise InputError(
            f"annotation {annotation.get('id')!r} has no completed_by (got {who!r}): a label needs the"
            " reviewer who made it",
            field="completed_by",
        )
    keys = [key for key in (email, None if user_id is None else str(user_id)) if key]
    if not keys:
        raise InputError(f"completed_by {who!r} names neither a user id nor an email", field="completed_by")
    if reviewers is not None:
        for key in keys:
            if key in reviewers:
                return reviewers[key]
        raise InputError(
            f"Label Studio user {' / '.join(keys)} is not in the reviewer map ({len(reviewers)} users);"
            " add them to it, or leave the map out to record Label Studio's own names",
            field="completed_by",
        )
    name = email or f"label-studio:{user_id}"
    if len(name) > MAX_REVIEWER_CHARS:  # the queue's limit (ReviewerField, services/review_requests.py)
        raise InputError(
            f"completed_by names a reviewer of {len(name)} characters; at most {MAX_REVIEWER_CHARS}",
            field="completed_by",
        )
    return name


def _is_scalar(value: Any) -> bool:
    return value is None or (isinstance(value, (int, str)) and not isinstance(value, bool))


def _listed(value: Any, field: str) -> list[Any]:
    """A JSON list field that may be absent (None); anything else is refused naming ``field``."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise InputError(f"{field} must be a list, got {type(value).__name__}", field=field)
    return value


def _object(value: Any, field: str) -> Mapping[str, Any]:
    """A JSON object field that may be absent (None); anything else is refused naming ``field``."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InputError(f"{field} must be an object, got {type(value).__name__}", field=field)
    return value


def _chosen_annotation(task_json: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The annotation to import: a ground-truth one first, then the most recently updated."""
    annotations = [a for a in _listed(task_json.get("annotations"), "annotations") if isinstance(a, Mapping)]
    kept = [(n, a) for n, a in enumerate(annotations) if not a.get("was_cancelled")]
    if not kept:
        return None
    return max(
        kept,
        key=lambda pair: (bool(pair[1].get("ground_truth")), str(pair[1].get("updated_at") or ""), pair[0]),
    )[1]


def _finite(value: Any, field: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an integer past float's range
        number = math.nan
    if not math.isfinite(number):
        raise InputError(f"{field} must be a number, got {value!r}", field=field)
    return number


def _box(result: Mapping[str, Any], data: Mapping[str, Any]) -> tuple[str, tuple[float, float, float, float]]:
    """A ``rectanglelabels`` result as (label, xyxy in the image's pixels)."""
    value = _object(result.get("value"), "result.value")
    labels = _listed(value.get("rectanglelabels"), "result.value.rectanglelabels")
    if len(labels) != 1 or not isinstance(labels[0], str):
        raise InputError(
            f"a box needs exactly one label, got {labels!r}", field="result.value.rectanglelabels"
        )
    if abs(_finite(value.get("rotation", 0) or 0, "result.value.rotation")) > 1e-6:
        raise InputError(
            f"box rotated by {value.get('rotation')} degrees: VisionRoute boxes are axis-aligned",
            field="result.value.rotation",
        )
    width = result.get("original_width") or data.get("width")
    height = result.get("original_height") or data.get("height")
    if not width or not height:
        raise InputError(
            "a box in percent needs the image size (result.original_width/original_height or data.width/height)",
            field="result.original_width",
        )
    width, height = _finite(width, "result.original_width"), _finite(height, "result.original_height")
    x, y, w, h = (_finite(value.get(key), f"result.value.{key}") for key in ("x", "y", "width", "height"))
    xyxy = (x * width / 100.0, y * height / 100.0, (x + w) * width / 100.0, (y + h) * height / 100.0)
    if not all(math.isfinite(v) for v in xyxy):  # finite inputs whose product overflows
        raise InputError(
            "the box's pixel coordinates overflow; check x, y, width, height", field="result.value"
        )
    return str(labels[0]), tuple(round(v, 2) for v in xyxy)  # type: ignore[return-value]


def read_task(
    task_json: Mapping[str, Any], reviewers: Mapping[str, str] | None
) -> StudioAnnotation | Outcome:
    """One exported task as a ``StudioAnnotation``, or an ``Outcome`` saying why not."""
    task_id = task_json.get("id")
    data = task_json.get("data")
    if not isinstance(data, Mapping):
        return Outcome("refused", task_id, None, "data", "a Label Studio task needs a 'data' object")
    item_id = data.get("visionroute_item_id")
    if not isinstance(item_id, str):  # the export writes the item id as a string
        item_id = None
    if not item_id:
        return Outcome(
            "refused",
            task_id,
            None,
            "data.visionroute_item_id",
            "the task names no review item: import only tasks that `visionroute review export"
            " --format label-studio` wrote",
        )
    version = data.get("visionroute_item_version")
    if not isinstance(version, str):
        version = None
    if not version:
        return Outcome(
            "refused",
            task_id,
            str(item_id),
            "data.visionroute_item_version",
            "the task carries no item version",
        )
    try:
        annotation = _chosen_annotation(task_json)
    except InputError as exc:
        return Outcome("refused", task_id, str(item_id), exc.field, exc.reason)
    if annotation is None:
        cancelled = bool(task_json.get("annotations"))
        reason = "every annotation was skipped in Label Studio" if cancelled else "not annotated yet"
        return Outcome("skipped", task_id, str(item_id), "annotations", reason)
    try:
        reviewer = reviewer_of(annotation, reviewers)
        classes: list[str] = []
        boxes: list[tuple[str, tuple[float, float, float, float]]] = []
        rejected = False
        for result in _listed(annotation.get("result"), "result"):
            kind = result.get("type") if isinstance(result, Mapping) else None
            if kind == "choices":
                value = _object(result.get("value"), "result.value")
                chosen = [str(c) for c in _listed(value.get("choices"), "result.value.choices")]
                if result.get("from_name") == VERDICT_NAME:
                    rejected = rejected or REJECT in chosen
                else:
                    classes.extend(chosen)
            elif kind == "rectanglelabels":
                boxes.append(_box(result, data))
            else:
                kind = kind if _is_scalar(kind) else type(kind).__name__
                raise InputError(
                    f"result type {kind!r} is not one VisionRoute reads; expected 'choices' or 'rectanglelabels'",
                    field="result.type",
                )
    except InputError as exc:
        return Outcome("refused", task_id, str(item_id), exc.field, exc.reason)
    return StudioAnnotation(
        task_id=task_id,
        annotation_id=annotation.get("id"),
        item_id=str(item_id),
        item_version=str(version),
        kind=str(data.get("visionroute_kind") or (BOXES if boxes else CHOICES)),
        reviewer=reviewer,
        classes=tuple(classes),
        boxes=tuple(boxes),
        rejected=rejected,
    )


def parse_export(
    document: Any, reviewers: Mapping[str, str] | None = None
) -> list[StudioAnnotation | Outcome]:
    """A Label Studio JSON export (a list of tasks; one task object is read as a list of one)."""
    if isinstance(document, Mapping):
        document = [document]
    if not isinstance(document, list):
        raise InputError(
            f"a Label Studio JSON export is a list of tasks, got {type(document).__name__}"
            " (export with the 'JSON' format, not JSON_MIN or CSV)",
            field="file",
        )
    read: list[StudioAnnotation | Outcome] = []
    for n, task_json in enumerate(document):
        if not isinstance(task_json, Mapping):
            read.append(Outcome("refused", None, None, f"[{n}]", "each task must be a JSON object"))
            continue
        read.append(read_task(task_json, reviewers))
    return read
