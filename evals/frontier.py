"""The cascade's cost-accuracy frontier against baselines, measured on the same items.

The cascade escalates the items its cheap tier is least confident about. Baselines:
- cheap only and strong only (one point each);
- random routing: escalate a random fraction r; its expected accuracy on these items is exactly
  (1 - r) * cheap accuracy + r * strong accuracy, so no sampling noise enters the comparison;
- the oracle router: escalates exactly the items the cheap tier gets wrong and the strong tier
  gets right, first; no router can do better at the same escalation rate.
An escalated item pays both tiers (the cheap tier already ran). ``summary`` also gives RouteLLM's
APGR and CPT of each curve (the escalation rate is RouteLLM's share of strong-model calls).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Frontier:
    escalation_rate: np.ndarray  # (n + 1,) 0, 1/n, ..., 1
    cost_units: np.ndarray  # per item, at each rate
    cascade_accuracy: np.ndarray
    random_accuracy: np.ndarray
    oracle_accuracy: np.ndarray
    cheap_accuracy: float
    strong_accuracy: float
    cheap_cost: float
    strong_cost: float

    def escalation_needed(self, target_accuracy: float) -> dict[str, float | None]:
        """The smallest escalation rate at which each router reaches ``target_accuracy``."""

        def first(acc: np.ndarray) -> float | None:
            hit = np.flatnonzero(acc >= target_accuracy - 1e-12)
            return float(self.escalation_rate[hit[0]]) if len(hit) else None

        return {
            "cascade": first(self.cascade_accuracy),
            "random": first(self.random_accuracy),
            "oracle": first(self.oracle_accuracy),
        }

    def summary(self, fraction_of_strong: float = 0.99) -> dict[str, Any]:
        target = fraction_of_strong * self.strong_accuracy
        return {
            "cheap_only": {"accuracy": self.cheap_accuracy, "cost_units": self.cheap_cost},
            "strong_only": {"accuracy": self.strong_accuracy, "cost_units": self.strong_cost},
            "target_accuracy": target,
            "fraction_of_strong": fraction_of_strong,
            "escalation_needed": self.escalation_needed(target),
            "aufc_cascade": float(np.mean(self.cascade_accuracy)),  # area under the accuracy-vs-rate curve
            "aufc_random": float(np.mean(self.random_accuracy)),
            "aufc_oracle": float(np.mean(self.oracle_accuracy)),
            "routellm": self.routellm(),
        }

    def routellm(self) -> dict[str, Any] | None:
        """RouteLLM's APGR and CPT(50%, 80%, 95%) of each router's curve (``evals.metrics``);
        None when the tiers are equally accurate (no gap to recover)."""
        from evals.metrics import routing_summary

        if self.strong_accuracy == self.cheap_accuracy:
            return None
        curves = {
            "cascade": self.cascade_accuracy,
            "random": self.random_accuracy,
            "oracle": self.oracle_accuracy,
        }
        return {
            name: routing_summary(self.escalation_rate, accuracy, self.cheap_accuracy, self.strong_accuracy)
            for name, accuracy in curves.items()
        }

    def plot(self, path, *, title: str = "Cost-accuracy frontier"):
        from evals.plots import frontier_plot

        curves = {
            "cascade (escalate least confident)": (self.cost_units, self.cascade_accuracy),
            "random routing": (self.cost_units, self.random_accuracy),
            "oracle router": (self.cost_units, self.oracle_accuracy),
        }
        points = {
            "cheap only": (self.cheap_cost, self.cheap_accuracy),
            "strong only": (self.strong_cost, self.strong_accuracy),
        }
        return frontier_plot(path, curves, points, title=title)


def cascade_frontier(
    cheap_prediction: Any,
    cheap_confidence: Any,
    strong_prediction: Any,
    targets: Any,
    *,
    cheap_cost: float = 1.0,
    strong_cost: float = 10.0,
) -> Frontier:
    cheap_ok = np.asarray(cheap_prediction) == np.asarray(targets)
    strong_ok = np.asarray(strong_prediction) == np.asarray(targets)
    confidence = np.asarray(cheap_confidence, np.float64)
    n = len(cheap_ok)
    if not (len(strong_ok) == len(confidence) == n) or n == 0:
        raise ValueError(f"need equal, non-empty lengths; got {n}, {len(confidence)}, {len(strong_ok)}")
    rate = np.arange(n + 1) / n
    # escalating item i changes its correctness by strong_ok - cheap_ok
    gain = strong_ok.astype(float) - cheap_ok.astype(float)
    by_confidence = np.argsort(confidence, kind="stable")  # least confident first
    cascade = cheap_ok.mean() + np.concatenate([[0.0], np.cumsum(gain[by_confidence])]) / n
    oracle = cheap_ok.mean() + np.concatenate([[0.0], np.cumsum(np.sort(gain)[::-1])]) / n
    oracle = np.maximum.accumulate(oracle)  # the oracle never escalates an item that would lose
    random = (1 - rate) * cheap_ok.mean() + rate * strong_ok.mean()
    return Frontier(
        escalation_rate=rate,
        cost_units=cheap_cost + rate * strong_cost,
        cascade_accuracy=cascade,
        random_accuracy=random,
        oracle_accuracy=oracle,
        cheap_accuracy=float(cheap_ok.mean()),
        strong_accuracy=float(strong_ok.mean()),
        cheap_cost=cheap_cost,
        strong_cost=strong_cost,
    )
