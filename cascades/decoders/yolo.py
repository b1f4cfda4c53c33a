"""YOLOv8 / YOLO11 detection head: ``[batch, 4 + classes, anchors]``, cx-cy-w-h in input pixels.

Letterbox in (aspect kept, grey padding), one score rule (``score >= confidence_threshold``),
boxes mapped back to the original image's pixels and clipped to it, then NMS (per class, or
across classes with ``nms="agnostic"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from cascades.decoders import check_channels, normalise_chw
from visionroute.errors import ConfigError
from visionroute.records import Detections

NMS_MODES = ("class_aware", "agnostic")


def letterbox(
    image_rgb: np.ndarray, size_hw: tuple[int, int], pad_value: int = 114
) -> tuple[np.ndarray, float, tuple[float, float]]:
    """Resize keeping aspect ratio and pad to ``size_hw``; returns image, scale, (pad_x, pad_y)."""
    height, width = image_rgb.shape[:2]
    out_h, out_w = size_hw
    scale = min(out_h / height, out_w / width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    resized = cv2.resize(image_rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    pad_x, pad_y = (out_w - new_w) / 2, (out_h - new_h) / 2
    top, left = int(round(pad_y - 0.1)), int(round(pad_x - 0.1))
    canvas = np.full((out_h, out_w, 3), pad_value, np.uint8)
    canvas[top : top + new_h, left : left + new_w] = resized
    return canvas, scale, (left, top)


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box with each of ``boxes`` (n, 4); 0 where the union is empty."""
    top_left = np.maximum(box[:2], boxes[:, :2])
    bottom_right = np.minimum(box[2:], boxes[:, 2:])
    intersection = np.prod((bottom_right - top_left).clip(min=0), axis=1)
    area = np.prod((box[2:] - box[:2]).clip(min=0))
    areas = np.prod((boxes[:, 2:] - boxes[:, :2]).clip(min=0), axis=1)
    union = area + areas - intersection
    return np.divide(intersection, union, out=np.zeros_like(union, dtype=np.float64), where=union > 0)


def non_max_suppression(
    xyxy: np.ndarray, confidence: np.ndarray, iou_threshold: float, class_id: np.ndarray | None = None
) -> np.ndarray:
    """Greedy NMS; indices kept, highest confidence first (ties: input order).

    A box is suppressed by a kept box whose IoU with it is above ``iou_threshold``; with
    ``class_id`` given, only by a kept box of its own class. No score threshold here: the
    decoder filters scores once, before.
    """
    order = np.argsort(-confidence, kind="stable")
    kept = []
    while order.size:
        best, rest = order[0], order[1:]
        kept.append(best)
        overlaps = box_iou(xyxy[best], xyxy[rest]) > iou_threshold
        if class_id is not None:
            overlaps &= class_id[rest] == class_id[best]
        order = rest[~overlaps]
    return np.asarray(kept, np.int64)


class YoloDecoder:
    max_batch_size = 16

    def __init__(
        self,
        *,
        labels: tuple[str, ...],
        size_hw: Sequence[int] = (640, 640),
        confidence_threshold: float = 0.25,
        iou_threshold: float = 0.45,
        max_detections: int = 300,
        max_candidates: int = 30000,
        nms: str = "class_aware",
        channels: str = "RGB",
    ) -> None:
        if nms not in NMS_MODES:
            raise ConfigError(f"nms must be one of {list(NMS_MODES)}, got {nms!r}", field="nms")
        self.labels = labels
        self.size_hw = (int(size_hw[0]), int(size_hw[1]))
        self.confidence_threshold = confidence_threshold
        self.iou_threshold = iou_threshold
        self.max_detections = max_detections
        self.max_candidates = max_candidates
        self.nms = nms
        self.channels = check_channels(channels)

    def preprocess(self, image_rgb: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        canvas, scale, pad = letterbox(image_rgb, self.size_hw)
        tensor = normalise_chw(canvas, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), self.channels)
        height, width = image_rgb.shape[:2]
        return tensor, {"scale": scale, "pad": pad, "width": width, "height": height}

    def decode(self, outputs: Sequence[np.ndarray], meta: dict[str, Any]) -> Detections:
        raw = np.asarray(outputs[0])
        if raw.ndim == 3:
            raw = raw[0]
        num_classes = raw.shape[0] - 4
        if raw.ndim != 2 or num_classes < 1:
            raise ConfigError(
                f"YOLO output must be [batch, 4 + classes, anchors], got {outputs[0].shape}", field="decoder"
            )
        if self.labels and num_classes != len(self.labels):
            raise ConfigError(
                f"YOLO output has {num_classes} classes, {len(self.labels)} labels configured", field="labels"
            )
        predictions = raw.T  # (anchors, 4 + classes)
        class_scores = predictions[:, 4:]
        class_id = class_scores.argmax(axis=1)
        confidence = class_scores[np.arange(len(class_id)), class_id]
        # The one score rule: kept when score >= threshold, compared in the output's own dtype
        # (a float32 score equal to float32(threshold) is "at the threshold").
        keep = np.flatnonzero(confidence >= np.asarray(self.confidence_threshold, confidence.dtype))
        keep = keep[np.argsort(-confidence[keep], kind="stable")][: self.max_candidates]
        cxcywh, confidence, class_id = predictions[keep, :4], confidence[keep], class_id[keep]
        xyxy = np.column_stack(
            [
                cxcywh[:, 0] - cxcywh[:, 2] / 2,
                cxcywh[:, 1] - cxcywh[:, 3] / 2,
                cxcywh[:, 0] + cxcywh[:, 2] / 2,
                cxcywh[:, 1] + cxcywh[:, 3] / 2,
            ]
        ).astype(np.float64)
        # Undo the letterbox and clip to the image BEFORE NMS: a box reaching outside the
        # image competes only with the part of it that is in the image.
        pad_x, pad_y = meta["pad"]
        xyxy[:, [0, 2]] = ((xyxy[:, [0, 2]] - pad_x) / meta["scale"]).clip(0, meta["width"])
        xyxy[:, [1, 3]] = ((xyxy[:, [1, 3]] - pad_y) / meta["scale"]).clip(0, meta["height"])
        inside = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])  # not wholly outside
        xyxy, confidence, class_id = xyxy[inside], confidence[inside], class_id[inside]
        if not len(xyxy):
            return Detections.empty(self.labels)
        kept = non_max_suppression(
            xyxy, confidence, self.iou_threshold, class_id if self.nms == "class_aware" else None
        )[: self.max_detections]
        return Detections(xyxy[kept].astype(np.float32), confidence[kept], class_id[kept], self.labels)
