"""PP-OCR DBNet text detector: probability map -> text boxes in original pixels.

Post-processing follows PP-OCR's DBPostProcess: binarise the map, take contours, score each
region by its mean probability, expand ("unclip") the shrunk polygon with pyclipper.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import pyclipper

from cascades.decoders import check_channels, normalise_chw
from visionroute.records import Detections


class DBNetDecoder:
    max_batch_size = 1  # input size follows each image's aspect ratio

    def __init__(
        self,
        *,
        labels: tuple[str, ...] = ("text",),
        max_side: int = 960,
        multiple: int = 32,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        channels: str = "BGR",
        binary_threshold: float = 0.3,
        box_threshold: float = 0.5,
        unclip_ratio: float = 1.6,
        min_side_px: float = 3.0,
        max_candidates: int = 1000,
    ) -> None:
        self.labels = labels or ("text",)
        self.max_side, self.multiple = max_side, multiple
        self.mean, self.std, self.channels = mean, std, check_channels(channels)
        self.binary_threshold, self.box_threshold = binary_threshold, box_threshold
        self.unclip_ratio, self.min_side_px, self.max_candidates = unclip_ratio, min_side_px, max_candidates

    def preprocess(self, image_rgb: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        height, width = image_rgb.shape[:2]
        scale = min(1.0, self.max_side / max(height, width))
        new_h = max(self.multiple, int(round(height * scale / self.multiple)) * self.multiple)
        new_w = max(self.multiple, int(round(width * scale / self.multiple)) * self.multiple)
        resized = cv2.resize(image_rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        tensor = normalise_chw(resized, self.mean, self.std, self.channels)
        return tensor, {"width": width, "height": height, "scale_xy": (width / new_w, height / new_h)}

    def _unclip(self, box: np.ndarray) -> np.ndarray | None:
        polygon = box.astype(np.float64)
        area = cv2.contourArea(polygon.astype(np.float32))
        length = cv2.arcLength(polygon.astype(np.float32), True)
        if length <= 0:
            return None
        offset = pyclipper.PyclipperOffset()
        offset.AddPath(
            polygon.round().astype(np.int64).tolist(), pyclipper.JT_ROUND, pyclipper.ET_CLOSEDPOLYGON
        )
        expanded = offset.Execute(area * self.unclip_ratio / length)
        return np.asarray(expanded[0], np.float32) if expanded else None

    def decode(self, outputs: Sequence[np.ndarray], meta: dict[str, Any]) -> Detections:
        probability = np.asarray(outputs[0], np.float32).reshape(outputs[0].shape[-2:])
        mask = (probability > self.binary_threshold).astype(np.uint8)
        contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        boxes, scores = [], []
        for contour in contours[: self.max_candidates]:
            rect = cv2.minAreaRect(contour)
            if min(rect[1]) < self.min_side_px:
                continue
            # "fast" score mode: mean probability inside the region's bounding box mask.
            x, y, w, h = cv2.boundingRect(contour)
            region = np.zeros((h, w), np.uint8)
            cv2.fillPoly(region, [contour.reshape(-1, 2) - [x, y]], 1)
            score = float(cv2.mean(probability[y : y + h, x : x + w], region)[0])
            if score < self.box_threshold:
                continue
            expanded = self._unclip(cv2.boxPoints(rect))
            if expanded is None:
                continue
            box = cv2.boxPoints(cv2.minAreaRect(expanded))
            if min(cv2.minAreaRect(expanded)[1]) < self.min_side_px + 2:
                continue
            boxes.append([box[:, 0].min(), box[:, 1].min(), box[:, 0].max(), box[:, 1].max()])
            scores.append(score)
        if not boxes:
            return Detections.empty(self.labels)
        xyxy = np.asarray(boxes, np.float32)
        scale_x, scale_y = meta["scale_xy"]
        xyxy[:, [0, 2]] = (xyxy[:, [0, 2]] * scale_x).clip(0, meta["width"])
        xyxy[:, [1, 3]] = (xyxy[:, [1, 3]] * scale_y).clip(0, meta["height"])
        order = np.argsort(-np.asarray(scores), kind="stable")
        return Detections(xyxy[order], np.asarray(scores)[order], np.zeros(len(order), np.int64), self.labels)
