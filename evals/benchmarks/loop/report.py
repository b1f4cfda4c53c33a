"""``bench loop``'s table and plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from evals.benchmarks.loop.config import POLICIES


def format_result(result: dict[str, Any]) -> str:
    config = result["config"]
    lines = [
        f"closed loop: {result['task']}, {config['items']} items in windows of {config['window']}, severity "
        f"0 -> {config['max_severity']} from {config['shift_start']:.0%} over {config['ramp']:.0%} of the stream; "
        f"alpha={result['alpha']}, delta={result['delta']} (the loop's certificates at "
        f"{result['certificate_delta']:g}); reviewers wrong {config['reviewer_error']:.0%}, "
        f"audits unanswered {config['nonresponse']:.0%}; audit fraction {result['audit_fraction']:.3f} "
        f"({result['alarm_audit_fraction']:.3f} on a drift alarm); {result['seconds']} s",
        f"cost/1000 leaves the audit labels out; +labels adds each answered audit label at the review cost "
        f"({config['costs']['review']:g}; the reviews the plans ask for are in both)",
        f"{'policy':<13} {'phase':<11} {'windows':>7} {'cost/1000':>9} {'+labels':>7} {'acc.err':>7} {'worst':>6} "
        f"{'>alpha':>6} {'coverage':>8} {'audits':>7} {'reviews':>7}",
    ]
    for policy in POLICIES:
        for phase, row in result["phases"][policy].items():
            lines.append(
                f"{policy:<13} {phase:<11} {row['windows']:>7} {row['cost_per_1000']:>9.0f} "
                f"{row['cost_with_labels_per_1000']:>7.0f} "
                f"{row['accepted_error']:>7.3f} {row['worst_window_error']:>6.3f} {row['windows_above_alpha']:>6} "
                f"{row['coverage']:>8.1%} {row['audit_labels']:>7} {row['reviews']:>7}"
            )
    baseline, targets = result["shifted_baseline"], result["targets"]
    if baseline.get("available"):
        lines.append(
            f"calibration fitted on the shifted data ({baseline['labels']} iid labels): cost/1000 "
            f"{baseline['cost_per_1000']:.0f}, accepted error {baseline['accepted_error']:.3f}; the loop settled: "
            f"{baseline['loop_cost_per_1000']:.0f} ({baseline['loop_cost_ratio']:.2f}x; target <= 1.2x: "
            f"{'met' if targets['cost_within_1_2x'] else 'NOT met'}; labels not in cost). With labels at the "
            f"review cost (the baseline's spread over the settled items): {baseline['cost_with_labels_per_1000']:.0f} "
            f"against {baseline['loop_cost_with_labels_per_1000']:.0f} ({baseline['loop_cost_ratio_with_labels']:.2f}x)"
        )
    else:
        lines.append(f"calibration fitted on the shifted data: not available ({baseline['reason']})")
    lines.append(
        f"loop windows above alpha: {targets['loop_windows_above_alpha'] or 'none'}; lag bound "
        f"{targets['lag_bound_windows']} windows from the shift; outside it within alpha: "
        f"{'yes' if targets['accepted_error_within_alpha_outside_lag'] else 'NO'} (before the shift: "
        f"{targets['windows_above_alpha_before_shift'] or 'none'}; after the lag: "
        f"{targets['windows_above_alpha_after_lag'] or 'none'}); "
        f"recertifications: {result['recertifications']}"
    )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path:
    from evals.plots import _pyplot, _save

    plt = _pyplot()
    config = result["config"]
    fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    for policy in POLICIES:
        rows = result["windows"][policy]
        x = [(r["start"] + config["window"]) / 1000 for r in rows]
        axes[0].plot(x, [r["cost_per_1000"] for r in rows], marker=".", label=policy)
        axes[1].plot(x, [r["accepted_error"] for r in rows], marker=".", label=policy)
        axes[2].plot(x, np.cumsum([r["audit_labels"] for r in rows]), marker=".", label=policy)
    baseline = result["shifted_baseline"]
    if baseline.get("available"):
        axes[0].axhline(
            baseline["cost_per_1000"], color="grey", linestyle=":", label="fitted on shifted data"
        )
    axes[1].axhline(result["alpha"], color="black", linestyle="--", label="alpha")
    shift = config["shift_start"] * config["items"] / 1000
    for ax in axes:
        ax.axvspan(shift, shift + config["ramp"] * config["items"] / 1000, color="tab:red", alpha=0.1)
    axes[0].set_ylabel("cost per 1000 items")
    axes[1].set_ylabel("accepted error")
    axes[2].set_ylabel("audit labels (cumulative)")
    axes[2].set_xlabel("stream items (thousands); shaded: the severity ramp")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    axes[0].set_title(f"closed loop: {result['task']}")
    return _save(fig, path)
