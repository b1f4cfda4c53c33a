"""Privacy through the service core (no Ray, no HTTP): what a review or audit enqueue stores,
the trace of what was redacted, fail closed, no detector on the accept path, and retention
running inside the service on its schedule."""

from __future__ import annotations

import asyncio
import io
import time

import cv2
import numpy as np
import pytest
from PIL import Image

from router.services import ImageRequest, VisionRouteService, response_body
from router.services.backends import LocalOnnxTier
from router.services.review_requests import ClaimRequest, LabelRequest
from tests.router.colour_model import colour_app_config, solid_png
from visionroute.errors import NotFound

FACE_XYXY = (195, 85, 255, 160)  # the astronaut's face, annotated by hand
RED, GREY = solid_png((255, 0, 0)), solid_png((128, 128, 128))


make_config = colour_app_config


def build(config) -> VisionRouteService:
    tier = LocalOnnxTier(config.cascades["colour"].tier.model_dump(), config.models_dir)
    return VisionRouteService.build(config, tiers={"colour": tier})


def analyze(service, image: bytes, request_id: str = "r1"):
    return asyncio.run(service.analyze.analyze(ImageRequest(image, request_id), None))


def sharpness(data: bytes) -> float:
    x1, y1, x2, y2 = FACE_XYXY
    grey = np.asarray(Image.open(io.BytesIO(data)).convert("L"))[y1:y2, x1:x2]
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def test_a_review_item_stores_the_redacted_photo_and_the_trace_says_what_was_redacted(tmp_path, photos_png):
    astronaut = photos_png["astronaut"]
    service = build(make_config(tmp_path, {"version": "privacy-v7"}))
    analysis = analyze(service, astronaut)
    assert analysis.decision.value == "review" and analysis.review_item_id
    stored, media_type = asyncio.run(service.review.image(None, analysis.review_item_id))
    assert media_type == "image/png" and stored != astronaut
    assert sharpness(stored) < 0.05 * sharpness(astronaut)
    body = response_body(analysis)
    stages = [step["stage"] for step in body["trace"]["steps"]]
    assert stages[-2:] == ["privacy:redact", "review_queue"]
    redact = body["trace"]["steps"][-2]
    assert redact["policy_version"] == "privacy-v7" and redact["latency_ms"] > 0
    assert redact["details"]["faces"]["count"] == 1 and "facenet-pytorch==2.6.0" in redact["model_version"]
    item = asyncio.run(service.review.get(None, analysis.review_item_id))
    assert [s["stage"] for s in item.trace["steps"]][-1] == "privacy:redact"  # the stored trace says so
    middle = astronaut[len(astronaut) // 2 :][:64]
    assert all(middle not in p.read_bytes() for p in (tmp_path / "review").rglob("*") if p.is_file())


def test_a_failing_detector_queues_the_item_for_review_without_its_image(tmp_path, photos_png, monkeypatch):
    from cascades.detectors_privacy import MtcnnFaceDetector

    def broken(self, rgb):
        raise RuntimeError("detector crashed")

    monkeypatch.setattr(MtcnnFaceDetector, "detect", broken)
    service = build(make_config(tmp_path))
    analysis = analyze(service, photos_png["astronaut"])
    assert analysis.decision.value == "review" and analysis.review_item_id
    item = asyncio.run(service.review.get(None, analysis.review_item_id))
    assert (
        "image not stored: privacy redaction failed at mtcnn: RuntimeError: detector crashed" in item.reason
    )
    assert item.image_available is False and item.status == "pending"
    step = next(s for s in response_body(analysis)["trace"]["steps"] if s["stage"] == "privacy:redact")
    assert step["error"] and "fail closed" in step["reason"]
    with pytest.raises(NotFound, match="not stored"):
        asyncio.run(service.review.image(None, analysis.review_item_id))
    assert not [p for p in (tmp_path / "review" / "images").rglob("*") if p.is_file()]


def test_the_accept_path_runs_no_detector_and_an_audit_sample_is_redacted(tmp_path, monkeypatch):
    from cascades.detectors_privacy import MtcnnFaceDetector

    calls = []
    original_detect = MtcnnFaceDetector.detect
    monkeypatch.setattr(
        MtcnnFaceDetector, "detect", lambda self, rgb: calls.append(1) or original_detect(self, rgb)
    )
    service = build(make_config(tmp_path))
    accepted = analyze(service, RED, "accepted")
    assert accepted.decision.value == "accept" and calls == []
    assert "privacy:redact" not in [s.stage for s in accepted.trace]
    audited = build(make_config(tmp_path / "audited", {"audit": {"fraction": 1.0}}))
    sampled = analyze(audited, RED, "sampled")
    assert sampled.decision.value == "accept" and calls == [1]  # the audit item's image was checked
    stages = [s.stage for s in sampled.trace]
    assert stages[-2:] == ["privacy:redact", "review_queue:audit"]


def test_retention_runs_inside_the_service_and_keeps_labels(tmp_path):
    config = make_config(tmp_path, retention_interval_s=0.05)

    async def scenario():
        service = build(config)  # built on a running loop: the retention task starts with it
        assert service.retention.is_running
        analysis = await service.analyze.analyze(ImageRequest(GREY, "r1"), None)
        item_id = analysis.review_item_id
        claim = await service.review.claim(None, ClaimRequest(reviewer="ann", item_id=item_id))
        label = LabelRequest(reviewer="ann", lease_token=claim.lease_token, verdict="correct", label="red")
        await service.review.label(None, item_id, label)
        await asyncio.sleep(0.3)
        assert (await service.review.get(None, item_id)).image_deleted_at is None  # 30-day TTL
        # A new policy set with a short TTL applies at the next run, without a restart.
        assert service.operations.reconfigure({"version": "short-ttl", "review": {"image_ttl_s": 0.01}})
        deadline = time.monotonic() + 30
        while (await service.review.get(None, item_id)).image_deleted_at is None:
            assert time.monotonic() < deadline, "the retention task did not purge the image"
            await asyncio.sleep(0.05)
        item = await service.review.get(None, item_id)
        assert item.label["label"] == "red" and item.status == "labelled"
        events = (await service.review.audit_log(None, item_id)).events
        assert events[-1].action == "image_purged"
        with pytest.raises(NotFound, match="retention"):
            await service.review.image(None, item_id)
        assert service.retention.runs >= 1 and service.retention.last_result.ttl_s == 0.01
        await service.retention.stop()
        assert not service.retention.is_running

    asyncio.run(scenario())


def test_a_service_built_outside_an_event_loop_schedules_nothing(tmp_path):
    service = build(make_config(tmp_path))
    assert service.retention is not None and not service.retention.is_running
