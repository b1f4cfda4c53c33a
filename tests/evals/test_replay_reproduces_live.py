"""Replay reproduces production: traces recorded by the real pipeline, replayed under the same
policy, give every live decision back (and its reason), for every branch of the rule."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import numpy as np
import pytest

from cascades.pipeline import TierResult, run_cascade
from evals.replay import read_traces, replay, replay_decision
from policies.thresholds import ThresholdPolicy
from visionroute.errors import InputError
from visionroute.records import Analysis, Decision, Detections, Step, Trace

CLASSIFY = ThresholdPolicy(version="classify-v1", accept_threshold=0.7, escalate_threshold=0.3)
TEXT_ACCEPT_EMPTY = ThresholdPolicy(
    version="text-v1", score="min_box", accept_threshold=0.6, escalate_threshold=0.4
)
TEXT_REVIEW_EMPTY = ThresholdPolicy(
    version="text-v2", score="min_box", accept_threshold=0.6, escalate_threshold=0.4, empty_result="review"
)
MEAN = ThresholdPolicy(version="mean-v1", score="mean_box", accept_threshold=0.7, escalate_threshold=0.3)
POLICIES = {p.version: p for p in (CLASSIFY, TEXT_ACCEPT_EMPTY, TEXT_REVIEW_EMPTY, MEAN)}


def classes(*confidences: float, calibrated: bool = False) -> Detections:
    n = len(confidences)
    return Detections(
        np.tile([0, 0, 32, 32], (n, 1)),
        np.array(confidences),
        np.arange(n),
        ("cat", "dog", "cow"),
        is_calibrated=calibrated,
    )


def boxes(*confidences: float) -> Detections:
    n = len(confidences)
    return Detections(np.tile([1, 2, 10, 12], (n, 1)), np.array(confidences), np.full(n, -1), ())


async def vlm_answers(analysis: Analysis) -> Analysis:
    analysis.trace.append(
        Step(stage="vlm", decision=Decision.ACCEPT, cost_units=10.0, details={"label": "cat"})
    )
    return analysis


async def vlm_unreachable(analysis: Analysis) -> Analysis:
    raise ConnectionError("vllm down")


@dataclass(frozen=True)
class Case:
    name: str
    answer: Detections | None  # None: the cheap tier raises
    policy: ThresholdPolicy
    vlm: object | None
    expected: Decision  # what the live policy step decides (guards the cases' intent)


CASES = [
    Case("classifier above accept", classes(0.95, 0.03), CLASSIFY, vlm_answers, Decision.ACCEPT),
    Case("classifier between, VLM", classes(0.5, 0.3), CLASSIFY, vlm_answers, Decision.ESCALATE),
    Case("classifier between, VLM down", classes(0.45), CLASSIFY, vlm_unreachable, Decision.ESCALATE),
    Case("classifier between, no VLM", classes(0.5, 0.3), CLASSIFY, None, Decision.REVIEW),
    Case("classifier below escalate", classes(0.1, 0.05), CLASSIFY, vlm_answers, Decision.REVIEW),
    Case("calibrated, above", classes(0.91, calibrated=True), CLASSIFY, None, Decision.ACCEPT),
    # float32(0.7) = 0.69999998 < 0.7: the replayed score must be the same float32
    Case("float32 just under accept", classes(0.7), CLASSIFY, vlm_answers, Decision.ESCALATE),
    Case("float32 just over accept", boxes(0.75, 0.6), TEXT_ACCEPT_EMPTY, None, Decision.ACCEPT),
    Case("empty, empty_result accept", boxes(), TEXT_ACCEPT_EMPTY, None, Decision.ACCEPT),
    Case("empty, empty_result review", boxes(), TEXT_REVIEW_EMPTY, vlm_answers, Decision.REVIEW),
    Case("min_box: one unsure box", boxes(0.95, 0.5, 0.9), TEXT_ACCEPT_EMPTY, vlm_answers, Decision.ESCALATE),
    Case("min_box, no VLM", boxes(0.95, 0.5), TEXT_REVIEW_EMPTY, None, Decision.REVIEW),
    Case("min_box below", boxes(0.99, 0.2), TEXT_ACCEPT_EMPTY, vlm_answers, Decision.REVIEW),
    Case("mean_box between", boxes(0.9, 0.2), MEAN, vlm_answers, Decision.ESCALATE),
    Case("mean_box above", boxes(0.9, 0.8, 0.7), MEAN, None, Decision.ACCEPT),
    Case("cheap tier fails", None, CLASSIFY, vlm_answers, Decision.REVIEW),
    Case("cheap tier fails, no VLM", None, TEXT_REVIEW_EMPTY, None, Decision.REVIEW),
]


def live_trace(case: Case, request_id: str) -> Trace:
    """One request through the real cascade; only the cheap tier's answer is chosen."""

    async def cheap_tier(image: np.ndarray) -> TierResult:
        if case.answer is None:
            raise RuntimeError("onnxruntime session lost")
        calibration = {"calibration": "temperature@0123456789ab"} if case.answer.is_calibrated else None
        return TierResult(case.answer, "tiny", "tiny==1;sha256:0", 1.5, 1.0, calibration)

    analysis = Analysis(
        image_rgb=np.zeros((32, 32, 3), np.uint8),
        image_sha256="0" * 64,
        task="classify",
        trace=Trace(request_id),
    )
    analysis = asyncio.run(run_cascade(analysis, cheap_tier=cheap_tier, policy=case.policy, vlm=case.vlm))
    return analysis.trace


def policy_decision(trace: Trace) -> Step:
    """The live rule's step: the policy step, or the failed cheap step that decided instead."""
    policy = [s for s in trace.steps if s.stage == "policy:thresholds"]
    failed = [s for s in trace.steps if s.stage.startswith("onnx") and s.error is not None]
    (step,) = policy or failed
    return step


@pytest.fixture()
def recorded(tmp_path):
    """The traces as JSONL, exactly Trace.to_dict() per line; and the live decisions."""
    path = tmp_path / "traces.jsonl"
    live = {}
    with path.open("w") as handle:
        for index, case in enumerate(CASES):
            request_id = f"r{index:02d}"
            trace = live_trace(case, request_id)
            step = policy_decision(trace)
            assert step.decision is case.expected, case.name
            live[request_id] = (case, step)
            handle.write(json.dumps(trace.to_dict()) + "\n")
    return path, live


def test_replay_under_the_live_policy_reproduces_every_live_decision(recorded):
    path, live = recorded
    items = read_traces(path)
    assert [i.request_id for i in items] == sorted(live)
    for item in items:
        case, step = live[item.request_id]
        decision, reason = replay_decision(item, case.policy)
        assert (decision, reason) == (step.decision, step.reason), case.name

    # the summary agrees too, per live policy, in both the policy and the keyword form
    for version, policy in POLICIES.items():
        group = [i for i in items if live[i.request_id][0].policy is policy]
        expected = [live[i.request_id][1].decision.value for i in group]
        rates = {d: expected.count(d) / len(group) for d in ("accept", "escalate", "review")}
        for out in (
            replay(group, policy),
            replay(
                group,
                accept_threshold=policy.accept_threshold,
                escalate_threshold=policy.escalate_threshold,
            ),
        ):
            overall = out["slices"]["all"]
            assert overall["changed_decisions"] == 0, version
            assert overall["rates"] == pytest.approx(rates), version
            assert overall["recorded_score_only"] == 0


def test_traces_from_before_the_new_fields_still_load_and_reproduce(recorded, tmp_path):
    path, live = recorded
    old = tmp_path / "old.jsonl"
    with path.open() as source, old.open("w") as handle:
        for line in source:
            data = json.loads(line)
            for step in data["steps"]:
                for key in ("confidences", "is_calibrated", "vlm_available", "score_rule", "empty_result"):
                    step["details"].pop(key, None)
            handle.write(json.dumps(data) + "\n")
    items = read_traces(old)
    for item in items:
        case, step = live[item.request_id]
        assert item.cheap_confidences is None
        assert replay_decision(item, case.policy) == (step.decision, step.reason), case.name
    answered = sum(case.answer is not None for case in CASES)
    assert replay(items, CLASSIFY)["slices"]["all"]["recorded_score_only"] == answered


def test_a_candidate_policy_is_judged_on_the_recorded_confidences(recorded):
    path, live = recorded
    items = {i.request_id: i for i in read_traces(path)}
    index = {case.name: f"r{n:02d}" for n, case in enumerate(CASES)}

    def under(name: str, policy: ThresholdPolicy, **kwargs) -> Decision:
        return replay_decision(items[index[name]], policy, **kwargs)[0]

    # The score rule is the candidate's, recomputed from every box's confidence.
    assert under("min_box: one unsure box", TEXT_ACCEPT_EMPTY) is Decision.ESCALATE
    top1 = TEXT_ACCEPT_EMPTY.model_copy(update={"score": "top1"})
    assert under("min_box: one unsure box", top1) is Decision.ACCEPT
    assert under("mean_box between", MEAN.model_copy(update={"score": "top1"})) is Decision.ACCEPT
    # Empty answers follow the candidate's empty_result.
    assert under("empty, empty_result accept", TEXT_REVIEW_EMPTY) is Decision.REVIEW
    assert under("empty, empty_result review", TEXT_ACCEPT_EMPTY) is Decision.ACCEPT
    # A VLM the trace did not have (or had) can be assumed.
    assert under("classifier between, no VLM", CLASSIFY) is Decision.REVIEW
    assert under("classifier between, no VLM", CLASSIFY, vlm_available=True) is Decision.ESCALATE
    assert under("classifier between, VLM", CLASSIFY, vlm_available=False) is Decision.REVIEW
    # A failed cheap tier is reviewed whatever the candidate.
    lenient = ThresholdPolicy(accept_threshold=0.0, escalate_threshold=0.0)
    assert under("cheap tier fails", lenient) is Decision.REVIEW

    summary = replay(list(items.values()), top1)["slices"]["all"]
    assert summary["changed_decisions"] > 0


def test_replay_takes_a_policy_or_both_thresholds(recorded):
    items = read_traces(recorded[0])
    with pytest.raises(InputError, match="not both"):
        replay(items, CLASSIFY, accept_threshold=0.9)
    with pytest.raises(InputError, match="both accept_threshold and escalate_threshold"):
        replay(items, accept_threshold=0.9)
    with pytest.raises(InputError, match="must not exceed"):
        replay(items, accept_threshold=0.5, escalate_threshold=0.9)
    with pytest.raises(InputError, match="less than or equal to 1"):
        replay(items, accept_threshold=1.5, escalate_threshold=0.9)
    out = replay(items, CLASSIFY, vlm_available=False)
    assert out["policy"]["score"] == "top1" and out["policy"]["vlm_available"] is False
    assert out["slices"]["all"]["rates"]["escalate"] == 0.0


def test_a_malformed_new_field_names_the_line(tmp_path):
    trace = Trace("r1")
    trace.append(Step(stage="onnx:classify", score=0.9, details={"confidences": ["high"]}))
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(trace.to_dict()) + "\n")
    with pytest.raises(InputError, match="bad.jsonl:1"):
        read_traces(path)
