"""The cheap tier's calibration, refitted from production labels weighted by inclusion probability.

A recalibration job (router/services/recalibration.py) certifies thresholds on the cheap tier's
calibrated score as the traces record it. This module answers the other half of the question:
is that score still a probability? It refits ``P(answer right | score)`` on the same production
sample (``policies.production_certify.ProductionSample``) and measures both maps.

**Weights.** The labelled items are not a sample of traffic: every escalation is reviewed
(inclusion probability 1) and only a fraction ``f`` of the accepts is audited. Weighting each
labelled item by ``1 / inclusion_probability`` (Horvitz-Thompson) makes the weighted sample stand
for all the traffic the queue saw, so the refit and its reliability figures are about production,
not about what reviewers happened to see. Items whose cheap answer has no label (non-response:
an expired audit, a flagged reviewer's label, a VLM-judged escalation) are left out of the fit
and counted: a calibration fit, unlike the certificate, has no conservative side to put them on.

**The map.** Weighted isotonic regression of "right" on the score (monotone, in [0, 1]), kept as
its breakpoints and read by linear interpolation. Monotone means it orders items as the score
does, so the certified thresholds accept exactly the same items under either; the artefact
states what each threshold means as a probability under the refit (``p_correct_at``).

**Reliability.** Weighted expected calibration error (10 equal-width bins of the predicted
probability) and weighted Brier score, for the incumbent's score read as a probability and for
the refit. The refit's figures are cross-fitted (two folds: each half predicted by the map
fitted on the other), so they are not flattered by fitting and scoring the same labels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from policies.production_certify import ProductionSample

MIN_LABELS = 20  # below this a refit says more about noise than about the tier
BINS = 10
METHOD = "isotonic, weighted by 1 / inclusion probability (Horvitz-Thompson)"


@dataclass(frozen=True)
class CalibrationRefit:
    """``P(right | score)`` refitted on production labels, and how well each map calibrates."""

    scores: tuple[float, ...]  # breakpoints of the map, increasing
    p_correct: tuple[float, ...]  # the map's value at each breakpoint
    labelled: int  # items whose cheap answer has a label (the fit's rows)
    left_out_unlabelled: int  # sampled items without one (non-response; not in the fit)
    weighted_n: float  # sum of 1 / inclusion probability: the traffic the labels stand for
    ece_incumbent: float
    ece_refit: float  # cross-fitted
    brier_incumbent: float
    brier_refit: float  # cross-fitted
    method: str = METHOD

    def predict(self, score: Any) -> np.ndarray:
        return np.interp(np.asarray(score, np.float64), self.scores, self.p_correct)

    def p_correct_at(self, threshold: float) -> float:
        return float(self.predict(threshold))

    def statement(self) -> str:
        return (
            f"calibrator refit on {self.labelled} production labels ({self.method}; "
            f"{self.left_out_unlabelled} sampled items without a label left out): weighted ECE of the "
            f"incumbent's score {self.ece_incumbent:.3f}, of the refit {self.ece_refit:.3f} (cross-fitted); "
            f"Brier {self.brier_incumbent:.3f} -> {self.brier_refit:.3f}"
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["scores"], out["p_correct"] = list(self.scores), list(self.p_correct)
        return out


def _fit(score: np.ndarray, right: np.ndarray, weight: np.ndarray):
    from sklearn.isotonic import IsotonicRegression

    model = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
    return model.fit(score, right, sample_weight=weight)


def weighted_ece(predicted: np.ndarray, right: np.ndarray, weight: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error with each item weighted (equal-width bins of ``predicted``)."""
    which = np.minimum((np.clip(predicted, 0.0, 1.0) * bins).astype(int), bins - 1)
    total, error = weight.sum(), 0.0
    for b in np.unique(which):
        mask = which == b
        w = weight[mask]
        error += abs(float(np.dot(w, right[mask]) - np.dot(w, predicted[mask]))) / total
    return error


def weighted_brier(predicted: np.ndarray, right: np.ndarray, weight: np.ndarray) -> float:
    return float(np.dot(weight, (predicted - right) ** 2) / weight.sum())


def refit_calibration(sample: ProductionSample, *, seed: int = 0) -> CalibrationRefit | None:
    """The refit (see the module docstring), or None when fewer than ``MIN_LABELS`` items of the
    sample have a label on the cheap tier's answer."""
    labelled = ~np.isnan(sample.cheap_error)
    n = int(labelled.sum())
    if n < MIN_LABELS:
        return None
    score = sample.cheap_score[labelled]
    right = 1.0 - sample.cheap_error[labelled]
    weight = 1.0 / sample.inclusion_probability[labelled]
    fitted = _fit(score, right, weight)
    crossfit = np.empty(n)
    fold = np.random.default_rng(seed).permutation(n) % 2 == 0
    for held_out in (fold, ~fold):
        crossfit[held_out] = _fit(score[~held_out], right[~held_out], weight[~held_out]).predict(
            score[held_out]
        )
    incumbent = np.clip(score, 0.0, 1.0)  # the calibrated score read as P(right)
    return CalibrationRefit(
        scores=tuple(float(x) for x in fitted.X_thresholds_),
        p_correct=tuple(float(y) for y in fitted.y_thresholds_),
        labelled=n,
        left_out_unlabelled=len(sample) - n,
        weighted_n=float(weight.sum()),
        ece_incumbent=weighted_ece(incumbent, right, weight),
        ece_refit=weighted_ece(crossfit, right, weight),
        brier_incumbent=weighted_brier(incumbent, right, weight),
        brier_refit=weighted_brier(crossfit, right, weight),
    )
