"""The decode budget (pixels in flight per replica) and decoding large images at the needed size."""

from __future__ import annotations

import asyncio
import io
import json

import numpy as np
import pytest
from PIL import Image

from cascades.decode_budget import DecodeBudget, DecodeBudgetConfig, InputNeed, in_file_pixels, input_need
from cascades.images import decode_image, probe_image, reduction_factor
from cascades.onnx_stage import OnnxStageConfig
from visionroute.errors import BackendUnavailable, PayloadTooLarge
from visionroute.records import Detections


def encoded(width: int, height: int, fmt: str, colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format=fmt)
    return buffer.getvalue()


def test_a_large_jpeg_is_decoded_by_dct_scaling_no_smaller_than_needed():
    data = encoded(4000, 3000, "JPEG")
    decoded = decode_image(data, min_size=(224, 224))
    height, width = decoded.rgb.shape[:2]
    assert (width, height) == (500, 375)  # 1/8: the largest scale keeping both sides >= 224
    assert (decoded.width, decoded.height) == (4000, 3000) and decoded.is_reduced
    assert decoded.format == "JPEG"
    assert np.allclose(decoded.rgb.reshape(-1, 3).mean(axis=0), (200, 30, 30), atol=3)


def test_other_formats_are_reduced_by_an_integer_factor_after_decoding():
    decoded = decode_image(encoded(1000, 700, "PNG"), min_size=(224, 224))
    assert decoded.rgb.shape == (234, 334, 3)  # factor 3 = min(1000 // 224, 700 // 224), rounded up
    assert (decoded.width, decoded.height) == (1000, 700) and decoded.format == "PNG"


def test_no_min_size_or_a_small_image_decodes_whole():
    assert decode_image(encoded(300, 200, "JPEG"), min_size=(224, 224)).is_reduced is False
    decoded = decode_image(encoded(3000, 3000, "PNG"))
    assert decoded.rgb.shape == (3000, 3000, 3) and decoded.original_size is None


@pytest.mark.parametrize(
    "size, min_size, factor",
    [((6320, 6320), (224, 224), 28), ((6000, 200), (224, 224), 1), ((10, 10), None, 1)],
)
def test_reduction_factor_keeps_both_sides(size, min_size, factor):
    assert reduction_factor(size, min_size) == factor


def test_the_header_is_checked_before_anything_is_decoded():
    header = probe_image(encoded(640, 480, "PNG"))
    assert (header.width, header.height, header.format, header.pixels) == (640, 480, "PNG", 307200)
    with pytest.raises(PayloadTooLarge, match="640x480 = 307200 pixels; the limit is 1000") as caught:
        probe_image(encoded(640, 480, "PNG"), max_pixels=1000)
    assert caught.value.field == "image"


def test_boxes_found_on_a_reduced_image_are_mapped_back_to_the_file():
    decoded = decode_image(encoded(4000, 3000, "JPEG"), min_size=(224, 224))
    found = Detections(
        np.array([[0, 0, 500, 375], [50, 25, 100, 75]]), np.array([0.9, 0.8]), np.array([1, 2])
    )
    mapped = in_file_pixels(found, decoded)
    assert mapped.xyxy.tolist() == [[0, 0, 4000, 3000], [400, 200, 800, 600]]
    assert mapped.confidence.tolist() == pytest.approx([0.9, 0.8]) and mapped.class_id.tolist() == [1, 2]
    whole = decode_image(encoded(300, 200, "PNG"))
    assert in_file_pixels(found, whole) is found


def test_what_a_tier_needs_comes_from_config_then_the_sidecar(tmp_path):
    (tmp_path / "cls.json").write_text(json.dumps({"preprocess": {"size_hw": [224, 224]}}))
    (tmp_path / "det.json").write_text(json.dumps({"preprocess": {"max_side": 960}}))
    assert input_need(OnnxStageConfig(model="cls"), tmp_path, has_vlm=False) == InputNeed(side=224)
    assert input_need(OnnxStageConfig(model="det"), tmp_path, has_vlm=False) == InputNeed(max_side=960)
    assert input_need(OnnxStageConfig(model="cls", size_hw=(320, 640)), tmp_path, has_vlm=False) == InputNeed(
        side=640
    )
    assert input_need(OnnxStageConfig(model="cls"), tmp_path, has_vlm=True) == InputNeed()  # a VLM sees all
    assert input_need(OnnxStageConfig(model="unknown"), tmp_path, has_vlm=False) == InputNeed()
    assert InputNeed(max_side=960).min_size(6000, 3000) == (960, 480)
    assert InputNeed().min_size(6000, 3000) is None


def run(coroutine):
    return asyncio.run(coroutine)


def test_requests_beyond_the_budget_wait_in_order_then_run():
    budget = DecodeBudget(DecodeBudgetConfig(pixels_in_flight=100, wait_s=5))
    order = []

    async def hold(name: str, pixels: int, seconds: float):
        async with budget.session() as session:
            session.held += await budget.acquire(pixels)
            order.append((name, budget.in_flight))
            await asyncio.sleep(seconds)

    async def scenario():
        first = asyncio.create_task(hold("a", 60, 0.2))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(hold("b", 60, 0.0))  # no room until a is done
        await asyncio.sleep(0.01)
        third = asyncio.create_task(hold("c", 10, 0.0))  # room, but b is first in line
        await asyncio.gather(first, second, third)

    run(scenario())
    assert [name for name, _ in order] == ["a", "b", "c"]
    assert all(in_flight <= 100 for _, in_flight in order)
    assert budget.in_flight == 0


def test_a_request_that_waits_too_long_gets_a_retryable_503_naming_the_image():
    budget = DecodeBudget(DecodeBudgetConfig(pixels_in_flight=100, wait_s=0.05, retry_after_s=3))

    async def scenario():
        async with budget.session() as holder:
            holder.held += await budget.acquire(80)
            with pytest.raises(BackendUnavailable) as caught:
                await budget.acquire(30, what="this 6x5 PNG")
            return caught.value

    error = run(scenario())
    assert error.field == "image" and error.retry_after_s == 3
    assert "this 6x5 PNG needs 30 pixels, 80 of the 100 pixel budget are in use" in error.reason
    assert budget.in_flight == 0 and not budget._queue


def test_an_image_larger_than_the_budget_runs_alone():
    budget = DecodeBudget(DecodeBudgetConfig(pixels_in_flight=100, wait_s=1))

    async def scenario():
        async with budget.session() as session:
            session.held += await budget.acquire(10_000)
            assert budget.in_flight == 100

    run(scenario())
    assert budget.in_flight == 0


def test_a_session_keeps_only_the_working_size_and_releases_on_errors():
    budget = DecodeBudget(DecodeBudgetConfig(pixels_in_flight=50_000_000, reduce_above_pixels=1_000_000))
    big_jpeg = encoded(4000, 3000, "JPEG")

    async def scenario():
        async with budget.session() as session:
            decoded = await session.decode(big_jpeg, need=InputNeed(side=224))
            assert session.held == 500 * 375 == budget.in_flight
            return decoded

    assert run(scenario()).is_reduced and budget.in_flight == 0

    async def failing():
        async with budget.session() as session:
            await session.decode(big_jpeg, need=None)
            assert budget.in_flight == 12_000_000  # no need known: the whole image is held
            raise RuntimeError("the tier failed")

    with pytest.raises(RuntimeError):
        run(failing())
    assert budget.in_flight == 0


def test_the_service_answers_a_reduced_image_in_the_files_own_size(tmp_path):
    from router.config import parse_app_config
    from router.services import ImageRequest, VisionRouteService, response_body
    from router.services.backends import LocalOnnxTier
    from tests.router.colour_model import LABELS, write_colour_model

    model = write_colour_model(tmp_path / "colour.onnx")
    config = parse_app_config(
        {
            "models_dir": str(tmp_path),
            "default_task": "colour",
            "cascades": {
                "colour": {
                    "tier": {"model": str(model), "decoder": "classifier", "labels": LABELS, "size_hw": 32},
                    "policy": {"version": "colour-v1", "accept_threshold": 0.9, "escalate_threshold": 0.2},
                }
            },
            "limits": {"decode": {"reduce_above_pixels": 1_000_000}},
            "review": {"path": str(tmp_path / "review")},
            "retrieval": {"enabled": False},
        }
    )
    tier = LocalOnnxTier(config.cascades["colour"].tier.model_dump(), config.models_dir)
    service = VisionRouteService.build(config, tiers={"colour": tier})
    image = encoded(2400, 1600, "JPEG", colour=(255, 0, 0))
    body = response_body(asyncio.run(service.analyze.analyze(ImageRequest(image, "big-1"), None)))
    assert body["decision"] == "accept" and body["answer"][0]["label"] == "red"
    assert body["answer"][0]["xyxy"] == [0, 0, 2400, 1600]
    assert body["image"]["width"] == 2400 and body["image"]["height"] == 1600
    details = body["trace"]["steps"][0]["details"]
    assert (details["width"], details["height"]) == (2400, 1600)
    # 1/8 by DCT scaling (300x200), then reduced by 6: the smallest size with both sides >= 32
    assert (details["decoded_width"], details["decoded_height"]) == (50, 34)
    assert service.analyze.decode_budget.in_flight == 0


def test_one_budget_serves_event_loops_in_turn():
    """A service built once and driven by several asyncio.run calls (as tests and scripts do)."""
    budget = DecodeBudget(DecodeBudgetConfig(pixels_in_flight=10, wait_s=5))

    async def contended():
        async def hold():
            async with budget.session() as session:
                session.held += await budget.acquire(10)
                await asyncio.sleep(0.01)

        await asyncio.gather(hold(), hold())  # the second waits: the condition is used

    run(contended())
    run(contended())
    assert budget.in_flight == 0
