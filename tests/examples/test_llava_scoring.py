"""``examples.llava_scoring`` refuses a folder that holds no trained LLaVA, naming what is
missing. That a loaded model scores exactly as training did is checked where a model is trained
anyway (tests/examples/test_textures.py, the trainer's plumbing test)."""

from __future__ import annotations

import json

import pytest

from examples import llava_scoring


def test_a_folder_without_a_trained_llava_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="model_dir: .* no readable visionroute_build.json"):
        llava_scoring.load(tmp_path)
    (tmp_path / llava_scoring.MANIFEST).write_text(json.dumps({"labels": ["a", "b"]}))
    with pytest.raises(ValueError, match="lacks .*prompt_token_ids"):
        llava_scoring.load(tmp_path)
