"""The learned router end to end through Ray Serve (issue 22): the session's keyed service serves
two small tasks with a calibrated router (tests/support/router_artefact.py): ``colour8``, whose
trace shows the router stage (score, features, version, price) and the decision on the plan
certified on its score, and ``colour8_fallback``, whose features are never waited for
(``timeout_ms: 0``): a feature failing at run time, so the certified confidence-only fallback
plan decides and the trace says so; never an uncertified accept."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from cascades.learned_router import RouterArtefact
from tests.support.keys import key
from tests.support.router_artefact import uploads

pytestmark = [pytest.mark.server, pytest.mark.slow]

CLIENT = {"x-api-key": key("router_client")}


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def analyze(service, image: np.ndarray, task: str) -> dict:
    response = httpx.post(
        service.url + "/v1/analyze",
        files={"image": ("x.png", png(image), "image/png")},
        data={"task": task},
        headers=CLIENT,
        timeout=60,
    )
    assert response.status_code == 200, response.text
    return response.json()


def served_artefact(service, task: str) -> RouterArtefact:
    args = yaml.safe_load(service.config_path.read_text())["applications"][0]["args"]
    return RouterArtefact.load(args["cascades"][task]["router"]["path"])


def by_stage(body: dict) -> dict:
    return {step["stage"]: step for step in body["trace"]["steps"]}


def test_the_router_stage_decides_in_the_served_trace(keyed_service):
    artefact = served_artefact(keyed_service, "colour8")
    learned = artefact.plans.learned
    for image in uploads(3, seed=7):
        body = analyze(keyed_service, image, "colour8")
        stages = [step["stage"] for step in body["trace"]["steps"]]
        assert stages[:4] == ["input", "onnx:colour8", "router", "policy:thresholds"]
        steps = by_stage(body)
        router, decided = steps["router"], steps["policy:thresholds"]
        assert router["error"] is None and router["details"]["fallback"] is False
        assert router["model_version"] == artefact.sha256
        features = router["details"]["features"]
        assert list(features) == list(artefact.spec.names)
        # the score is the artefact's learner on the logged features (replay can rescore it)
        again = artefact.learner.score(np.array([[features[name] for name in artefact.spec.names]]))[0]
        assert router["score"] == pytest.approx(again)
        assert decided["score"] == router["score"]
        assert decided["policy_version"] == f"router@{artefact.sha256[:12]}:learned"
        assert decided["details"]["vlm_accept_threshold"] == pytest.approx(learned.vlm_accept_threshold)
        if body["decision"] == "accept":
            assert router["score"] >= learned.accept_threshold
        # the features are priced in the cheap tier's cost and in the response's
        assert router["cost_units"] >= 0 and router["details"]["pricing"]["rule"] == "measured"
        assert body["cost_units"] == pytest.approx(sum(step["cost_units"] for step in body["trace"]["steps"]))


def test_a_failing_feature_falls_back_to_the_certified_confidence_plan(keyed_service):
    artefact = served_artefact(keyed_service, "colour8_fallback")
    fallback = artefact.plans.fallback
    for image in uploads(3, seed=8):
        body = analyze(keyed_service, image, "colour8_fallback")
        steps = by_stage(body)
        router, decided = steps["router"], steps["policy:thresholds"]
        assert router["details"]["fallback"] is True and router["details"]["plan"] == "fallback"
        assert "TimeoutError" in router["error"] and router["details"]["features"] is None
        assert router["score"] is None and router["cost_units"] == 0
        assert decided["policy_version"] == f"router@{artefact.sha256[:12]}:fallback"
        assert decided["details"]["score_source"] == "top1 (router fallback)"
        top1 = steps["onnx:colour8_fallback"]["score"]
        assert decided["score"] == top1
        if body["decision"] == "accept":  # only what the fallback plan certifies
            assert fallback.feasible and top1 >= fallback.accept_threshold
        else:
            assert not fallback.feasible or top1 < fallback.accept_threshold
