"""The textures task (``examples.textures``) in the shapes the evaluations read: ``tier_data``
as ``evals.harness.digits_tier_data`` builds the digits' ``TierData``, and ``router_task`` as
``evals.benchmarks.router.digits_task`` builds the digits' ``RouterTask`` (``visionroute bench
router --task evals.textures:router_task``). They live here, not in examples/, because the
examples layer sits below evals (tests/test_import_graph.py). docs/second_task.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from examples import textures


def _brightness_bucket(image: np.ndarray) -> str:
    from evals.slicing import bucket

    return bucket(float(image.mean()), [0.25, 0.5], ["dark", "medium", "bright"])


def tier_data(seed: int = textures.SEED, models_dir: Path | None = None):
    """Both tiers on the pool (items never used in training), as ``evals.harness.TierData``:
    the same signature and return type as ``evals.harness.digits_tier_data``. Trains (and caches
    under ``models_dir``, default ``cache_dir()``) whatever is missing: the cheap tier in
    seconds, the VLM in a few CPU-minutes."""
    from scipy.special import softmax

    from cascades.onnx_runner import file_sha256
    from evals.harness import TierData

    models_dir = Path(models_dir or textures.cache_dir())
    split = textures.load_split(seed)
    cheap_path = textures.prepare_cheap(models_dir, seed=seed)
    vlm = textures.prepare_vlm(seed=seed, cache=models_dir)
    metadata = [
        {
            "texture": textures.CLASS_NAMES[int(label)],
            "brightness": _brightness_bucket(image),
            "source": f"skimage.data.{dict(textures.SOURCES)[textures.CLASS_NAMES[int(label)]]}",
        }
        for image, label in zip(split.images_pool, split.labels_pool)
    ]
    models = {
        "cheap": {"name": cheap_path.stem, "sha256": file_sha256(cheap_path)},
        "strong": {"name": vlm.model_dir.name, "sha256": vlm.weights_sha256},
    }
    return TierData(
        softmax(textures.cheap_logits(cheap_path, split.images_pool).astype(np.float64), axis=1),
        vlm.probabilities[split.pool_index],
        split.labels_pool,
        textures.CLASS_NAMES,
        metadata,
        f"textures(seed={seed})",
        models,
    )


def router_task(seed: int, work_dir: Path) -> Any:
    """``bench router``'s task loader (``evals.benchmarks.router.TaskLoader``: ``--task
    evals.textures:router_task``), as ``digits_task`` builds the digits: the pool as the
    population, the VLM's in-process answers and confidences as the second tier, ``embeddings``
    for the reference index with the training share as its reference items. The tiers come from
    ``cache_dir()``, not ``work_dir`` (the VLM takes minutes to train; cached artefacts are keyed
    by recipe version, seed and inputs, so every bench run can share them)."""
    from cascades.router_features import input_features
    from evals.benchmarks.router import RouterTask

    data = tier_data(seed)
    split = textures.load_split(seed)
    uploads = textures.rendered(split.images_pool)
    strong = data.strong_probabilities
    cheap_path = textures.prepare_cheap(seed=seed)
    return RouterTask(
        name=textures.TASK,
        seed=seed,
        class_names=textures.CLASS_NAMES,
        labels=split.labels_pool,
        cheap_probabilities=data.cheap_probabilities,
        vlm_answers=strong.argmax(1),
        vlm_scores=strong.max(1),
        embeddings=textures.embeddings(split.images_pool),
        reference_embeddings=textures.embeddings(split.images_train),
        reference_labels=split.labels_train,
        item_ids=split.pool_index,
        cheap_stage_us=lambda: textures.cheap_tier_us(cheap_path, uploads[:300]),
        embedding=textures.EMBEDDING,
        second_tier="the textures LLaVA (examples.textures_vlm), answer probabilities in-process",
        embed_us=lambda: textures.embed_us(uploads[:300]),
        input_statistics=input_features(uploads),
    )
