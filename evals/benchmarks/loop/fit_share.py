"""How the share of labels that places the candidates changes the certified plan's cost.

``python -m evals.benchmarks.loop.fit_share --severity 4 --labels 500,1000,2000 --reps 30``:
``reps`` times per label count N, N digits drawn iid (with replacement) from the replay at
``severity``, labelled by reviewers wrong 1% of the time, certified by
``certify_production_plan`` at the loop's level (delta / 2) with each fit share; every plan's
cost per 1,000 and accepted error on the whole pool (the population the draws come from). An
infeasible or refused certificate reviews everything. docs/recertification.md, "The figure"."""

from __future__ import annotations

import argparse

import numpy as np

from evals.benchmarks.loop.replay import digits_replay
from evals.benchmarks.loop.stream import route

SHARES = (None, 0.3, 0.5)  # None: the service's default (10%, at most 200 items)


def compare(severity: int, labels: list[int], reps: int, *, alpha=0.1, delta=0.05, say=print) -> dict:
    from evals.harness import calibrate
    from policies.production_certify import ProductionSample, TooFewLabels, certify_production_plan
    from policies.risk_control import TierCosts

    replay = digits_replay(seed=0)
    costs = TierCosts(cheap=1.0, escalate=10.0, review=100.0)
    offline = calibrate(
        replay.tier_data(0), replay.fit_rows, replay.certify_rows, alpha=alpha, delta=delta, costs=costs
    )
    cheap, strong, truth = replay.cheap[severity], replay.strong[severity], replay.labels
    at = np.arange(len(truth))
    pred, strong_pred = cheap.argmax(1), strong.argmax(1)
    score = offline.calibrator.calibrate_probabilities(cheap)[at, pred]
    strong_score = strong[at, strong_pred]
    n_classes = cheap.shape[1]

    def on_the_pool(plan) -> tuple[float, float]:
        routed = route(plan, score, strong_score, np.zeros(len(at), bool))
        auto = routed.cheap_ok | routed.vlm_ok
        wrong = (routed.cheap_ok & (pred != truth)) | (routed.vlm_ok & (strong_pred != truth))
        cost = costs.cheap + costs.escalate * routed.asked.mean() + costs.review * routed.reviewed.mean()
        return 1000 * cost, float(wrong.sum() / max(auto.sum(), 1))

    results = {}
    for n in labels:
        for share in SHARES:
            rows = []
            for rep in range(reps):
                rng = np.random.default_rng([rep, n])
                pick = rng.choice(at, n)
                flip = rng.random(n) < 0.01
                label = np.where(flip, (truth[pick] + rng.integers(1, n_classes, n)) % n_classes, truth[pick])
                sample = ProductionSample(
                    score[pick],
                    (pred[pick] != label).astype(float),
                    np.full(n, 0.1),
                    (strong_pred[pick] != label).astype(float),
                    strong_score[pick],
                    0.1,
                )
                try:
                    plan = certify_production_plan(
                        sample, costs=costs, alpha=alpha, delta=delta, seed=rep, n_points=30, fit_share=share
                    )
                    feasible = plan.certificate.is_feasible
                except TooFewLabels:
                    feasible = False
                rows.append(on_the_pool(plan) if feasible else (1000 * (costs.cheap + costs.review), 0.0))
            cost, error = np.array(rows).T
            results[(n, share)] = {
                "cost_mean": float(cost.mean()),
                "cost_median": float(np.median(cost)),
                "error_mean": float(error.mean()),
                "runs_above_alpha": int((error > alpha).sum()),
            }
            r = results[(n, share)]
            say(
                f"severity {severity}, {n} labels, fit share {share or 'default'}: cost/1000 mean "
                f"{r['cost_mean']:.0f}, median {r['cost_median']:.0f}; accepted error mean "
                f"{r['error_mean']:.3f}; above alpha {r['runs_above_alpha']}/{reps}"
            )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--severity", type=int, default=4)
    parser.add_argument("--labels", default="500,1000,2000", help="comma list of label counts")
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args(argv)
    compare(args.severity, [int(n) for n in args.labels.split(",")], args.reps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
