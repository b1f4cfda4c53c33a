"""``visionroute bench calibration``: the three figures of the calibration feature, one run.

1. ECE of the cheap digits tier before and after calibration, on held-out items.
2. Validity: over many random calibration/test splits, the fraction of splits whose error among
   accepted items exceeds alpha, next to delta. Two designs, both printed:
   - disjoint halves of the pool: the test half's accepted error. This adds the test half's own
     sampling noise, and halves of a finite pool are negatively correlated (an error drawn into
     calibration is missing from test), so it overstates failures;
   - the pool as the population: calibration items drawn i.i.d. (with replacement) from the
     pool and the accepted error computed exactly on the whole pool. This is precisely the
     setting of the guarantee, with no test noise.
3. The fraction of items sent to the strong tier needed to reach 99% of the strong tier's
   accuracy: calibrated cascade vs random routing, on the same held-out items.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from evals.frontier import cascade_frontier
from evals.harness import calibrate, digits_tier_data, split_indices
from evals.metrics import expected_calibration_error
from policies.risk_control import TierCosts


def calibration_bench(
    *,
    seed: int = 0,
    n_splits: int = 200,
    alpha: float = 0.05,
    delta: float = 0.1,
    method: str = "temperature",
    costs: TierCosts | None = None,
) -> dict[str, Any]:
    started = time.perf_counter()
    costs = costs or TierCosts()
    data = digits_tier_data(seed)
    rows = np.arange(len(data))
    cheap_pred = data.cheap_probabilities.argmax(axis=1)
    strong_pred = data.strong_probabilities.argmax(axis=1)
    cheap_error = cheap_pred != data.labels

    population = []
    for split_seed in range(n_splits):
        draw = np.random.default_rng(5000 + split_seed).integers(0, len(data), len(data) // 2)
        cal = calibrate(
            data,
            draw[: len(draw) // 2],
            draw[len(draw) // 2 :],
            method=method,
            alpha=alpha,
            delta=delta,
            costs=costs,
        )
        conf = cal.calibrator.calibrate_probabilities(data.cheap_probabilities)[rows, cheap_pred]
        accepted = (
            conf >= cal.certificate.threshold if cal.certificate.is_feasible else np.zeros(len(data), bool)
        )
        population.append(float(cheap_error[accepted].mean()) if accepted.any() else 0.0)

    per_split = []
    for split_seed in range(n_splits):
        splits = split_indices(len(data), seed=1000 + split_seed)
        cal = calibrate(
            data, splits.fit, splits.certify, method=method, alpha=alpha, delta=delta, costs=costs
        )
        conf = cal.calibrator.calibrate_probabilities(data.cheap_probabilities)[rows, cheap_pred]
        test = splits.test
        raw = data.cheap_probabilities[test, cheap_pred[test]]
        accepted = (
            conf[test] >= cal.certificate.threshold
            if cal.certificate.is_feasible
            else np.zeros(len(test), bool)
        )
        plan = cal.plan
        decision = np.array([plan.decide(c) for c in conf[test]])
        auto_wrong = np.where(decision == "accept", cheap_error[test], strong_pred[test] != data.labels[test])
        auto = decision != "review"
        frontier = cascade_frontier(
            cheap_pred[test],
            conf[test],
            strong_pred[test],
            data.labels[test],
            cheap_cost=costs.cheap,
            strong_cost=costs.escalate,
        )
        need = frontier.escalation_needed(0.99 * frontier.strong_accuracy)
        per_split.append(
            {
                "ece_before": expected_calibration_error(raw, ~cheap_error[test]),
                "ece_after": expected_calibration_error(conf[test], ~cheap_error[test]),
                "feasible": cal.certificate.is_feasible,
                "coverage": float(accepted.mean()),
                "accepted_error": float(cheap_error[test][accepted].mean()) if accepted.any() else 0.0,
                "tier_auto_error": float(auto_wrong[auto].mean()) if auto.any() else 0.0,
                "tier_cost": float(
                    costs.cheap
                    + costs.escalate * (decision == "escalate").mean()
                    + costs.review * (decision == "review").mean()
                ),
                "need_cascade": need["cascade"],
                "need_random": need["random"],
                "need_oracle": need["oracle"],
            }
        )

    def column(key: str) -> np.ndarray:
        return np.array([s[key] for s in per_split], dtype=float)

    first = per_split[0]
    return {
        "data": {
            "name": data.name,
            "items": len(data),
            "test_items_per_split": len(split_indices(len(data), seed=1000).test),
            "cheap_accuracy": float((~cheap_error).mean()),
            "strong_accuracy": float((strong_pred == data.labels).mean()),
            "models": data.models,
        },
        "alpha": alpha,
        "delta": delta,
        "method": method,
        "n_splits": n_splits,
        "ece": {
            "before": first["ece_before"],
            "after": first["ece_after"],
            "before_mean": float(column("ece_before").mean()),
            "after_mean": float(column("ece_after").mean()),
        },
        "validity": {
            "fraction_exceeding_alpha": float((column("accepted_error") > alpha).mean()),
            "population_fraction_exceeding_alpha": float((np.array(population) > alpha).mean()),
            "population_mean_accepted_error": float(np.mean(population)),
            "three_tier_fraction_exceeding_alpha": float((column("tier_auto_error") > alpha).mean()),
            "feasible_fraction": float(column("feasible").mean()),
            "mean_coverage": float(column("coverage").mean()),
            "mean_accepted_error": float(column("accepted_error").mean()),
            "mean_three_tier_cost": float(column("tier_cost").mean()),
        },
        "escalation_to_reach_99pct_of_strong": {
            "cascade": first["need_cascade"],
            "random": first["need_random"],
            "oracle": first["need_oracle"],
            "cascade_mean": float(np.nanmean(column("need_cascade"))),
            "random_mean": float(np.nanmean(column("need_random"))),
        },
        "seconds": time.perf_counter() - started,
    }


def format_bench(result: dict[str, Any]) -> str:
    d, e, v, r = (
        result["data"],
        result["ece"],
        result["validity"],
        result["escalation_to_reach_99pct_of_strong"],
    )
    return "\n".join(
        [
            f"digits: {d['items']} held-out-from-training items, {d['test_items_per_split']} test items per split; "
            f"cheap tier accuracy {d['cheap_accuracy']:.4f}, strong tier {d['strong_accuracy']:.4f}",
            f"1. ECE of the cheap tier on held-out items ({result['method']}): before {e['before']:.4f} -> after {e['after']:.4f}"
            f"   (mean over {result['n_splits']} splits: {e['before_mean']:.4f} -> {e['after_mean']:.4f})",
            f"2. validity, alpha={result['alpha']}, delta={result['delta']}, {result['n_splits']} random splits each:",
            f"   pool as population (calibration drawn i.i.d., error exact on the pool): fraction with accepted error > alpha = "
            f"{v['population_fraction_exceeding_alpha']:.3f} (must be <= delta = {result['delta']}); mean accepted error {v['population_mean_accepted_error']:.4f}",
            f"   disjoint calibration/test halves (adds test noise): fraction with test accepted error > alpha = {v['fraction_exceeding_alpha']:.3f}; "
            f"three tiers: {v['three_tier_fraction_exceeding_alpha']:.3f}; mean coverage {v['mean_coverage']:.3f}, "
            f"mean accepted error {v['mean_accepted_error']:.4f}, feasible in {v['feasible_fraction']:.0%} of splits",
            f"3. fraction sent to the strong tier to reach 99% of its accuracy: calibrated cascade {r['cascade']:.3f} "
            f"vs random routing {r['random']:.3f} (oracle {r['oracle']:.3f}); mean over splits {r['cascade_mean']:.3f} vs {r['random_mean']:.3f}",
            f"({result['seconds']:.1f} s)",
        ]
    )


def run(args) -> int:
    result = calibration_bench(
        seed=args.seed, n_splits=args.splits, alpha=args.alpha, delta=args.delta, method=args.method
    )
    print(format_bench(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0
