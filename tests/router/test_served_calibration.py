"""A calibrator refit from production labels, served (issue 23): the recalibration job fits it on
one share of the items and certifies the thresholds after it on the rest; every arm serving the
artefact (the rollout's candidate, the adopted incumbent) maps the cheap tier's confidences
through it, so the score certified is the score served; the next job reads the items of both
scales on the incumbent's (cascades/served_calibration.py, router/services/recalibration.py)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from cascades.served_calibration import ServedCalibration
from policies.thresholds import answer_score
from router.config import parse_app_config
from router.services import ImageRequest
from router.services.recalibration import RecalibrationRequest, RecalibrationService
from tests.router.colour_model import LABELS, write_colour_model
from tests.router.test_rollout_router import labelled_traffic, png, service_for, step_of
from visionroute.errors import ConfigError, InputError


def colour_config(tmp_path):
    model = write_colour_model(tmp_path / "colour.onnx")
    return parse_app_config(
        {
            "models_dir": str(tmp_path),
            "default_task": "colour",
            "cascades": {
                "colour": {
                    "tier": {"model": str(model), "decoder": "classifier", "labels": LABELS, "size_hw": 32},
                    # accepts nothing until recertified: every answer is reviewed (labelled)
                    "policy": {"version": "colour-v1", "accept_threshold": 0.9999, "escalate_threshold": 0.5},
                }
            },
            "review": {"path": str(tmp_path / "review")},
            "retrieval": {"enabled": False},
            "rollouts": {"refresh_s": 0.05, "cost_flush_s": 0.05},
            "policies": {"privacy": {"faces": "keep", "text": "keep"}},
        }
    )


def raw_confidences(service, image: bytes) -> np.ndarray:
    """The configured tier's own confidences for ``image`` (no artefact in between)."""
    from cascades.images import decode_image

    result = asyncio.run(service.analyze.tiers["colour"].predict(decode_image(image).rgb))
    return result.detections.confidence


def solid_colours(n: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [png(np.full((48, 48, 3), rng.integers(0, 256, 3), np.uint8)) for _ in range(n)]


def test_a_served_calibrator_is_certified_on_items_it_never_saw_and_serves_what_was_certified(tmp_path):
    service = service_for(colour_config(tmp_path))
    recalibration = RecalibrationService.of(service)
    request = RecalibrationRequest(
        task="colour", alpha=0.3, delta=0.2, shadow_fraction=1.0, audit_fraction=1.0, serve_calibrator=True
    )

    async def day1():
        return await labelled_traffic(service, 120, "day1", seed=11)

    asyncio.run(day1())
    job = recalibration.job.run(request, "alice@ops")
    assert job["status"] == "succeeded", job["reason"]
    body = service.rollouts.artefacts.get(job["artefact_sha256"])
    calibrator = body["calibrator"]
    assert calibrator["kind"] == "production_refit" and calibrator["production_refit"]["served"] is True
    chain = ServedCalibration.from_document(calibrator["served"])
    assert len(chain.maps) == 1
    # certified on the items the map was not fitted on
    fit_items = calibrator["production_refit"]["fit_items"]
    assert 0 < fit_items < 120 and body["certificate"]["n"] <= 120 - fit_items
    # shadow: the candidate's run maps the tier's answer through the chain (what it would serve)
    service.rollouts._read_at = 0.0
    images = solid_colours(8, seed=4)

    async def shadowed():
        for i, image in enumerate(images):
            await service.analyze.analyze(ImageRequest(image, f"shadow-{i}"), None)
        await service.rollouts.drain()

    asyncio.run(shadowed())
    shadow = {i.request_id: i for i in service.review.queue.iter_all() if i.kind == "shadow"}
    assert shadow, "the candidate accepted none of the shadowed requests"
    for request_id, item in shadow.items():
        recorded = step_of(item.trace, "onnx:colour")["details"]["confidences"]
        expected = chain.apply(raw_confidences(service, images[int(request_id.split("-")[1])]))
        assert np.array_equal(np.asarray(recorded, np.float32), expected)
    # an operator promotes it: the artefact becomes the incumbent and its arm maps every answer
    rollout_id = job["rollout_id"]
    asyncio.run(service.rollouts.decide(None, rollout_id, "promote", {"reason": "test"}))
    assert service.rollouts.artefacts.incumbents()["colour"]["sha256"] == job["artefact_sha256"]
    service.rollouts._read_at = 0.0
    moved = 0
    for i, image in enumerate(solid_colours(6, seed=5)):
        analysis = asyncio.run(service.analyze.analyze(ImageRequest(image, f"later-{i}"), None))
        served, raw = analysis.detections.confidence, raw_confidences(service, image)
        assert np.array_equal(served, chain.apply(raw))
        moved += not np.array_equal(served, raw)
        decided = step_of(analysis, "policy:thresholds")
        assert decided.policy_version == body["version"]
        assert decided.score == answer_score(served, "top1")  # the certified score is the served one
        assert decided.threshold["accept"] == body["thresholds"]["accept_threshold"]
    assert moved  # the refit is not the identity on these answers

    # the next job reads the items of both scales on the incumbent's, and keeps serving its chain
    again = recalibration.job.run(
        RecalibrationRequest(task="colour", alpha=0.3, delta=0.2, propose=False), "bob"
    )
    assert again["status"] == "succeeded", again["reason"]
    second = service.rollouts.artefacts.get(again["artefact_sha256"])
    assert second["labels"]["left_out"]["other_calibration"] == 0
    assert ServedCalibration.from_document(second["calibrator"]["served"]) == chain
    assert second["parent_artefact"] == job["artefact_sha256"]


def test_a_routed_task_refuses_to_serve_a_calibrator(tmp_path):
    from tests.router.test_rollout_router import routed_config
    from tests.router.test_router_stage import fitted_artefact

    service = service_for(routed_config(tmp_path, fitted_artefact().save(tmp_path / "router.json")))
    with pytest.raises(InputError) as refused:
        RecalibrationService.of(service).job.check(RecalibrationRequest(task="colour", serve_calibrator=True))
    assert refused.value.field == "serve_calibrator"


def test_a_served_chain_maps_monotonely_and_refuses_a_bad_document_naming_the_field():
    chain = ServedCalibration().then([0.2, 0.6, 0.9], [0.1, 0.5, 0.95]).then([0.0, 1.0], [0.05, 0.99])
    x = np.linspace(0, 1, 101, dtype=np.float32)
    mapped = chain.apply(x)
    assert mapped.dtype == np.float32 and np.all(np.diff(mapped) >= 0)
    head = ServedCalibration(chain.maps[:1])
    assert np.array_equal(chain.after(head).apply(head.apply(x)), mapped)  # a tail on a recorded score
    assert chain.after(ServedCalibration().then([0.0, 1.0], [0.0, 1.0])) is None
    assert ServedCalibration.from_document(chain.to_document()) == chain
    for bad, field in (
        ({"maps": [{"scores": [0.5, 0.2], "p_correct": [0.1, 0.2]}]}, "x.maps[0].scores"),
        ({"maps": [{"scores": [0.2, 0.5], "p_correct": [0.9, 0.2]}]}, "x.maps[0].p_correct"),
        ({"maps": [{"scores": [0.2], "p_correct": [0.9, 0.2]}]}, "x.maps[0].p_correct"),
        ({"maps": [{"scores": ["a"], "p_correct": [0.9]}]}, "x.maps[0].scores"),
        ({"maps": [{"scores": [0.2]}]}, "x.maps[0]"),
        ([1], "x"),
    ):
        with pytest.raises(ConfigError) as refused:
            ServedCalibration.from_document(bad, field="x")
        assert refused.value.field == field
