"""Turn raw ONNX outputs into ``Detections``: one decoder per output layout, keyed by name.

A decoder owns both halves of the model's contract: ``preprocess`` (image -> input tensor,
remembering how pixels were scaled) and ``decode`` (outputs -> Detections in original
pixels). Config and model sidecars refer to decoders by the registry's names.

The registry maps each name to ``"module:attribute"`` and imports a decoder on first use, so
building the classifier needs neither OpenCV nor pyclipper (the detectors' extra packages).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import re
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from visionroute.errors import ConfigError
from visionroute.records import Detections

DECODERS: dict[str, str] = {
    "classifier": "cascades.decoders.classifier:ClassifierDecoder",
    "yolov8": "cascades.decoders.yolo:YoloDecoder",
    "dbnet": "cascades.decoders.dbnet:DBNetDecoder",
}

# Import name -> the distributions that provide it (the first is the one to suggest).
OPTIONAL_MODULES: dict[str, tuple[str, ...]] = {
    "cv2": ("opencv-python-headless", "opencv-python", "opencv-contrib-python"),
    "pyclipper": ("pyclipper",),
}

CHANNEL_ORDERS = ("RGB", "BGR", "GRAY")  # GRAY: one channel, ITU-R 601 luma

_loaded: dict[str, type] = {}


class Decoder(Protocol):
    #: how many images one session.run may hold (1 where input sizes vary per image)
    max_batch_size: int
    labels: tuple[str, ...]

    def preprocess(self, image_rgb: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        """One image -> a (1, c, h, w) float32 tensor and what decode needs to map back."""

    def decode(self, outputs: Sequence[np.ndarray], meta: dict[str, Any]) -> Detections:
        """The outputs for one image (batch dimension 1) -> Detections in original pixels."""


def decoder_class(name: str) -> type:
    """The decoder class registered as ``name``, imported on first use."""
    if name not in DECODERS:
        raise ConfigError(f"unknown decoder {name!r}; expected one of {sorted(DECODERS)}", field="decoder")
    if name not in _loaded:
        module_name, attribute = DECODERS[name].split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            missing = (exc.name or "").split(".")[0]
            raise ConfigError(
                f"decoder {name!r} needs the module {missing!r}, which is not installed; "
                + install_hint(missing),
                field="decoder",
            ) from None
        _loaded[name] = getattr(module, attribute)
    return _loaded[name]


def install_hint(module: str) -> str:
    """How to get ``module``: the package, and which visionroute extra (if any) declares it."""
    packages = OPTIONAL_MODULES.get(module, (module,))
    try:
        requirements = importlib.metadata.requires("visionroute") or []
    except importlib.metadata.PackageNotFoundError:
        requirements = []
    for requirement in requirements:
        package = re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower()
        if package in packages:
            extra = re.search(r"extra\s*==\s*[\"']([^\"']+)", requirement)
            if extra:
                return f"install package {package!r} with: pip install 'visionroute[{extra.group(1)}]'"
            return f"package {package!r} is a visionroute dependency: reinstall visionroute (pip install visionroute)"
    return f"install package {packages[0]!r} with: pip install {packages[0]}"


def decoder_options(name: str) -> list[str]:
    """The keyword options decoder ``name`` accepts (besides ``labels``)."""
    parameters = inspect.signature(decoder_class(name).__init__).parameters
    return sorted(p for p in parameters if p not in ("self", "labels"))


def build_decoder(name: str, *, labels: Sequence[str], options: dict[str, Any]) -> Decoder:
    cls = decoder_class(name)
    accepted = decoder_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(
            f"decoder {name!r} takes no option {unknown}; its options are {accepted}", field="decoder_options"
        )
    try:
        return cls(labels=tuple(labels), **options)
    except TypeError as exc:
        raise ConfigError(f"bad options for decoder {name!r}: {exc}", field="decoder_options") from None


def check_channels(channels: str) -> str:
    if channels not in CHANNEL_ORDERS:
        raise ConfigError(
            f"channels must be one of {list(CHANNEL_ORDERS)}, got {channels!r}", field="channels"
        )
    return channels


_LUMA = np.asarray([0.299, 0.587, 0.114], np.float32)


def normalise_chw(
    image_rgb: np.ndarray, mean: Sequence[float], std: Sequence[float], channels: str = "RGB"
) -> np.ndarray:
    """uint8 HWC (RGB) -> float32 1CHW in ``channels`` order, scaled to [0, 1] then standardised.

    ``mean`` and ``std`` are given in the model's channel order.
    """
    if channels == "BGR":
        image_rgb = image_rgb[..., ::-1]
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    if channels == "GRAY":  # PIL's "L" conversion weights, kept in float (no rounding to uint8)
        array = (image_rgb.astype(np.float32) @ _LUMA)[..., None] / 255.0
        # an RGB mean/std (a decoder's default) becomes its luma: what a grey image's pixels are
        mean, std = (v @ _LUMA if v.size == 3 else v for v in (mean, std))
    else:
        array = image_rgb.astype(np.float32) / 255.0
    array = (array - mean) / std
    return array.transpose(2, 0, 1)[None]
