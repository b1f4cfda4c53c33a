"""The open_clip path with a tiny model built here, saved to and reloaded from a checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest

from retrieval.config import OpenClipConfig, RetrievalConfig
from retrieval.embedders import build_embedder
from retrieval.service import SearchService
from visionroute.errors import ConfigError

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    import open_clip
    import torch

    config_dir = tmp_path_factory.mktemp("open_clip_configs")
    (config_dir / "vr-tiny-clip.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(config_dir)
    torch.manual_seed(0)
    model = open_clip.create_model("vr-tiny-clip", pretrained=None)
    path = tmp_path_factory.mktemp("weights") / "vr-tiny-clip.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return path, model


@pytest.fixture(scope="module")
def embedder(tiny_checkpoint):
    path, _ = tiny_checkpoint
    return build_embedder(OpenClipConfig(model_name="vr-tiny-clip", pretrained=str(path), batch_size=3))


def test_loads_weights_from_local_checkpoint(embedder, tiny_checkpoint):
    import torch

    _, original = tiny_checkpoint
    tokens = embedder.tokenizer(["a forklift near a person"])
    with torch.no_grad():
        expected = original.encode_text(tokens).numpy()
    got = embedder.embed_texts(["a forklift near a person"])
    np.testing.assert_allclose(got, expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-5)
    assert embedder.dim == 32 and embedder.space == "open_clip:vr-tiny-clip:vr-tiny-clip.pt"
    assert embedder.precision == "fp32" and embedder.device == "cpu"  # fp16 is for GPUs only


def test_batched_image_embeddings_match_one_by_one(embedder, photos):
    images = [photos[n] for n in ("coffee", "chelsea", "rocket", "horse", "camera")]
    batched = embedder.embed_images(images)  # batch_size=3: two batches
    single = np.concatenate([embedder.embed_images([im]) for im in images])
    assert batched.shape == (5, 32)
    np.testing.assert_allclose(batched, single, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)


def test_onnx_image_tower_matches_pytorch(embedder, tiny_checkpoint, tmp_path, photos):
    path, _ = tiny_checkpoint
    onnx_path = embedder.export_image_onnx(tmp_path / "tower.onnx")
    onnx_embedder = build_embedder(
        OpenClipConfig(model_name="vr-tiny-clip", pretrained=str(path), image_onnx_path=onnx_path)
    )
    images = [photos["coffee"], photos["astronaut"]]
    np.testing.assert_allclose(onnx_embedder.embed_images(images), embedder.embed_images(images), atol=1e-4)


def test_service_runs_on_open_clip(embedder, tmp_path, photos):
    config = RetrievalConfig(index_dir=tmp_path, embedder=embedder.config)
    with SearchService(config, embedder=embedder) as service:
        ids = service.index_images([photos["coffee"], photos["chelsea"]])
        assert service.search_image(photos["chelsea"], k=1).hits[0].id == ids[1]
        assert len(service.search_text("a cat", k=2).hits) == 2


def test_missing_checkpoint_or_unknown_model_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_embedder(OpenClipConfig(model_name="vr-tiny-clip", pretrained=str(tmp_path / "nope.pt")))
    with pytest.raises(ConfigError, match="no-such-model"):
        build_embedder(OpenClipConfig(model_name="no-such-model"))
