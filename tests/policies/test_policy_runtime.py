"""PolicyRuntime: validated swaps, refusals keep the running set, budget refusals carry their mode."""

from __future__ import annotations

import numpy as np
import pytest

from policies.budgets import BudgetLedger
from policies.policy_set import PolicySet
from policies.runtime import PolicyRuntime, Refusal
from policies.thresholds import ThresholdPolicy
from visionroute.errors import ConfigError
from visionroute.records import Analysis, Decision, Detections, Step

BASE = {"classify": ThresholdPolicy(version="classify-v1")}


def runtime(tmp_path, **policy) -> PolicyRuntime:
    return PolicyRuntime(
        PolicySet(**policy), BudgetLedger(tmp_path / "b.sqlite3"), tasks=["classify"], base_thresholds=BASE
    )


def accepted(request_id: str) -> Analysis:
    analysis = Analysis(
        np.zeros((4, 4, 3), np.uint8),
        "0" * 64,
        "classify",
        detections=Detections.from_class_probabilities(np.array([0.9, 0.1]), ["a", "b"], width=4, height=4),
    )
    analysis.trace.request_id = request_id
    analysis.trace.append(Step(stage="policy:thresholds", decision=Decision.ACCEPT))
    return analysis


def test_valid_change_applies_and_invalid_keeps_the_running_set(tmp_path):
    rt = runtime(tmp_path)
    rt.reconfigure(
        {"version": "v2", "thresholds": {"classify": {"version": "classify-v2", "accept_threshold": 0.9}}}
    )
    assert rt.current.version == "v2" and rt.thresholds(rt.current, "classify").accept_threshold == 0.9
    for bad, field in [
        (
            {"version": "v3", "budgets": [{"name": "b", "window_s": 60, "cap_units": -1}]},
            "budgets.0.cap_units",
        ),
        ({"version": "v3", "thresholds": {"ocr": {}}}, "thresholds"),
        ({"version": "v3", "audit": {"fraction": 1.5}}, "audit.fraction"),
        (
            {
                "version": "v3",
                "thresholds": {"classify": {"version": "classify-v2", "accept_threshold": 0.8}},
            },
            "thresholds.classify.version",
        ),  # changed thresholds under an old version name
    ]:
        with pytest.raises(ConfigError) as info:
            rt.reconfigure(bad)
        assert info.value.field == field
        assert rt.current.version == "v2"
    assert [h["result"] for h in rt.history] == [
        "initial",
        "applied",
        "rejected",
        "rejected",
        "rejected",
        "rejected",
    ]


def test_refusal_carries_the_degrade_mode(tmp_path):
    rt = runtime(
        tmp_path, budgets=[{"name": "zero", "window_s": 60, "cap_units": 0, "degrade": "accept_degraded"}]
    )
    refusal = rt.reserve(rt.current, accepted("r1"), "review", 1.0)
    assert isinstance(refusal, Refusal) and refusal.mode == "accept_degraded"
    step = refusal.step("v1", Decision.ACCEPT, "degraded")
    assert step.details["degraded"] and step.details["budget"] == "zero" and step.policy_version == "v1"


def test_audit_sampling_only_samples_accepts(tmp_path):
    rt = runtime(tmp_path, audit={"fraction": 1.0})
    assert rt.audit_sampled(rt.current, accepted("r1"))
    reviewed = accepted("r2")
    reviewed.trace.append(Step(stage="review_queue", decision=Decision.REVIEW))
    assert not rt.audit_sampled(rt.current, reviewed)
    assert not runtime(tmp_path).audit_sampled(PolicySet(), accepted("r3"))  # default fraction is 0
