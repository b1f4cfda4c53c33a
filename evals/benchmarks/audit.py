"""``visionroute bench audit``: how often the audit estimator's bounds hold a known error rate.

Simulated runs: each accepts ``accepted`` items, each wrong with a known probability; a
``fraction`` is audited, and ``policies.audit_sampling.clopper_pearson`` bounds the rate. The
baseline is the nominal coverage (``confidence`` one-sided, ``2*confidence-1`` two-sided).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from policies.audit_sampling import clopper_pearson


def simulate_coverage(
    error_rate: float,
    *,
    accepted: int = 5000,
    fraction: float = 0.05,
    confidence: float = 0.9,
    runs: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """How often the bounds contain a known accepted-error rate over simulated runs.

    Each run accepts ``accepted`` items, each wrong with probability ``error_rate``; a
    ``fraction`` is audited. Returns the share of runs whose upper bound is >= the true rate,
    whose lower bound is <= it, and whose two-sided interval holds it (nominal: confidence,
    confidence, 2*confidence-1).
    """
    rng = np.random.default_rng(seed)
    n = rng.binomial(accepted, fraction, size=runs)
    k = rng.binomial(n, error_rate)
    bounds = np.array([clopper_pearson(int(ki), int(ni), confidence) for ki, ni in zip(k, n)])
    upper_ok = bounds[:, 1] >= error_rate
    lower_ok = bounds[:, 0] <= error_rate
    return {
        "error_rate": error_rate,
        "runs": runs,
        "mean_audited": float(n.mean()),
        "upper_coverage": float(upper_ok.mean()),
        "lower_coverage": float(lower_ok.mean()),
        "two_sided_coverage": float((upper_ok & lower_ok).mean()),
        "nominal_one_sided": confidence,
        "nominal_two_sided": 2 * confidence - 1,
        "mean_upper_bound": float(bounds[:, 1].mean()),
    }


def format_rows(
    rows: list[dict[str, float]], *, runs: int, accepted: int, fraction: float, confidence: float
) -> str:
    lines = [
        f"audit estimator coverage: {runs} simulated runs, {accepted} accepts each, {fraction:.0%} audited,"
        f" exact Clopper-Pearson bounds at {confidence}",
        f"{'true rate':>9} {'audited':>8} {'upper>=p':>9} {'lower<=p':>9} {'two-sided':>10} {'nominal':>8} {'mean UB':>8}",
    ]
    lines += [
        f"{r['error_rate']:9.3f} {r['mean_audited']:8.1f} {r['upper_coverage']:9.3f} {r['lower_coverage']:9.3f} "
        f"{r['two_sided_coverage']:10.3f} {r['nominal_one_sided']:8.2f} {r['mean_upper_bound']:8.4f}"
        for r in rows
    ]
    return "\n".join(lines)


def run(args) -> int:
    rows = [
        simulate_coverage(
            rate,
            accepted=args.accepted,
            fraction=args.fraction,
            confidence=args.confidence,
            runs=args.runs,
            seed=args.seed,
        )
        for rate in args.error_rates
    ]
    print(
        format_rows(
            rows, runs=args.runs, accepted=args.accepted, fraction=args.fraction, confidence=args.confidence
        )
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0
