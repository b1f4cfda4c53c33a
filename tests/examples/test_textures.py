"""The textures task (examples/textures.py, examples/textures_vlm.py, evals/textures.py):
scikit-image's bundled photographs as a labelled set, the cheap tier trained, exported and run
under ONNX Runtime, the VLM trainer's plumbing at a tiny size, and what the benches read
(TierData, RouterTask) on a stand-in VLM. Accuracies are checked against chance with a wide margin, never pinned."""

from __future__ import annotations

import sys

import numpy as np
import pytest

pytest.importorskip("skimage", reason="the textures task reads scikit-image's bundled photographs")

from evals import textures as textures_task  # noqa: E402
from examples import textures, textures_vlm  # noqa: E402

N_CLASSES = len(textures.CLASS_NAMES)
N_ITEMS = N_CLASSES * textures.PER_CLASS


@pytest.fixture(scope="module")
def cheap_model(tmp_path_factory):
    """The cheap tier of seed 0, trained (15 epochs of the recipe's 60: ~0.65 on the pool
    instead of ~0.76, a second of CPU) and exported once for this module, where
    ``prepare_cheap`` looks for it."""
    path = tmp_path_factory.mktemp("textures") / f"{textures.CHEAP_VERSION}-seed0.onnx"
    return textures.export_cheap(
        textures.train_cheap(textures.load_split(0), seed=0, epochs=15), path, seed=0
    )


# --------------------------------------------------------------------------- the data


def test_the_loader_returns_every_patch_labelled():
    data = textures.load_textures()
    assert data.images.shape == (N_ITEMS, 32, 32) == (2048, 32, 32)
    assert data.images.dtype == np.float32
    assert 0.0 <= data.images.min() and data.images.max() <= 1.0
    assert np.bincount(data.labels, minlength=N_CLASSES).tolist() == [256] * N_CLASSES
    # every patch of a class has its own grid position: no patch is counted twice
    keys = {(int(label), int(r), int(c)) for label, (r, c) in zip(data.labels, data.positions)}
    assert len(keys) == N_ITEMS
    # the patches are pictures, not blanks: every class varies within and across its patches
    for label in range(N_CLASSES):
        patches = data.images[data.labels == label]
        assert patches.std(axis=(1, 2)).mean() > 0.005, textures.CLASS_NAMES[label]
        assert patches.mean(axis=(1, 2)).std() > 0.0


def test_labels_start_with_distinct_letters():
    """The VLM's in-process probabilities rely on the answers differing at their first token."""
    assert len({name[0] for name in textures.CLASS_NAMES}) == N_CLASSES


def test_the_split_is_seeded_disjoint_and_complete():
    split = textures.load_split(0)
    assert split.images_train.shape == (819, 1, 32, 32)
    assert split.images_pool.shape == (1229, 1, 32, 32)
    rows = np.concatenate([split.train_index, split.pool_index])
    assert sorted(rows.tolist()) == list(range(N_ITEMS))
    data = textures.load_textures()
    np.testing.assert_array_equal(split.labels_pool, data.labels[split.pool_index])
    np.testing.assert_array_equal(split.images_pool[:, 0], data.images[split.pool_index])
    again, other = textures.load_split(0), textures.load_split(1)
    np.testing.assert_array_equal(again.pool_index, split.pool_index)
    assert not np.array_equal(other.pool_index, split.pool_index)


def test_a_missing_scikit_image_is_named(monkeypatch):
    textures.load_textures.cache_clear()  # built once per process otherwise
    monkeypatch.setitem(sys.modules, "skimage", None)  # import skimage now raises ImportError
    try:
        with pytest.raises(textures.MissingDataPackage, match="scikit-image"):
            textures.load_textures()
    finally:
        textures.load_textures.cache_clear()


def test_uploads_and_embeddings_have_the_documented_shapes():
    split = textures.load_split(0)
    uploads = textures.rendered(split.images_pool[:5])
    assert [u.shape for u in uploads] == [(32, 32, 3)] * 5
    assert all(u.dtype == np.uint8 for u in uploads)
    with pytest.raises(ValueError, match="images"):
        textures.rendered(np.full((1, 32, 32), 2.0))
    vectors = textures.embeddings(split.images_pool[:5])
    assert vectors.shape == (5, 20)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


def test_the_embedding_finds_neighbours_of_the_same_texture():
    """The reference index's embedding carries the label: the nearest training patch has the
    same texture far more often than chance (1 in 8)."""
    split = textures.load_split(0)
    train = textures.embeddings(split.images_train)
    pool = textures.embeddings(split.images_pool[:300])
    nearest = (pool @ train.T).argmax(1)
    agreement = (split.labels_train[nearest] == split.labels_pool[:300]).mean()
    assert agreement > 0.4
    # a constant patch has one code everywhere (every neighbour >= the centre: 8 set bits)
    flat = textures.embeddings(np.full((1, 32, 32), 0.5))
    assert np.flatnonzero(flat[0]).tolist() == [8, 18]  # bin 8 of each radius's 10


# --------------------------------------------------------------------------- the cheap tier


def test_the_cheap_tier_runs_under_onnx_runtime_and_beats_chance(cheap_model):
    from cascades.onnx_runner import OnnxModel

    model = OnnxModel(cheap_model)
    assert model.metadata["class_names"] == list(textures.CLASS_NAMES)
    split = textures.load_split(0)
    logits = textures.cheap_logits(cheap_model, split.images_pool)
    assert logits.shape == (1229, N_CLASSES)
    assert np.isfinite(logits).all()
    accuracy = (logits.argmax(1) == split.labels_pool).mean()
    assert accuracy > 0.45  # chance is 0.125


def test_the_export_matches_the_trained_network(tmp_path):
    import torch

    split = textures.load_split(0)
    network = textures.train_cheap(split, seed=0, epochs=1)
    path = textures.export_cheap(network, tmp_path / "cheap.onnx", seed=0)
    with torch.no_grad():
        expected = network(torch.from_numpy(split.images_pool[:64])).numpy()
    np.testing.assert_allclose(textures.cheap_logits(path, split.images_pool[:64]), expected, atol=1e-4)
    assert not list(tmp_path.glob(".cheap-*")), "the staging folder is left behind"


def test_the_cheap_tier_is_reused_once_prepared(cheap_model):
    before = cheap_model.stat().st_mtime_ns
    assert textures.prepare_cheap(cheap_model.parent, seed=0) == cheap_model
    assert cheap_model.stat().st_mtime_ns == before


# --------------------------------------------------------------------------- the VLM tier


@pytest.mark.slow
def test_the_vlm_trainer_saves_a_model_and_label_probabilities(tmp_path):
    """One epoch of each stage on 48 patches: the plumbing, not the accuracy (the full recipe
    runs in ``ensure_vlm``)."""
    split = textures.load_split(0)
    images, labels = split.images_train[:48, 0], split.labels_train[:48]
    manifest = textures_vlm.train(
        images,
        labels,
        textures.CLASS_NAMES,
        tmp_path,
        seed=0,
        vision_epochs=1,
        answer_epochs=1,
        score_images=images[:10],
    )
    assert manifest["labels"] == list(textures.CLASS_NAMES)
    assert manifest["n_train"] == 48 and manifest["image_size"] == 32 and manifest["patch_size"] == 8
    assert "<image>" in manifest["prompt_text"] and "pebbles" in manifest["prompt_text"]
    assert list(tmp_path.glob("*.safetensors")), "no weights saved"
    probabilities = np.load(tmp_path / textures_vlm.PROBABILITIES)["probabilities"]
    assert probabilities.shape == (10, N_CLASSES)
    np.testing.assert_allclose(probabilities.sum(1), 1.0, rtol=1e-6)
    # read back from the saved files, the model scores as it did when training returned it
    # (bench loop --task textures scores the corrupted patches so: examples.llava_scoring)
    from examples import llava_scoring

    again = llava_scoring.load(tmp_path).label_probabilities(textures_vlm.grey_uploads(images[:10]))
    np.testing.assert_allclose(again, probabilities, rtol=1e-5, atol=1e-6)


def test_the_vlm_trainer_rejects_bad_input(tmp_path):
    images = np.zeros((4, 32, 32), np.float32)
    with pytest.raises(ValueError, match="labels"):
        textures_vlm.train(images, np.array([0, 1, 2, 99]), textures.CLASS_NAMES, tmp_path)
    with pytest.raises(ValueError, match="epochs"):
        textures_vlm.train(images, np.zeros(4, np.int64), textures.CLASS_NAMES, tmp_path, vision_epochs=0)


# --------------------------------------------------------------------------- what the benches read


@pytest.fixture
def stand_in_vlm(monkeypatch, tmp_path):
    """prepare_vlm without the minutes of training: a VLM that is right on 9 items in 10."""
    data = textures.load_textures()
    rng = np.random.default_rng(0)
    answers = np.where(rng.random(N_ITEMS) < 0.9, data.labels, rng.integers(0, N_CLASSES, N_ITEMS))
    probabilities = np.full((N_ITEMS, N_CLASSES), 0.1 / (N_CLASSES - 1))
    probabilities[np.arange(N_ITEMS), answers] = 0.9
    tier = textures_vlm.VlmTier(tmp_path / "stand-in", probabilities, {"weights_sha256": "0" * 64})
    monkeypatch.setattr(textures, "prepare_vlm", lambda **_: tier)
    return tier


def test_tier_data_has_the_digits_structure(stand_in_vlm, cheap_model, tmp_path):
    from evals.harness import TierData

    data = textures_task.tier_data(0, cheap_model.parent)
    assert isinstance(data, TierData)
    split = textures.load_split(0)
    assert data.cheap_probabilities.shape == data.strong_probabilities.shape == (1229, N_CLASSES)
    np.testing.assert_allclose(data.cheap_probabilities.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(data.labels, split.labels_pool)
    np.testing.assert_array_equal(data.strong_probabilities, stand_in_vlm.probabilities[split.pool_index])
    assert data.class_names == textures.CLASS_NAMES
    assert set(data.models) == {"cheap", "strong"}
    assert len(data.metadata) == 1229
    assert data.metadata[0]["texture"] == textures.CLASS_NAMES[int(split.labels_pool[0])]
    # the cheap tier's calibration: a temperature on a fit share, saved as the service's artefact
    calibrator = textures.fit_cheap_calibration(data, np.arange(300), tmp_path / "cheap_calibration.json")
    assert (tmp_path / "cheap_calibration.json").is_file()
    calibrated = calibrator.calibrate_probabilities(data.cheap_probabilities)
    np.testing.assert_array_equal(calibrated.argmax(1), data.cheap_probabilities.argmax(1))


def test_the_router_bench_task_validates(stand_in_vlm, cheap_model, tmp_path, monkeypatch):
    router = pytest.importorskip("evals.benchmarks.router")
    if not hasattr(router, "RouterTask"):
        pytest.skip("this bench has no task registry (RouterTask) yet")
    monkeypatch.setattr(textures, "cache_dir", lambda: cheap_model.parent)
    task = textures_task.router_task(0, tmp_path)
    assert isinstance(task, router.RouterTask)  # its __post_init__ checks every shape
    assert task.embeddings.shape == (1229, 20)
    assert task.reference_embeddings.shape == (819, 20)
    assert task.input_statistics.shape == (1229, 5)
    assert task.cheap_stage_us() > 0 and task.embed_us() > 0
