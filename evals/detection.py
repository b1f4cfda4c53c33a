"""COCO-style detection mAP@[.5:.95] with pycocotools (the reference implementation), as a
metric with ``update / compute / reset``, plus true-positive matching for score calibration."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from visionroute.records import Detections


def _xywh(xyxy: np.ndarray) -> np.ndarray:
    xyxy = np.asarray(xyxy, np.float64).reshape(-1, 4)
    return np.column_stack([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]])


class DetectionMAP:
    """Accumulates ground truth and detections per image; ``compute`` runs COCOeval('bbox')."""

    name = "detection_map"

    def __init__(self, class_names: Sequence[str]) -> None:
        self.class_names = list(class_names)
        self.reset()

    def reset(self) -> None:
        self._images: list[dict] = []
        self._gt: list[dict] = []
        self._dt: list[dict] = []

    @property
    def count(self) -> int:
        return len(self._images)

    def update(
        self, *, detections: Detections, gt_xyxy: Any, gt_class_id: Any, width: int, height: int, **_: Any
    ) -> None:
        image_id = len(self._images) + 1
        self._images.append({"id": image_id, "width": int(width), "height": int(height)})
        for box, cid in zip(_xywh(gt_xyxy), np.asarray(gt_class_id, np.int64)):
            self._gt.append(
                {
                    "id": len(self._gt) + 1,
                    "image_id": image_id,
                    "category_id": int(cid) + 1,
                    "bbox": box.tolist(),
                    "area": float(box[2] * box[3]),
                    "iscrowd": 0,
                }
            )
        for box, cid, score in zip(_xywh(detections.xyxy), detections.class_id, detections.confidence):
            self._dt.append(
                {
                    "image_id": image_id,
                    "category_id": int(cid) + 1,
                    "bbox": box.tolist(),
                    "score": float(score),
                }
            )

    def _coco_eval(self):
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        gt = COCO()
        gt.dataset = {
            "images": self._images,
            "annotations": self._gt,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(self.class_names)],
        }
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            gt.createIndex()
            dt = gt.loadRes(self._dt)
            evaluator = COCOeval(gt, dt, "bbox")
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        return evaluator

    def compute(self) -> dict[str, Any]:
        if not self._images or not self._gt:
            return {"map_50_95": None, "map_50": None, "map_75": None}
        if not self._dt:
            return {"map_50_95": 0.0, "map_50": 0.0, "map_75": 0.0}
        stats = self._coco_eval().stats
        # COCOeval reports -1 where there is nothing to score (e.g. no large objects)
        clean = [None if s < 0 else float(s) for s in stats]
        return {
            "map_50_95": clean[0],
            "map_50": clean[1],
            "map_75": clean[2],
            "map_small": clean[3],
            "map_medium": clean[4],
            "map_large": clean[5],
        }

    def true_positives(self, iou: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(score, class_id, is_true_positive) of every detection, matched as COCOeval matches
        at the given IoU; the input ``cascades.calibration.fit_detector`` wants."""
        if not self._dt:
            return np.zeros(0), np.zeros(0, np.int64), np.zeros(0, bool)
        scores, category_ids, tp = coco_true_positives(self._coco_eval(), iou)
        return scores, category_ids - 1, tp


def coco_true_positives(evaluator, iou: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(score, category_id, matched) per detection of an evaluated COCOeval. Detections past
    COCOeval's per-image limit (maxDets, 100) are never matched, as in the COCO metric."""
    t = int(np.argmin(np.abs(evaluator.params.iouThrs - iou)))
    matched: dict[int, bool] = {}
    for record in evaluator.evalImgs:
        if record is None or record["aRng"] != evaluator.params.areaRng[0]:
            continue  # only the "all areas" pass, so each detection is counted once
        for det_id, gt_id in zip(record["dtIds"], record["dtMatches"][t]):
            matched[int(det_id)] = bool(gt_id > 0)
    dts = evaluator.cocoDt.anns
    ids = sorted(dts)
    scores = np.array([dts[i]["score"] for i in ids], np.float64)
    categories = np.array([dts[i]["category_id"] for i in ids], np.int64)
    return scores, categories, np.array([matched.get(i, False) for i in ids], bool)


def evaluate_coco_files(
    gt_json: str | Path, dt_json: str | Path, *, slice_keys: Sequence[str] = ()
) -> dict[str, Any]:
    """mAP of a COCO results file against COCO annotations, overall and per image-level
    attribute (any key of the ``images`` entries, e.g. ``"lighting"``)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_json))
        dt = gt.loadRes(str(dt_json))
    images = gt.dataset["images"]
    groups: dict[str, list[int]] = {"all": [im["id"] for im in images]}
    for key in slice_keys:
        for image in images:
            groups.setdefault(f"{key}={image.get(key, '<missing>')}", []).append(image["id"])
    out = {}
    for name, ids in groups.items():
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.params.imgIds = ids
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        stats = [None if v < 0 else float(v) for v in evaluator.stats]
        out[name] = {"map_50_95": stats[0], "map_50": stats[1], "map_75": stats[2], "n": len(ids)}
    return out
