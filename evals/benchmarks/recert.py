"""Recertification validity: is the production certificate's promise kept under audit sampling?

``python -m evals.benchmarks.recert`` (``recert_validity``) simulates production windows with a
known population and asks, over many seeded runs, how often a certified threshold's true error
among accepted traffic exceeds alpha (the violation rate; the promise is <= delta):

- the traffic: 50,000 items in two segments of equal size with the same score distribution,
  one easier (a clean-image tenant) than the other; the deployed threshold accepts 97% of it
  (it was calibrated before production got harder: 11.5% of its accepts are wrong), below it
  every item is reviewed (inclusion 1);
- the audits: the policy samples accepts at 5% in the first half of the window and 15% after a
  drift alarm raised it; a rollout running on the clean segment samples its accepts at 30% on
  top (inclusion 1 - (1 - f)(1 - 0.3));
- non-response: a sampled item goes unlabelled with probability 2% when the answer was right
  and 10% when it was wrong (reviewers skip hard images).

``policies.production_certify.certify_production`` (Horvitz-Thompson betting, unlabelled as
errors) is compared with ``policies.certify.certify`` on the same labels unweighted (the
naive reading of the review queue: labelled items as if iid, unlabelled dropped). The truth at a
threshold is the error among accepted items of a large population drawn once.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from policies.certify import certify
from policies.production_certify import ProductionSample, TooFewLabels, certify_production, naive_sample


@dataclass(frozen=True)
class Scenario:
    """The simulated production window (module docstring)."""

    items: int = 50_000  # stream items in the window
    deployed_threshold: float = 0.35  # accept the cheap answer above it; review below
    policy_fractions: tuple[float, float] = (0.05, 0.15)  # first half, after the drift alarm
    rollout_fraction: float = 0.3  # on the clean segment's accepts
    clean_share: float = 0.5
    miss_if_right: float = 0.02  # non-response
    miss_if_wrong: float = 0.10
    # P(wrong | score) = sigmoid(intercept - slope * score), per segment
    clean_intercept: float = -1.5
    hard_intercept: float = 3.0
    slope: float = 6.0


def _error_probability(score: np.ndarray, clean: np.ndarray, s: Scenario) -> np.ndarray:
    intercept = np.where(clean, s.clean_intercept, s.hard_intercept)
    return 1.0 / (1.0 + np.exp(-(intercept - s.slope * score)))


def draw_traffic(rng: np.random.Generator, n: int, s: Scenario) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(score, clean segment, wrong) for n stream items."""
    score = rng.beta(4.0, 1.5, n)
    clean = rng.random(n) < s.clean_share
    wrong = rng.random(n) < _error_probability(score, clean, s)
    return score, clean, wrong


def true_risk_curve(s: Scenario, *, seed: int = 12345, n: int = 400_000):
    """risk(t): the error among items with score >= t in a large population (a function)."""
    score, _, wrong = draw_traffic(np.random.default_rng(seed), n, s)
    order = np.argsort(-score)
    sorted_score = score[order]
    cum = np.cumsum(wrong[order])

    def risk(threshold: float) -> float:
        k = int(np.searchsorted(-sorted_score, -threshold, side="right"))
        return float(cum[k - 1] / k) if k else 0.0

    def coverage(threshold: float) -> float:
        return float(np.searchsorted(-sorted_score, -threshold, side="right") / n)

    return risk, coverage


def production_window(rng: np.random.Generator, s: Scenario) -> ProductionSample:
    """What the review queue holds after one window: every review, the audit samples with their
    inclusion probabilities, unlabelled where the reviewer never labelled."""
    score, clean, wrong = draw_traffic(rng, s.items, s)
    accepted = score >= s.deployed_threshold
    late = np.arange(s.items) >= s.items // 2
    policy = np.where(late, s.policy_fractions[1], s.policy_fractions[0])
    rollout = np.where(clean, s.rollout_fraction, 0.0)
    pi = np.where(accepted, 1.0 - (1.0 - policy) * (1.0 - rollout), 1.0)
    sampled = rng.random(s.items) < pi
    missed = rng.random(s.items) < np.where(wrong, s.miss_if_wrong, s.miss_if_right)
    error = np.where(missed, np.nan, wrong.astype(np.float64))
    return ProductionSample(
        score[sampled],
        error[sampled],
        pi[sampled],
        min_inclusion_probability=float(min(s.policy_fractions)),
    )


def recert_validity(
    *,
    alpha: float = 0.1,
    delta: float = 0.1,
    runs: int = 200,
    scenario: Scenario | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Violation rate, certified share and mean true coverage of the weighted and the naive
    certificate over ``runs`` seeded production windows."""
    s = scenario or Scenario()
    risk, coverage = true_risk_curve(s)
    rows = {"weighted": [], "naive": []}
    started = time.perf_counter()
    refused = 0
    for run in range(runs):
        sample = production_window(np.random.default_rng([seed, run]), s)
        try:
            weighted = certify_production(sample, alpha=alpha, delta=delta, seed=run).threshold
        except TooFewLabels:
            weighted, refused = None, refused + 1
        scores, errors = naive_sample(sample)
        naive = certify(scores, errors, alpha=alpha, delta=delta, seed=run).threshold
        for name, threshold in (("weighted", weighted), ("naive", naive)):
            rows[name].append(
                (
                    threshold is not None,
                    risk(threshold) if threshold is not None else 0.0,
                    coverage(threshold) if threshold is not None else 0.0,
                )
            )
    out: dict[str, Any] = {
        "alpha": alpha,
        "delta": delta,
        "runs": runs,
        "seed": seed,
        "scenario": s.__dict__,
        "refused": refused,
        "seconds": round(time.perf_counter() - started, 1),
        "best_true_coverage": _best_coverage(risk, coverage, alpha),
    }
    out |= _summaries(rows, alpha)
    return out


def _best_coverage(risk, coverage, alpha: float) -> float:
    """The largest true coverage of any threshold whose true risk is <= alpha (the oracle)."""
    grid = np.linspace(0.0, 1.0, 1001)
    ok = [coverage(t) for t in grid if risk(t) <= alpha and coverage(t) > 0]
    return max(ok) if ok else 0.0


# --------------------------------------------------------------------------- three tiers

ESCALATE_FROM = 0.2  # the deployed plan: escalate [0.2, deployed accept), review below
DEPLOYED_ACCEPT = 0.6
DEPLOYED_VLM_ACCEPT = 0.7


def draw_vlm(rng: np.random.Generator, clean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(VLM wrong, VLM calibrated score) for every item: wrong 3% (clean) or 10% (hard) of the
    time, its score lower when wrong."""
    wrong = rng.random(len(clean)) < np.where(clean, 0.03, 0.10)
    score = np.clip(rng.normal(np.where(wrong, 0.55, 0.85), 0.12), 0.0, 1.0)
    return wrong, score


def plan_truth(s: Scenario, *, seed: int = 12345, n: int = 200_000):
    """The true error among automatically accepted items of a three-tier plan (a function)."""
    rng = np.random.default_rng(seed)
    score, clean, wrong = draw_traffic(rng, n, s)
    vlm_wrong, vlm_score = draw_vlm(rng, clean)

    def risk(plan) -> tuple[float, float]:
        cheap_ok = score >= plan.accept_threshold
        escalated = ~cheap_ok & (score >= plan.review_threshold)
        vlm_ok = escalated & (vlm_score >= (plan.vlm_accept_threshold or -np.inf))
        auto = cheap_ok | vlm_ok
        errors = (cheap_ok & wrong) | (vlm_ok & vlm_wrong)
        return (float(errors[auto].mean()) if auto.any() else 0.0), float(auto.mean())

    return risk


def production_window_plan(rng: np.random.Generator, s: Scenario) -> ProductionSample:
    """The review queue after a window under the deployed three-tier plan: accepts (the cheap
    tier's and the VLM's) audited at their inclusion probabilities, every review labelled; the
    VLM's answer known only where it was asked; a label judges both answers where they exist."""
    score, clean, wrong = draw_traffic(rng, s.items, s)
    vlm_wrong, vlm_score = draw_vlm(rng, clean)
    cheap_ok = score >= DEPLOYED_ACCEPT
    asked = ~cheap_ok & (score >= ESCALATE_FROM)
    accepted = cheap_ok | (asked & (vlm_score >= DEPLOYED_VLM_ACCEPT))
    late = np.arange(s.items) >= s.items // 2
    policy = np.where(late, s.policy_fractions[1], s.policy_fractions[0])
    rollout = np.where(clean, s.rollout_fraction, 0.0)
    pi = np.where(accepted, 1.0 - (1.0 - policy) * (1.0 - rollout), 1.0)
    sampled = rng.random(s.items) < pi
    final_wrong = np.where(cheap_ok, wrong, vlm_wrong)
    missed = rng.random(s.items) < np.where(final_wrong, s.miss_if_wrong, s.miss_if_right)
    cheap_error = np.where(missed, np.nan, wrong.astype(np.float64))
    strong_error = np.where(missed | ~asked, np.nan, vlm_wrong.astype(np.float64))
    strong_score = np.where(asked, vlm_score, np.nan)
    return ProductionSample(
        score[sampled],
        cheap_error[sampled],
        pi[sampled],
        strong_error[sampled],
        strong_score[sampled],
        min_inclusion_probability=float(min(s.policy_fractions)),
    )


def recert_validity_plan(
    *,
    alpha: float = 0.1,
    delta: float = 0.1,
    runs: int = 100,
    scenario: Scenario | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """``recert_validity`` for the three-tier plan: ``certify_production_plan`` against
    ``choose_tier_thresholds`` on the same labels unweighted (the naive reading)."""
    from policies.production_certify import certify_production_plan
    from policies.risk_control import TierCosts, TierOutcomes, choose_tier_thresholds

    s = scenario or Scenario()
    truth = plan_truth(s)
    costs = TierCosts()
    rows: dict[str, list[tuple[bool, float, float]]] = {"weighted": [], "naive": []}
    started = time.perf_counter()
    refused = 0
    for run in range(runs):
        sample = production_window_plan(np.random.default_rng([seed, run, 3]), s)
        try:
            weighted = certify_production_plan(sample, costs=costs, alpha=alpha, delta=delta, seed=run)
        except TooFewLabels:
            weighted, refused = None, refused + 1
        labelled = ~np.isnan(sample.cheap_error)
        outcomes = TierOutcomes(
            sample.cheap_score[labelled],
            sample.cheap_error[labelled].astype(bool),
            np.nan_to_num(sample.strong_error[labelled], nan=1.0).astype(bool),
            sample.strong_score[labelled],
        )
        order = np.random.default_rng(run).permutation(len(outcomes))
        n_fit = max(20, min(200, len(order) // 10))
        naive = choose_tier_thresholds(
            outcomes.subset(order[:n_fit]),
            outcomes.subset(order[n_fit:]),
            costs=costs,
            alpha=alpha,
            delta=delta,
        )
        for name, plan in (("weighted", weighted), ("naive", naive)):
            feasible = plan is not None and plan.certificate.is_feasible
            risk, coverage = truth(plan) if feasible else (0.0, 0.0)
            rows[name].append((feasible, risk, coverage))
    out: dict[str, Any] = {
        "alpha": alpha,
        "delta": delta,
        "runs": runs,
        "seed": seed,
        "scenario": {**s.__dict__, "plan": "three_tier"},
        "refused": refused,
        "seconds": round(time.perf_counter() - started, 1),
        "best_true_coverage": float("nan"),
    }
    out |= _summaries(rows, alpha)
    return out


def _summaries(rows: dict[str, list[tuple[bool, float, float]]], alpha: float) -> dict[str, Any]:
    out = {}
    for name, results in rows.items():
        certified = np.array([r[0] for r in results])
        true_risk = np.array([r[1] for r in results])
        covered = np.array([r[2] for r in results])
        out[name] = {
            "certified_share": float(certified.mean()),
            "violation_rate": float((certified & (true_risk > alpha)).mean()),
            "mean_true_risk_when_certified": float(true_risk[certified].mean()) if certified.any() else None,
            "mean_true_coverage": float(covered.mean()),
        }
    return out


def format_result(result: dict[str, Any]) -> str:
    lines = [
        f"recertification validity: {result['runs']} simulated production windows, alpha={result['alpha']}, "
        f"delta={result['delta']} ({result['seconds']} s"
        + (
            f"; oracle coverage at alpha {result['best_true_coverage']:.1%})"
            if result["best_true_coverage"] == result["best_true_coverage"]  # not NaN
            else "; three-tier plan)"
        ),
        f"{'procedure':<10} {'certified':>9} {'violations':>10} {'<= delta?':>9} {'true risk':>9} {'coverage':>9}",
    ]
    for name in ("weighted", "naive"):
        row = result[name]
        mean_risk = row["mean_true_risk_when_certified"]
        lines.append(
            f"{name:<10} {row['certified_share']:>9.1%} {row['violation_rate']:>10.1%} "
            f"{'yes' if row['violation_rate'] <= result['delta'] else 'NO':>9} "
            f"{(f'{mean_risk:.3f}' if mean_risk is not None else '-'):>9} {row['mean_true_coverage']:>9.1%}"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options, for ``python -m evals.benchmarks.recert`` and a ``visionroute bench`` entry."""
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--items", type=int, default=Scenario.items, help="stream items per window")
    parser.add_argument("--miss-if-right", type=float, default=Scenario.miss_if_right, help="non-response")
    parser.add_argument("--miss-if-wrong", type=float, default=Scenario.miss_if_wrong, help="non-response")
    parser.add_argument("--three-tier", action="store_true", help="certify the three-tier plan instead")
    parser.add_argument("--json", help="also write the result here")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """``visionroute bench``'s convention: run with parsed arguments, print the table."""
    scenario = Scenario(items=args.items, miss_if_right=args.miss_if_right, miss_if_wrong=args.miss_if_wrong)
    validity = recert_validity_plan if args.three_tier else recert_validity
    result = validity(alpha=args.alpha, delta=args.delta, runs=args.runs, seed=args.seed, scenario=scenario)
    print(format_result(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
