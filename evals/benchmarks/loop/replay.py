"""The tiers' recorded outputs the stream replays (``Replay``): every item once through the real
tiers at every severity of a corruption, cached on disk (``--task``: ``REPLAYS``).

- ``digits``: scikit-learn's digits pool (539) through both digits tiers (ONNX);
- ``textures``: the textures pool (1,229 patches, ``examples.textures``) through the cheap tier
  (ONNX) and the textures LLaVA, read back from its cache (``examples.llava_scoring``) to score
  the corrupted patches; its clean outputs are the ones it wrote at training."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visionroute.errors import ConfigError

Progress = Callable[[str], None] | None


@dataclass(frozen=True)
class Replay:
    """The tiers' recorded outputs for each item at each severity (level 0: clean).

    ``cheap``/``strong``: (levels, n, C) class probabilities; ``stats``: (levels, n, 5) the shift
    guard's input statistics; ``labels``: (n,). ``fit_rows``/``certify_rows`` calibrate offline
    (clean); the stream draws from ``stream_rows``."""

    cheap: np.ndarray
    strong: np.ndarray
    stats: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    fit_rows: np.ndarray
    certify_rows: np.ndarray
    stream_rows: np.ndarray
    name: str = "replay"

    @property
    def levels(self) -> int:
        return self.cheap.shape[0]

    def tier_data(self, level: int):
        from evals.harness import TierData

        return TierData(self.cheap[level], self.strong[level], self.labels, self.class_names, [], self.name)


def _cache_file(cache_dir: Path | None, name: str) -> Path:
    from visionroute import paths

    return Path(cache_dir or paths.data_dir() / "bench-loop") / name


def _cached(cache: Path, compute) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cheap, strong, stats) from ``cache``, or ``compute()`` once and saved there."""
    if cache.is_file():
        with np.load(cache) as npz:
            return npz["cheap"], npz["strong"], npz["stats"]
    cheap, strong, stats = compute()
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(".partial.npz")  # a reader never sees a half-written file
    np.savez_compressed(partial, cheap=cheap, strong=strong, stats=stats)
    partial.replace(cache)
    return cheap, strong, stats


def _replay(outputs, labels, class_names, seed: int, name: str) -> Replay:
    """Offline calibration on half the items (fit, certify), the stream from the rest, as the
    digits always split."""
    from policies.certify import split_indices

    cheap, strong, stats = outputs
    splits = split_indices(len(labels), seed=seed, calibration_fraction=0.5)
    return Replay(
        cheap,
        strong,
        stats,
        np.asarray(labels),
        tuple(class_names),
        splits.fit,
        splits.certify,
        splits.test,
        name,
    )


def digits_replay(
    corruption: str = "gaussian_noise",
    *,
    seed: int = 0,
    cache_dir: Path | None = None,
    progress: Progress = None,
) -> Replay:
    """Both digits tiers on every pool digit at every severity of ``corruption`` (cached: the
    tiers run once per corruption, seed and model)."""
    from cascades.digits import CLASS_NAMES
    from evals.corruptions import SEVERITIES, corrupt_all, corruption_transform
    from evals.robustness_sets import digits_set
    from policies.shift_guard import statistics_matrix

    corruption_transform(corruption, 1)  # an unknown name fails before any work
    image_set = digits_set(seed)
    models = "-".join(image_set.models[t]["sha256"][:12] for t in sorted(image_set.models))
    say = progress or (lambda _: None)

    def compute():
        outputs, statistics = [], []
        for severity in (0, *SEVERITIES):
            images = (
                image_set.images
                if severity == 0
                else corrupt_all(image_set.images, corruption, severity, seed=seed)
            )
            outputs.append(image_set.predict(images))
            statistics.append(statistics_matrix(images))
            say(f"digits replay: severity {severity} done")
        return (
            np.stack([c for c, _ in outputs]),
            np.stack([s for _, s in outputs]),
            np.stack(statistics),
        )

    cache = _cache_file(cache_dir, f"digits_{corruption}_seed{seed}_{models}.npz")
    return _replay(
        _cached(cache, compute), image_set.labels, CLASS_NAMES, seed, f"{image_set.name}, {corruption}"
    )


def textures_replay(
    corruption: str = "gaussian_noise",
    *,
    seed: int = 0,
    cache_dir: Path | None = None,
    progress: Progress = None,
) -> Replay:
    """Both textures tiers on every pool patch (1,229) at every severity of ``corruption``: the
    cheap tier through ONNX; the LLaVA's clean outputs from its training cache, the corrupted
    ones (5 x 1,229 patches) scored by the LLaVA read back from that cache, on one torch thread
    (``examples.textures_vlm.TORCH_THREADS``). The tiers are trained first if the cache lacks
    them (the LLaVA in a few CPU-minutes). Cached per corruption, seed and models."""
    import time

    from scipy.special import softmax

    from cascades.onnx_runner import file_sha256
    from evals.corruptions import SEVERITIES, corrupt_all, corruption_transform
    from examples import llava_scoring, llava_training, textures, textures_vlm
    from policies.shift_guard import statistics_matrix

    corruption_transform(corruption, 1)  # an unknown name fails before any work
    split = textures.load_split(seed)
    cheap_path = textures.prepare_cheap(seed=seed)
    vlm = textures.prepare_vlm(seed=seed)
    models = f"{file_sha256(cheap_path)[:12]}-{vlm.weights_sha256[:12]}"
    clean = list(np.round(split.images_pool[:, 0] * 255).astype(np.uint8))  # as grey_uploads sends them
    say = progress or (lambda _: None)

    def compute():
        scorer = None
        cheap, strong, stats = [], [], []
        for severity in (0, *SEVERITIES):
            images = (
                clean
                if severity == 0
                else corrupt_all(clean, corruption, severity, seed=seed, indices=split.pool_index)
            )
            pixels = np.stack(images).astype(np.float32) / 255.0
            uploads = textures_vlm.grey_uploads(pixels)  # what a client sends and the guard sees
            cheap.append(softmax(textures.cheap_logits(cheap_path, pixels).astype(np.float64), axis=1))
            stats.append(statistics_matrix(uploads))
            if severity == 0:  # scored at training: the same uploads through the same model
                strong.append(vlm.probabilities[split.pool_index])
                continue
            scorer = scorer or llava_scoring.load(vlm.model_dir)
            started = time.perf_counter()
            with llava_training.torch_threads(textures_vlm.TORCH_THREADS):
                strong.append(scorer.label_probabilities(uploads))
            seconds = time.perf_counter() - started
            say(
                f"textures replay: severity {severity}, {len(uploads)} patches through the LLaVA in "
                f"{seconds:.0f} s ({len(uploads) / seconds:.1f}/s)"
            )
        return np.stack(cheap), np.stack(strong), np.stack(stats)

    cache = _cache_file(cache_dir, f"textures_{corruption}_seed{seed}_{models}.npz")
    return _replay(
        _cached(cache, compute),
        split.labels_pool,
        textures.CLASS_NAMES,
        seed,
        f"textures(seed={seed}), {corruption}",
    )


REPLAYS = {"digits": digits_replay, "textures": textures_replay}


def load_replay(
    task: str, corruption: str, *, seed: int, cache_dir: Path | None = None, progress: Progress = None
) -> Replay:
    """The recorded outputs of ``task`` (a name in ``REPLAYS``)."""
    if task not in REPLAYS:
        raise ConfigError(f"unknown task {task!r}; expected one of {sorted(REPLAYS)}", field="task")
    return REPLAYS[task](corruption, seed=seed, cache_dir=cache_dir, progress=progress)
