"""The LLaVA trained on the digits (examples/train_digits.py), served by a REAL vLLM server.

Unlike the random tiny LLaVA, this model's answers mean something, so these tests check what it
says: held-out digits (never seen in training) come back as the JSON label, far above chance.
How far above the cheap tier, and how calibrated, are figures for ``visionroute bench
vlm-digits``, not assertions here.

The model and its vLLM server are session fixtures (tests/integration/conftest.py), shared with
test_three_tier_digits.py and test_vlm_server.py: trained when missing or stale (about 2
CPU-minutes, once; CI has no cache), and the suite's one vLLM server started for all three
modules (~40-80 s on 2 cores).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from cascades.vlm import VlmStage
from cascades.vlm.client import OpenAiVlmClient
from evals.benchmarks.vlm_digits import run_vlm_digits
from examples import vllm_server
from examples.digits import digits_vlm_config, digits_vlm_split
from examples.train_digits import BUILD_VERSION, LABELS, SERVED_MODEL_NAME, answer_json, inputs_sha256
from visionroute.errors import ConfigError
from visionroute.records import Analysis, Decision

pytestmark = [pytest.mark.server, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
HELD_OUT_CHECKED = 120  # first rows of the held-out split: a seeded regression check


@pytest.fixture(scope="module")
def digits_model_dir(digits_llava_dir) -> Path:
    return digits_llava_dir


@pytest.fixture(scope="module")
def digits_server(digits_vllm_server):
    return digits_vllm_server


@pytest.fixture(scope="module")
def split():
    return digits_vlm_split()


def held_out_analysis(split, row: int) -> Analysis:
    from examples.train_digits import render_digit

    return Analysis(render_digit(split.images[row]), f"{row:064x}", "classify")


# -- the trained model as a versioned artefact ------------------------------------------------


def test_the_model_is_versioned_by_its_inputs_and_its_weights(digits_model_dir):
    manifest = vllm_server.read_manifest(digits_model_dir)
    images, labels, prompt = vllm_server.digits_llava_inputs()
    assert manifest["build_version"] == BUILD_VERSION and manifest["served_model_name"] == SERVED_MODEL_NAME
    assert manifest["inputs_sha256"] == inputs_sha256(images, labels, prompt, manifest["seed"])
    assert manifest["n_train"] == len(labels) == 718  # the digits tiers' training share
    weights = b"".join(p.read_bytes() for p in sorted(Path(digits_model_dir).glob("*.safetensors")))
    assert manifest["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert (
        vllm_server.model_version(digits_model_dir)
        == f"{BUILD_VERSION}@sha256:{manifest['weights_sha256'][:16]}"
    )


def test_a_current_model_is_reused_and_a_stale_one_is_retrained(digits_model_dir, tmp_path):
    # /bin/false as the trainer's python: any attempt to train fails loudly.
    assert vllm_server.ensure_digits_llava(digits_model_dir, python=Path("/bin/false")) == digits_model_dir
    stale = tmp_path / "digits-llava"
    stale.mkdir()
    manifest = vllm_server.read_manifest(digits_model_dir)
    (stale / "visionroute_build.json").write_text(json.dumps({**manifest, "inputs_sha256": "0" * 64}))
    with pytest.raises(ConfigError, match="training the digits LLaVA failed"):
        vllm_server.ensure_digits_llava(stale, python=Path("/bin/false"))


def test_training_is_seeded(tmp_path):
    """Same seed, same weights; another seed, other weights (one short epoch of each stage)."""
    images, labels, prompt = vllm_server.digits_llava_inputs()
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, images=images[:48], labels=labels[:48], prompt=np.array(prompt))
    script = textwrap.dedent(
        f"""
        import json, sys
        import numpy as np
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from examples.train_digits import train
        data = np.load({str(inputs)!r})
        shas = [
            train(data["images"], data["labels"], str(data["prompt"]), __import__("pathlib").Path({str(tmp_path)!r}) / name,
                  seed=seed, vision_epochs=1, answer_epochs=1)["weights_sha256"]
            for name, seed in (("a", 0), ("b", 0), ("c", 1))
        ]
        print(json.dumps(shas))
        """
    )
    result = subprocess.run(
        [str(vllm_server.vllm_venv_dir() / "bin" / "python"), "-c", script],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    first, again, other_seed = json.loads(result.stdout.strip().splitlines()[-1])
    assert first == again and first != other_seed
    manifest = json.loads((tmp_path / "a" / "visionroute_build.json").read_text())
    assert manifest["build_version"] == BUILD_VERSION and manifest["recipe"]["answer_epochs"] == 1


# -- through the real server -----------------------------------------------------------------------


def test_vllm_builds_token_for_token_the_prompt_the_model_was_trained_on(digits_server, split):
    """The stage's request, tokenised by the server, is the prompt the trainer used."""
    stage = VlmStage(digits_vlm_config(digits_server.base_url, digits_server.model))
    request, _ = stage.build_request(held_out_analysis(split, int(split.held_out[0])))
    response = httpx.post(
        f"http://127.0.0.1:{digits_server.port}/tokenize",
        json={"model": digits_server.model, "messages": request.messages, "add_generation_prompt": True},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    trained_on = vllm_server.read_manifest(digits_server.model_dir)["prompt_token_ids"]
    assert response.json()["tokens"] == trained_on


def test_held_out_digits_are_answered_with_their_json_label(digits_server, split):
    version = vllm_server.model_version(digits_server.model_dir)
    stage = VlmStage(digits_vlm_config(digits_server.base_url, digits_server.model, model_version=version))
    rows = split.held_out[:HELD_OUT_CHECKED]
    with ThreadPoolExecutor(8) as pool:  # vLLM batches concurrent requests
        steps = list(
            pool.map(lambda row: stage.run(held_out_analysis(split, int(row))).trace.steps[-1], rows)
        )
    stage.close()
    for step in steps:
        assert step.error is None, step.error
        assert step.details["raw_output"] == answer_json(step.details["answer"])  # exactly the trained JSON
        assert step.details["answer"] in LABELS and 0.0 < step.score <= 1.0
        assert step.model == SERVED_MODEL_NAME and step.model_version == version
    answers = np.array([int(step.details["answer"]) for step in steps])
    accuracy = float((answers == split.labels[rows]).mean())
    # Chance is 0.1 (the random tiny LLaVA's level); the trained model scores ~0.97 here.
    assert accuracy > 0.8, f"held-out accuracy {accuracy:.3f} on {len(rows)} digits"
    # Most answers are confident; a model guessing among 10 labels would sit near 0.1.
    assert np.median([step.score for step in steps]) > 0.5


class _NoSchemaBackend:
    """The real client, but the request goes out without its JSON schema: what a server without
    structured outputs (or a proxy that drops the field) does. The model then writes freely."""

    def __init__(self, config) -> None:
        self.client = OpenAiVlmClient(config)

    def complete(self, request):
        return self.client.complete(dataclasses.replace(request, response_format={"type": "text"}))


def test_an_answer_outside_the_label_set_goes_to_review_with_the_raw_output(digits_server, split):
    # Labels the model never learnt: it still answers a digit, which is not one of them.
    words = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    config = digits_vlm_config(digits_server.base_url, digits_server.model, labels=words)
    stage = VlmStage(config, backend=_NoSchemaBackend(config))
    analysis = stage.run(held_out_analysis(split, int(split.held_out[0])))
    step = analysis.trace.steps[-1]
    assert step.decision is Decision.REVIEW and analysis.decision is Decision.REVIEW
    assert step.reason.startswith("the VLM's output is invalid") and step.error.startswith("invalid_output")
    # It still answers a digit, as trained: valid JSON, but not one of this request's labels.
    raw = json.loads(step.details["raw_output"])
    assert raw["label"] in LABELS and f"label={raw['label']!r} is not one of" in step.reason
    assert step.details["answer"] is None and step.score is None


def test_the_benchmark_figures_come_out_of_one_small_run(digits_server, split, prepared_models_dir):
    result = run_vlm_digits(
        digits_server.base_url,
        digits_server.model,
        split=split,
        models_dir=prepared_models_dir,  # the session's: digits_cheap among them
        n_calibration=40,
        n_held_out=40,
        concurrency=4,
    )
    assert result.split_sizes == {"training": 718, "calibration": 270, "certification": 270, "held_out": 539}
    assert result.n_held_out == 40 and result.vlm_invalid == 0
    assert 0.0 <= result.cheap_accuracy <= 1.0 and len(result.cheap_sha256) == 64
    assert 0.0 <= result.ece_raw <= 1.0 and set(result.ece_calibrated) == {"platt", "isotonic"}
    assert all(0.0 <= ece <= 1.0 for ece in result.ece_calibrated.values())


def test_render_digit_names_the_field_and_the_reason_for_bad_input():
    from examples.train_digits import IMAGE_SIZE, render_digit

    assert render_digit(np.zeros((1, 8, 8))).shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    with pytest.raises(ValueError, match=r"image: expected an 8x8 digit .* got shape \(28, 28\)"):
        render_digit(np.zeros((28, 28)))
    with pytest.raises(ValueError, match=r"image: expected finite values in \[0, 1\]"):
        render_digit(np.full((8, 8), 16.0))  # sklearn's raw 0..16, not divided by 16
