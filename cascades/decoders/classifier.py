"""Image classifier: resize, standardise, softmax over classes, keep the top k."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from cascades.decoders import check_channels, normalise_chw
from visionroute.errors import ConfigError
from visionroute.records import ClassProbabilities, Detections


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


class ClassifierDecoder:
    max_batch_size = 32

    def __init__(
        self,
        *,
        labels: tuple[str, ...],
        size_hw: Sequence[int] = (224, 224),
        resize: str = "stretch",
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        outputs: str = "logits",
        top_k: int = 5,
        channels: str = "RGB",
        crop_fraction: float = 0.875,
    ) -> None:
        if resize not in ("stretch", "center_crop"):
            raise ConfigError(f"resize must be 'stretch' or 'center_crop', got {resize!r}", field="resize")
        if outputs not in ("logits", "probabilities"):
            raise ConfigError(
                f"outputs must be 'logits' or 'probabilities', got {outputs!r}", field="outputs"
            )
        self.labels = labels
        self.size_hw = (int(size_hw[0]), int(size_hw[1]))
        self.resize, self.mean, self.std, self.outputs = resize, mean, std, outputs
        if not 0 < crop_fraction <= 1:
            raise ConfigError(f"crop_fraction must be in (0, 1], got {crop_fraction}", field="crop_fraction")
        self.top_k, self.channels = top_k, check_channels(channels)
        self.crop_fraction = crop_fraction

    @property
    def preprocessing(self) -> str:
        """Everything that decides the probabilities besides the model file (ClassProbabilities)."""
        crop = f":crop={self.crop_fraction}" if self.resize == "center_crop" else ""
        return (
            f"{self.resize}{crop}:{self.size_hw[0]}x{self.size_hw[1]}:mean={list(map(float, self.mean))}"
            f":std={list(map(float, self.std))}:{self.channels}:{self.outputs}"
        )

    def preprocess(self, image_rgb: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        height, width = image_rgb.shape[:2]
        out_h, out_w = self.size_hw
        image = Image.fromarray(image_rgb)
        if self.resize == "center_crop":
            # timm's eval transform: shorter side to size / crop_fraction, then the central crop
            # (Ultralytics classifiers use crop_fraction 1.0).
            scale = (out_h / self.crop_fraction) / min(height, width)
            image = image.resize((round(width * scale), round(height * scale)), Image.BICUBIC)
            left, top = (image.width - out_w) // 2, (image.height - out_h) // 2
            image = image.crop((left, top, left + out_w, top + out_h))
        else:
            # The whole image, stretched: nothing near the border is cut off.
            image = image.resize((out_w, out_h), Image.BILINEAR)
        tensor = normalise_chw(np.asarray(image), self.mean, self.std, self.channels)
        return tensor, {"width": width, "height": height}

    def decode(self, outputs: Sequence[np.ndarray], meta: dict[str, Any]) -> Detections:
        scores = np.asarray(outputs[0], np.float64).reshape(-1)
        if self.labels and len(scores) != len(self.labels):
            raise ConfigError(
                f"model outputs {len(scores)} classes but {len(self.labels)} labels are configured",
                field="labels",
            )
        probabilities = softmax(scores) if self.outputs == "logits" else scores
        detections = Detections.from_class_probabilities(
            probabilities, self.labels, width=meta["width"], height=meta["height"], top_k=self.top_k
        )
        whole = ClassProbabilities(probabilities, self.preprocessing)  # the search embedder reuses them
        return dataclasses.replace(detections, class_probabilities=whole)
