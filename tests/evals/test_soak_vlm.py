"""The soak's VLM tier and fault (evals/benchmarks/soak_vlm.py) without servers: the config it
serves, how answers are classified and counted per phase, and the options it refuses."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from evals.benchmarks.soak import SoakOptions, soak_document
from evals.benchmarks.soak_vlm import VLM_TASK, phases, vlm_outcome, vlm_summary
from visionroute.errors import ConfigError


def body(decision: str, review_item_id: str | None, vlm_step: dict | None) -> SimpleNamespace:
    steps = [{"stage": "onnx:classify"}] + ([vlm_step] if vlm_step else [])
    return SimpleNamespace(decision=decision, review_item_id=review_item_id, trace={"steps": steps})


def test_the_soak_config_with_a_vlm_endpoint_is_a_valid_app_config_whose_vlm_task_escalates(tmp_path):
    from router.config import AppConfig

    options = SoakOptions(minutes=1, vlm=True, faults=("vlm",))
    document = soak_document(tmp_path / "models", tmp_path, options, "http://127.0.0.1:8123/v1")
    config = AppConfig.model_validate(document["applications"][0]["args"])
    vlm_cascade = config.cascades[VLM_TASK]
    assert vlm_cascade.vlm is not None and vlm_cascade.vlm.endpoint == "http://127.0.0.1:8123/v1"
    # noise scores fall between the thresholds: every analysis on the task reaches the VLM
    assert vlm_cascade.policy.escalate_threshold == 0.0 and vlm_cascade.policy.accept_threshold == 0.99
    # the soak client waits 30 s: the VLM's own deadline ends before it
    assert vlm_cascade.vlm.total_timeout_s < 30
    assert config.cascades["classify"].vlm is None
    without = soak_document(tmp_path / "models", tmp_path, SoakOptions(minutes=1))
    assert VLM_TASK not in without["applications"][0]["args"]["cascades"]


def test_an_escalation_is_an_answer_a_recorded_fallback_or_a_violation():
    assert vlm_outcome(body("accept", None, {"stage": "vlm", "error": None})) == "answer"
    down = {"stage": "vlm", "error": "connection refused", "details": {"failure": "connection"}}
    assert vlm_outcome(body("review", "item-1", down)) == "fallback:connection"
    assert vlm_outcome(body("review", None, down)) == "failed without review item"
    assert vlm_outcome(body("review", "item-2", None)) == "no vlm step"


def test_outcomes_are_counted_per_phase_around_each_kill_and_restart():
    events = [
        {"fault": "postgres"},
        {"fault": "vlm", "killed_at_s": 100.0, "ready_at_s": 250.0},
        {"fault": "vlm", "skipped": "the previous restart is not ready yet"},
    ]
    outcomes = [
        (10.0, "answer"),
        (120.0, "fallback:connection"),
        (130.0, "fallback:circuit_open"),
        (255.0, "fallback:circuit_open"),  # the breaker still open just after readiness
        (270.0, "answer"),
        (301.0, "answer"),  # answered after the traffic's end: the last phase
    ]
    rows = phases(outcomes, events, ran_s=300.0)
    assert [(r["phase"], r["from_s"], r["to_s"]) for r in rows] == [
        ("up", 0.0, 100.0),
        ("down", 100.0, 250.0),
        ("up", 250.0, 300.0),
    ]
    assert [(r["answers"], r["vlm_down_fallbacks"]) for r in rows] == [(1, 0), (0, 2), (2, 1)]
    assert rows[1]["fallback_failures"] == {"connection": 1, "circuit_open": 1}
    assert rows[2]["first_answer_after_s"] == 20.0
    summary = vlm_summary(outcomes, events, 300.0)
    assert summary["healthy"] and summary["answers"] == 3 and summary["vlm_down_fallbacks"] == 3


def test_a_restart_that_never_answers_again_or_a_fallback_without_an_item_is_unhealthy():
    events = [{"fault": "vlm", "killed_at_s": 50.0, "ready_at_s": 100.0}]
    never_again = [(10.0, "answer"), (60.0, "fallback:connection"), (150.0, "fallback:timeout")]
    assert vlm_summary(never_again, events, 200.0)["up_again_without_answer"] == 1
    assert not vlm_summary(never_again, events, 200.0)["healthy"]
    lost = [(10.0, "answer"), (60.0, "failed without review item"), (150.0, "answer")]
    summary = vlm_summary(lost, events, 200.0)
    assert summary["violations"] == 1 and not summary["healthy"]
    # a server that never came back: the outage lasts to the end
    down_to_end = phases([(60.0, "fallback:connection")], [{"fault": "vlm", "killed_at_s": 50.0}], 200.0)
    assert [(r["phase"], r["to_s"]) for r in down_to_end][-2:] == [("down", 200.0), ("up", 200.0)]


def test_the_vlm_fault_needs_the_vlm_tier():
    with pytest.raises(ConfigError) as error:
        SoakOptions(minutes=1, faults=("postgres", "vlm"))
    assert error.value.field == "faults"
    assert "vlm" in SoakOptions(minutes=30, vlm=True, faults=("postgres", "vlm")).faults
    schedule = SoakOptions(minutes=30, vlm=True, faults=("postgres", "ingress", "search", "vlm")).schedule()
    assert [f for _, f in schedule].count("vlm") >= 4
