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


# -- the plan's VLM threshold, the router's price, its time limit --------------------------------


def vlm_plan(vlm_accept) -> dict:
    """Every answer escalates (accept never, review never); the VLM's answer by ``vlm_accept``."""
    return {
        "accept_threshold": "inf",
        "review_threshold": "-inf",
        "vlm_accept_threshold": vlm_accept,
        "certificate": {"n": 0},
    }


def escalating_service(tmp_path, vlm_accept, logprob):
    """The colour service with a router whose plan escalates everything, and a scripted VLM that
    answers "red" with confidence exp(logprob); the VLM config's own accept threshold is 0.5."""
    from cascades.vlm import VlmConfig, VlmStage
    from cascades.vlm.client import VlmCompletion
    from cascades.vlm.confidence import TokenLogprob
    from router.services.backends import LocalVlmTier

    base = fitted_artefact()
    plans = RouterPlans(
        CertifiedThresholds.from_document(vlm_plan(vlm_accept), score="learned", field="learned"),
        CertifiedThresholds.from_document(vlm_plan(vlm_accept), score="top1", field="fallback"),
        0.05,
        0.1,
    )
    artefact = RouterArtefact(base.class_names, base.spec, base.learner, base.index, base.embedding, plans)
    config = colour_config(tmp_path, artefact.save(tmp_path / "router.json"))
    pieces = ['{"label":"', "red", '"}']
    tokens = tuple(TokenLogprob(p, lp, p.encode()) for p, lp in zip(pieces, [0.0, logprob, 0.0]))

    class Scripted:
        def complete(self, request):
            return VlmCompletion("".join(pieces), "stop", tokens, 100, 3, "m", 1, 5.0)

    stage = VlmStage(VlmConfig(task="classify", labels=LABELS, accept_threshold=0.5), backend=Scripted())
    tier = LocalOnnxTier(config.cascades["colour"].tier.model_dump(), config.models_dir)
    service = VisionRouteService.build(
        config, tiers={"colour": tier}, vlm_tiers={"colour": LocalVlmTier(stage)}
    )
    return service, artefact


@pytest.mark.parametrize("vlm_accept, expected", [(0.8, Decision.REVIEW), (0.6, Decision.ACCEPT)])
def test_the_vlm_stage_applies_the_plans_vlm_threshold(tmp_path, vlm_accept, expected):
    service, artefact = escalating_service(tmp_path, vlm_accept, logprob=float(np.log(0.7)))
    analysis = run(service.analyze.analyze(ImageRequest(solid_png((255, 0, 0)), "v1"), None))
    by_stage = steps(analysis)
    assert by_stage["policy:thresholds"].decision is Decision.ESCALATE
    assert by_stage["policy:thresholds"].details["vlm_accept_threshold"] == vlm_accept
    vlm = by_stage["vlm"]
    assert vlm.score == pytest.approx(0.7)
    assert vlm.threshold["accept"] == vlm_accept  # the plan's, not the VLM config's 0.5
    source = f"router@{artefact.sha256[:12]}:learned"
    assert vlm.details["accept_threshold_source"] == source and vlm.policy_version.endswith(source)
    assert vlm.decision is expected and analysis.decision is expected


def test_an_infeasible_vlm_threshold_accepts_no_vlm_answer(tmp_path):
    service, _ = escalating_service(tmp_path, "inf", logprob=0.0)  # confidence 1.0
    analysis = run(service.analyze.analyze(ImageRequest(solid_png((255, 0, 0)), "v2"), None))
    vlm = steps(analysis)["vlm"]
    assert vlm.score == pytest.approx(1.0) and vlm.decision is Decision.REVIEW
    assert vlm.threshold["accept"] > 1.0
    json.dumps(analysis.trace.to_dict(), allow_nan=False)


def test_the_router_step_is_priced_in_the_cheap_tier(routed):
    from policies.costs import costs_by_tier

    red = run(routed.analyze.analyze(ImageRequest(solid_png((255, 0, 0)), "p1"), None))
    by_stage = steps(red)
    cheap, router = by_stage["onnx:colour"], by_stage["router"]
    pricing = router.details["pricing"]
    assert pricing["rule"] == "measured" and pricing["cheap_latency_ms"] == cheap.latency_ms
    expected = cheap.cost_units * pricing["features_ms"] / cheap.latency_ms
    assert router.cost_units == pytest.approx(expected) and router.cost_units > 0
    assert costs_by_tier(red.trace)["onnx"] == pytest.approx(cheap.cost_units + router.cost_units)
    assert red.trace.cost_units == pytest.approx(sum(s.cost_units for s in red.trace))


def test_a_configured_price_and_a_zero_time_limit(tmp_path, artefact):
    """``cost_units`` fixes the features' price; ``timeout_ms: 0`` never waits for them: every
    request takes the certified fallback plan, unpriced (no features were computed)."""
    path = artefact.save(tmp_path / "router.json")
    config = colour_config(tmp_path, path)
    priced = config.model_copy(
        update={
            "cascades": {
                "colour": config.cascades["colour"].model_copy(
                    update={
                        "router": config.cascades["colour"].router.model_copy(update={"cost_units": 0.25})
                    }
                )
            }
        }
    )
    red = run(service_for(priced).analyze.analyze(ImageRequest(solid_png((255, 0, 0)), "c1"), None))
    assert steps(red)["router"].cost_units == 0.25
    assert steps(red)["router"].details["pricing"] == {"rule": "configured", "cost_units": 0.25}

    drill_args = {
        "models_dir": str(tmp_path),
        "default_task": "colour",
        "cascades": {
            "colour": {
                **config.cascades["colour"].model_dump(mode="json", include={"tier", "policy"}),
                "router": {"path": str(path), "timeout_ms": 0},
            }
        },
        "review": {"path": str(tmp_path / "review-drill")},
        "retrieval": {"enabled": False},
    }
    drill = service_for(parse_app_config(drill_args))
    red = run(drill.analyze.analyze(ImageRequest(solid_png((255, 0, 0)), "c2"), None))
    by_stage = steps(red)
    assert by_stage["router"].details["fallback"] is True and "TimeoutError" in by_stage["router"].error
    assert by_stage["router"].cost_units == 0.0
    assert by_stage["policy:thresholds"].policy_version.endswith(":fallback")
    with pytest.raises(ConfigError) as error:
        parse_app_config(
            {
                **drill_args,
                "cascades": {
                    "colour": {
                        **drill_args["cascades"]["colour"],
                        "router": {"path": str(path), "timeout_ms": -1},
                    }
                },
            }
        )
    assert "router.timeout_ms" in error.value.field


# -- more than 5 classes: the served features are the fitted ones -------------------------------


def test_a_served_score_equals_the_offline_score_for_the_same_image(tmp_path):
    """An 8-class tier answers with its top 5 rows; the router was fitted through the same served
    path (``served_output``), so the score served for an upload is the score computed offline
    from the model's whole probability vector for it."""
    import io

    from PIL import Image

    from cascades.router_stage import served_output
    from tests.support.router_artefact import LABELS as LABELS8
    from tests.support.router_artefact import calibrated_router, tier_config

    model, result, images, data = calibrated_router(tmp_path, n=600)
    calibration = result.calibrator.save(tmp_path / "calibration.json")
    config = parse_app_config(
        {
            "models_dir": str(tmp_path),
            "default_task": "colour8",
            "cascades": {
                "colour8": {
                    "tier": tier_config(model, calibration),
                    "router": {"path": str(result.artefact.save(tmp_path / "router8.json"))},
                }
            },
            "review": {"path": str(tmp_path / "review")},
            "retrieval": {"enabled": False},
        }
    )
    tier = LocalOnnxTier(config.cascades["colour8"].tier.model_dump(), config.models_dir)
    service = VisionRouteService.build(config, tiers={"colour8": tier})
    artefact = result.artefact
    embed = pixel_embedder(artefact.index.dim)
    for row in (0, 1, 2, 3):
        buffer = io.BytesIO()
        Image.fromarray(images[row]).save(buffer, format="PNG")
        served = run(service.analyze.analyze(ImageRequest(buffer.getvalue(), f"s{row}"), None))
        step = steps(served)["router"]
        assert step.error is None and len(served.detections) == 5 < len(LABELS8)
        output, answers, _ = served_output(
            data.probabilities[row : row + 1], LABELS8, calibrator=result.calibrator
        )
        offline = artefact.score(
            output=output,
            cheap_answers=answers,
            input_statistics=input_features([images[row]]),
            embeddings=embed(images[row]),
        )[0]
        assert step.score == pytest.approx(offline, abs=1e-6)
        names = artefact.spec.names
        logged = np.array([step.details["features"][name] for name in names])
        offline_features = artefact.features(
            output=output,
            cheap_answers=answers,
            input_statistics=input_features([images[row]]),
            embeddings=embed(images[row]),
        )[0]
        np.testing.assert_allclose(logged, offline_features, rtol=1e-5, atol=1e-6)
