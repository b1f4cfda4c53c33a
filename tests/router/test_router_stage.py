"""The learned router on the request path (cascades/router_stage.py): the ``router`` step (score,
features, version) through the service with the real colour model; the declared order holds it
only when a cascade names a router; a failing feature falls back to the confidence-only certified
thresholds (never an uncertified accept); a mismatched artefact is a ConfigError naming the field
at start-up; the plans certified by ``certify_router_plans`` round-trip through the artefact."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from cascades.learned_router import (
    CertifiedThresholds,
    RouterArtefact,
    RouterPlans,
    certify_router_plans,
    fit_router,
)
from cascades.pipeline import CascadeRun, DecideStage
from cascades.router_features import FeatureSpec, ReferenceIndex, input_features
from cascades.router_stage import RouterScoreStage, ServedRouter, output_probabilities, pixel_embedder
from policies.risk_control import TierCosts, TierOutcomes
from policies.thresholds import ThresholdPolicy
from router.config import parse_app_config
from router.services import ImageRequest, VisionRouteService
from router.services.backends import LocalOnnxTier
from tests.router.colour_model import LABELS, solid_png, write_colour_model
from visionroute.errors import ConfigError
from visionroute.records import Analysis, Decision, Detections, Trace

SPEC = FeatureSpec(output="classifier", top_k=3, use_input=True, neighbours_k=3)
EMBED_DIM = 12  # RGB 2x2


def run(coroutine):
    return asyncio.run(coroutine)


def plan(accept, escalate) -> dict:
    return {"accept_threshold": accept, "review_threshold": escalate, "certificate": {"n": 0}}


def fitted_artefact(*, learned=(0.5, 0.1), fallback=(0.95, 0.5), class_names=LABELS) -> RouterArtefact:
    """A router for the colour model, fitted on noisy solid colours (labels flip on 15%)."""
    rng = np.random.default_rng(0)
    n = 120
    images = [
        np.clip(rng.integers(0, 256, 3)[None, None, :] + rng.normal(0, 8, (8, 8, 3)), 0, 255).astype(np.uint8)
        for _ in range(n)
    ]
    means = np.array([im.reshape(-1, 3).mean(0) / 255.0 for im in images])
    logits = 4.0 * means
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    answers = probabilities.argmax(1)
    labels = np.where(rng.random(n) < 0.15, (answers + 1) % 3, answers)
    embed = pixel_embedder(EMBED_DIM)
    fitted = fit_router(
        class_names=class_names,
        spec=SPEC,
        output=probabilities,
        cheap_answers=answers,
        labels=labels,
        input_statistics=input_features(images),
        embeddings=np.vstack([embed(im) for im in images]),
        embedding="input pixels, RGB 2x2",
    )
    plans = RouterPlans(
        CertifiedThresholds.from_document(plan(*learned), score="learned", field="router.plans.learned"),
        CertifiedThresholds.from_document(plan(*fallback), score="top1", field="router.plans.fallback"),
        0.05,
        0.1,
    )
    return RouterArtefact(
        fitted.artefact.class_names,
        fitted.artefact.spec,
        fitted.artefact.learner,
        fitted.artefact.index,
        fitted.artefact.embedding,
        plans,
    )


def colour_config(tmp_path, router_path=None):
    model = write_colour_model(tmp_path / "colour.onnx")
    cascade = {
        "tier": {"model": str(model), "decoder": "classifier", "labels": LABELS, "size_hw": 32},
        "policy": {"version": "colour-v1", "accept_threshold": 0.9, "escalate_threshold": 0.2},
    }
    if router_path is not None:
        cascade["router"] = {"path": str(router_path)}
    return parse_app_config(
        {
            "models_dir": str(tmp_path),
            "default_task": "colour",
            "cascades": {"colour": cascade},
            "review": {"path": str(tmp_path / "review")},
            "retrieval": {"enabled": False},
        }
    )


def service_for(config) -> VisionRouteService:
    tier = LocalOnnxTier(config.cascades["colour"].tier.model_dump(), config.models_dir)
    return VisionRouteService.build(config, tiers={"colour": tier})


@pytest.fixture
def artefact() -> RouterArtefact:
    return fitted_artefact()


@pytest.fixture
def routed(tmp_path, artefact) -> VisionRouteService:
    return service_for(colour_config(tmp_path, artefact.save(tmp_path / "router.json")))


def steps(analysis: Analysis) -> dict:
    return {s.stage: s for s in analysis.trace}


# -- the declared order ------------------------------------------------------------------------


def test_the_router_stage_sits_between_cheap_tier_and_decide_only_when_configured(tmp_path, routed):
    names = routed.analyze.pipeline.names()
    assert names[names.index("cheap_tier") : names.index("decide") + 1] == ("cheap_tier", "router", "decide")
    plain = service_for(colour_config(tmp_path / "plain"))
    assert "router" not in plain.analyze.pipeline.names()
    red = run(plain.analyze.analyze(ImageRequest(solid_png((255, 0, 0)), "r0"), None))
    assert [s.stage for s in red.trace] == ["input", "onnx:colour", "policy:thresholds"]


# -- the router step ---------------------------------------------------------------------------


def test_the_router_step_records_score_features_and_version(routed, artefact):
    red = run(routed.analyze.analyze(ImageRequest(solid_png((255, 0, 0)), "r1"), None))
    assert [s.stage for s in red.trace][:4] == ["input", "onnx:colour", "router", "policy:thresholds"]
    by_stage = steps(red)
    step = by_stage["router"]
    assert step.error is None and step.decision is None
    assert 0.0 <= step.score <= 1.0
    assert step.model_version == artefact.sha256 == step.details["version"]
    assert step.details["fallback"] is False and step.details["plan"] == "learned"
    features = step.details["features"]
    assert list(features) == list(SPEC.names) == step.details["feature_names"]
    assert all(isinstance(v, float) and np.isfinite(v) for v in features.values())
    assert features["p_top1"] == pytest.approx(by_stage["onnx:colour"].score, abs=1e-6)
    # the score is the learner's on exactly those features
    again = artefact.learner.score(np.array([[features[name] for name in SPEC.names]]))[0]
    assert step.score == pytest.approx(again)
    decided = by_stage["policy:thresholds"]
    assert decided.score == step.score
    assert decided.threshold == {"accept": 0.5, "escalate": 0.1}
    assert decided.policy_version == f"router@{artefact.sha256[:12]}:learned"
    assert decided.details["score_source"] == "router" and decided.details["fallback"] is False
    expected = Decision.ACCEPT if step.score >= 0.5 else Decision.REVIEW if step.score < 0.1 else None
    if expected is not None:
        assert decided.decision is expected
    json.dumps(red.trace.to_dict(), allow_nan=False)  # the step is plain JSON


# -- the fallback ------------------------------------------------------------------------------


def test_a_failing_reference_lookup_falls_back_to_the_confidence_only_thresholds(routed, monkeypatch):
    def unavailable(self, *args, **kwargs):
        raise TimeoutError("neighbour lookup timed out")

    monkeypatch.setattr(ReferenceIndex, "neighbour_features", unavailable)
    red = run(routed.analyze.analyze(ImageRequest(solid_png((255, 0, 0)), "r2"), None))
    by_stage = steps(red)
    step = by_stage["router"]
    assert step.details["fallback"] is True and step.details["plan"] == "fallback"
    assert "TimeoutError" in step.error and step.score is None and step.details["features"] is None
    assert "fall" in step.reason or "confidence-only" in step.reason
    decided = by_stage["policy:thresholds"]
    assert decided.threshold == {"accept": 0.95, "escalate": 0.5}
    assert decided.score == by_stage["onnx:colour"].score  # the calibrated top-1 confidence
    assert decided.details["fallback"] is True and decided.policy_version.endswith(":fallback")
    assert decided.decision is Decision.ACCEPT  # red is 0.99+: certified by the fallback plan


def test_an_infeasible_fallback_never_accepts(tmp_path, monkeypatch):
    artefact = fitted_artefact(fallback=(float("inf"), float("inf")))
    service = service_for(colour_config(tmp_path, artefact.save(tmp_path / "router.json")))
    monkeypatch.setattr(ReferenceIndex, "neighbour_features", lambda *a, **k: 1 / 0)
    red = run(service.analyze.analyze(ImageRequest(solid_png((255, 0, 0)), "r3"), None))
    by_stage = steps(red)
    assert by_stage["router"].details["fallback"] is True
    assert by_stage["policy:thresholds"].decision is Decision.REVIEW
    assert by_stage["policy:thresholds"].threshold == {}
    assert red.decision is not Decision.ACCEPT
    json.dumps(red.trace.to_dict(), allow_nan=False)


def test_answer_labels_that_are_not_the_routers_fall_back(artefact):
    """Direct stage objects: an answer from another label set is a feature failure."""
    router = ServedRouter.from_artefact(artefact)
    image = np.full((8, 8, 3), (250, 5, 5), np.uint8)
    analysis = Analysis(image_rgb=image, image_sha256="x", task="colour", trace=Trace("d1"))
    analysis.detections = Detections.from_class_probabilities(
        np.array([0.9, 0.05, 0.05], np.float32), ["a", "b", "c"], width=8, height=8
    )
    state = CascadeRun(analysis, cheap_tier=None, thresholds=ThresholdPolicy())
    run(RouterScoreStage({"colour": router}).run(state))
    run(DecideStage().run(state))
    router_step, decided = analysis.trace.steps
    assert router_step.details["fallback"] is True and "InputError" in router_step.error
    assert decided.threshold == {"accept": 0.95, "escalate": 0.5}
    # another task, or a failed cheap tier: no step, the thresholds decide as today
    other = CascadeRun(
        Analysis(image_rgb=image, image_sha256="x", task="other", trace=Trace("d2")), None, ThresholdPolicy()
    )
    run(RouterScoreStage({"colour": router}).run(other))
    assert other.route is None and not other.analysis.trace.steps


def test_output_probabilities_complete_the_answer_rows():
    detections = Detections.from_class_probabilities(
        np.array([0.6, 0.3, 0.05, 0.03, 0.01, 0.01], np.float32), list("abcdef"), width=1, height=1, top_k=3
    )
    p = output_probabilities(detections, 6)[0]
    assert p[:3] == pytest.approx([0.6, 0.3, 0.05]) and p[3:] == pytest.approx([0.05 / 3] * 3)


# -- bad artefacts at start-up -----------------------------------------------------------------


def test_a_mismatched_artefact_is_a_config_error_naming_the_field(tmp_path, artefact):
    def field_of(document_or_path) -> str:
        path = document_or_path
        if isinstance(document_or_path, dict):
            path = tmp_path / "bad.json"
            path.write_text(json.dumps(document_or_path))
        with pytest.raises(ConfigError) as error:
            colour_config(tmp_path, path)
        return error.value.field

    assert field_of(tmp_path / "missing.json") == "cascades.colour.router"
    wrong_labels = fitted_artefact(class_names=["cyan", "magenta", "yellow"])
    assert field_of(wrong_labels.save(tmp_path / "labels.json")) == "cascades.colour.router.class_names"
    document = artefact.to_document()
    tampered = json.loads(json.dumps(document))
    tampered["reference_index"]["labels"][0] = (tampered["reference_index"]["labels"][0] + 1) % 3
    assert field_of(tampered) == "cascades.colour.router.reference_index.sha256"
    renamed = json.loads(json.dumps(document))
    renamed["learner"]["feature_names"] = list(reversed(renamed["learner"]["feature_names"]))
    assert field_of(renamed).startswith("cascades.colour.router.learner")
    no_plans = {k: v for k, v in document.items() if k != "plans"}
    assert field_of(no_plans) == "cascades.colour.router.plans"
    bad_plan = json.loads(json.dumps(document))
    bad_plan["plans"]["fallback"]["review_threshold"] = 0.99
    assert field_of(bad_plan) == "cascades.colour.router.plans.fallback.review_threshold"


# -- the certified plans -----------------------------------------------------------------------


def test_certify_router_plans_certifies_both_and_round_trips(tmp_path, artefact):
    rng = np.random.default_rng(1)

    def outcomes(n):
        correct = rng.random(n) < 0.9
        learned = np.clip(np.where(correct, rng.beta(8, 1, n), rng.beta(1, 3, n)), 0, 1)
        confidence = np.clip(np.where(correct, rng.beta(4, 1, n), rng.beta(2, 2, n)), 0, 1)
        strong_error = rng.random(n) < 0.03
        return TierOutcomes(learned, ~correct, strong_error), TierOutcomes(confidence, ~correct, strong_error)

    (learned_fit, confidence_fit), (learned_cert, confidence_cert) = outcomes(400), outcomes(600)
    certified = certify_router_plans(
        artefact,
        learned_fit=learned_fit,
        learned_certification=learned_cert,
        confidence_fit=confidence_fit,
        confidence_certification=confidence_cert,
        costs=TierCosts(cheap=1, escalate=10, review=100),
        alpha=0.05,
        delta=0.1,
    )
    plans = certified.plans
    assert plans.learned.score == "learned" and plans.fallback.score == "top1"
    assert plans.learned.feasible and plans.learned.accept_threshold <= 1.0
    assert plans.learned.document["certificate"]["alpha"] == 0.05
    assert certified.sha256 != artefact.sha256  # the plans are part of the version
    loaded = RouterArtefact.load(certified.save(tmp_path / "certified.json"), class_names=LABELS)
    assert loaded.sha256 == certified.sha256
    assert loaded.plans.fallback.accept_threshold == plans.fallback.accept_threshold
