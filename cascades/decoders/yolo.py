"""YOLOv8 / YOLO11 detection head: ``[batch, 4 + classes, anchors]``, cx-cy-w-h in input pixels.

Letterbox in (aspect kept, grey padding), confidence filter, class-aware NMS (OpenCV's
``NMSBoxesBatched``), boxes mapped back to the original image's pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from cascades.decoders import normalise_chw
from visionroute.errors import ConfigError
from visionroute.records import Detections


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
    ) -> None:
        self.labels = labels
        self.size_hw = (int(size_hw[0]), int(size_hw[1]))
        self.confidence_threshold = confidence_threshold
        self.iou_threshold = iou_threshold
        self.max_detections = max_detections

    def preprocess(self, image_rgb: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        canvas, scale, pad = letterbox(image_rgb, self.size_hw)
        tensor = normalise_chw(canvas, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        height, width = image_rgb.shape[:2]
        return tensor, {"scale": scale, "pad": pad, "width": width, "height": height}

    def decode(self, outputs: Sequence[np.ndarray], meta: dict[str, Any]) -> Detections:
        raw = np.asarray(outputs[0])
        if raw.ndim == 3:
            raw = raw[0]
        num_classes = raw.shape[0] - 4
        if num_classes < 1:
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
        keep = confidence >= self.confidence_threshold
        if not keep.any():
            return Detections.empty(self.labels)
        cxcywh, confidence, class_id = predictions[keep, :4], confidence[keep], class_id[keep]
        xywh = np.column_stack(
            [cxcywh[:, 0] - cxcywh[:, 2] / 2, cxcywh[:, 1] - cxcywh[:, 3] / 2, cxcywh[:, 2], cxcywh[:, 3]]
        )
        kept = cv2.dnn.NMSBoxesBatched(
            xywh.tolist(),
            confidence.tolist(),
            class_id.tolist(),
            self.confidence_threshold,
            self.iou_threshold,
        )
        kept = np.asarray(kept, dtype=np.int64).reshape(-1)
        kept = kept[np.argsort(-confidence[kept], kind="stable")][: self.max_detections]
        xyxy = xywh[kept].copy()
        xyxy[:, 2:] += xyxy[:, :2]
        # Undo the letterbox: remove padding, divide by scale, clip to the image.
        pad_x, pad_y = meta["pad"]
        xyxy[:, [0, 2]] = ((xyxy[:, [0, 2]] - pad_x) / meta["scale"]).clip(0, meta["width"])
        xyxy[:, [1, 3]] = ((xyxy[:, [1, 3]] - pad_y) / meta["scale"]).clip(0, meta["height"])
        return Detections(xyxy, confidence[kept], class_id[kept], self.labels)
