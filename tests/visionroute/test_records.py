import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from visionroute.records import Decision, Detections, Step, Trace


def test_detections_validates_shapes_with_expected_and_actual():
    with pytest.raises(ValueError, match=r"xyxy must have shape \(n, 4\), got \(2, 3\)"):
        Detections(np.zeros((2, 3)), np.zeros(2), np.zeros(2))
    with pytest.raises(ValueError, match="equal length"):
        Detections(np.zeros((2, 4)), np.zeros(3), np.zeros(2))


def test_classifier_answer_is_topk_whole_image_rows_best_first():
    probabilities = np.array([0.1, 0.6, 0.3])
    detections = Detections.from_class_probabilities(
        probabilities, ["a", "b", "c"], width=40, height=30, top_k=2
    )
    assert detections.labels == ["b", "c"]
    np.testing.assert_allclose(detections.confidence, [0.6, 0.3], rtol=1e-6)
    np.testing.assert_array_equal(detections.xyxy, [[0, 0, 40, 30]] * 2)
    assert len(detections[detections.confidence > 0.5]) == 1
    assert Detections.empty(["a"]).to_dicts() == []


@given(st.sampled_from(list(Decision)), st.text(min_size=1))
def test_an_errored_step_never_accepts(decision, error):
    if decision is Decision.ACCEPT:
        with pytest.raises(ValueError, match="cannot accept"):
            Step(stage="x", decision=decision, error=error)
    else:
        assert Step(stage="x", decision=decision, error=error).decision is decision


def test_trace_is_append_only_and_round_trips():
    trace = Trace("req-1")
    trace.append(Step(stage="onnx", score=0.4, cost_units=1.0))
    trace.append(Step(stage="policy", decision=Decision.ESCALATE, threshold={"accept": 0.7}))
    trace.append(Step(stage="vlm", decision=Decision.REVIEW, error="timeout", cost_units=2.5))
    assert trace.decision is Decision.REVIEW
    assert trace.cost_units == 3.5
    assert isinstance(trace.steps, tuple)  # callers cannot edit the list in place
    again = Trace.from_dict(trace.to_dict())
    assert again.to_dict() == trace.to_dict()


def test_a_step_as_data_is_what_asdict_gives_and_shares_no_container_with_the_step():
    """``Step.to_dict`` is built field by field (no deep copy): it must still give every field, in
    declaration order, with what ``dataclasses.asdict`` gives, and copies a caller may edit."""
    import dataclasses
    from collections import namedtuple

    @dataclasses.dataclass(frozen=True)
    class Inner:
        name: str
        sizes: tuple[int, ...]

    Pair = namedtuple("Pair", "a b")
    step = Step(
        stage="onnx:classify",
        decision=Decision.ACCEPT,
        threshold={"accept": 0.7, "escalate": 0.3},
        details={
            "nested": {"list": [1, {"x": 2.5}], "tuple": (1, "a")},
            "inner": Inner("n", (1, 2)),
            "pair": Pair(1, [2]),
        },
    )
    expected = dataclasses.asdict(step)
    expected["decision"] = "accept"
    data = step.to_dict()
    assert list(data) == [f.name for f in dataclasses.fields(Step)]  # a new field is never left out
    assert data == expected and type(data["details"]["pair"]) is Pair
    data["details"]["nested"]["list"].append(3)
    data["threshold"]["accept"] = 0.0
    assert step.details["nested"]["list"] == [1, {"x": 2.5}] and step.threshold["accept"] == 0.7
