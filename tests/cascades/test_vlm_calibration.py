"""The VLM's logprob confidence calibrated in the stage, and the certified VLM accept threshold;
the three-tier example's serve config resolving both thresholds from the certificate. A scripted
backend stands in for the server (tests/integration/test_three_tier_digits.py uses the real one)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from cascades.calibration import fit_classifier, fit_detector
from cascades.vlm import VlmConfig, VlmStage
from cascades.vlm.calibration import NEVER_ACCEPT
from cascades.vlm.client import VlmCompletion
from cascades.vlm.confidence import TokenLogprob
from router.config import parse_app_config
from visionroute.errors import ConfigError
from visionroute.records import Analysis, Decision

LABELS = ("cat", "dog", "coffee cup")


class ScriptedBackend:
    def __init__(self, completion: VlmCompletion) -> None:
        self.completion = completion

    def complete(self, request) -> VlmCompletion:
        return self.completion


def answer(label: str, logprob: float) -> VlmCompletion:
    pieces = ['{"label":"', label, '"}']
    tokens = tuple(TokenLogprob(p, lp, p.encode()) for p, lp in zip(pieces, [0.0, logprob, 0.0]))
    return VlmCompletion("".join(pieces), "stop", tokens, 100, 3, "m", 1, 5.0)


def analysis() -> Analysis:
    return Analysis(np.zeros((32, 32, 3), np.uint8), "0" * 64, "classify")


def overconfident_calibrator(tmp_path, certificate=None, name="vlm.json"):
    """Platt on answers whose raw confidence overstates them: right only half the time at 0.9."""
    rng = np.random.default_rng(0)
    raw = rng.uniform(0.5, 1.0, size=400)
    correct = rng.uniform(size=400) < (raw - 0.5)  # 0.9 raw -> right 40% of the time
    calibrator = fit_detector("platt", raw, rng.integers(0, 3, size=400), correct, LABELS)
    if certificate is not None:
        calibrator = calibrator.with_certificate(certificate)
    return calibrator, calibrator.save(tmp_path / name)


def certificate(vlm_accept, feasible=True) -> dict:
    return {
        "feasible": feasible,
        "threshold": 0.2 if feasible else None,
        "three_tier": {"accept_threshold": 0.9, "review_threshold": 0.2, "vlm_accept_threshold": vlm_accept},
    }


def test_the_threshold_is_compared_with_the_calibrated_confidence(tmp_path):
    calibrator, path = overconfident_calibrator(tmp_path)
    config = VlmConfig(labels=LABELS, calibration=str(path), accept_threshold=0.6)
    raw = math.exp(-0.105)  # about 0.9: above the threshold before calibration
    step = VlmStage(config, ScriptedBackend(answer("dog", -0.105))).run(analysis()).trace.steps[-1]
    expected = float(calibrator.calibrate_scores(np.array([raw]), np.array([1]))[0])
    assert expected < 0.6 < raw  # the calibrator lowers it below the threshold
    assert step.decision is Decision.REVIEW and "< accept threshold 0.6" in step.reason
    assert step.score == pytest.approx(expected)
    assert step.details["raw_score"] == pytest.approx(raw)
    assert step.details["calibrated_score"] == pytest.approx(expected)
    assert step.details["calibration"] == calibrator.artifact_id
    # without the calibration the same answer is accepted on its raw confidence
    plain = VlmStage(VlmConfig(labels=LABELS, accept_threshold=0.6), ScriptedBackend(answer("dog", -0.105)))
    assert plain.run(analysis()).trace.steps[-1].decision is Decision.ACCEPT


def test_a_failed_call_still_names_the_calibration(tmp_path):
    calibrator, path = overconfident_calibrator(tmp_path)

    class Down:
        def complete(self, request):
            from cascades.vlm.client import VlmBackendError

            raise VlmBackendError("refused", kind="connection", attempts=1)

    step = VlmStage(VlmConfig(labels=LABELS, calibration=str(path)), Down()).run(analysis()).trace.steps[-1]
    assert step.decision is Decision.REVIEW and step.details["calibration"] == calibrator.artifact_id
    assert "raw_score" not in step.details and step.score is None


def test_the_accept_threshold_comes_from_the_certificate(tmp_path):
    calibrator, path = overconfident_calibrator(tmp_path, certificate(0.35))
    config = VlmConfig(
        labels=LABELS, calibration=str(path), accept_threshold_from_certificate=True, policy_version="v"
    )
    stage = VlmStage(config, ScriptedBackend(answer("cat", -0.01)))
    assert stage.policy.accept_threshold == 0.35 and stage.policy.version == f"v+{calibrator.artifact_id}"
    step = stage.run(analysis()).trace.steps[-1]
    assert step.threshold["accept"] == 0.35 and step.policy_version == f"v+{calibrator.artifact_id}"
    assert step.decision is (Decision.ACCEPT if step.score >= 0.35 else Decision.REVIEW)


@pytest.mark.parametrize(
    ("vlm_accept", "feasible", "expected"),
    [("-inf", True, 0.0), ("inf", True, NEVER_ACCEPT), (0.4, False, NEVER_ACCEPT)],
)
def test_infinite_and_infeasible_certificates(tmp_path, vlm_accept, feasible, expected):
    _, path = overconfident_calibrator(tmp_path, certificate(vlm_accept, feasible))
    config = VlmConfig(labels=LABELS, calibration=str(path), accept_threshold_from_certificate=True)
    stage = VlmStage(config, ScriptedBackend(answer("cat", 0.0)))
    assert stage.policy.accept_threshold == expected
    step = stage.run(analysis()).trace.steps[-1]  # raw confidence 1.0
    assert step.decision is (Decision.REVIEW if expected > 1.0 else Decision.ACCEPT)


def app_args(vlm: dict) -> dict:
    return {
        "default_task": "pets",
        "cascades": {"pets": {"tier": {"model": "digits_cheap"}, "vlm": {"labels": list(LABELS), **vlm}}},
    }


def test_bad_calibration_is_a_config_error_naming_the_field(tmp_path):
    with pytest.raises(ConfigError) as missing:
        parse_app_config(app_args({"calibration": str(tmp_path / "nope.json")}))
    assert missing.value.field == "cascades.pets.vlm.calibration"
    assert "does not exist" in str(missing.value)

    temperature = fit_classifier(
        "temperature", np.eye(3)[[0, 1, 2, 0]] * 0.9 + 0.03, np.array([0, 1, 2, 1]), LABELS
    )
    with pytest.raises(ConfigError, match="per-answer map, 'platt' or 'isotonic'") as wrong_method:
        parse_app_config(app_args({"calibration": str(temperature.save(tmp_path / "t.json"))}))
    assert wrong_method.value.field == "cascades.pets.vlm.calibration"

    _, path = overconfident_calibrator(tmp_path)
    with pytest.raises(ConfigError, match=r"fitted for answers \['cat', 'dog', 'coffee cup'\]"):
        parse_app_config(app_args({"calibration": str(path), "labels": ["a", "b", "c"]}))
    with pytest.raises(ConfigError, match="no three-tier certificate with a vlm_accept_threshold"):
        parse_app_config(app_args({"calibration": str(path), "accept_threshold_from_certificate": True}))
    with pytest.raises(ValidationError, match="accept_threshold_from_certificate needs calibration"):
        VlmConfig(labels=LABELS, accept_threshold_from_certificate=True)


def test_the_example_serve_config_takes_both_thresholds_from_the_certificate(tmp_path):
    """serve_config.digits.yaml, filled in by the example, resolves to the certified thresholds."""
    from examples.digits import ExampleBuild, serve_document, write_serve_config
    from examples.train_digits import LABELS as DIGITS

    rng = np.random.default_rng(1)
    document = certificate(0.42)
    document["three_tier"] |= {"accept_threshold": 0.93, "review_threshold": 0.31}
    scores, ids, right = rng.uniform(size=200), rng.integers(0, 10, 200), rng.uniform(size=200) < 0.8
    paths = [
        fit_detector("platt", scores, ids, right, DIGITS).with_certificate(document).save(tmp_path / name)
        for name in ("cheap.json", "vlm.json")
    ]
    build = ExampleBuild(tmp_path, tmp_path / "models", paths[0], paths[1], None, document, {})
    config_doc = serve_document(
        build,
        http_port=8123,
        vlm_endpoint="http://127.0.0.1:8199/v1",
        vlm_model="digits-llava",
        vlm_model_version="x@sha256:1",
    )
    path = write_serve_config(config_doc, tmp_path / "serve_config.yaml")  # check-config passes
    app = parse_app_config(config_doc["applications"][0]["args"])
    cascade = app.cascades["digits"]
    assert (cascade.policy.accept_threshold, cascade.policy.escalate_threshold) == (0.93, 0.31)
    assert cascade.tier.calibration == str(paths[0]) and cascade.vlm.calibration == str(paths[1])
    assert VlmStage(cascade.vlm, backend=object()).policy.accept_threshold == 0.42
    assert config_doc["http_options"]["port"] == 8123 and path.exists()
