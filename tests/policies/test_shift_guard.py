"""The shift guard: clean inputs pass, shifted ones stop being auto-accepted, the trace says why,
and a policy set that cannot guard is refused with the field named. Seeded: real photo crops
(scikit-image) as the reference and the clean traffic; blur, low contrast, dark and heavy-JPEG
copies as the shifted traffic."""

from __future__ import annotations

import asyncio
import hashlib
import json

import cv2
import numpy as np
import pytest

from cascades.pipeline import TierResult, run_cascade
from policies.shift_guard import (
    FEATURES,
    STAGE,
    InputReference,
    ShiftGuard,
    attach_reference,
    input_statistics,
    reference_from_artefact,
    statistics_matrix,
)
from visionroute.errors import ConfigError, InputError
from visionroute.records import Analysis, Decision, Detections, Step

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def crops(seed: int, n: int, side: int = 96) -> list[np.ndarray]:
    """Random square crops of real photos: exchangeable draws from one input distribution."""
    from skimage import data

    rng = np.random.default_rng(seed)
    photos = [getattr(data, name)() for name in PHOTOS]
    out = []
    for _ in range(n):
        photo = photos[rng.integers(len(photos))]
        y, x = rng.integers(0, photo.shape[0] - side), rng.integers(0, photo.shape[1] - side)
        out.append(np.ascontiguousarray(photo[y : y + side, x : x + side]))
    return out


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED)


def noisy(image: np.ndarray, sigma: float) -> np.ndarray:
    noise = np.random.default_rng(0).normal(0, sigma, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


# Strong enough for one input to give itself away (the per-request rule)...
SHIFTS = {
    "defocus": lambda im: cv2.GaussianBlur(im, (0, 0), 5.0),
    "jpeg quality 5": lambda im: jpeg(im, 5),
}
# ...and moderate ones that only many inputs together reveal (the window rule).
MILD_SHIFTS = {
    "slight blur": lambda im: cv2.GaussianBlur(im, (0, 0), 1.0),
    "noise sigma 10": lambda im: noisy(im, 10),
    "low contrast": lambda im: (0.25 * im.astype(np.float32) + 96).astype(np.uint8),
    "dark": lambda im: (0.3 * im.astype(np.float32)).astype(np.uint8),
}


@pytest.fixture(scope="module")
def reference() -> InputReference:
    return InputReference.from_images(crops(0, 150), crops(1, 150), source="photo crops")


@pytest.fixture(scope="module")
def clean() -> list[np.ndarray]:
    return crops(2, 200)


def test_clean_inputs_pass_and_shifted_inputs_are_flagged(reference, clean):
    guard = ShiftGuard(reference, false_alarm_rate=0.02)
    false_alarms = int(guard.is_shifted(statistics_matrix(clean)).sum())
    assert false_alarms <= 10  # seeded; 4 expected at a 2% false-alarm rate
    for name, shift in SHIFTS.items():
        flagged = guard.is_shifted(statistics_matrix([shift(image) for image in clean[:60]]))
        assert flagged.mean() >= 0.9, f"{name}: only {flagged.mean():.0%} flagged"


def test_each_statistic_moves_the_way_its_shift_does(clean):
    shifts = {**SHIFTS, **MILD_SHIFTS}
    base = statistics_matrix(clean[:30]).mean(axis=0)
    moved = {
        name: statistics_matrix([shift(im) for im in clean[:30]]).mean(axis=0)
        for name, shift in shifts.items()
    }
    column = {f: i for i, f in enumerate(FEATURES)}
    assert moved["defocus"][column["sharpness"]] < base[column["sharpness"]] - 1.0
    assert moved["noise sigma 10"][column["sharpness"]] > base[column["sharpness"]] + 0.2
    assert moved["low contrast"][column["contrast"]] < 0.5 * base[column["contrast"]]
    assert moved["dark"][column["brightness"]] < 0.5 * base[column["brightness"]]
    assert moved["jpeg quality 5"][column["blockiness"]] > base[column["blockiness"]] + 0.2
    assert input_statistics(np.zeros((64, 128), np.uint8))[column["log2_pixels"]] == 13.0


@pytest.mark.parametrize("name", list(MILD_SHIFTS))
def test_the_window_rule_sees_a_mild_shift_no_single_input_shows(reference, clean, name):
    shifted = [MILD_SHIFTS[name](image) for image in clean[:100]]
    per_request = ShiftGuard(reference, false_alarm_rate=0.02)
    assert per_request.is_shifted(statistics_matrix(shifted)).mean() < 0.1
    windowed = ShiftGuard(reference, false_alarm_rate=0.02, window=40)
    verdicts = [windowed.check(image) for image in shifted]
    assert all(v.window_p_value is None for v in verdicts[:39])  # the window fills first
    assert np.mean([v.shifted for v in verdicts[40:]]) > 0.9
    assert {v.rule for v in verdicts[40:] if v.shifted} == {"window"}
    # the batch form (evals) judges a stream exactly as check() does one by one
    flags = ShiftGuard(reference, false_alarm_rate=0.02, window=40).flags(statistics_matrix(shifted))
    assert flags["shifted"].tolist() == [v.shifted for v in verdicts]


def test_the_window_rule_stays_quiet_on_clean_traffic(reference, clean):
    flags = ShiftGuard(reference, false_alarm_rate=0.02, window=40).flags(statistics_matrix(clean))
    assert flags["window"].mean() <= 0.05 and flags["shifted"].mean() <= 0.08  # seeded


# --------------------------------------------------------------------------- the trace


def cheap_tier_answering(confidence: float):
    async def cheap_tier(image: np.ndarray) -> TierResult:
        detections = Detections.from_class_probabilities(
            np.array([confidence, 1 - confidence]),
            ["cat", "dog"],
            width=image.shape[1],
            height=image.shape[0],
        )
        return TierResult(detections, "tiny", "tiny==1;sha256:0", 1.0, 1.0)

    return cheap_tier


async def vlm_answers(analysis: Analysis) -> Analysis:
    analysis.trace.append(Step(stage="vlm", decision=Decision.ACCEPT, reason="the VLM agrees"))
    return analysis


def analyse(image: np.ndarray, guard: ShiftGuard | None, vlm=None) -> Analysis:
    from policies.thresholds import ThresholdPolicy

    analysis = Analysis(image_rgb=image, image_sha256="0" * 64, task="classify")
    return asyncio.run(
        run_cascade(
            analysis,
            cheap_tier=cheap_tier_answering(0.97),
            policy=ThresholdPolicy(accept_threshold=0.9, escalate_threshold=0.5),
            vlm=vlm,
            shift_guard=guard,
        )
    )


def test_the_trace_says_why_a_shifted_input_was_not_accepted(reference, clean):
    guard = ShiftGuard(reference, false_alarm_rate=0.02, version="policies-v7", source="cal.json")
    image = clean[0]
    assert not guard.check(image).shifted
    passed = analyse(image, guard)
    assert passed.decision is Decision.ACCEPT
    step = passed.trace.steps[-1]
    assert step.stage == STAGE and step.decision is None and step.reason.startswith("input matches")

    blurred = SHIFTS["defocus"](image)
    reviewed = analyse(blurred, guard)
    assert reviewed.decision is Decision.REVIEW
    step = reviewed.trace.steps[-1]
    assert step.stage == STAGE and step.policy_version == "policies-v7"
    assert step.score is None  # the answer's score stays the cheap tier's (review priority reads it)
    assert "input shift: sharpness" in step.reason and "no VLM is configured" in step.reason
    assert (
        step.details["shifted"]
        and step.details["rule"] == "request"
        and step.details["feature"] == "sharpness"
    )
    assert step.details["reference"] == "cal.json" and step.details["z"]["sharpness"] < 0
    json.dumps(reviewed.trace.to_dict())  # the step is JSON-ready like every other

    escalated = analyse(blurred, guard, vlm=vlm_answers)
    stages = [s.stage for s in escalated.trace.steps]
    assert stages[-2:] == [STAGE, "vlm"] and escalated.trace.steps[-2].decision is Decision.ESCALATE
    assert "ask the VLM" in escalated.trace.steps[-2].reason

    unguarded = analyse(blurred, None)
    assert unguarded.decision is Decision.ACCEPT and STAGE not in [s.stage for s in unguarded.trace.steps]


# --------------------------------------------------------------------------- configuration


@pytest.fixture()
def artefacts(tmp_path, reference):
    from cascades.calibration import fit_classifier

    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet([2, 2], 200)
    calibrator = fit_classifier("temperature", probabilities, rng.integers(0, 2, 200), ["cat", "dog"])
    plain = calibrator.save(tmp_path / "plain.json")
    guarded = attach_reference(calibrator, reference).save(tmp_path / "guarded.json")
    return calibrator, plain, guarded


def test_the_reference_lives_in_the_artefact_and_old_artefacts_keep_their_id(artefacts, reference):
    from cascades.calibration import load_calibration

    calibrator, plain, guarded = artefacts
    document = json.loads(plain.read_text())
    assert "input_reference" not in document  # written as before the field existed
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    assert calibrator.artifact_id == f"temperature@{hashlib.sha256(canonical).hexdigest()[:12]}"
    assert load_calibration(plain).artifact_id == calibrator.artifact_id
    with_reference = load_calibration(guarded)
    assert with_reference.artifact_id != calibrator.artifact_id  # the reference is part of the artefact
    assert reference_from_artefact(str(guarded)) == reference
    with pytest.raises(ConfigError) as info:
        reference_from_artefact(str(plain), field="cascades.classify.tier.calibration")
    assert (
        info.value.field == "cascades.classify.tier.calibration" and "no input_reference" in info.value.reason
    )


def runtime(tmp_path, calibrations, **policy):
    from policies.budgets import BudgetLedger
    from policies.policy_set import PolicySet
    from policies.runtime import PolicyRuntime
    from policies.thresholds import ThresholdPolicy

    return PolicyRuntime(
        PolicySet(**policy),
        BudgetLedger(tmp_path / "budgets.sqlite3"),
        tasks=["classify", "text"],
        base_thresholds={"classify": ThresholdPolicy(), "text": ThresholdPolicy(version="text-v1")},
        calibrations=calibrations,
    )


def test_the_guard_is_off_by_default_and_on_where_configured(tmp_path, artefacts):
    _, plain, guarded = artefacts
    rt = runtime(tmp_path, {"classify": str(plain), "text": None})
    assert rt.shift_guard(rt.current, "classify") is None and not rt.current.shift_guard.enabled
    rt = runtime(tmp_path, {"classify": str(guarded)})
    rt.reconfigure(
        {
            "version": "v2",
            "shift_guard": {"enabled": True, "tasks": ["classify"], "false_alarm_rate": 0.02, "window": 30},
        }
    )
    guard = rt.shift_guard(rt.current, "classify")
    assert guard is not None and guard.window == 30 and guard.version == "v2"
    assert rt.shift_guard(rt.current, "text") is None


@pytest.mark.parametrize(
    ("shift_guard", "calibration", "field"),
    [
        ({"enabled": True}, "guarded", "shift_guard.tasks"),  # 'text' has no artefact
        ({"enabled": True, "tasks": ["classify"]}, "plain", "cascades.classify.tier.calibration"),
        ({"enabled": True, "tasks": ["ocr"]}, "guarded", "shift_guard.tasks"),
        (
            {"enabled": True, "tasks": ["classify"], "false_alarm_rate": 0.001},
            "guarded",
            "shift_guard.false_alarm_rate",
        ),
        (
            {"enabled": True, "tasks": ["classify"], "false_alarm_rate": 0.7},
            "guarded",
            "shift_guard.false_alarm_rate",
        ),
        ({"enabled": True, "tasks": ["classify"], "window": 5}, "guarded", "shift_guard.window"),
        ({"enabled": True, "tasks": ["classify"], "features": ["hue"]}, "guarded", "shift_guard.features"),
        ({"enabled": "sometimes"}, "guarded", "shift_guard.enabled"),
        ({"enabled": True, "threshold": 3}, "guarded", "shift_guard.threshold"),
    ],
)
def test_a_set_that_cannot_guard_is_refused_naming_the_field(
    tmp_path, artefacts, shift_guard, calibration, field
):
    _, plain, guarded = artefacts
    rt = runtime(tmp_path, {"classify": str(guarded if calibration == "guarded" else plain)})
    with pytest.raises(ConfigError) as info:
        rt.reconfigure({"version": "v9", "shift_guard": shift_guard})
    assert info.value.field == field, info.value.reason
    assert rt.current.version == "policies-v1" and rt.shift_guard(rt.current, "classify") is None


def test_bad_images_and_references_are_named(reference):
    with pytest.raises(InputError) as info:
        input_statistics(np.zeros((8, 8), np.int32))
    assert info.value.field == "image"
    with pytest.raises(InputError):
        input_statistics(np.zeros((8,), np.uint8))
    floats = input_statistics(np.full((16, 16), 0.5, np.float32))
    assert floats[FEATURES.index("brightness")] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="one per feature"):
        InputReference.model_validate({**reference.model_dump(), "median": [0.0]})
    with pytest.raises(ConfigError) as info:
        ShiftGuard(reference, false_alarm_rate=0.001)  # 150 held-out images cannot resolve 0.1%
    assert info.value.field == "shift_guard.false_alarm_rate" and "1/(n+1)" in info.value.reason
