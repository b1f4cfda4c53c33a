"""Turn raw ONNX outputs into ``Detections``: one decoder per output layout, keyed by name.

A decoder owns both halves of the model's contract: ``preprocess`` (image -> input tensor,
remembering how pixels were scaled) and ``decode`` (outputs -> Detections in original
pixels). Config and model sidecars refer to decoders by the registry's names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from visionroute.errors import ConfigError
from visionroute.records import Detections


class Decoder(Protocol):
    #: how many images one session.run may hold (1 where input sizes vary per image)
    max_batch_size: int

    def preprocess(self, image_rgb: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        """One image -> a (1, c, h, w) float32 tensor and what decode needs to map back."""

    def decode(self, outputs: Sequence[np.ndarray], meta: dict[str, Any]) -> Detections:
        """The outputs for one image (batch dimension 1) -> Detections in original pixels."""


def build_decoder(name: str, *, labels: Sequence[str], options: dict[str, Any]) -> Decoder:
    from cascades.decoders.classifier import ClassifierDecoder
    from cascades.decoders.dbnet import DBNetDecoder
    from cascades.decoders.yolo import YoloDecoder

    registry = {"classifier": ClassifierDecoder, "yolov8": YoloDecoder, "dbnet": DBNetDecoder}
    if name not in registry:
        raise ConfigError(f"unknown decoder {name!r}; expected one of {sorted(registry)}", field="decoder")
    try:
        return registry[name](labels=tuple(labels), **options)
    except TypeError as exc:
        raise ConfigError(f"bad options for decoder {name!r}: {exc}", field="decoder_options") from None


def normalise_chw(
    image_rgb: np.ndarray, mean: Sequence[float], std: Sequence[float], channels: str = "RGB"
) -> np.ndarray:
    """uint8 HWC -> float32 1CHW, scaled to [0, 1] then standardised per channel."""
    if channels == "BGR":
        image_rgb = image_rgb[..., ::-1]
    array = image_rgb.astype(np.float32) / 255.0
    array = (array - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return array.transpose(2, 0, 1)[None]
