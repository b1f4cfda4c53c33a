"""Calibrate, certify and evaluate a two-tier classifier cascade on labelled data.

The data is split once (seeded) into three disjoint parts:
- ``fit``: fits the calibrator and fixes the candidate threshold grid and its order;
- ``certify``: the Learn-then-Test p-values (independent of ``fit``, as the guarantee needs);
- ``test``: held out for every number in the report.
Works on any ``TierData``: the digits tiers (``digits_tier_data``) or a user's own model
outputs (``evals.datasets``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cascades.calibration import Calibrator, arrays_sha256, fit_classifier
from evals.frontier import cascade_frontier
from evals.metrics import Accuracy, CalibrationError, PerClassPRF, RiskCoverage, TopKAccuracy
from evals.slicing import MetricSuite, bucket
from policies.certify import certify_split
from policies.risk_control import (
    RiskCertificate,
    TierCosts,
    TierOutcomes,
    TierPlan,
    binomial_p_value,
    choose_tier_thresholds,
)


@dataclass(frozen=True)
class TierData:
    """Class probabilities of both tiers on the same labelled items, plus per-item metadata."""

    cheap_probabilities: np.ndarray  # (n, C)
    strong_probabilities: np.ndarray | None  # (n, C); None when there is only one tier
    labels: np.ndarray  # (n,)
    class_names: tuple[str, ...]
    metadata: list[dict[str, Any]] = field(default_factory=list)
    name: str = "dataset"
    models: dict[str, dict[str, str]] = field(default_factory=dict)  # tier -> {"name", "sha256"}

    def subset(self, rows: np.ndarray) -> TierData:
        meta = [self.metadata[i] for i in rows] if self.metadata else []
        strong = None if self.strong_probabilities is None else self.strong_probabilities[rows]
        return TierData(
            self.cheap_probabilities[rows],
            strong,
            self.labels[rows],
            self.class_names,
            meta,
            self.name,
            self.models,
        )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def sha256(self) -> str:
        arrays = [self.cheap_probabilities, self.labels]
        if self.strong_probabilities is not None:
            arrays.append(self.strong_probabilities)
        return arrays_sha256(*(np.asarray(a, np.float32) for a in arrays))

    @classmethod
    def from_npz(cls, path: Path) -> TierData:
        """``probabilities`` (n, C), ``labels`` (n,) class indices; optional
        ``strong_probabilities`` (n, C) and ``class_names`` (C,)."""
        from visionroute.errors import InputError

        with np.load(path, allow_pickle=False) as npz:
            missing = {"probabilities", "labels"} - set(npz.files)
            if missing:
                raise InputError(
                    f"{path} lacks arrays {sorted(missing)}; it has {npz.files}", field="predictions"
                )
            probabilities = npz["probabilities"].astype(np.float64)
            names = (
                tuple(str(n) for n in npz["class_names"])
                if "class_names" in npz.files
                else tuple(map(str, range(probabilities.shape[1])))
            )
            strong = (
                npz["strong_probabilities"].astype(np.float64)
                if "strong_probabilities" in npz.files
                else None
            )
            return cls(probabilities, strong, npz["labels"].astype(np.int64), names, [], Path(path).stem)


STRONG_SCORE = "the strong tier's top-1 probability (uncalibrated)"  # what vlm_accept_threshold compares


@dataclass(frozen=True)
class Calibration:
    calibrator: Calibrator  # with the certificate attached
    certificate: RiskCertificate  # accept vs not, on the cheap tier alone
    plan: TierPlan | None  # three tiers: accept / escalate to the strong tier / review; None with one tier


def calibrate(
    data: TierData,
    fit_rows: np.ndarray,
    certify_rows: np.ndarray,
    *,
    method: str = "temperature",
    alpha: float = 0.05,
    delta: float = 0.1,
    costs: TierCosts | None = None,
    p_value: str = "binomial",
) -> Calibration:
    """Fit the cheap tier's calibrator on ``fit_rows``, certify thresholds on ``certify_rows``."""
    costs = costs or TierCosts()
    calibrator = fit_classifier(
        method,
        data.cheap_probabilities[fit_rows],
        data.labels[fit_rows],
        data.class_names,
        model=data.models.get("cheap"),
    )
    calibrated = calibrator.calibrate_probabilities(data.cheap_probabilities)
    prediction = data.cheap_probabilities.argmax(axis=1)
    confidence = calibrated[np.arange(len(data)), prediction]
    cheap_error = prediction != data.labels

    # The fit rows also place the sequence's start where the test is likely to pass
    # (policies.certify): the certify rows stay untouched until the test itself.
    certification = certify_split(
        confidence[fit_rows],
        cheap_error[fit_rows],
        confidence[certify_rows],
        cheap_error[certify_rows],
        alpha=alpha,
        delta=delta,
        p_value=p_value,
    )
    certificate = certification.certificate
    document = {
        **certificate.to_dict(),
        "certify_method": certification.method,
        "created_at": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        "certify_data_sha256": arrays_sha256(
            confidence[certify_rows].astype(np.float32), cheap_error[certify_rows]
        ),
    }
    plan = None
    if data.strong_probabilities is not None:
        strong_prediction = data.strong_probabilities.argmax(axis=1)
        strong_error = strong_prediction != data.labels
        # With the strong tier's score the plan also certifies its accept threshold (low-confidence
        # strong answers go to a human). Its top-1 probability as the tier reports it: the
        # certificate needs only a score fixed before the certify rows, and eval replays this one.
        strong_score = data.strong_probabilities[np.arange(len(data)), strong_prediction]
        outcomes = TierOutcomes(confidence, cheap_error, strong_error, strong_score)
        plan = choose_tier_thresholds(
            outcomes.subset(fit_rows),
            outcomes.subset(certify_rows),
            costs=costs,
            alpha=alpha,
            delta=delta,
            p_value=p_value,
        )
        document["three_tier"] = plan.to_dict() | {
            "costs": costs.model_dump(),
            "strong_score": STRONG_SCORE,
        }
    return Calibration(calibrator.with_certificate(document), certificate, plan)


def _ink_bucket(image: np.ndarray) -> str:
    return bucket(float(image.mean()), [0.28, 0.34], ["light", "medium", "heavy"])


def digits_tier_data(seed: int = 0, models_dir: Path | None = None) -> TierData:
    """Both digits tiers run through ONNX on the pool (items never used in training)."""
    from scipy.special import softmax

    from cascades.digits import CLASS_NAMES, load_split, prepare_tiers, tier_logits
    from cascades.onnx_runner import file_sha256

    paths = prepare_tiers(models_dir, seed=seed)
    split = load_split(seed)
    logits = tier_logits(paths, split.images_pool)
    metadata = [
        {"ink": _ink_bucket(image), "digit": str(int(label)), "source": "sklearn-digits"}
        for image, label in zip(split.images_pool, split.labels_pool)
    ]
    models = {tier: {"name": path.stem, "sha256": file_sha256(path)} for tier, path in paths.items()}
    return TierData(
        softmax(logits["cheap"], axis=1),
        softmax(logits["strong"], axis=1),
        split.labels_pool,
        CLASS_NAMES,
        metadata,
        f"digits(seed={seed})",
        models,
    )


# --------------------------------------------------------------------------- evaluation


def _suite(class_names: Sequence[str], slice_keys: Sequence[str]) -> MetricSuite:
    return MetricSuite(
        {
            "accuracy": Accuracy,
            "top2": lambda: TopKAccuracy(2),
            "per_class": lambda: PerClassPRF(class_names),
            "calibration": CalibrationError,
            "risk_coverage": RiskCoverage,
        },
        slice_keys,
    )


def certified_risk_check(
    certificate: dict[str, Any], confidences: np.ndarray, is_error: np.ndarray
) -> dict[str, Any]:
    """Does held-out data contradict the certificate? Violated when the observed accepted error
    is significantly above alpha: exact one-sided binomial test at level delta."""
    threshold = certificate.get("threshold")
    alpha, delta = float(certificate["alpha"]), float(certificate["delta"])
    if threshold is None:
        return {
            "alpha": alpha,
            "delta": delta,
            "n_accepted": 0,
            "n_errors": 0,
            "accepted_error": 0.0,
            "coverage": 0.0,
            "p_value_exceeds": 1.0,
            "violated": False,
        }
    accepted = confidences >= float(threshold)
    n_acc, n_err = int(accepted.sum()), int(is_error[accepted].sum())
    # P(Binomial(n, alpha) >= n_err): small when this many errors are unlikely under risk <= alpha
    p_exceeds = 1.0 - binomial_p_value(n_err - 1, n_acc, alpha) if n_err > 0 else 1.0
    return {
        "alpha": alpha,
        "delta": delta,
        "n_accepted": n_acc,
        "n_errors": n_err,
        "accepted_error": n_err / n_acc if n_acc else 0.0,
        "coverage": n_acc / len(confidences) if len(confidences) else 0.0,
        "p_value_exceeds": p_exceeds,
        "violated": bool(p_exceeds <= delta),
    }


def evaluate(
    data: TierData,
    calibration: Calibration,
    test_rows: np.ndarray,
    *,
    out_dir: Path,
    costs: TierCosts | None = None,
    slice_keys: Sequence[str] = (),
) -> dict[str, Any]:
    """Every number and plot of the report, on ``test_rows`` only."""
    costs = costs or TierCosts()
    test = data.subset(test_rows)
    out_dir = Path(out_dir)
    calibrator = calibration.calibrator
    calibrated = calibrator.calibrate_probabilities(test.cheap_probabilities)
    rows = np.arange(len(test))
    cheap_pred = test.cheap_probabilities.argmax(axis=1)
    cheap_error = cheap_pred != test.labels
    cal_conf = calibrated[rows, cheap_pred]

    suites = {
        "cheap_raw": (cheap_pred, test.cheap_probabilities, test.cheap_probabilities[rows, cheap_pred]),
        "cheap_calibrated": (cheap_pred, calibrated, cal_conf),
    }
    if test.strong_probabilities is not None:
        strong_pred = test.strong_probabilities.argmax(axis=1)
        suites["strong"] = (
            strong_pred,
            test.strong_probabilities,
            test.strong_probabilities[rows, strong_pred],
        )
    metrics: dict[str, Any] = {}
    plots: dict[str, str] = {}
    metadata = test.metadata or None
    keys = slice_keys if metadata else ()
    for name, (pred, probs, conf) in suites.items():
        suite = _suite(test.class_names, keys)
        suite.update(
            metadata=metadata,
            predictions=pred,
            targets=test.labels,
            probabilities=probs,
            confidences=conf,
            correct=pred == test.labels,
        )
        metrics[name] = suite.compute()
        if name != "strong":
            path = out_dir / f"reliability_{name}.png"
            plots[f"reliability_{name}"] = str(
                suite.metric("calibration").plot(path, title=f"{data.name}: {name}")
            )
        if name == "cheap_calibrated":
            path = out_dir / "risk_coverage.png"
            plots["risk_coverage"] = str(
                suite.metric("risk_coverage").plot(path, title=f"{data.name}: cheap tier")
            )

    cert = calibrator.certificate or {}
    report: dict[str, Any] = {
        "dataset": {
            "name": data.name,
            "sha256": data.sha256,
            "n_test": len(test),
            "class_names": list(test.class_names),
        },
        "models": data.models,
        "calibration": {
            "artifact_id": calibrator.artifact_id,
            "method": calibrator.method,
            "temperature": calibrator.artifact.temperature,
        },
        "certificate": cert,
        "certified_risk_check": {
            "accept_threshold": certified_risk_check(cert, cal_conf, cheap_error) if cert else None
        },
        "metrics": metrics,
        "plots": plots,
    }
    plan = calibration.plan
    if test.strong_probabilities is None or plan is None:
        return report

    # The cascade under the certified three-tier plan: what users would get (review = human, right).
    # An escalated item's strong answer is accepted as the plan decides (``decide_vlm``: every
    # answer for a plan without a strong-tier threshold); otherwise a human sees it too.
    decision = np.array([plan.decide(c) for c in cal_conf])
    escalated = decision == "escalate"
    strong_conf = test.strong_probabilities[rows, strong_pred]
    strong_accepted = escalated & np.array([plan.decide_vlm(s) == "accept" for s in strong_conf], bool)
    cheap_accepted = decision == "accept"
    cascade_pred = np.where(cheap_accepted, cheap_pred, np.where(strong_accepted, strong_pred, test.labels))
    cascade_suite = MetricSuite({"accuracy": Accuracy}, keys)
    cascade_suite.update(metadata=metadata, predictions=cascade_pred, targets=test.labels)
    metrics["cascade"] = cascade_suite.compute()
    auto = cheap_accepted | strong_accepted
    reviewed = ~auto  # every item a human sees, escalated or not
    report["certified_risk_check"]["three_tier"] = {
        "rates": {
            "accept": float(cheap_accepted.mean()),
            "escalate": float(escalated.mean()),
            "review": float(reviewed.mean()),
            "vlm_accept": float(strong_accepted.mean()),
        },
        "vlm_accept_threshold": plan.to_dict()["vlm_accept_threshold"],  # JSON-safe: "-inf", "inf"
        "auto_accepted_error": float((cascade_pred[auto] != test.labels[auto]).mean()) if auto.any() else 0.0,
        "cost_units_per_item": float(
            costs.cheap + costs.escalate * escalated.mean() + costs.review * reviewed.mean()
        ),
    }
    frontier = cascade_frontier(
        cheap_pred, cal_conf, strong_pred, test.labels, cheap_cost=costs.cheap, strong_cost=costs.escalate
    )
    plots["frontier"] = str(frontier.plot(out_dir / "frontier.png", title=f"{data.name}: cost-accuracy"))
    report["frontier"] = frontier.summary(0.99)
    return report


# --------------------------------------------------------------------------- the learned router's data


def router_data_from_npz(path: Path):
    """``cascades.router_calibration.RouterData`` from an NPZ: ``TierData.from_npz``'s arrays
    (``probabilities``, ``labels``, optional ``class_names``), the VLM's answers as either
    ``strong_answers`` (n,) class ids (-1: no answer) with ``strong_scores`` (n,) confidences
    (NaN: no answer), or ``strong_probabilities`` (n, C) (answer: the arg max, score: its
    probability), and optionally ``images`` (n, H, W) or (n, H, W, 3) uint8, the uploads (for
    the input and neighbour features)."""
    from cascades.router_calibration import RouterData
    from visionroute.errors import ConfigError

    data = TierData.from_npz(Path(path))
    with np.load(path, allow_pickle=False) as npz:
        files = set(npz.files)
        if {"strong_answers", "strong_scores"} <= files:
            answers = npz["strong_answers"].astype(np.int64)
            scores = npz["strong_scores"].astype(np.float64)
            score_name = "strong_scores (the VLM's confidence as given)"
        elif data.strong_probabilities is not None:
            answers = data.strong_probabilities.argmax(axis=1)
            scores = data.strong_probabilities[np.arange(len(data)), answers]
            score_name = STRONG_SCORE
        else:
            raise ConfigError(
                f"{path}: the three-tier plan needs the VLM's answers: strong_answers + strong_scores, or "
                f"strong_probabilities; it has {sorted(files)}",
                field="predictions.strong_answers",
            )
        images = None
        if "images" in files:
            images = npz["images"]
            if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] != 3):
                raise ConfigError(
                    f"{path}: images must have shape (n, H, W) or (n, H, W, 3), got {images.shape}",
                    field="predictions.images",
                )
            if images.dtype != np.uint8:
                raise ConfigError(
                    f"{path}: images must be uint8 pixels as uploaded, got {images.dtype}",
                    field="predictions.images",
                )
    try:
        return RouterData(
            data.class_names,
            data.cheap_probabilities,
            data.labels,
            answers,
            scores,
            None if images is None else list(images),
            data.name,
            score_name,
        )
    except ConfigError as exc:  # an array of the file: name it as the file's
        raise ConfigError(f"{path}: {exc.reason}", field=f"predictions.{exc.field}") from None


def digits_router_data(seed: int = 0):
    """The digits tiers (``digits_tier_data``; the digits CNN stands in for the VLM, its top-1
    probability as its confidence) with the images a client uploads (28x28 RGB renders)."""
    from cascades.digits import load_split
    from cascades.router_calibration import RouterData
    from examples.digits import rendered

    data = digits_tier_data(seed)
    answers = data.strong_probabilities.argmax(axis=1)
    return RouterData(
        data.class_names,
        data.cheap_probabilities,
        data.labels,
        answers,
        data.strong_probabilities[np.arange(len(data)), answers],
        rendered(load_split(seed).images_pool),
        data.name,
        STRONG_SCORE,
    )
