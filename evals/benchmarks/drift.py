"""``visionroute bench drift``: false alarms on unshifted traffic, requests to alarm on shifted traffic.

Traffic: real images, each request one of scikit-image's bundled photos (random crop of 40-100%
of the short side, random flip) or one of scikit-learn's 8x8 digits upsampled to 64x64, saved as
JPEG at a quality drawn from 80-95 (a camera's) and decoded with Pillow, as the service decodes
an upload. Shifted traffic applies, before that JPEG step: Gaussian blur, Gaussian pixel noise,
brightness, or JPEG at a low quality instead (all with Pillow).

Per request: ``router.drift.monitors.image_statistics``; the confidence (top-1 softmax) and the ConSE
embedding of the service's classifier (EfficientNet-Lite0 ONNX + MiniLM, ``retrieval``'s
embedder), computed once per request and cached. Reviewers' verdicts have no image source, so
that monitor gets simulated verdict mixes.

Figures, per monitor and window size (requests per window), each monitor at ``--level``:
- false alarms per 1000 windows: reference and window both drawn from unshifted traffic, over
  ``--windows`` windows spread over ``--references`` reference draws (by default a fresh
  reference per window: the rate a deployment sees on average over its reference window; windows
  sharing one reference alarm together or not at all, which makes a rate over few references
  noisy, though not biased);
- detection: share of windows of fully shifted traffic that alarm, and the requests needed to
  alarm: with a window checked every ``w`` requests, the median requests until the first alarm
  is w * (smallest k with 1 - (1 - power)^k >= 1/2); the best window size is printed.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from router.drift.monitors import (
    VERDICTS,
    ConfidenceDriftMonitor,
    EmbeddingDriftMonitor,
    InputDriftMonitor,
    VerdictDriftMonitor,
    image_statistics,
    statistics_matrix,
)
from visionroute import paths

PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "camera",
    "coins",
    "moon",
    "page",
    "text",
    "brick",
    "grass",
    "gravel",
    "colorwheel",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "cat",
    "horse",
    "logo",
    "clock",
    "cell",
)
SHIFTS = ("blur", "noise", "brightness", "jpeg")
SHIFT_DESCRIPTIONS = {
    "blur": "Gaussian blur, radius 1.5 px",
    "noise": "Gaussian noise, sigma 12 (of 255)",
    "brightness": "brightness x1.3",
    "jpeg": "JPEG quality 15-30 (instead of 80-95)",
}
REFERENCE_VERDICTS = (0.85, 0.12, 0.03)  # confirm, correct, reject
SHIFTED_VERDICTS = (0.75, 0.17, 0.08)


# --------------------------------------------------------------------------- traffic


def _base_images() -> tuple[list[np.ndarray], np.ndarray]:
    from skimage import data
    from sklearn.datasets import load_digits

    images = []
    for name in PHOTOS:
        image = getattr(data, name)()
        if image.dtype != np.uint8:
            image = (255 * (image > 0) if image.dtype == bool else np.clip(image, 0, 255)).astype(np.uint8)
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        images.append(np.ascontiguousarray(image[..., :3]))
    return images, (load_digits().images * (255 / 16)).astype(np.uint8)


def _request(rng: np.random.Generator, photos, digits, shift: str | None) -> Image.Image:
    """One request's image, decoded from JPEG as the service would see it."""
    if rng.random() < 0.7:
        photo = photos[rng.integers(len(photos))]
        height, width = photo.shape[:2]
        side = int(min(height, width) * rng.uniform(0.4, 1.0))
        top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
        image = Image.fromarray(photo[top : top + side, left : left + side])
    else:
        digit = digits[rng.integers(len(digits))]
        image = Image.fromarray(np.stack([digit] * 3, axis=-1)).resize((64, 64), Image.BICUBIC)
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    if shift == "blur":
        image = image.filter(ImageFilter.GaussianBlur(1.5))
    elif shift == "noise":
        noisy = np.asarray(image, np.float64) + rng.normal(0, 12, (image.height, image.width, 3))
        image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    elif shift == "brightness":
        image = ImageEnhance.Brightness(image).enhance(1.3)
    quality = int(rng.integers(15, 31)) if shift == "jpeg" else int(rng.integers(80, 96))
    encoded = io.BytesIO()
    image.save(encoded, "JPEG", quality=quality)
    return Image.open(io.BytesIO(encoded.getvalue()))


@dataclass
class Pool:
    statistics: np.ndarray  # (n, len(INPUT_STATISTICS))
    confidence: np.ndarray | None  # (n,)
    embeddings: np.ndarray | None  # (n, d)


def _embedder(models_dir: Path):
    from retrieval.config import ConseConfig
    from retrieval.embedders.conse import ConseEmbedder

    return ConseEmbedder(ConseConfig(classifier_path=models_dir / "efficientnet_lite0.onnx"))


def _conse_from_probabilities(embedder, probabilities: np.ndarray) -> np.ndarray:
    """ConseEmbedder.embed_images from probabilities already computed (one classifier pass)."""
    from retrieval.embedders.base import l2_normalise

    top = np.argsort(-probabilities, axis=1)[:, : embedder.config.top_k]
    weights = np.take_along_axis(probabilities, top, axis=1)
    weights /= weights.sum(axis=1, keepdims=True)
    return l2_normalise(np.einsum("nk,nkd->nd", weights, embedder.label_vectors[top]))


def build_pools(sizes: dict[str, int], *, seed: int, embedder) -> dict[str, Pool]:
    """Unshifted traffic under the key "none", and each shift's traffic."""
    photos, digits = _base_images()
    pools = {}
    for i, (shift, count) in enumerate(sizes.items()):
        rng = np.random.default_rng([seed, i])
        images = [_request(rng, photos, digits, None if shift == "none" else shift) for _ in range(count)]
        stats = statistics_matrix([image_statistics(im) for im in images], "pool")
        confidence = embeddings = None
        if embedder is not None:
            rgb = [np.asarray(im.convert("RGB")) for im in images]
            probabilities = np.vstack(
                [embedder.class_probabilities(rgb[j : j + 32]) for j in range(0, len(rgb), 32)]
            )
            confidence = probabilities.max(axis=1)
            embeddings = _conse_from_probabilities(embedder, probabilities)
        pools[shift] = Pool(stats, confidence, embeddings)
    return pools


def cached_pools(sizes: dict[str, int], *, seed: int, models_dir: Path | None) -> tuple[dict[str, Pool], str]:
    """The pools, from a cache keyed by their parameters and the classifier's sha256 (features
    are the slow part: a classifier pass per request)."""
    from cascades.onnx_runner import file_sha256

    classifier = models_dir / "efficientnet_lite0.onnx" if models_dir is not None else None
    if classifier is not None and classifier.is_file():
        note = f"classifier {classifier.name} sha256 {file_sha256(classifier)[:12]}"
    else:
        classifier = None
        note = "inputs and verdicts only: no prepared classifier (run `visionroute models prepare`)"
    key = hashlib.sha256(json.dumps([sizes, seed, note, 1]).encode()).hexdigest()[:16]
    cache = paths.home() / "cache" / "bench-drift" / f"pools-{key}.npz"
    if cache.is_file():
        saved = np.load(cache)
        pools = {
            s: Pool(
                saved[f"{s}/statistics"],
                saved[f"{s}/confidence"] if f"{s}/confidence" in saved else None,
                saved[f"{s}/embeddings"] if f"{s}/embeddings" in saved else None,
            )
            for s in sizes
        }
        return pools, note + "; features from cache " + str(cache)
    embedder = _embedder(models_dir) if classifier is not None else None
    pools = build_pools(sizes, seed=seed, embedder=embedder)
    arrays = {}
    for s, pool in pools.items():
        arrays[f"{s}/statistics"] = pool.statistics
        if pool.confidence is not None:
            arrays[f"{s}/confidence"] = pool.confidence
            arrays[f"{s}/embeddings"] = pool.embeddings
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **arrays)
    return pools, note


# --------------------------------------------------------------------------- windows


def _monitors(pool: Pool, rows: np.ndarray, level: float, permutations: int, seed: int) -> dict[str, Any]:
    monitors: dict[str, Any] = {"inputs": InputDriftMonitor(pool.statistics[rows], level=level)}
    if pool.confidence is not None:
        monitors["confidence"] = ConfidenceDriftMonitor(pool.confidence[rows], level=level)
        monitors["embeddings"] = EmbeddingDriftMonitor(
            pool.embeddings[rows], level=level, permutations=permutations, seed=seed
        )
    return monitors


def _window(pool: Pool, rows: np.ndarray, name: str):
    if name == "inputs":
        return pool.statistics[rows]
    return pool.confidence[rows] if name == "confidence" else pool.embeddings[rows]


def alarm_rates(
    reference_pool: Pool,
    window_pool: Pool,
    *,
    window: int,
    windows: int,
    references: int,
    reference_size: int,
    level: float,
    permutations: int,
    seed: int,
) -> dict[str, float]:
    """Share of ``windows`` windows that alarm, per monitor and for any of them."""
    rng = np.random.default_rng(seed)
    alarms: dict[str, int] = {}
    any_alarms = 0
    per_reference = math.ceil(windows / references)
    done = 0
    for r in range(min(references, windows)):
        ref_rows = rng.integers(0, len(reference_pool.statistics), reference_size)
        monitors = _monitors(reference_pool, ref_rows, level, permutations, seed + r)
        for _ in range(min(per_reference, windows - done)):
            rows = rng.integers(0, len(window_pool.statistics), window)
            fired = False
            for name, monitor in monitors.items():
                alarm = monitor.feed(_window(window_pool, rows, name)).alarm
                alarms[name] = alarms.get(name, 0) + alarm
                fired |= alarm
            any_alarms += fired
            done += 1
    rates = {name: count / done for name, count in alarms.items()}
    rates["any image monitor"] = any_alarms / done
    return rates


def verdict_alarm_rate(
    mix, *, window: int, windows: int, reference_size: int, level: float, seed: int
) -> float:
    rng = np.random.default_rng(seed)
    fired = 0
    for i in range(windows):
        reference = dict(zip(VERDICTS, map(int, rng.multinomial(reference_size, REFERENCE_VERDICTS))))
        current = dict(zip(VERDICTS, map(int, rng.multinomial(window, mix))))
        fired += VerdictDriftMonitor(reference, level=level, permutations=1000, seed=i).feed(current).alarm
    return fired / windows


def requests_to_alarm(window: int, power: float) -> float:
    """Median requests until the first alarm when a window of ``window`` requests is checked each
    ``window`` requests and alarms with probability ``power`` (independent windows)."""
    if power <= 0.0:
        return math.inf
    if power >= 1.0:
        return float(window)
    return float(window * math.ceil(math.log(0.5) / math.log(1.0 - power)))


# --------------------------------------------------------------------------- command


def drift_bench(args) -> dict[str, Any]:
    started = time.perf_counter()
    sizes = {"none": args.pool, **{s: args.shifted_pool for s in SHIFTS}}
    models_dir = Path(args.models_dir) if args.models_dir else None
    pools, note = cached_pools(sizes, seed=args.seed, models_dir=models_dir)
    features_s = time.perf_counter() - started
    common = dict(
        references=args.references,
        reference_size=args.reference_size,
        level=args.level,
        permutations=args.permutations,
    )
    out: dict[str, Any] = {"note": note, "level": args.level, "window_sizes": args.window_sizes, "rows": []}
    for w in args.window_sizes:
        # Independent draws for every window size and traffic kind.
        seeds = {
            kind: (args.seed * 1009 + w) * 31 + k for k, kind in enumerate(["none", *SHIFTS, "verdicts"])
        }
        null = alarm_rates(
            pools["none"], pools["none"], window=w, windows=args.windows, seed=seeds["none"], **common
        )
        out["rows"].append({"traffic": "unshifted", "window": w, "alarm_rate": null})
        for shift in SHIFTS:
            shifted = alarm_rates(
                pools["none"],
                pools[shift],
                window=w,
                windows=args.shifted_windows,
                seed=seeds[shift],
                **common,
            )
            out["rows"].append({"traffic": shift, "window": w, "alarm_rate": shifted})
        verdict_null = verdict_alarm_rate(
            REFERENCE_VERDICTS,
            window=w,
            windows=args.windows,
            reference_size=args.reference_size,
            level=args.level,
            seed=seeds["verdicts"],
        )
        verdict_shift = verdict_alarm_rate(
            SHIFTED_VERDICTS,
            window=w,
            windows=args.shifted_windows,
            reference_size=args.reference_size,
            level=args.level,
            seed=seeds["verdicts"] + 1,
        )
        out["rows"].append({"traffic": "unshifted", "window": w, "alarm_rate": {"verdicts": verdict_null}})
        out["rows"].append({"traffic": "verdict mix", "window": w, "alarm_rate": {"verdicts": verdict_shift}})
    out["seconds"] = time.perf_counter() - started
    out["features_seconds"] = features_s
    return out


def format_report(result: dict[str, Any], args) -> str:
    level = result["level"]
    lines = [
        f"drift monitors at level {level} (expected false alarms: <= {1000 * level:.0f} per 1000 windows); "
        f"reference {args.reference_size} requests, {args.references} reference draws; {result['note']}; "
        f"{result['seconds']:.0f} s ({result['features_seconds']:.0f} s features)",
        "traffic: skimage photos (random crops) + sklearn digits (64x64), JPEG q80-95; shifts: "
        + "; ".join(f"{k}: {v}" for k, v in SHIFT_DESCRIPTIONS.items())
        + f"; verdict mix (simulated): {REFERENCE_VERDICTS} -> {SHIFTED_VERDICTS}",
        "",
        "false alarms per 1000 windows, unshifted traffic:",
    ]
    monitors = sorted(
        {m for r in result["rows"] for m in r["alarm_rate"]}, key=lambda m: (m == "any image monitor", m)
    )
    header = f"{'window':>7} " + " ".join(f"{m:>18}" for m in monitors)
    lines.append(header)
    for w in result["window_sizes"]:
        rates = {}
        for r in result["rows"]:
            if r["traffic"] == "unshifted" and r["window"] == w:
                rates.update(r["alarm_rate"])
        lines.append(
            f"{w:>7} "
            + " ".join(f"{1000 * rates[m]:>18.1f}" if m in rates else f"{'-':>18}" for m in monitors)
        )
    lines += [
        "",
        "shifted traffic: share of windows that alarm (power) / median requests to the first alarm:",
    ]
    lines.append(f"{'traffic':>12} {'window':>7} " + " ".join(f"{m:>18}" for m in monitors))
    best: dict[tuple[str, str], float] = {}
    for r in result["rows"]:
        if r["traffic"] == "unshifted":
            continue
        cells = []
        for m in monitors:
            if m not in r["alarm_rate"]:
                cells.append(f"{'-':>18}")
                continue
            power = r["alarm_rate"][m]
            need = requests_to_alarm(r["window"], power)
            key = (r["traffic"], m)
            best[key] = min(best.get(key, math.inf), need)
            cells.append(f"{power:>10.3f} / {'never' if math.isinf(need) else f'{need:.0f}':>5}")
        lines.append(f"{r['traffic']:>12} {r['window']:>7} " + " ".join(cells))
    lines += ["", "requests needed to alarm (median, best window size):"]
    for traffic in [*SHIFTS, "verdict mix"]:
        found = {m: v for (t, m), v in best.items() if t == traffic}
        lines.append(
            f"{traffic:>12}: "
            + ", ".join(f"{m} {'never' if math.isinf(v) else f'{v:.0f}'}" for m, v in found.items())
        )
    return "\n".join(lines)


def run(args) -> int:
    result = drift_bench(args)
    print(format_report(result, args))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=float) + "\n")
    return 0
