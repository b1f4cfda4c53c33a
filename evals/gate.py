"""The regression gate: compare a run's report with a stored baseline report.

Fails (exit code 1 from ``visionroute eval --baseline`` or ``visionroute gate``) when any
slice's metric falls below ``ratio`` (default 90%) of the same slice in the baseline, when a
slice of the baseline is missing from the run, or when the run's held-out data contradicts its
risk certificate. Every failure names the suite, slice and metric.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

HIGHER_IS_BETTER = ("accuracy", "macro_f1", "top2_accuracy", "map_50_95")


def _values(report: dict[str, Any], metric_names: Iterable[str]) -> dict[tuple[str, str, str], float]:
    out = {}
    for suite, slices in report.get("metrics", {}).items():
        for slice_name, values in slices.items():
            for name in metric_names:
                value = values.get(name)
                if isinstance(value, (int, float)):
                    out[(suite, slice_name, name)] = float(value)
    return out


def compare(
    run: dict[str, Any],
    baseline: dict[str, Any],
    *,
    ratio: float = 0.9,
    metrics: Iterable[str] = HIGHER_IS_BETTER,
) -> list[str]:
    """The failures, one human sentence each; empty when the run passes."""
    metrics = tuple(metrics)
    failures = []
    current = _values(run, metrics)
    for key, base in sorted(_values(baseline, metrics).items()):
        suite, slice_name, name = key
        if key not in current:
            failures.append(
                f"slice {slice_name!r} of {suite} has no {name} in this run (baseline {base:.4f})"
            )
        elif current[key] < ratio * base:
            failures.append(
                f"slice {slice_name!r} of {suite}: {name} {current[key]:.4f} < {ratio:.0%} of baseline {base:.4f}"
            )
    check = (run.get("certified_risk_check") or {}).get("accept_threshold") or {}
    if check.get("violated"):
        failures.append(
            f"certified risk violated: accepted error {check['accepted_error']:.4f} on {check['n_accepted']} "
            f"held-out items exceeds alpha={check['alpha']} (binomial p={check['p_value_exceeds']:.3g} <= delta={check['delta']})"
        )
    return failures
