"""Labelled image sets with real tiers, for the robustness evaluation (evals/corruptions.py).

Unlike ``evals.harness.TierData`` (model outputs only), an ``ImageSet`` keeps the images and a
``predict`` function, so the same tiers can be run again on corrupted copies.

- ``digits_set``: scikit-learn's digits pool (8x8) through the two trained digits tiers (ONNX).
- ``faces_set``: a face / non-face task for the packaged ImageNet classifier: scikit-image's
  ``lfw_subset`` (100 faces, 100 non-face patches, 25x25, enlarged to the classifier's 224x224)
  plus scikit-image's bundled photos. ImageNet has no "face" class, so the cheap tier is
  EfficientNet-Lite0 followed by a logistic-regression probe on its 1,000 log-probabilities,
  fitted on a seeded, stratified quarter of ``lfw_subset`` that is then left out of the set.
- ``folder_set``: a user's folder and labels file (``evals.datasets.folder_items``), through any
  ONNX classifier and optionally a stronger one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

Predict = Callable[[list[np.ndarray]], tuple[np.ndarray, np.ndarray | None]]

# Bundled scikit-image photos for the face task: the astronaut portrait shows a face; the rest do not.
FACE_PHOTOS = {"astronaut": "face"}
NON_FACE_PHOTOS = ("brick", "chelsea", "clock", "coffee", "coins", "moon", "rocket", "text")
FACE_CLASSES = ("non-face", "face")
PROBE_FRACTION = 0.25


@dataclass(frozen=True)
class ImageSet:
    """Labelled uint8 images, and the tiers to run on them: ``predict(images)`` returns the
    cheap tier's (n, C) probabilities and the strong tier's (or None)."""

    name: str
    images: list[np.ndarray]
    labels: np.ndarray
    class_names: tuple[str, ...]
    predict: Predict
    models: dict[str, dict[str, str]] = field(default_factory=dict)
    metadata: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def tier_data(self, images: Sequence[np.ndarray] | None = None, rows: np.ndarray | None = None):
        """``TierData`` of the tiers on ``images`` (default: the clean ones) for ``rows``."""
        from evals.harness import TierData

        rows = np.arange(len(self)) if rows is None else np.asarray(rows)
        images = [self.images[i] for i in rows] if images is None else list(images)
        cheap, strong = self.predict(images)
        meta = [self.metadata[i] for i in rows] if self.metadata else []
        return TierData(cheap, strong, self.labels[rows], self.class_names, meta, self.name, self.models)


def _softmax(logits: np.ndarray) -> np.ndarray:
    from scipy.special import softmax

    return softmax(np.asarray(logits, np.float64), axis=1)


def digits_set(seed: int = 0, models_dir: Path | None = None) -> ImageSet:
    from cascades.digits import CLASS_NAMES, load_split, prepare_tiers, tier_logits
    from cascades.onnx_runner import file_sha256

    paths = prepare_tiers(models_dir, seed=seed)
    split = load_split(seed)
    images = [np.round(image[0] * 255).astype(np.uint8) for image in split.images_pool]  # (8, 8)

    def predict(batch: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        x = np.stack(batch).astype(np.float32)[:, None] / 255.0
        logits = tier_logits(paths, x)
        return _softmax(logits["cheap"]), _softmax(logits["strong"])

    models = {tier: {"name": path.stem, "sha256": file_sha256(path)} for tier, path in paths.items()}
    metadata = [{"digit": str(int(label)), "source": "sklearn-digits"} for label in split.labels_pool]
    return ImageSet(f"digits(seed={seed})", images, split.labels_pool, CLASS_NAMES, predict, models, metadata)


def _classifier(model: str, models_dir: Path | None):
    from cascades.onnx_stage import OnnxStage, OnnxStageConfig

    return OnnxStage(
        OnnxStageConfig(model=model, decoder="classifier", decoder_options={"top_k": 1_000_000}),
        models_dir=models_dir,
    )


def stage_probabilities(stage, images: list[np.ndarray]) -> np.ndarray:
    """Full (n, C) class probabilities from the service's own ONNX stage."""
    probabilities = np.zeros((len(images), len(stage.decoder.labels)))
    detections, _ = stage.predict([_rgb(image) for image in images])
    for row, found in enumerate(detections):
        probabilities[row, found.class_id] = found.confidence
    return probabilities


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image[..., :3])


def _photo(name: str) -> np.ndarray:
    from skimage import data

    image = np.asarray(getattr(data, name)())
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    return _rgb(image.astype(np.uint8))


def faces_set(seed: int = 0, models_dir: Path | None = None) -> ImageSet:
    """Face / non-face with EfficientNet-Lite0 and a probe (see the module docstring)."""
    import cv2
    from skimage import data
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    lfw = data.lfw_subset()  # (200, 25, 25) float in [0, 1]: 100 faces, then 100 non-faces
    lfw_labels = np.array([1] * 100 + [0] * 100, np.int64)
    enlarged = [
        _rgb(
            np.round(np.clip(cv2.resize(im, (224, 224), interpolation=cv2.INTER_CUBIC), 0, 1) * 255).astype(
                np.uint8
            )
        )
        for im in lfw
    ]
    probe_rows, pool_rows = train_test_split(
        np.arange(len(lfw)), train_size=PROBE_FRACTION, stratify=lfw_labels, random_state=seed
    )
    stage = _classifier("efficientnet_lite0", models_dir)

    def features(batch: list[np.ndarray]) -> np.ndarray:
        return np.log(np.clip(stage_probabilities(stage, batch), 1e-12, 1.0))

    probe = LogisticRegression(C=1.0, max_iter=2000).fit(
        features([enlarged[i] for i in probe_rows]), lfw_labels[probe_rows]
    )

    def predict(batch: list[np.ndarray]) -> tuple[np.ndarray, None]:
        return probe.predict_proba(features(batch)), None

    images = [enlarged[i] for i in sorted(pool_rows)]
    labels = [int(lfw_labels[i]) for i in sorted(pool_rows)]
    metadata = [{"source": "lfw_subset", "lfw_index": int(i)} for i in sorted(pool_rows)]
    for name, label in [*FACE_PHOTOS.items(), *((n, "non-face") for n in NON_FACE_PHOTOS)]:
        images.append(_photo(name))
        labels.append(FACE_CLASSES.index(label))
        metadata.append({"source": "skimage-photo", "photo": name})
    models = {
        "cheap": {
            "name": f"{stage.name}+face-probe(seed={seed})",
            "sha256": stage.model.sha256,
            "probe": f"logistic regression on log-probabilities, {len(probe_rows)} lfw_subset images",
        }
    }
    return ImageSet(
        f"faces(seed={seed})", images, np.array(labels, np.int64), FACE_CLASSES, predict, models, metadata
    )


def folder_set(
    images_dir, labels_file=None, *, model: str, strong_model: str | None = None, models_dir=None
) -> ImageSet:
    """A user's labelled folder (``evals.datasets`` layout) through ``model`` (and ``strong_model``)."""
    from cascades.images import decode_image
    from evals.datasets import folder_items
    from visionroute.errors import InputError

    items = folder_items(images_dir, labels_file)
    cheap = _classifier(model, models_dir)
    strong = _classifier(strong_model, models_dir) if strong_model else None
    names = tuple(cheap.decoder.labels)
    if strong is not None and tuple(strong.decoder.labels) != names:
        raise InputError("the strong model's label set differs from the cheap model's", field="strong_model")
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted({item.label for item in items if item.label not in index})
    if unknown:
        raise InputError(
            f"labels {unknown[:5]} are not in model {model!r}'s label set (e.g. {list(names[:5])})",
            field="labels",
        )
    images = [decode_image(item.path.read_bytes(), field=str(item.path)).rgb for item in items]

    def predict(batch: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        return stage_probabilities(cheap, batch), (
            stage_probabilities(strong, batch) if strong is not None else None
        )

    models = {"cheap": {"name": cheap.name, "sha256": cheap.model.sha256}}
    if strong is not None:
        models["strong"] = {"name": strong.name, "sha256": strong.model.sha256}
    labels = np.array([index[item.label] for item in items], np.int64)
    return ImageSet(
        Path(images_dir).name, images, labels, names, predict, models, [item.metadata for item in items]
    )
