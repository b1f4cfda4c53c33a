"""A trained tiny LLaVA read back from its folder (``examples.llava_scoring``) scores images
exactly as the model did when training returned it: ``bench loop --task textures`` scores the
corrupted patches with it."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("skimage", reason="the textures task reads scikit-image's bundled photographs")

from examples import llava_scoring, textures, textures_vlm  # noqa: E402


@pytest.mark.slow
def test_a_loaded_model_reproduces_the_probabilities_training_wrote(tmp_path):
    """One epoch of each stage on 48 patches (the plumbing, not the accuracy): the probabilities
    the trainer wrote for 10 patches come back from the saved files, and other patches get rows
    that are distributions over the saved labels."""
    split = textures.load_split(0)
    images, labels = split.images_train[:48, 0], split.labels_train[:48]
    textures_vlm.train(
        images,
        labels,
        textures.CLASS_NAMES,
        tmp_path,
        seed=0,
        vision_epochs=1,
        answer_epochs=1,
        score_images=images[:10],
    )
    written = np.load(tmp_path / textures_vlm.PROBABILITIES)["probabilities"]
    scorer = llava_scoring.load(tmp_path)
    assert scorer.labels == textures.CLASS_NAMES
    again = scorer.label_probabilities(textures_vlm.grey_uploads(images[:10]))
    np.testing.assert_allclose(again, written, rtol=1e-5, atol=1e-6)
    other = scorer.label_probabilities(textures_vlm.grey_uploads(split.images_pool[:5, 0]))
    assert other.shape == (5, len(textures.CLASS_NAMES))
    np.testing.assert_allclose(other.sum(1), 1.0, rtol=1e-6)


def test_a_folder_without_a_trained_llava_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="model_dir: .* no readable visionroute_build.json"):
        llava_scoring.load(tmp_path)
    (tmp_path / llava_scoring.MANIFEST).write_text(json.dumps({"labels": ["a", "b"]}))
    with pytest.raises(ValueError, match="lacks .*prompt_token_ids"):
        llava_scoring.load(tmp_path)
