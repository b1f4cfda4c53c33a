"""A model card as Markdown: the same facts as its JSON, laid out for people."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: model_card_schema imports this module to render a card
    from router.services.model_card_schema import CertificateSummary, ModelCard

LABELS_SHOWN = 20
SLICE_COLUMNS = ("n", "accuracy", "ece", "mce", "mean_confidence", "aurc", "top5_accuracy")
ROBUSTNESS_COLUMNS = ("corruption", "severity", "accuracy", "ece", "coverage", "accepted_error")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list | tuple):
        value = json.dumps(value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[str]:
    lines = [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}"]
    lines += [f"| {' | '.join(_cell(value) for value in row)} |" for row in rows]
    return lines


def _fields(values: dict[str, Any]) -> list[str]:
    return _table(
        ("field", "value"), [(key, value) for key, value in values.items() if value not in (None, {}, [])]
    )


def _certificate(certificate: CertificateSummary) -> list[str]:
    lines = ["", "### Risk certificate", ""]
    if certificate.statement:
        lines += [certificate.statement, ""]
    rows = certificate.model_dump(exclude={"statement", "three_tier", "split"})
    lines += _fields(rows)
    if certificate.three_tier:
        lines += ["", "Three tiers (accept / escalate / review):", ""] + _fields(certificate.three_tier)
    if certificate.split:
        lines += ["", f"Calibration split: `{json.dumps(certificate.split)}`"]
    return lines


def _routing(routing: dict[str, Any]) -> list[str]:
    """A policy set's per-task thresholds as one table; other routing facts as fields."""
    per_task = routing.get("thresholds")
    if not (isinstance(per_task, dict) and per_task and all(isinstance(v, dict) for v in per_task.values())):
        return _fields(routing)
    columns = list(dict.fromkeys(key for row in per_task.values() for key in row))
    lines = _table(
        ("task", *columns), [(task, *(row.get(c) for c in columns)) for task, row in per_task.items()]
    )
    rest = {key: value for key, value in routing.items() if key != "thresholds"}
    return lines + (["", *_fields(rest)] if rest else [])


def render(card: ModelCard) -> str:
    lines = [f"# {card.title}", ""]
    lines.append(
        f"Card `{card.name}` ({card.kind}{f', task `{card.task}`' if card.task else ''}; schema {card.schema_})"
    )
    if card.model is not None:
        model = card.model.model_dump(exclude={"details"})
        lines += ["", "## Model", ""] + _fields(model)
        if card.model.details:
            lines += ["", "Recorded with it:", ""] + _fields(card.model.details)
    if card.inputs:
        lines += ["", "## Inputs", ""]
        inputs = dict(card.inputs)
        preprocess, sources = inputs.pop("preprocess", None), inputs.pop("preprocess_sources", {}) or {}
        lines += _fields(inputs)
        if preprocess:
            lines += ["", "Preprocessing (value, where it came from):", ""]
            lines += _table(
                ("setting", "value", "from"),
                [(key, value, sources.get(key, "default")) for key, value in preprocess.items()],
            )
    if card.labels is not None:
        shown = ", ".join(f"`{name}`" for name in card.labels.names[:LABELS_SHOWN])
        more = f" and {card.labels.count - LABELS_SHOWN} more" if card.labels.count > LABELS_SHOWN else ""
        count = f"{card.labels.count} label{'s' if card.labels.count != 1 else ''}"
        lines += ["", "## Labels", "", f"{count} (from {card.labels.source}): {shown}{more}"]
    if card.calibration is not None:
        calibration = card.calibration
        lines += ["", "## Calibration", ""]
        lines += _fields(calibration.model_dump(exclude={"certificate", "fit_metrics", "fitted_on_model"}))
        if calibration.fitted_on_model:
            lines += ["", f"Fitted on model: `{json.dumps(calibration.fitted_on_model)}`"]
        if calibration.fit_metrics:
            lines += ["", "Fit metrics (calibration data):", ""] + _fields(calibration.fit_metrics)
        if calibration.certificate is not None:
            lines += _certificate(calibration.certificate)
        elif not calibration.error:
            lines += ["", "No risk certificate in this artefact."]
    if card.routing:
        lines += ["", "## Routing", ""] + _routing(card.routing)
    if card.policy is not None:
        lines += ["", "## Policy set settings", "", "```json", json.dumps(card.policy, indent=2), "```"]
    if card.evaluation is not None:
        evaluation = card.evaluation
        lines += ["", "## Evaluation", "", evaluation.status]
        if evaluation.report:
            lines += ["", f"Report: `{evaluation.report}` ({evaluation.created_at or 'undated'})"]
        if evaluation.dataset:
            lines += ["", f"Dataset: `{json.dumps(evaluation.dataset)}`"]
        if evaluation.slices:
            present = [c for c in SLICE_COLUMNS if any(c in m for m in evaluation.slices.values())]
            lines += ["", f"Metrics by slice (suite `{evaluation.suite}`):", ""]
            lines += _table(
                ("slice", *present),
                [(name, *(metrics.get(c) for c in present)) for name, metrics in evaluation.slices.items()],
            )
        if evaluation.calibration_artifact_id:
            which = {
                True: "the deployed artefact",
                False: "NOT the deployed artefact: its certificate and calibrated figures describe another calibration",
                None: "no calibration is deployed",
            }[evaluation.same_calibration]
            lines += ["", f"Calibration used by the report: `{evaluation.calibration_artifact_id}` ({which})"]
        if evaluation.certified_risk_check:
            check = json.dumps(evaluation.certified_risk_check)
            lines += ["", f"Held-out check of the report's certificate: `{check}`"]
        if evaluation.robustness:
            lines += ["", "### Robustness (corrupted held-out images, no shift guard)", ""]
            lines += _table(
                ROBUSTNESS_COLUMNS,
                [tuple(row.get(c) for c in ROBUSTNESS_COLUMNS) for row in evaluation.robustness],
            )
        if evaluation.bound_breaks is not None:
            breaks = {
                name: {key: value for key, value in entry.items() if value is not None}
                for name, entry in evaluation.bound_breaks.items()
                if any(value is not None for value in entry.values())
            }
            lines.append("")
            lines.append(
                f"First severity whose accepted error exceeds the report's alpha: `{json.dumps(breaks)}`"
                if breaks
                else "No corruption tested pushed the accepted error above the report's alpha."
            )
    lines += ["", "## Known limitations", ""]
    lines += [f"- {line}" for line in card.limitations] or ["- none recorded"]
    lines += ["", "## Sources", ""] + [f"- {line}" for line in card.sources]
    return "\n".join(lines) + "\n"
