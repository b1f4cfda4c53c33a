"""The per-item records of ``bench cascade`` and the figures computed from them (policy rows,
the threshold sweep, routing figures, latency by path, the accepted error and its interval):
shared by the confidence-certified run (evals/benchmarks/cascade.py) and the learned-certified
row (evals/benchmarks/cascade_learned.py)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

PATHS = ("cheap", "vlm", "review")  # how the service answered an item
CI_CONFIDENCE = 0.95  # the accepted error's two-sided interval (Clopper-Pearson)
NO_ANSWER = -1


# --------------------------------------------------------------------------- per-item records


@dataclass(frozen=True)
class ItemRecord:
    """One held-out digit: what the service did with it, and both tiers' answers.

    Class ids are indices into the label set; ``NO_ANSWER`` (-1) where a tier gave no valid
    answer. Scores are calibrated confidences (NaN where there is none)."""

    label: int
    path: str  # "cheap" | "vlm" | "review" (the service's decision)
    escalated: bool  # the service called the VLM
    answer: int  # the service's answer; NO_ANSWER for review
    cost_units: float  # what the service charged (response ``cost_units``)
    latency_ms: float  # client-side, request to response
    cheap_answer: int
    cheap_score: float
    vlm_answer: int
    vlm_score: float
    vlm_source: str  # "service" (from the trace) or "direct" (asked the vLLM server directly)
    cheap_cost_units: float = 0.0  # per step, as the trace charged them
    vlm_cost_units: float = 0.0
    review_cost_units: float = 0.0
    # The learned router's step (a service with ``cascades.digits.router``): its score (NaN:
    # no router, or it fell back), whether the confidence-only fallback plan decided, what its
    # features were charged (in the cheap tier's units) and took.
    router_score: float = math.nan
    router_fallback: bool = False
    router_cost_units: float = 0.0
    router_features_ms: float = math.nan


@dataclass(frozen=True)
class Prices:
    """Cost units per item for each tier: the cheap tier, one VLM call, one human review."""

    cheap: float
    vlm: float
    review: float


@dataclass(frozen=True)
class PolicyRow:
    name: str
    measured: str  # "service" or "counterfactual" / "expected" (computed from the records)
    n_items: int
    n_auto: float  # answered without a human (expected, for random routing)
    accuracy: float  # of the automatically answered items; NaN when none
    share: dict[str, float]  # "cheap" / "vlm" / "human": share of items answered by each
    vlm_call_share: float  # share of items the VLM was asked about (and paid for)
    cost_per_1000: float  # at the certificate's prices
    cost_per_1000_service: float  # at the service's prices (for the service row: as charged)

    @property
    def accepted_error(self) -> float:
        return 1.0 - self.accuracy


class Records:
    """Per-item records as parallel arrays (validated once), for the policy arithmetic."""

    def __init__(self, records: Sequence[ItemRecord]) -> None:
        if not records:
            raise ValueError("records: need at least one held-out item, got none")
        bad = sorted({r.path for r in records} - set(PATHS))
        if bad:
            raise ValueError(f"records: path must be one of {list(PATHS)}, got {bad}")
        self.items = list(records)
        self.n = len(records)

        def column(name: str, dtype) -> np.ndarray:
            return np.array([getattr(r, name) for r in records], dtype)

        self.label = column("label", np.int64)
        self.path = np.array([r.path for r in records])
        self.escalated = column("escalated", bool)
        self.answer = column("answer", np.int64)
        self.cost_units = column("cost_units", np.float64)
        self.latency_ms = column("latency_ms", np.float64)
        self.cheap_score = column("cheap_score", np.float64)
        self.cheap_valid = column("cheap_answer", np.int64) != NO_ANSWER
        self.cheap_ok = column("cheap_answer", np.int64) == self.label
        self.vlm_valid = column("vlm_answer", np.int64) != NO_ANSWER
        self.vlm_ok = column("vlm_answer", np.int64) == self.label
        self.step_costs = {
            tier: column(f"{tier}_cost_units", np.float64) for tier in ("cheap", "vlm", "review", "router")
        }
        self.router_score = column("router_score", np.float64)
        self.router_fallback = column("router_fallback", bool)


def service_prices(records: Records, *, review_default: float) -> Prices:
    """The unit prices the service charged, read from the traces: the mean cost of each tier's
    step where that step ran (``review_default``, the policy set's review units, if no item
    went to review)."""
    reviewed = records.path == "review"
    return Prices(
        cheap=float(records.step_costs["cheap"].mean()),
        vlm=float(records.step_costs["vlm"][records.escalated].mean()) if records.escalated.any() else 0.0,
        review=float(records.step_costs["review"][reviewed].mean()) if reviewed.any() else review_default,
    )


def _row(
    name: str,
    measured: str,
    records: Records,
    *,
    w_cheap: np.ndarray,
    w_vlm: np.ndarray,
    vlm_called: np.ndarray,
    correct: np.ndarray,
    prices: Prices,
    service_prices: Prices,
    pays_cheap: bool = True,
    charged_per_1000: float | None = None,
    features_in_cheap_units: float = 0.0,
) -> PolicyRow:
    """Figures of a routing given per item (possibly fractional, for expectations): the weight
    of the cheap and the VLM answer (the rest goes to a human), the chance the VLM is called,
    and whether the automatic answer is right. ``features_in_cheap_units``: a learned router's
    features per item as a share of the cheap tier's cost, paid on top of it."""
    n = records.n
    w_human = 1.0 - w_cheap - w_vlm
    n_auto = float((w_cheap + w_vlm).sum())
    n_correct = float(correct.sum())

    def cost_per_1000(p: Prices) -> float:
        cheap = p.cheap * n * (1.0 + features_in_cheap_units) if pays_cheap else 0.0
        total = cheap + p.vlm * vlm_called.sum() + p.review * w_human.sum()
        return 1000.0 * float(total) / n

    return PolicyRow(
        name=name,
        measured=measured,
        n_items=n,
        n_auto=n_auto,
        accuracy=n_correct / n_auto if n_auto > 0 else math.nan,
        share={
            "cheap": float(w_cheap.sum()) / n,
            "vlm": float(w_vlm.sum()) / n,
            "human": float(w_human.sum()) / n,
        },
        vlm_call_share=float(vlm_called.sum()) / n,
        cost_per_1000=cost_per_1000(prices),
        cost_per_1000_service=cost_per_1000(service_prices) if charged_per_1000 is None else charged_per_1000,
    )


def policy_rows(
    records: Records, *, accept_threshold: float, prices: Prices, service: Prices
) -> list[PolicyRow]:
    """The six policies of the module docstring on the same items. ``accept_threshold``: the
    certified cheap accept threshold (calibrated cheap score), used by cheap -> VLM."""
    r = records
    one, zero = np.ones(r.n), np.zeros(r.n)
    common = dict(prices=prices, service_prices=service)
    vlm_answered = r.vlm_valid.astype(float)
    rows = [
        _row(
            "cheap only",
            "counterfactual",
            r,
            w_cheap=r.cheap_valid.astype(float),
            w_vlm=zero,
            vlm_called=zero,
            correct=r.cheap_ok.astype(float),
            **common,
        ),
        _row(
            "VLM only",
            "counterfactual",
            r,
            w_cheap=zero,
            w_vlm=vlm_answered,
            vlm_called=one,
            correct=r.vlm_ok.astype(float),
            pays_cheap=False,
            **common,
        ),
    ]
    cheap_accepts = r.cheap_valid & (r.cheap_score >= accept_threshold)  # NaN >= t: False
    rows.append(
        _row(
            "cheap -> VLM by confidence",
            "counterfactual",
            r,
            w_cheap=cheap_accepts.astype(float),
            w_vlm=(~cheap_accepts & r.vlm_valid).astype(float),
            vlm_called=(~cheap_accepts).astype(float),
            correct=(cheap_accepts & r.cheap_ok) | (~cheap_accepts & r.vlm_ok),
            **common,
        )
    )
    served_cheap, served_vlm = r.path == "cheap", r.path == "vlm"
    rows.append(
        _row(
            "certified three-tier",
            "service",
            r,
            w_cheap=served_cheap.astype(float),
            w_vlm=served_vlm.astype(float),
            vlm_called=r.escalated.astype(float),
            correct=(served_cheap | served_vlm) & (r.answer == r.label),
            charged_per_1000=1000.0 * float(r.cost_units.sum()) / r.n,
            **common,
        )
    )
    # Random routing: each item to the VLM with the service's VLM-call share s, else the cheap
    # answer; the expected counts (ratio of expectations), so no sampling noise enters.
    s = float(r.escalated.mean())
    rows.append(
        _row(
            f"random routing (VLM share {s:.3f})",
            "expected",
            r,
            w_cheap=(1.0 - s) * r.cheap_valid,
            w_vlm=s * vlm_answered,
            vlm_called=s * one,
            correct=(1.0 - s) * r.cheap_ok + s * r.vlm_ok,
            **common,
        )
    )
    oracle_vlm = ~r.cheap_ok & r.vlm_ok
    rows.append(
        _row(
            "oracle router",
            "counterfactual",
            r,
            w_cheap=r.cheap_ok.astype(float),
            w_vlm=oracle_vlm.astype(float),
            vlm_called=oracle_vlm.astype(float),
            correct=r.cheap_ok | oracle_vlm,
            **common,
        )
    )
    return rows


def threshold_sweep(records: Records, prices: Prices) -> tuple[np.ndarray, np.ndarray]:
    """Cheap -> VLM (every VLM answer accepted) at every cheap accept threshold the items allow:
    (cost per item, accuracy of the automatic answers), for the frontier plot."""
    scores = records.cheap_score[records.cheap_valid]
    levels = np.concatenate([[-np.inf], np.unique(scores), [np.inf]])
    cost, accuracy = [], []
    for level in levels:
        row = policy_rows(records, accept_threshold=level, prices=prices, service=prices)[2]
        cost.append(row.cost_per_1000 / 1000.0)
        accuracy.append(row.accuracy)
    return np.array(cost), np.array(accuracy)


def routing_figures(records: Records) -> dict[str, dict[str, Any]]:
    """RouteLLM's APGR and CPT(50%, 80%, 95%) on the held-out items (``evals.metrics``) for the
    confidence ranking (the cheap tier's calibrated score; an item without a cheap answer ranks
    first to the VLM), random routing and RouteLLM's optimal router. Two-model curves: cheap vs
    VLM, every answer accepted (a missing answer counts as wrong); the human tier is not on them."""
    from evals.metrics import oracle_routing_curve, random_routing_curve, routing_curve, routing_summary

    cheap_ok, vlm_ok = records.cheap_ok & records.cheap_valid, records.vlm_ok & records.vlm_valid
    score = np.where(records.cheap_valid & np.isfinite(records.cheap_score), records.cheap_score, -np.inf)
    a_cheap, a_vlm = float(cheap_ok.mean()), float(vlm_ok.mean())
    curves = {
        "confidence": routing_curve(score, cheap_ok, vlm_ok),
        "random": random_routing_curve(cheap_ok, vlm_ok),
        "oracle": oracle_routing_curve(cheap_ok, vlm_ok),
    }
    return {name: routing_summary(x, accuracy, a_cheap, a_vlm) for name, (x, accuracy) in curves.items()}


def latency_by_path(records: Records) -> dict[str, dict[str, float]]:
    """Client-side latency p50/p95 (ms) per path, measured through the service."""
    out = {}
    for path in PATHS:
        values = records.latency_ms[records.path == path]
        out[path] = {
            "n": int(len(values)),
            "p50_ms": float(np.percentile(values, 50)) if len(values) else math.nan,
            "p95_ms": float(np.percentile(values, 95)) if len(values) else math.nan,
        }
    return out


def replay_agreement(records: Records, plan) -> int:
    """How many items the service routed as the certified plan (``TierPlan``) routes them when
    replayed on the trace's calibrated scores: the service and the plan share one rule."""
    agree = 0
    for item in records.items:
        expected = {"accept": "cheap", "review": "review"}.get(plan.decide(item.cheap_score))
        if expected is None:  # escalated: the VLM's confidence as the service saw it
            vlm_score = item.vlm_score if item.vlm_source == "service" else math.nan
            expected = "vlm" if plan.decide_vlm(vlm_score) == "accept" else "review"
        agree += expected == item.path
    return agree


def accepted_error_ci(errors: int, accepted: int, confidence: float = CI_CONFIDENCE) -> tuple[float, float]:
    """Two-sided exact (Clopper-Pearson) interval of the accepted error rate."""
    from policies.audit_sampling import clopper_pearson

    if accepted == 0:
        return 0.0, 1.0
    return clopper_pearson(errors, accepted, 1.0 - (1.0 - confidence) / 2.0)


def accepted_error(records: Records) -> tuple[int, int]:
    """(wrong, accepted) among the items the service answered without a human."""
    accepted = records.path != "review"
    return int((accepted & (records.answer != records.label)).sum()), int(accepted.sum())


# --------------------------------------------------------------------------- the report
