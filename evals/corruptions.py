"""ImageNet-C-style corruptions and the robustness evaluation of a calibrated cascade under them.

Corruptions (Hendrycks and Dietterich, "Benchmarking Neural Network Robustness to Common
Corruptions and Perturbations", ICLR 2019), five severities each, applied with albumentations
(not hand-written filters). The parameters follow the paper's ``make_imagenet_c.py`` where
albumentations has the same knob; ``CORRUPTIONS`` records both. Spatial sizes are the paper's
pixels on a 224-px image, scaled by the image's shorter side / 224 (never below the smallest
kernel the library allows, so on 8x8 digits the blurs are all at that floor).

``corrupt(image, name, severity, seed=, index=)`` is deterministic: the same seed, corruption,
severity and item index give the same pixels whatever else runs.

``evaluate_corruptions(image_set, ...)`` calibrates and certifies on the clean data (the same
split, calibrator and Learn-then-Test thresholds as ``visionroute calibrate``), builds the shift
guard's input reference from the same calibration images, and then, for each corruption and
severity, runs the real tiers on the corrupted held-out images and measures accuracy, ECE,
coverage, the error among automatically answered items (what alpha bounds) and the routing
(accepted / escalated / review, cost per 1000 items), without and with the shift guard.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from visionroute.errors import ConfigError, InputError

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations would ask PyPI at import

SEVERITIES = (1, 2, 3, 4, 5)
REFERENCE_SIDE = 224  # ImageNet-C's image side: spatial parameters are in its pixels


def _odd(value: float, least: int = 3) -> int:
    k = max(least, int(round(value)))
    return k if k % 2 else k + 1


def _gaussian_noise(c, scale):
    import albumentations as A

    return A.GaussNoise(std_range=(c, c), p=1.0)


def _shot_noise(c, scale):
    import albumentations as A

    # ImageNet-C: poisson(x * c) / c; albumentations' scale is 1 / (photons per unit intensity).
    return A.ShotNoise(scale_range=(1.0 / c, 1.0 / c), p=1.0)


def _defocus_blur(c, scale):
    import albumentations as A

    radius = max(1, int(round(c[0] * scale)))
    return A.Defocus(radius=(radius, radius), alias_blur=(c[1] * scale, c[1] * scale), p=1.0)


def _motion_blur(c, scale):
    import albumentations as A

    # ImageNet-C blurs along a line with Gaussian weights of sigma c[1]; albumentations' kernel is
    # a uniform line, given the length 2 * sigma + 1. Angles 135..225 are ImageNet-C's -45..45
    # (a line at a and a + 180 degrees is the same line).
    kernel = _odd((2 * c[1] + 1) * scale)
    return A.MotionBlur(blur_limit=(kernel, kernel), angle_range=(135.0, 225.0), p=1.0)


def _brightness(c, scale):
    import albumentations as A

    return A.RandomBrightnessContrast(
        brightness_limit=(c, c), contrast_limit=(0.0, 0.0), brightness_by_max=False, p=1.0
    )


def _contrast(c, scale):
    import albumentations as A

    # ImageNet-C: (x - mean) * c + mean; albumentations: (x - mean) * (1 + a) + mean.
    return A.RandomBrightnessContrast(brightness_limit=(0.0, 0.0), contrast_limit=(c - 1, c - 1), p=1.0)


def _jpeg(c, scale):
    import albumentations as A

    return A.ImageCompression(compression_type="jpeg", quality_range=(c, c), p=1.0)


def _pixelate(c, scale):
    import albumentations as A
    import cv2

    # ImageNet-C: shrink by c and enlarge back, both with PIL's box filter; OpenCV's area
    # interpolation is that filter (each output pixel averages the input area it covers).
    return A.Downscale(
        scale_range=(c, c),
        interpolation_pair={"downscale": cv2.INTER_AREA, "upscale": cv2.INTER_AREA},
        p=1.0,
    )


def _occlusion(c, scale):
    import albumentations as A

    # Not in ImageNet-C: one black square (Cutout: DeVries and Taylor, 2017), side c of the image's.
    return A.CoarseDropout(
        num_holes_range=(1, 1), hole_height_range=(c, c), hole_width_range=(c, c), fill=0, p=1.0
    )


@dataclass(frozen=True)
class Corruption:
    name: str
    transform: str  # the albumentations class
    parameters: tuple  # per severity 1..5, in the paper's units
    meaning: str
    build: Callable[[Any, float], Any]  # (severity parameter, image side / 224) -> transform


CORRUPTIONS: dict[str, Corruption] = {
    c.name: c
    for c in (
        Corruption(
            "gaussian_noise",
            "GaussNoise",
            (0.08, 0.12, 0.18, 0.26, 0.38),
            "noise standard deviation, as a fraction of the full range",
            _gaussian_noise,
        ),
        Corruption(
            "shot_noise",
            "ShotNoise",
            (60, 25, 12, 5, 3),
            "photons per unit intensity (Poisson); fewer is noisier",
            _shot_noise,
        ),
        Corruption(
            "defocus_blur",
            "Defocus",
            ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
            "(disc radius, anti-alias sigma) in pixels of a 224-px image",
            _defocus_blur,
        ),
        Corruption(
            "motion_blur",
            "MotionBlur",
            ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)),
            "ImageNet-C (radius, sigma); kernel length 2*sigma+1 px of a 224-px image",
            _motion_blur,
        ),
        Corruption(
            "brightness",
            "RandomBrightnessContrast",
            (0.1, 0.2, 0.3, 0.4, 0.5),
            "added to every pixel, as a fraction of the full range",
            _brightness,
        ),
        Corruption(
            "contrast",
            "RandomBrightnessContrast",
            (0.4, 0.3, 0.2, 0.1, 0.05),
            "factor on the distance from the mean",
            _contrast,
        ),
        Corruption("jpeg", "ImageCompression", (25, 18, 15, 10, 7), "JPEG quality (lower is worse)", _jpeg),
        Corruption(
            "pixelate",
            "Downscale",
            (0.6, 0.5, 0.4, 0.3, 0.25),
            "shrink factor before enlarging back",
            _pixelate,
        ),
        Corruption(
            "occlusion",
            "CoarseDropout",
            (0.2, 0.3, 0.4, 0.5, 0.6),
            "side of one black square, as a fraction of the image's",
            _occlusion,
        ),
    )
}
DEFAULT_CORRUPTIONS = tuple(CORRUPTIONS)


def parse_corruptions(text: str | None) -> tuple[str, ...]:
    """``all`` (or empty) or a comma list of names from ``CORRUPTIONS``."""
    if not text or text.strip() == "all":
        return DEFAULT_CORRUPTIONS
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [n for n in names if n not in CORRUPTIONS]
    if unknown or not names:
        raise ConfigError(
            f"unknown corruptions {unknown or [text]}; expected 'all' or a comma list of {list(CORRUPTIONS)}",
            field="corruptions",
        )
    return tuple(dict.fromkeys(names))


def parse_severities(text: str | None) -> tuple[int, ...]:
    """A comma list of severities 1..5 (default: all five)."""
    if not text:
        return SEVERITIES
    try:
        values = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        values = ()
    if not values or any(v not in SEVERITIES for v in values):
        raise ConfigError(f"severities must be a comma list of 1..5, got {text!r}", field="severities")
    return values


def corruption_transform(name: str, severity: int, *, image_side: int = REFERENCE_SIDE):
    """The albumentations transform (applied with p=1) for one corruption at one severity."""
    if name not in CORRUPTIONS:
        raise ConfigError(
            f"unknown corruption {name!r}; expected one of {list(CORRUPTIONS)}", field="corruptions"
        )
    if severity not in SEVERITIES:
        raise ConfigError(f"severity must be one of {list(SEVERITIES)}, got {severity!r}", field="severities")
    corruption = CORRUPTIONS[name]
    return corruption.build(corruption.parameters[severity - 1], image_side / REFERENCE_SIDE)


def item_seed(seed: int, name: str, index: int) -> int:
    """The seed of one item's corruption: independent of which other items are corrupted, and
    the same at every severity (common random numbers: one noise pattern, hole position or blur
    angle per item, scaled by the severity, so severity curves compare like with like)."""
    entropy = [seed, zlib.crc32(name.encode()), index]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def corrupt(image: np.ndarray, name: str, severity: int, *, seed: int = 0, index: int = 0) -> np.ndarray:
    """One corrupted copy of a uint8 image (H, W) or (H, W, C), same shape and dtype."""
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise InputError(
            f"expected a uint8 image (H, W) or (H, W, C), got {array.dtype} {array.shape}", field="image"
        )
    transform = corruption_transform(name, severity, image_side=min(array.shape[:2]))
    transform.set_random_seed(item_seed(seed, name, index))
    out = transform(image=np.ascontiguousarray(array))["image"]
    return out.reshape(array.shape)


def corrupt_all(
    images: Sequence[np.ndarray],
    name: str,
    severity: int,
    *,
    seed: int = 0,
    indices: Sequence[int] | None = None,
) -> list[np.ndarray]:
    """``corrupt`` each image; ``indices`` are the items' ids in their data set (default 0..n-1)."""
    indices = range(len(images)) if indices is None else indices
    return [corrupt(image, name, severity, seed=seed, index=int(i)) for image, i in zip(images, indices)]


# --------------------------------------------------------------------------- the evaluation


@dataclass(frozen=True)
class _Thresholds:
    """The service's routing thresholds (``policies.thresholds.decide`` reads these)."""

    accept_threshold: float
    escalate_threshold: float
    empty_result: str = "review"


def routing_thresholds(calibration) -> tuple[Any, bool]:
    """The thresholds the service would run under ``thresholds_from_certificate`` (as
    router.config.certified_policy reads the artefact), and whether a stronger tier exists:
    the three-tier plan when there is one, else accept at the certified threshold and review
    the rest (an infeasible certificate accepts nothing)."""
    if calibration.plan is not None:
        return calibration.plan, True
    threshold = calibration.certificate.threshold
    accept = float("inf") if threshold is None else float(threshold)
    return _Thresholds(accept, accept), False


def _bound_check(n_accepted: int, n_errors: int, alpha: float, delta: float) -> dict[str, Any]:
    """Is the observed accepted error significantly above alpha? One-sided exact binomial test at
    level delta (as evals.harness.certified_risk_check does on clean held-out data)."""
    from policies.risk_control import binomial_p_value

    p_exceeds = 1.0 - binomial_p_value(n_errors - 1, n_accepted, alpha) if n_errors > 0 else 1.0
    return {"p_value_exceeds": float(p_exceeds), "violated": bool(p_exceeds <= delta)}


def guarantee_metrics(
    confidence: np.ndarray,
    cheap_error: np.ndarray,
    threshold: float | None,
    *,
    shifted: np.ndarray | None,
    alpha: float,
    delta: float,
) -> dict[str, Any]:
    """The certified claim: among items auto-accepted from the cheap tier (calibrated score >=
    the certificate's threshold, and not flagged by the guard), at most alpha are wrong."""
    accepted = np.zeros(len(confidence), bool) if threshold is None else confidence >= threshold
    if shifted is not None:
        accepted &= ~shifted
    n_accepted, n_errors = int(accepted.sum()), int(cheap_error[accepted].sum())
    return {
        "coverage": n_accepted / len(confidence) if len(confidence) else 0.0,
        "accepted_error": n_errors / n_accepted if n_accepted else 0.0,
        "n_accepted": n_accepted,
        "n_errors": n_errors,
        **_bound_check(n_accepted, n_errors, alpha, delta),
    }


def routing_metrics(
    confidence: np.ndarray,
    cheap_error: np.ndarray,
    strong_error: np.ndarray | None,
    thresholds,
    *,
    shifted: np.ndarray | None,
    costs,
) -> dict[str, Any]:
    """What the service would do: ``policies.thresholds.decide`` (its one rule) under the
    certified thresholds, then the shift guard (``guarded_decision``) when ``shifted`` is given."""
    from policies.shift_guard import guarded_decision
    from policies.thresholds import decide
    from visionroute.records import Decision

    vlm = strong_error is not None
    decisions = [decide(float(c), thresholds, vlm_available=vlm, is_calibrated=True)[0] for c in confidence]
    if shifted is not None:
        decisions = [guarded_decision(d, bool(s), vlm_available=vlm) for d, s in zip(decisions, shifted)]
    decision = np.array([d.value for d in decisions])
    masks = {d.value: decision == d.value for d in (Decision.ACCEPT, Decision.ESCALATE, Decision.REVIEW)}
    rates = {k: float(v.mean()) if len(decision) else 0.0 for k, v in masks.items()}
    # Errors among all automatic answers: the cheap accepts plus the strong tier's answers to
    # escalations (a human reviewer is taken to be right).
    auto = masks["accept"] | masks["escalate"] if vlm else masks["accept"]
    n_errors = int(cheap_error[masks["accept"]].sum() + (strong_error[masks["escalate"]].sum() if vlm else 0))
    cost = costs.cheap + costs.escalate * rates["escalate"] + costs.review * rates["review"]
    return {
        "rates": rates,
        "cost_per_1000": 1000.0 * cost,
        "auto_error": n_errors / int(auto.sum()) if auto.any() else 0.0,
    }


def condition_metrics(
    cheap_probabilities: np.ndarray,
    strong_probabilities: np.ndarray | None,
    labels: np.ndarray,
    calibration,
    *,
    flags: dict[str, np.ndarray],
    costs,
    alpha: float,
    delta: float,
) -> dict[str, Any]:
    """Every figure of one (corruption, severity) condition on its held-out items, without the
    shift guard and with it (``flags`` from ``ShiftGuard.flags``)."""
    from evals.metrics import expected_calibration_error

    rows = np.arange(len(labels))
    prediction = cheap_probabilities.argmax(axis=1)
    confidence = calibration.calibrator.calibrate_probabilities(cheap_probabilities)[rows, prediction]
    cheap_error = prediction != labels
    strong_error = None if strong_probabilities is None else strong_probabilities.argmax(axis=1) != labels
    thresholds, _ = routing_thresholds(calibration)
    out = {
        "n": int(len(labels)),
        "accuracy": float(1.0 - cheap_error.mean()),
        "strong_accuracy": None if strong_error is None else float(1.0 - strong_error.mean()),
        "ece": expected_calibration_error(confidence, ~cheap_error),
        "mean_confidence": float(confidence.mean()),
        "guard_fired": {rule: float(np.mean(flag)) for rule, flag in flags.items()},
    }
    # "guard_request": the per-request rule alone, to show what the window rule adds
    for mode, shifted in (
        ("no_guard", None),
        ("guard_request", flags["request"]),
        ("guard", flags["shifted"]),
    ):
        out[mode] = {
            **guarantee_metrics(
                confidence,
                cheap_error,
                calibration.certificate.threshold,
                shifted=shifted,
                alpha=alpha,
                delta=delta,
            ),
            "routing": routing_metrics(
                confidence, cheap_error, strong_error, thresholds, shifted=shifted, costs=costs
            ),
        }
    return out


def evaluate_corruptions(
    image_set,
    *,
    corruptions: Sequence[str] = DEFAULT_CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    seed: int = 0,
    calibration_fraction: float = 0.5,
    method: str = "temperature",
    alpha: float = 0.05,
    delta: float = 0.1,
    costs=None,
    p_value: str = "binomial",
    false_alarm_rate: float = 0.01,
    guard_window: int = 50,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], Any]:
    """Calibrate on the clean data, then measure every corruption and severity on held-out items.

    Returns ``(result, context)``: ``result`` is the report's ``robustness`` section (JSON-ready);
    ``context`` has the clean ``TierData``, the ``Calibration`` (its calibrator carrying the
    input reference) and the held-out rows, for the clean report (``evals.harness.evaluate``).
    """
    from evals.harness import Calibration, calibrate
    from policies.certify import split_indices
    from policies.risk_control import TierCosts
    from policies.shift_guard import InputReference, ShiftGuard, attach_reference, statistics_matrix

    corruptions = tuple(corruptions)
    for name in corruptions:
        corruption_transform(name, SEVERITIES[0])  # unknown names fail before any work
    severities = tuple(severities)
    for severity in severities:
        corruption_transform(corruptions[0] if corruptions else "jpeg", severity)
    costs = costs or TierCosts()
    say = progress or (lambda _: None)

    clean = image_set.tier_data()
    splits = split_indices(len(clean), seed=seed, calibration_fraction=calibration_fraction)
    calibration = calibrate(
        clean,
        splits.fit,
        splits.certify,
        method=method,
        alpha=alpha,
        delta=delta,
        costs=costs,
        p_value=p_value,
    )
    images = image_set.images
    reference = InputReference.from_images(
        [images[i] for i in splits.fit],
        [images[i] for i in splits.certify],
        source=f"{image_set.name}: {len(splits.fit)} fit + {len(splits.certify)} certify calibration images",
    )
    guard = ShiftGuard(reference, false_alarm_rate=false_alarm_rate, window=guard_window)
    certificate = {
        **calibration.calibrator.certificate,
        "split": {
            "dataset_sha256": clean.sha256,
            "seed": seed,
            "calibration_fraction": calibration_fraction,
            "n_fit": len(splits.fit),
            "n_certify": len(splits.certify),
        },
    }
    calibrator = attach_reference(calibration.calibrator.with_certificate(certificate), reference)
    calibration = Calibration(calibrator, calibration.certificate, calibration.plan)
    thresholds, has_strong = routing_thresholds(calibration)
    test = splits.test
    labels = clean.labels[test]

    def measure(cheap, strong, test_images) -> dict[str, Any]:
        # the held-out items as one stream, the guard's window in steady state under this condition
        flags = guard.flags(statistics_matrix(test_images), steady=True, stride=max(1, guard_window // 10))
        return condition_metrics(
            cheap, strong, labels, calibration, flags=flags, costs=costs, alpha=alpha, delta=delta
        )

    strong_clean = None if clean.strong_probabilities is None else clean.strong_probabilities[test]
    rows = [
        {"corruption": "clean", "severity": 0}
        | measure(clean.cheap_probabilities[test], strong_clean, [images[i] for i in test])
    ]
    for name in corruptions:
        for severity in severities:
            say(f"{name} severity {severity}")
            corrupted = corrupt_all([images[i] for i in test], name, severity, seed=seed, indices=test)
            cheap, strong = image_set.predict(corrupted)
            rows.append({"corruption": name, "severity": severity} | measure(cheap, strong, corrupted))
    result = {
        "dataset": image_set.name,
        "n_test": int(len(test)),
        "seed": seed,
        "alpha": alpha,
        "delta": delta,
        "certificate_threshold": calibration.certificate.threshold,
        "routing": "three-tier plan (accept / escalate to the strong tier / review)"
        if has_strong
        else "accept at the certified threshold, else review (no stronger tier)",
        "thresholds": {
            "accept": float(thresholds.accept_threshold),
            "escalate": float(thresholds.escalate_threshold),
        },
        "guard": {
            "false_alarm_rate": false_alarm_rate,
            "window": guard_window,
            "features": list(guard.features),
            "n_reference_fit": reference.n_fit,
            "n_reference_holdout": len(reference.holdout),
        },
        "costs": costs.model_dump(),
        "corruptions": {
            name: {
                "transform": f"albumentations.{CORRUPTIONS[name].transform}",
                "parameters": [list(p) if isinstance(p, tuple) else p for p in CORRUPTIONS[name].parameters],
                "meaning": CORRUPTIONS[name].meaning,
            }
            for name in corruptions
        },
        "rows": rows,
        "bound_breaks": bound_breaks(rows, alpha),
    }
    context = {"clean": clean, "calibration": calibration, "test_rows": test}
    return result, context


def bound_breaks(rows: Sequence[dict[str, Any]], alpha: float) -> dict[str, dict[str, Any]]:
    """Per corruption: the first severity whose accepted error exceeds alpha, and the first where
    it does so significantly (the binomial test at delta), without and with the guard."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        entry = out.setdefault(
            row["corruption"],
            {f"{k}_{g}": None for k in ("above_alpha", "violated") for g in ("no_guard", "guard")},
        )
        for mode in ("no_guard", "guard"):
            if entry[f"above_alpha_{mode}"] is None and row[mode]["accepted_error"] > alpha:
                entry[f"above_alpha_{mode}"] = row["severity"]
            if entry[f"violated_{mode}"] is None and row[mode]["violated"]:
                entry[f"violated_{mode}"] = row["severity"]
    return out


# --------------------------------------------------------------------------- plots

GUARD_MODES = {"no_guard": "no guard", "guard_request": "per-request rule", "guard": "shift guard"}


def robustness_plots(result: dict[str, Any], out_dir) -> dict[str, str]:
    """The PNG figures of a ``robustness`` section: metrics per severity, the guarantee with and
    without the shift guard against alpha, and the routing shares."""
    from pathlib import Path

    from evals.plots import guarantee_under_shift, routing_shares, severity_curves

    out_dir = Path(out_dir)
    rows = result["rows"]
    clean = next(r for r in rows if r["corruption"] == "clean")
    names = [n for n in dict.fromkeys(r["corruption"] for r in rows) if n != "clean"]

    def series(name: str) -> list[dict[str, Any]]:
        return [clean] + [r for r in rows if r["corruption"] == name]

    def line(name: str, get) -> tuple[list[int], list[float]]:
        chosen = series(name)
        return [r["severity"] for r in chosen], [get(r) for r in chosen]

    title = f"{result['dataset']}: {result['n_test']} held-out items"
    metrics = {
        "accuracy (cheap tier)": lambda r: r["accuracy"],
        "ECE (calibrated cheap tier)": lambda r: r["ece"],
        "coverage (share auto-accepted)": lambda r: r["no_guard"]["coverage"],
        "cost per 1000 items (no guard)": lambda r: r["no_guard"]["routing"]["cost_per_1000"],
    }
    plots = {
        "robustness_metrics": severity_curves(
            out_dir / "robustness_metrics.png",
            {panel: {name: line(name, get) for name in names} for panel, get in metrics.items()},
            title=title,
        )
    }
    modes = [m for m in GUARD_MODES if m != "guard_request" or result["guard"]["window"]]
    plots["robustness_guarantee"] = guarantee_under_shift(
        out_dir / "robustness_guarantee.png",
        {
            name: {
                GUARD_MODES[mode]: (
                    [r["severity"] for r in series(name)],
                    [r[mode]["accepted_error"] for r in series(name)],
                    [r[mode]["violated"] for r in series(name)],
                )
                for mode in modes
            }
            for name in names
        },
        alpha=result["alpha"],
        title=f"{title}: error among auto-accepted items",
    )
    plots["robustness_routing"] = routing_shares(
        out_dir / "robustness_routing.png",
        {
            name: {
                "severities": [r["severity"] for r in series(name)],
                **{
                    d: [r["no_guard"]["routing"]["rates"][d] for r in series(name)]
                    for d in ("accept", "escalate", "review")
                },
                "accept_guard": [r["guard"]["routing"]["rates"]["accept"] for r in series(name)],
            }
            for name in names
        },
        title=f"{title}: routing without the guard (bars) and accepted with it (line)",
    )
    return {name: str(path) for name, path in plots.items()}
