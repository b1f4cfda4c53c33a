"""Classification and selective-prediction metrics with ``update / compute / reset``.

Each metric accumulates numpy arrays across ``update`` calls and computes once (the shape of
supervision's metrics/core.py). Counting is done with scikit-learn where it has the metric;
``MetricSuite`` (evals.slicing) feeds the same batch to many metrics and slices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np


class Metric(Protocol):
    name: str

    def update(self, **batch: Any) -> None: ...

    def compute(self) -> dict[str, Any]: ...

    def reset(self) -> None: ...


class _Accumulator:
    """Keeps the arrays named in ``fields`` from every update; ``_concat(name)`` joins them."""

    fields: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._parts: dict[str, list[np.ndarray]] = {f: [] for f in self.fields}

    def _add(self, **arrays: Any) -> None:
        lengths = {name: len(np.asarray(value)) for name, value in arrays.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"{type(self).__name__}.update got arrays of different lengths: {lengths}")
        for name, value in arrays.items():
            self._parts[name].append(np.asarray(value))

    def _concat(self, name: str) -> np.ndarray:
        parts = self._parts[name]
        return np.concatenate(parts) if parts else np.zeros(0)

    @property
    def count(self) -> int:
        return int(sum(len(p) for p in self._parts[self.fields[0]]))


class Accuracy(_Accumulator):
    name = "accuracy"
    fields = ("predictions", "targets")

    def update(self, *, predictions: Any, targets: Any, **_: Any) -> None:
        self._add(predictions=predictions, targets=targets)

    def compute(self) -> dict[str, Any]:
        from sklearn.metrics import accuracy_score

        if self.count == 0:
            return {"accuracy": None, "n": 0}
        return {
            "accuracy": float(accuracy_score(self._concat("targets"), self._concat("predictions"))),
            "n": self.count,
        }


class TopKAccuracy(_Accumulator):
    fields = ("probabilities", "targets")

    def __init__(self, k: int = 5) -> None:
        self.k = k
        self.name = f"top{k}_accuracy"
        super().__init__()

    def update(self, *, probabilities: Any, targets: Any, **_: Any) -> None:
        self._add(probabilities=probabilities, targets=targets)

    def compute(self) -> dict[str, Any]:
        from sklearn.metrics import top_k_accuracy_score

        if self.count == 0:
            return {self.name: None}
        probabilities = self._concat("probabilities")
        labels = np.arange(probabilities.shape[1])
        if probabilities.shape[1] == 2:  # scikit-learn takes a binary task's scores as one column
            probabilities = probabilities[:, 1]
        value = top_k_accuracy_score(self._concat("targets"), probabilities, k=self.k, labels=labels)
        return {self.name: float(value)}


class PerClassPRF(_Accumulator):
    """Precision, recall and F1 per class, plus their macro averages."""

    name = "per_class"
    fields = ("predictions", "targets")

    def __init__(self, class_names: Sequence[str]) -> None:
        self.class_names = list(class_names)
        super().__init__()

    def update(self, *, predictions: Any, targets: Any, **_: Any) -> None:
        self._add(predictions=predictions, targets=targets)

    def compute(self) -> dict[str, Any]:
        from sklearn.metrics import precision_recall_fscore_support

        if self.count == 0:
            return {"macro_f1": None, "per_class": {}}
        labels = np.arange(len(self.class_names))
        p, r, f, support = precision_recall_fscore_support(
            self._concat("targets"), self._concat("predictions"), labels=labels, zero_division=0
        )
        per_class = {
            name: {
                "precision": float(p[i]),
                "recall": float(r[i]),
                "f1": float(f[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(self.class_names)
        }
        present = support > 0  # macro over classes that occur, so a slice is not punished for absent ones
        return {
            "macro_precision": float(p[present].mean()) if present.any() else None,
            "macro_recall": float(r[present].mean()) if present.any() else None,
            "macro_f1": float(f[present].mean()) if present.any() else None,
            "per_class": per_class,
        }


def calibration_bins(confidences: np.ndarray, correct: np.ndarray, n_bins: int = 15):
    """Equal-width bins over [0, 1]: (count, mean confidence, accuracy) per bin."""
    confidences = np.clip(np.asarray(confidences, np.float64), 0.0, 1.0)
    correct = np.asarray(correct, np.float64)
    # bin i holds (i/n, (i+1)/n]; confidence 0 goes to the first bin
    index = np.clip(np.ceil(confidences * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    conf_sum = np.bincount(index, weights=confidences, minlength=n_bins)
    correct_sum = np.bincount(index, weights=correct, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return count, conf_sum / count, correct_sum / count


def expected_calibration_error(confidences: Any, correct: Any, n_bins: int = 15) -> float:
    """ECE (Naeini et al. 2015; Guo et al. 2017): sum over bins of |accuracy - confidence|,
    weighted by the fraction of items in the bin."""
    count, conf, acc = calibration_bins(confidences, correct, n_bins)
    filled = count > 0
    if not filled.any():
        return float("nan")
    return float(np.sum(count[filled] / count.sum() * np.abs(acc[filled] - conf[filled])))


class CalibrationError(_Accumulator):
    """ECE and MCE of top-1 confidences; ``plot(path)`` draws the reliability diagram."""

    name = "calibration"
    fields = ("confidences", "correct")

    def __init__(self, n_bins: int = 15) -> None:
        self.n_bins = n_bins
        super().__init__()

    def update(self, *, confidences: Any, correct: Any, **_: Any) -> None:
        self._add(confidences=confidences, correct=np.asarray(correct, bool))

    def compute(self) -> dict[str, Any]:
        if self.count == 0:
            return {"ece": None, "mce": None}
        count, conf, acc = calibration_bins(self._concat("confidences"), self._concat("correct"), self.n_bins)
        filled = count > 0
        gaps = np.abs(acc[filled] - conf[filled])
        return {
            "ece": float(np.sum(count[filled] / count.sum() * gaps)),
            "mce": float(gaps.max()),
            "mean_confidence": float(self._concat("confidences").mean()),
        }

    def plot(self, path, *, title: str = "Reliability diagram"):
        from evals.plots import reliability_diagram

        count, conf, acc = calibration_bins(self._concat("confidences"), self._concat("correct"), self.n_bins)
        summary = self.compute()
        return reliability_diagram(path, count, conf, acc, title=f"{title} (ECE {summary['ece']:.3f})")


def risk_coverage_curve(confidences: Any, correct: Any) -> tuple[np.ndarray, np.ndarray]:
    """Accept the k most confident items, k = 1..n: (coverage k/n, selective risk at k)."""
    confidences = np.asarray(confidences, np.float64)
    errors = ~np.asarray(correct, bool)
    order = np.argsort(-confidences, kind="stable")
    k = np.arange(1, len(order) + 1)
    return k / len(order), np.cumsum(errors[order]) / k


class RiskCoverage(_Accumulator):
    """Risk-coverage curve and its area (AURC; Geifman, Uziel and El-Yaniv, ICLR 2019).
    ``e_aurc`` subtracts the area an oracle ranking would get, leaving what the score costs."""

    name = "risk_coverage"
    fields = ("confidences", "correct")

    def update(self, *, confidences: Any, correct: Any, **_: Any) -> None:
        self._add(confidences=confidences, correct=np.asarray(correct, bool))

    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        return risk_coverage_curve(self._concat("confidences"), self._concat("correct"))

    def compute(self) -> dict[str, Any]:
        if self.count == 0:
            return {"aurc": None, "e_aurc": None}
        correct = self._concat("correct").astype(bool)
        _, risk = self.curve()
        _, oracle_risk = risk_coverage_curve(correct.astype(float), correct)  # right answers first
        return {"aurc": float(risk.mean()), "e_aurc": float(risk.mean() - oracle_risk.mean())}

    def plot(self, path, *, title: str = "Risk-coverage", others: dict | None = None):
        from evals.plots import risk_coverage_plot

        curves = {"model": self.curve(), **(others or {})}
        return risk_coverage_plot(path, curves, title=title)


# --------------------------------------------------------------------------- routing (RouteLLM)
#
# RouteLLM (Ong et al., ICLR 2025; lm-sys/RouteLLM routellm/evals/evaluate.py) measures a router
# between a weak and a strong model by sweeping its threshold: at each share x of calls to the
# strong model, the quality of all answers. With q_w and q_s the weak and strong models' own
# quality, PGR(x) = (q(x) - q_w) / (q_s - q_w) (performance gap recovered); APGR is the area
# under PGR over x in [0, 1] (their (AUC - AUC_weak) / (AUC_strong - AUC_weak)); CPT(p) is the
# least share of strong calls at which PGR reaches p. Here the weak model is the cheap tier, the
# strong one the VLM, and quality is accuracy over all items. The human tier is not on these
# curves (RouteLLM routes between two models; every answer is accepted on them): reviews enter
# the certified rows' cost and shares instead.


def routing_curve(router_score: Any, cheap_correct: Any, vlm_correct: Any) -> tuple[np.ndarray, np.ndarray]:
    """A router's two-model curve: the k items it trusts least (lowest ``router_score``, an
    estimate of P(cheap answer right)) go to the VLM, k = 0..n: (VLM call share k/n, accuracy)."""
    score = np.asarray(router_score, np.float64)
    cheap = np.asarray(cheap_correct, bool)
    vlm = np.asarray(vlm_correct, bool)
    if not (len(score) == len(cheap) == len(vlm)) or len(score) == 0:
        raise ValueError(f"need equal, non-empty lengths; got {len(score)}, {len(cheap)}, {len(vlm)}")
    gain = vlm.astype(float) - cheap.astype(float)
    order = np.argsort(score, kind="stable")
    n = len(score)
    accuracy = cheap.mean() + np.concatenate([[0.0], np.cumsum(gain[order])]) / n
    return np.arange(n + 1) / n, accuracy


def random_routing_curve(cheap_correct: Any, vlm_correct: Any) -> tuple[np.ndarray, np.ndarray]:
    """Random routing's expected curve: accuracy (1 - x) q_cheap + x q_vlm (no sampling noise)."""
    cheap, vlm = np.asarray(cheap_correct, bool), np.asarray(vlm_correct, bool)
    x = np.arange(len(cheap) + 1) / len(cheap)
    return x, (1 - x) * cheap.mean() + x * vlm.mean()


def oracle_routing_curve(cheap_correct: Any, vlm_correct: Any) -> tuple[np.ndarray, np.ndarray]:
    """RouteLLM's optimal router (``get_optimal_accuracy``): with a budget of x n VLM calls it
    spends them only where the cheap answer is wrong and the VLM's right: q_cheap + min(x, g)."""
    cheap, vlm = np.asarray(cheap_correct, bool), np.asarray(vlm_correct, bool)
    n = len(cheap)
    x = np.arange(n + 1) / n
    return x, cheap.mean() + np.minimum(x, float((~cheap & vlm).mean()))


def performance_gap_recovered(accuracy: Any, cheap_accuracy: float, vlm_accuracy: float) -> np.ndarray:
    """PGR: 0 at the cheap tier's accuracy, 1 at the VLM's (NaN when they are equal)."""
    gap = vlm_accuracy - cheap_accuracy
    if gap == 0:
        return np.full(np.shape(accuracy), np.nan)
    return (np.asarray(accuracy, np.float64) - cheap_accuracy) / gap


def apgr(call_share: Any, accuracy: Any, cheap_accuracy: float, vlm_accuracy: float) -> float:
    """Average PGR: the trapezoid area under PGR over the call shares (0 to 1), RouteLLM's APGR.
    Random routing scores 0.5; RouteLLM's optimal router 1 - g/2 when the cheap tier is never
    right where the VLM is wrong (g: the share the VLM alone gets right)."""
    x = np.asarray(call_share, np.float64)
    pgr = performance_gap_recovered(accuracy, cheap_accuracy, vlm_accuracy)
    width = x[-1] - x[0]
    return float(np.sum((pgr[1:] + pgr[:-1]) * np.diff(x)) / 2 / width) if width > 0 else math.nan


def calls_to_performance(
    call_share: Any, accuracy: Any, cheap_accuracy: float, vlm_accuracy: float, level: float
) -> float:
    """CPT(level): the least VLM call share at which PGR reaches ``level`` (linear between the
    curve's points; the first crossing, so a curve that dips later is not credited twice); NaN
    when it never does."""
    x = np.asarray(call_share, np.float64)
    pgr = performance_gap_recovered(accuracy, cheap_accuracy, vlm_accuracy)
    hit = np.flatnonzero(pgr >= level - 1e-12)
    if len(hit) == 0:
        return math.nan
    i = int(hit[0])
    if i == 0:
        return float(x[0])
    x0, x1, p0, p1 = x[i - 1], x[i], pgr[i - 1], pgr[i]
    return float(x0 + (x1 - x0) * (level - p0) / (p1 - p0))


CPT_LEVELS = (0.5, 0.8, 0.95)


class RoutingCurve(_Accumulator):
    """APGR and CPT(50%, 80%, 95%) of a router's score (``routing_curve``) on the items given."""

    name = "routing"
    fields = ("router_score", "cheap_correct", "vlm_correct")

    def update(self, *, router_score: Any, cheap_correct: Any, vlm_correct: Any, **_: Any) -> None:
        self._add(router_score=router_score, cheap_correct=cheap_correct, vlm_correct=vlm_correct)

    def compute(self) -> dict[str, Any]:
        if self.count == 0:
            return {"apgr": None, "cpt": {}}
        cheap, vlm = self._concat("cheap_correct").astype(bool), self._concat("vlm_correct").astype(bool)
        x, accuracy = routing_curve(self._concat("router_score"), cheap, vlm)
        return routing_summary(x, accuracy, float(cheap.mean()), float(vlm.mean()))


def routing_summary(
    call_share: Any, accuracy: Any, cheap_accuracy: float, vlm_accuracy: float
) -> dict[str, Any]:
    return {
        "apgr": apgr(call_share, accuracy, cheap_accuracy, vlm_accuracy),
        "cpt": {
            f"{round(100 * level)}%": calls_to_performance(
                call_share, accuracy, cheap_accuracy, vlm_accuracy, level
            )
            for level in CPT_LEVELS
        },
        "cheap_accuracy": cheap_accuracy,
        "vlm_accuracy": vlm_accuracy,
    }
