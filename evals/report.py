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
    if report.get("robustness"):
        lines += robustness_markdown(report["robustness"])
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


def _bound(mode: dict[str, Any], alpha: float) -> str:
    if mode["violated"]:
        return "**broken**"  # significantly above alpha (binomial test at delta)
    return "above α" if mode["accepted_error"] > alpha else "holds"


def robustness_markdown(section: dict[str, Any]) -> list[str]:
    """The robustness section (evals.corruptions.evaluate_corruptions) as Markdown lines."""
    alpha, guard = section["alpha"], section["guard"]
    threshold = section.get("certificate_threshold")
    rule = f"per-request conformal rule at {guard['false_alarm_rate']:g}" + (
        f" split with a two-sample window rule over {guard['window']} inputs (steady state)"
        if guard["window"]
        else ""
    )
    lines = [
        "",
        "## Robustness: corruptions and the guarantee under shift",
        "",
        f"{section['n_test']} held-out items of {section['dataset']}, each corrupted (seed {section['seed']}) with "
        "albumentations at ImageNet-C severities. Calibration, certificate and the shift guard's reference "
        "come from the clean calibration split only.",
        "",
        f"- certificate: α = {alpha:g}, δ = {section['delta']:g}; accept from the cheap tier when the calibrated "
        f"score ≥ {_fmt(threshold) if threshold is not None else 'nothing (infeasible)'}",
        f"- routing: {section['routing']}; cost units {section['costs']}",
        f"- shift guard: {rule}; statistics {', '.join(guard['features'])}",
        "",
        "Where the certified bound stops holding (first severity; '-' never):",
        "",
        "| corruption | accepted error > α, no guard | significantly (bound broken), no guard "
        "| > α, with guard | broken, with guard |",
        "|---|---|---|---|---|",
    ]
    for name, entry in section["bound_breaks"].items():
        if name == "clean":
            continue
        lines.append(
            f"| {name} | {_fmt(entry['above_alpha_no_guard'])} | {_fmt(entry['violated_no_guard'])} "
            f"| {_fmt(entry['above_alpha_guard'])} | {_fmt(entry['violated_guard'])} |"
        )
    lines += [
        "",
        "| corruption | sev | accuracy | ECE | coverage | accepted error | bound | guard fired "
        "| coverage, guard | accepted error, guard | bound, guard | accept / escalate / review "
        "| cost per 1000 | cost per 1000, guard |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in section["rows"]:
        plain, guarded = row["no_guard"], row["guard"]
        rates = plain["routing"]["rates"]
        lines.append(
            f"| {row['corruption']} | {row['severity']} | {_fmt(row['accuracy'], 3)} | {_fmt(row['ece'], 3)} "
            f"| {_fmt(plain['coverage'], 3)} | {_fmt(plain['accepted_error'], 3)} | {_bound(plain, alpha)} "
            f"| {_fmt(row['guard_fired']['shifted'], 2)} | {_fmt(guarded['coverage'], 3)} "
            f"| {_fmt(guarded['accepted_error'], 3)} | {_bound(guarded, alpha)} "
            f"| {rates['accept']:.2f} / {rates['escalate']:.2f} / {rates['review']:.2f} "
            f"| {plain['routing']['cost_per_1000']:.0f} | {guarded['routing']['cost_per_1000']:.0f} |"
        )
    return lines


def write_report(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"schema": SCHEMA, **report}
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    md_path = out_dir / "report.md"
    md_path.write_text(to_markdown(report, out_dir))
    return {"json": json_path, "markdown": md_path}
