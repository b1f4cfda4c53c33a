"""``visionroute bench rollout``: the rollout test's error rates and speed, by simulation.

Each simulated stream is one rollout: audit labels arrive one at a time, each from the candidate
with probability ``candidate_share`` (else the incumbent), each wrong with its arm's true risk.
After every label the decision rule of ``policies.sequential`` (the same vectorised functions
the ``RolloutMonitor`` calls) looks at the candidate's bounds and the comparison e-value, and the
first promote or rollback ends
the stream; a stream still undecided after ``horizon`` labels counts as "continue". Cost is
taken as no higher (the worst case for false promotion).

Scenarios, on the same kind of streams:
- risk above alpha (at alpha, the worst case of the null "risk >= alpha", and 1.2 alpha): how
  often it is promoted (our rule promises <= delta/2, printed as the limit);
- risk equal to the incumbent's, below alpha: how often it is rolled back (must be <= delta);
- risk twice the incumbent's: labels until rollback (median and p90);
- equal risk: labels until promotion (power; the cheaper candidate case).

Baseline, on the same streams: the same rule with fixed-n tests at the same levels (one-sided
Clopper-Pearson bounds against alpha, a pooled two-proportion z-test for "worse"), recomputed
after every label as if each look were the only one. Valid once, at a pre-set n; looked at after
every label it is not.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from policies.sequential import (
    CONTINUE,
    PROMOTE,
    ROLLBACK,
    RolloutConfig,
    confidence_bounds,
    log_worse_e_value,
    rollout_decision,
)


@dataclass(frozen=True)
class Scenario:
    name: str
    candidate_risk: float
    incumbent_risk: float
    figure: str  # "promotion_rate" | "rollback_rate" | "labels_to_rollback" | "labels_to_promote"


def _by_counts(errors: np.ndarray, bound_fn) -> tuple[np.ndarray, np.ndarray]:
    """Bounds after 0..T labels for error counts of shape (streams, T + 1).

    Bounds only depend on (errors, labelled) and streams share most pairs: each distinct pair
    is computed once.
    """
    width = errors.shape[1]
    keys = errors.astype(np.int64) * width + np.arange(width)
    unique, inverse = np.unique(keys.ravel(), return_inverse=True)
    lower, upper = bound_fn(unique // width, unique % width)
    return lower[inverse].reshape(keys.shape), upper[inverse].reshape(keys.shape)


def clopper_pearson_bounds(errors, labelled, tail: float) -> tuple[np.ndarray, np.ndarray]:
    """One-sided exact binomial bounds, each at level 1 - ``tail`` for a fixed n, vectorised."""
    from scipy.special import betaincinv

    s = np.asarray(errors, dtype=np.float64)
    n = np.asarray(labelled, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        lower = np.where(s > 0, betaincinv(s, n - s + 1, tail), 0.0)
        upper = np.where(s < n, betaincinv(s + 1, n - s, 1.0 - tail), 1.0)
    return np.where(n > 0, lower, 0.0), np.where(n > 0, upper, 1.0)


def naive_decision(cand_errors, cand_labelled, inc_errors, inc_labelled, config: RolloutConfig, bounds):
    """The same rule with fixed-n tests, each at the level our rule gives that decision (delta/2):
    one-sided Clopper-Pearson bounds against alpha, and a one-sided pooled two-proportion z-test
    for "candidate worse". Valid at one pre-set n; here it is re-run after every label."""
    from scipy.stats import norm

    lower, upper = bounds
    sc, nc, si, ni = (
        np.asarray(v, dtype=np.float64) for v in (cand_errors, cand_labelled, inc_errors, inc_labelled)
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        pooled = (sc + si) / (nc + ni)
        z = (sc / nc - si / ni) / np.sqrt(pooled * (1 - pooled) * (1 / nc + 1 / ni))
    worse = np.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0) > norm.ppf(1 - config.delta / 2)
    rollback = (lower > config.alpha) | worse
    promote = upper < config.alpha
    return np.where(rollback, ROLLBACK, np.where(promote, PROMOTE, CONTINUE)).astype(np.int8)


def _first_decisions(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(decision, labels used) per stream: the first non-continue code, or continue at the horizon."""
    decided = codes != CONTINUE
    any_decided = decided.any(axis=1)
    first = np.where(any_decided, decided.argmax(axis=1), codes.shape[1] - 1)
    decision = np.where(any_decided, codes[np.arange(len(codes)), first], CONTINUE)
    return decision, np.where(any_decided, first + 1, np.inf)


def simulate(
    scenario: Scenario,
    config: RolloutConfig,
    *,
    streams: int,
    horizon: int,
    candidate_share: float,
    seed: int,
    chunk: int = 500,
) -> dict[str, Any]:
    """Runs ``streams`` rollouts of ``horizon`` labels each; returns the scenario's figures."""
    rng = np.random.default_rng(seed)
    results: dict[str, list[np.ndarray]] = {
        k: [] for k in ("seq_decision", "seq_labels", "seq_cand_labels", "naive_decision", "naive_labels")
    }
    for start in range(0, streams, chunk):
        rows = min(chunk, streams - start)
        is_candidate = rng.random((rows, horizon)) < candidate_share
        # Each arm's own sequence of outcomes, indexed by that arm's label count (0..T).
        zeros = np.zeros((rows, 1), np.int32)
        cand_by_count = np.hstack(
            [zeros, np.cumsum(rng.random((rows, horizon)) < scenario.candidate_risk, 1)]
        )
        inc_by_count = np.hstack([zeros, np.cumsum(rng.random((rows, horizon)) < scenario.incumbent_risk, 1)])
        # After each label of the stream: each arm's labels and errors so far.
        cand_labelled = np.cumsum(is_candidate, axis=1)
        inc_labelled = np.arange(1, horizon + 1) - cand_labelled
        cand_errors = np.take_along_axis(cand_by_count, cand_labelled, 1)
        inc_errors = np.take_along_axis(inc_by_count, inc_labelled, 1)

        lower, upper = _by_counts(
            cand_by_count,
            lambda s, n: confidence_bounds(s, n, config.delta / 2, config.prior_a, config.prior_b),
        )
        # The running intersection, as BernoulliConfidenceSequence reports it.
        lower, upper = np.maximum.accumulate(lower, axis=1), np.minimum.accumulate(upper, axis=1)
        log_e = log_worse_e_value(
            cand_errors, cand_labelled, inc_errors, inc_labelled, config.prior_a, config.prior_b
        )
        sequential = rollout_decision(
            np.take_along_axis(lower, cand_labelled, 1),
            np.take_along_axis(upper, cand_labelled, 1),
            log_e,
            config.alpha,
            config.delta,
            True,
        )
        cp_lower, cp_upper = _by_counts(
            cand_by_count, lambda s, n: clopper_pearson_bounds(s, n, config.delta / 2)
        )
        naive = naive_decision(
            cand_errors,
            cand_labelled,
            inc_errors,
            inc_labelled,
            config,
            (np.take_along_axis(cp_lower, cand_labelled, 1), np.take_along_axis(cp_upper, cand_labelled, 1)),
        )
        for prefix, codes in (("seq", sequential), ("naive", naive)):
            decision, labels = _first_decisions(codes)
            results[f"{prefix}_decision"].append(decision)
            results[f"{prefix}_labels"].append(labels)
            if prefix == "seq":
                at = np.minimum(labels, horizon).astype(np.int64) - 1
                results["seq_cand_labels"].append(
                    np.where(np.isfinite(labels), cand_labelled[np.arange(rows), at], np.inf)
                )
    merged = {k: np.concatenate(v) for k, v in results.items()}
    return _summarise(scenario, config, merged, streams=streams, horizon=horizon)


def _quantile(labels: np.ndarray, q: float) -> float:
    # An observed value (inverted CDF), so streams that never decided give inf, not nan.
    return float(np.quantile(labels, q, method="inverted_cdf"))


def _summarise(scenario: Scenario, config: RolloutConfig, r: dict, *, streams: int, horizon: int) -> dict:
    out: dict[str, Any] = {
        "scenario": scenario.name,
        "figure": scenario.figure,
        "candidate_risk": scenario.candidate_risk,
        "incumbent_risk": scenario.incumbent_risk,
        "streams": streams,
        "horizon_labels": horizon,
    }
    for prefix in ("seq", "naive"):
        decision = r[f"{prefix}_decision"]
        out[f"{prefix}_promotion_rate"] = float(np.mean(decision == PROMOTE))
        out[f"{prefix}_rollback_rate"] = float(np.mean(decision == ROLLBACK))
    target = ROLLBACK if scenario.figure == "labels_to_rollback" else PROMOTE
    hit = r["seq_decision"] == target
    labels = np.where(hit, r["seq_labels"], np.inf)
    cand_labels = np.where(hit, r["seq_cand_labels"], np.inf)
    out["labels_median"] = _quantile(labels, 0.5)
    out["labels_p90"] = _quantile(labels, 0.9)
    out["candidate_labels_median"] = _quantile(cand_labels, 0.5)
    out["candidate_labels_p90"] = _quantile(cand_labels, 0.9)
    out["undecided_rate"] = float(np.mean(r["seq_decision"] == CONTINUE))
    return out


def scenarios(
    alpha: float, incumbent_risk: float, equal_risk: float, double_from: tuple[float, ...]
) -> list[Scenario]:
    rows = [
        Scenario("risk = alpha (null boundary)", alpha, incumbent_risk, "promotion_rate"),
        Scenario("risk = 1.2 alpha", 1.2 * alpha, incumbent_risk, "promotion_rate"),
        Scenario("risk = incumbent's < alpha", equal_risk, equal_risk, "rollback_rate"),
    ]
    rows += [Scenario("risk = 2x incumbent's", 2 * p, p, "labels_to_rollback") for p in double_from]
    rows.append(Scenario("risk = incumbent's (cheaper)", incumbent_risk, incumbent_risk, "labels_to_promote"))
    return rows


def _fmt_labels(value: float, horizon: int) -> str:
    return f">{horizon}" if math.isinf(value) else f"{value:.0f}"


def format_report(rows: list[dict], config: RolloutConfig, *, candidate_share: float, seconds: float) -> str:
    first = rows[0]
    lines = [
        f"rollout test: {first['streams']} simulated streams per row, decided after every label "
        f"(horizon {first['horizon_labels']} labels, {candidate_share:.0%} from the candidate), "
        f"alpha={config.alpha}, delta={config.delta}; {seconds:.1f} s",
        "  ours: policies/sequential.py (mixture CS for the candidate, e-process for 'worse', each at delta/2);"
        "\n  naive: the same rule with fixed-n tests at the same levels (one-sided Clopper-Pearson,"
        " pooled z-test), re-run after every label",
        "",
        f"{'scenario':32} {'cand':>6} {'inc':>6} {'figure':>16} {'ours':>8} {'naive':>8} {'limit':>7}",
    ]
    for r in rows:
        if r["figure"] in ("promotion_rate", "rollback_rate"):
            key = "promotion" if r["figure"] == "promotion_rate" else "rollback"
            limit = config.delta / 2 if key == "promotion" else config.delta
            lines.append(
                f"{r['scenario']:32} {r['candidate_risk']:6.3f} {r['incumbent_risk']:6.3f} "
                f"{'false ' + key:>16} {r[f'seq_{key}_rate']:8.4f} {r[f'naive_{key}_rate']:8.4f} {limit:7.4f}"
            )
    lines += [
        "",
        f"{'scenario':32} {'cand':>6} {'inc':>6} {'labels to':>10} {'median':>7} {'p90':>7} "
        f"{'cand med':>8} {'cand p90':>8} {'rollback':>8} {'promote':>8} {'neither':>8}",
    ]
    horizon = first["horizon_labels"]
    for r in rows:
        if r["figure"] in ("labels_to_rollback", "labels_to_promote"):
            lines.append(
                f"{r['scenario']:32} {r['candidate_risk']:6.3f} {r['incumbent_risk']:6.3f} "
                f"{r['figure'].removeprefix('labels_to_'):>10} {_fmt_labels(r['labels_median'], horizon):>7} "
                f"{_fmt_labels(r['labels_p90'], horizon):>7} "
                f"{_fmt_labels(r['candidate_labels_median'], horizon):>8} "
                f"{_fmt_labels(r['candidate_labels_p90'], horizon):>8} {r['seq_rollback_rate']:8.3f} "
                f"{r['seq_promotion_rate']:8.3f} {r['undecided_rate']:8.3f}"
            )
    lines.append(
        "  (labels: both arms together, median and p90 over all streams, >T where too few decided;"
        " cand: the candidate's own labels; rollback/promote/neither: share of streams at the horizon."
        " A 2x candidate still below alpha may be promoted: the rule promotes any risk shown below alpha)"
    )
    return "\n".join(lines)


def run(args) -> int:
    config = RolloutConfig(alpha=args.alpha, delta=args.delta)
    if not 0.0 < args.candidate_share < 1.0:
        raise SystemExit(f"--candidate-share must be in (0, 1); got {args.candidate_share}")
    started = time.perf_counter()
    rows = [
        simulate(
            scenario,
            config,
            streams=args.streams,
            horizon=args.horizon,
            candidate_share=args.candidate_share,
            seed=args.seed + i,
        )
        for i, scenario in enumerate(
            scenarios(args.alpha, args.incumbent_risk, args.equal_risk, tuple(args.double_from))
        )
    ]
    seconds = time.perf_counter() - started
    print(format_report(rows, config, candidate_share=args.candidate_share, seconds=seconds))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0
