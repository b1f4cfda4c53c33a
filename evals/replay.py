"""Score a routing policy on production traces before shipping it.

Input: a JSONL file, one ``Trace.to_dict()`` per line, with the ground truth either inline
(``"ground_truth": "cat"``) or in a labels file mapping request ids to labels (CSV with columns
``request_id,label`` or a JSON object). Optional ``"metadata": {...}`` on a line feeds slices.

From each trace we take the cheap tier's step (stage ``onnx:*``): its score and its answer;
and, when the item was escalated then, the VLM's step (stage ``vlm*``) and its answer. An
answer is read from ``step.details["label"]`` (or the first of ``details["labels"]`` /
``details["detections"]`` when those are lists of labels or detection dicts).

The candidate policy (accept and escalate thresholds on the cheap score) is replayed on those
recorded facts. An item the candidate would escalate but that never reached the VLM in
production has no recorded VLM answer: it is counted in ``unscorable`` rather than guessed.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evals.slicing import MISSING
from visionroute.errors import InputError
from visionroute.records import Trace


@dataclass(frozen=True)
class ReplayItem:
    request_id: str
    cheap_score: float | None
    cheap_label: str | None
    vlm_label: str | None
    recorded_decision: str | None
    recorded_cost_units: float
    ground_truth: str | None
    metadata: dict[str, Any]


def _answer(details: dict[str, Any]) -> str | None:
    if details.get("label") is not None:
        return str(details["label"])
    for key in ("labels", "detections"):
        value = details.get(key)
        if isinstance(value, list) and value:
            first = value[0]
            return str(first.get("label")) if isinstance(first, dict) else str(first)
    return None


def load_labels(path: Path) -> dict[str, str]:
    path = Path(path)
    if path.suffix == ".json":
        return {str(k): str(v) for k, v in json.loads(path.read_text()).items()}
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"request_id", "label"} <= set(reader.fieldnames):
            raise InputError(
                f"labels file {str(path)!r} needs columns request_id,label; found {reader.fieldnames}",
                field="labels",
            )
        return {row["request_id"]: row["label"] for row in reader}


def read_traces(path: Path, labels: dict[str, str] | None = None) -> list[ReplayItem]:
    items = []
    with Path(path).open() as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                trace = Trace.from_dict(data)
            except (ValueError, TypeError) as exc:
                raise InputError(
                    f"{path}:{line_no} is not a Trace.to_dict() JSON line: {exc}", field="traces"
                ) from exc
            cheap = next((s for s in trace.steps if s.stage.startswith("onnx")), None)
            vlm = next((s for s in trace.steps if s.stage.startswith("vlm") and s.error is None), None)
            truth = data.get("ground_truth")
            if truth is None and labels is not None:
                truth = labels.get(trace.request_id)
            items.append(
                ReplayItem(
                    request_id=trace.request_id,
                    cheap_score=None if cheap is None or cheap.error else cheap.score,
                    cheap_label=_answer(cheap.details) if cheap is not None else None,
                    vlm_label=_answer(vlm.details) if vlm is not None else None,
                    recorded_decision=trace.decision.value if trace.decision else None,
                    recorded_cost_units=trace.cost_units,
                    ground_truth=None if truth is None else str(truth),
                    metadata=dict(data.get("metadata") or {}),
                )
            )
    return items


def replay(
    items: Iterable[ReplayItem],
    *,
    accept_threshold: float,
    escalate_threshold: float,
    cheap_cost: float = 1.0,
    vlm_cost: float = 10.0,
    review_cost: float = 100.0,
    slice_keys: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The candidate policy's decisions, accepted error, coverage and cost, overall and per slice."""
    if escalate_threshold > accept_threshold:
        raise InputError(
            f"escalate_threshold ({escalate_threshold}) must not exceed accept_threshold ({accept_threshold})",
            field="escalate_threshold",
        )
    rows = []
    for item in items:
        score = item.cheap_score
        if score is None:
            decision = "review"  # a failed cheap tier never auto-accepts
        elif score >= accept_threshold:
            decision = "accept"
        elif score >= escalate_threshold:
            decision = "escalate"
        else:
            decision = "review"
        answer = (
            item.cheap_label if decision == "accept" else item.vlm_label if decision == "escalate" else None
        )
        scorable = item.ground_truth is not None and (decision == "review" or answer is not None)
        wrong = decision != "review" and scorable and answer != item.ground_truth
        cost = (
            cheap_cost
            + (vlm_cost if decision == "escalate" else 0.0)
            + (review_cost if decision == "review" else 0.0)
        )
        rows.append((item, decision, scorable, wrong, cost))

    def summarise(selected: list) -> dict[str, Any]:
        n = len(selected)
        auto = [r for r in selected if r[1] != "review" and r[2]]
        recorded = [
            r for r in selected if r[0].ground_truth is not None and r[0].recorded_decision == "accept"
        ]
        return {
            "n": n,
            "rates": {
                d: sum(r[1] == d for r in selected) / n if n else 0.0
                for d in ("accept", "escalate", "review")
            },
            "unscorable": sum(not r[2] for r in selected),
            "auto_accepted_scored": len(auto),
            "accepted_error": sum(r[3] for r in auto) / len(auto) if auto else 0.0,
            "accuracy": 1.0 - (sum(r[3] for r in selected if r[2]) / max(1, sum(r[2] for r in selected))),
            "cost_units_per_item": float(np.mean([r[4] for r in selected])) if n else 0.0,
            "recorded_cost_units_per_item": float(np.mean([r[0].recorded_cost_units for r in selected]))
            if n
            else 0.0,
            "recorded_accepted": len(recorded),
        }

    out = {
        "policy": {"accept_threshold": accept_threshold, "escalate_threshold": escalate_threshold},
        "slices": {"all": summarise(rows)},
    }
    for key in slice_keys:
        values = sorted({str(r[0].metadata.get(key, MISSING)) for r in rows})
        for value in values:
            out["slices"][f"{key}={value}"] = summarise(
                [r for r in rows if str(r[0].metadata.get(key, MISSING)) == value]
            )
    return out
