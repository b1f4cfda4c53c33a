"""COCO mAP through pycocotools, and true-positive matching for detector calibration."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evals.detection import DetectionMAP, evaluate_coco_files
from visionroute.records import Detections

NAMES = ("cat", "dog")
GT = np.array([[10, 10, 60, 60], [100, 100, 180, 200]], np.float32)


def test_perfect_detections_score_one_and_shifted_ones_less():
    perfect, shifted = DetectionMAP(NAMES), DetectionMAP(NAMES)
    perfect.update(
        detections=Detections(GT, [0.9, 0.8], [0, 1], NAMES),
        gt_xyxy=GT,
        gt_class_id=[0, 1],
        width=200,
        height=220,
    )
    moved = GT + np.array([8, 8, 8, 8], np.float32)  # IoU ~0.6-0.7: counts at 0.5, not at 0.75+
    shifted.update(
        detections=Detections(moved, [0.9, 0.8], [0, 1], NAMES),
        gt_xyxy=GT,
        gt_class_id=[0, 1],
        width=200,
        height=220,
    )
    assert perfect.compute()["map_50_95"] == pytest.approx(1.0)
    out = shifted.compute()
    assert out["map_50"] == pytest.approx(1.0) and out["map_50_95"] < 0.6


def test_empty_and_reset():
    metric = DetectionMAP(NAMES)
    metric.update(detections=Detections.empty(NAMES), gt_xyxy=GT, gt_class_id=[0, 1], width=200, height=220)
    assert metric.compute()["map_50_95"] == 0.0
    metric.reset()
    assert metric.compute()["map_50_95"] is None


def test_true_positives_match_like_cocoeval():
    metric = DetectionMAP(NAMES)
    dets = Detections(
        np.r_[GT, [[300, 300, 320, 320]]], [0.9, 0.8, 0.7], [0, 0, 1], NAMES
    )  # 2nd: wrong class; 3rd: nothing there
    metric.update(detections=dets, gt_xyxy=GT, gt_class_id=[0, 1], width=400, height=400)
    scores, classes, tp = metric.true_positives(0.5)
    assert list(tp) == [True, False, False]
    assert list(classes) == [0, 0, 1]
    np.testing.assert_allclose(scores, [0.9, 0.8, 0.7])


def test_coco_files_with_slices(tmp_path):
    gt = {
        "images": [
            {"id": 1, "width": 200, "height": 220, "lighting": "day"},
            {"id": 2, "width": 200, "height": 220, "lighting": "night"},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50], "area": 2500, "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [10, 10, 50, 50], "area": 2500, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "cat"}],
    }
    dt = [
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50], "score": 0.9},
        {"image_id": 2, "category_id": 1, "bbox": [150, 150, 20, 20], "score": 0.9},
    ]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(dt))
    out = evaluate_coco_files(tmp_path / "gt.json", tmp_path / "dt.json", slice_keys=["lighting"])
    assert out["lighting=day"]["map_50_95"] == pytest.approx(1.0)
    assert out["lighting=night"]["map_50_95"] == pytest.approx(0.0)
    assert 0.0 < out["all"]["map_50_95"] < 1.0 and out["all"]["n"] == 2
