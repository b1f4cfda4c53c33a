"""Trace replay on JSONL written from real Trace records, and the regression gate."""

from __future__ import annotations

import json

import pytest

from evals.gate import compare
from evals.replay import load_labels, read_traces, replay
from visionroute.errors import InputError
from visionroute.records import Decision, Step, Trace


def _trace(request_id: str, score: float, label: str, vlm_label: str | None) -> Trace:
    trace = Trace(request_id)
    trace.append(Step(stage="onnx:classify", score=score, cost_units=1.0, details={"label": label}))
    decision = Decision.ACCEPT if score >= 0.8 else Decision.ESCALATE
    trace.append(
        Step(
            stage="policy:thresholds",
            decision=decision,
            score=score,
            threshold={"accept": 0.8, "escalate": 0.3},
        )
    )
    if vlm_label is not None:
        trace.append(
            Step(stage="vlm", decision=Decision.ACCEPT, cost_units=10.0, details={"label": vlm_label})
        )
    return trace


@pytest.fixture()
def traces_file(tmp_path):
    rows = [
        # request, cheap score, cheap answer, VLM answer (only when production escalated), truth, metadata
        ("r1", 0.95, "cat", None, "cat", {"source": "web"}),
        ("r2", 0.85, "dog", None, "cat", {"source": "web"}),  # accepted and wrong at 0.8
        ("r3", 0.60, "dog", "cat", "cat", {"source": "phone"}),  # escalated, VLM fixed it
        ("r4", 0.40, "cow", "cow", "cow", {"source": "phone"}),
        ("r5", 0.20, "cat", "dog", "dog", {}),
    ]
    path = tmp_path / "traces.jsonl"
    with path.open("w") as handle:
        for rid, score, label, vlm, truth, meta in rows:
            line = _trace(rid, score, label, vlm).to_dict() | {"metadata": meta}
            if rid != "r5":
                line["ground_truth"] = truth
            handle.write(json.dumps(line) + "\n")
    labels = tmp_path / "labels.csv"
    labels.write_text("request_id,label\nr5,dog\n")
    return path, labels


def test_replaying_the_production_policy_reproduces_its_outcome(traces_file):
    path, labels = traces_file
    items = read_traces(path, load_labels(labels))
    assert [i.ground_truth for i in items] == ["cat", "cat", "cat", "cow", "dog"]
    out = replay(items, accept_threshold=0.8, escalate_threshold=0.1, slice_keys=("source",))
    overall = out["slices"]["all"]
    assert overall["rates"] == {"accept": 0.4, "escalate": 0.6, "review": 0.0}
    assert overall["accepted_error"] == pytest.approx(1 / 5) and overall["unscorable"] == 0
    assert (
        overall["cost_units_per_item"]
        == pytest.approx(overall["recorded_cost_units_per_item"])
        == pytest.approx(7.0)
    )
    assert out["slices"]["source=phone"]["accepted_error"] == 0.0
    assert out["slices"]["source=<missing>"]["n"] == 1


def test_a_stricter_candidate_policy_is_scored_before_shipping(traces_file):
    path, labels = traces_file
    items = read_traces(path, load_labels(labels))
    strict = replay(items, accept_threshold=0.9, escalate_threshold=0.5)["slices"]["all"]
    # r2 (0.85) would now escalate, but production never asked the VLM about it: unscorable
    assert strict["unscorable"] == 1
    assert strict["rates"]["review"] == pytest.approx(0.4)  # r4, r5 below 0.5
    assert strict["accepted_error"] == 0.0
    with pytest.raises(InputError, match="must not exceed"):
        replay(items, accept_threshold=0.5, escalate_threshold=0.9)


def test_bad_trace_lines_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"steps": [{"stage": "onnx", "bogus": 1}]}\n')
    with pytest.raises(InputError, match="bad.jsonl:1"):
        read_traces(path)


def _report(accuracy_by_slice: dict, violated: bool = False) -> dict:
    return {
        "metrics": {"cascade": {name: {"accuracy": acc, "n": 10} for name, acc in accuracy_by_slice.items()}},
        "certified_risk_check": {
            "accept_threshold": {
                "violated": violated,
                "accepted_error": 0.09,
                "n_accepted": 300,
                "alpha": 0.05,
                "delta": 0.1,
                "p_value_exceeds": 0.001,
            }
        },
    }


def test_gate_names_the_slice_that_regressed():
    baseline = _report({"all": 0.95, "lighting=night": 0.90, "lighting=day": 0.97})
    assert compare(_report({"all": 0.94, "lighting=night": 0.82, "lighting=day": 0.97}), baseline) == []
    failures = compare(_report({"all": 0.94, "lighting=night": 0.80, "lighting=day": 0.97}), baseline)
    assert len(failures) == 1 and "'lighting=night'" in failures[0] and "0.8000" in failures[0]
    missing = compare(_report({"all": 0.95, "lighting=day": 0.97}), baseline)
    assert any("'lighting=night'" in f and "no accuracy" in f for f in missing)
    violated = compare(
        _report({"all": 0.95, "lighting=night": 0.90, "lighting=day": 0.97}, violated=True), baseline
    )
    assert violated and "certified risk violated" in violated[0]
