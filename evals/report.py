"""Write a report as JSON (machine-readable, the regression gate's input) and Markdown (for
people), next to its PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

SCHEMA = "visionroute-eval-report/1"


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()  # numpy scalars
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def to_markdown(report: dict[str, Any], out_dir: Path) -> str:
    lines = [f"# Evaluation report: {report['dataset']['name']}", ""]
    lines += [
        f"- created: {report.get('created_at', '-')}",
        f"- test items: {report['dataset']['n_test']}",
        f"- data sha256: `{report['dataset']['sha256'][:16]}`",
        f"- calibration: `{report['calibration']['artifact_id']}`",
    ]
    for tier, model in report.get("models", {}).items():
        lines.append(f"- {tier} model: {model.get('name')} (sha256 `{model.get('sha256', '')[:16]}`)")
    cert = report.get("certificate") or {}
    if cert:
        lines += ["", "## Risk certificate", "", cert.get("statement", ""), ""]
        check = (report.get("certified_risk_check") or {}).get("accept_threshold") or {}
        if check:
            lines.append(
                f"Held-out check: accepted error {_fmt(check['accepted_error'])} over {check['n_accepted']} accepted "
                f"items (coverage {_fmt(check['coverage'])}); violated: **{check['violated']}**."
            )
        tiers = (report.get("certified_risk_check") or {}).get("three_tier")
        if tiers:
            lines.append(
                f"Three tiers on held-out data: rates {json.dumps({k: round(v, 4) for k, v in tiers['rates'].items()})}, "
                f"auto-accepted error {_fmt(tiers['auto_accepted_error'])}, cost {_fmt(tiers['cost_units_per_item'], 2)} units/item."
            )
    metrics = report.get("metrics", {})
    lines += [
        "",
        "## Calibration (held out)",
        "",
        "| suite | ECE | MCE | mean confidence | accuracy | AURC |",
        "|---|---|---|---|---|---|",
    ]
    for suite, slices in metrics.items():
        overall = slices.get("all", {})
        if "ece" in overall:
            lines.append(
                f"| {suite} | {_fmt(overall['ece'])} | {_fmt(overall['mce'])} | {_fmt(overall.get('mean_confidence'))} "
                f"| {_fmt(overall.get('accuracy'))} | {_fmt(overall.get('aurc'))} |"
            )
    frontier = report.get("frontier")
    if frontier:
        need = frontier["escalation_needed"]
        lines += [
            "",
            "## Cost-accuracy frontier (same items)",
            "",
            f"Target: {frontier['fraction_of_strong']:.0%} of the strong tier's accuracy = {_fmt(frontier['target_accuracy'])}.",
            "",
            "| router | fraction sent to the strong tier to reach the target |",
            "|---|---|",
            f"| calibrated cascade | {_fmt(need['cascade'])} |",
            f"| random routing | {_fmt(need['random'])} |",
            f"| oracle | {_fmt(need['oracle'])} |",
            "",
            f"Cheap only: accuracy {_fmt(frontier['cheap_only']['accuracy'])} at {_fmt(frontier['cheap_only']['cost_units'], 2)} units; "
            f"strong only: {_fmt(frontier['strong_only']['accuracy'])} at {_fmt(frontier['strong_only']['cost_units'], 2)} units.",
        ]
    lines += ["", "## Accuracy by slice", ""]
    suites = list(metrics)
    lines += ["| slice | n | " + " | ".join(suites) + " |", "|---|---|" + "---|" * len(suites)]
    for slice_name in metrics[suites[0]] if suites else []:
        values = [_fmt(metrics[s].get(slice_name, {}).get("accuracy")) for s in suites]
        lines.append(
            f"| {slice_name} | {metrics[suites[0]][slice_name].get('n')} | " + " | ".join(values) + " |"
        )
    if report.get("gate"):
        lines += ["", "## Regression gate", ""]
        gate = report["gate"]
        lines += [f"Baseline: `{gate['baseline']}`; passed: **{gate['passed']}**"] + [
            f"- {f}" for f in gate["failures"]
        ]
    lines += ["", "## Plots", ""]
    for name, path in report.get("plots", {}).items():
        lines.append(
            f"![{name}]({Path(path).relative_to(out_dir) if Path(path).is_relative_to(out_dir) else path})"
        )
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"schema": SCHEMA, **report}
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    md_path = out_dir / "report.md"
    md_path.write_text(to_markdown(report, out_dir))
    return {"json": json_path, "markdown": md_path}
