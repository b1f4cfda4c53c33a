"""The batch API without Ray: the service core (router/services/batch.py) and both faces over
the colour model, a real SQLite review queue and budget ledger."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from fastapi.testclient import TestClient

from router.auth.keys import SecurityConfig
from router.grpc.ingress import GrpcEndpoints, pb
from router.http.api import app
from router.http.deps import attach
from router.serve_context import make_authenticator
from router.services import VisionRouteService
from router.services.backends import LocalOnnxTier
from router.services.batch import BatchImage
from tests.router.colour_model import colour_app_config, solid_png
from visionroute.errors import InputError

RED, GREY = solid_png((255, 0, 0)), solid_png((128, 128, 128))
NOT_AN_IMAGE = b"these bytes are no image"
KEEP = {"privacy": {"faces": "keep", "text": "keep"}}
NO_KEYS = SecurityConfig(allow_insecure_bind=True)  # no keys; and no Serve to ask for its bind


class CountingTier:
    """The colour tier, counting how many predictions run at once."""

    def __init__(self, tier: LocalOnnxTier) -> None:
        self.tier, self.running, self.most = tier, 0, 0

    async def predict(self, image_rgb):
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(0.01)  # let the other images of the batch start, if they may
            return await self.tier.predict(image_rgb)
        finally:
            self.running -= 1

    async def describe(self):
        return await self.tier.describe()


def build(tmp_path, **limits) -> tuple[VisionRouteService, CountingTier]:
    config = colour_app_config(tmp_path, policies=KEEP)  # no face/text detectors: not what is tested
    config = config.model_copy(update={"limits": config.limits.model_copy(update=limits)})
    tier = CountingTier(LocalOnnxTier(config.cascades["colour"].tier.model_dump(), config.models_dir))
    return VisionRouteService.build(config, tiers={"colour": tier}), tier


def run(coroutine):
    return asyncio.run(coroutine)


def test_each_image_gets_its_own_answer_in_order_and_a_bad_one_is_only_its_own_error(tmp_path):
    service, tier = build(tmp_path, batch_concurrency=2)
    images = [BatchImage(RED), BatchImage(GREY), BatchImage(NOT_AN_IMAGE), BatchImage(RED), BatchImage(GREY)]

    async def twice():  # one event loop: the service's locks belong to the loop that made them
        first = await service.batch.analyze_batch(images, "b1", None)
        return first, await service.batch.analyze_batch(images, "b1", None)

    result, again = run(twice())
    assert [item.index for item in result.items] == [0, 1, 2, 3, 4]
    assert [item.request_id for item in result.items] == [f"b1:{n}" for n in range(5)]
    assert (result.succeeded, result.failed) == (4, 1)
    red, grey, bad = result.items[0].analysis, result.items[1].analysis, result.items[2]
    assert red.decision.value == "accept" and red.trace.request_id == "b1:0" and red.review_item_id is None
    assert grey.decision.value == "review" and grey.review_item_id  # its own review item
    assert result.items[4].analysis.review_item_id not in (None, grey.review_item_id)
    assert isinstance(bad.error, InputError) and bad.error.field == "images[2]" and bad.analysis is None
    assert 1 < tier.most <= 2  # concurrent, and bounded by limits.batch_concurrency

    # The same batch again (a client's retry): the same per-image requests, no second review item.
    assert again.items[1].analysis.review_item_id == grey.review_item_id
    pending = run(service.review.list_items(None, "pending", 50, 0))
    assert sorted(item.request_id for item in pending.items) == ["b1:1", "b1:4"]


def test_what_is_wrong_with_the_batch_itself_fails_it_naming_the_field(tmp_path):
    service, _ = build(tmp_path, batch_max_images=2)
    cases = [
        ([BatchImage(RED)] * 3, {}, "images", "at most 2 images"),
        ([], {}, "images", "at least one image"),
        ([BatchImage(RED)], {"task": "nope"}, "task", "unknown task"),
        ([BatchImage(RED)], {"tenant": "bad tenant!"}, "tenant", "tenant must be"),
    ]
    for images, fields, field, reason in cases:
        with pytest.raises(InputError, match=reason) as error:
            run(service.batch.analyze_batch(images, "b2", None, **fields))
        assert error.value.field == field
    with pytest.raises(InputError) as error:  # "<id>:1" would pass the request-id limit
        run(service.batch.analyze_batch([BatchImage(RED)] * 2, "x" * 127, None))
    assert error.value.field == "X-Request-Id"


@pytest.fixture
def client(tmp_path):
    service, _ = build(tmp_path, batch_max_images=4)
    attach(service, NO_KEYS)
    return TestClient(app)


def test_http_batch_multipart_and_json(client):
    files = [("image", ("a.png", RED, "image/png")), ("image", ("b.png", NOT_AN_IMAGE, "image/png"))]
    response = client.post("/v1/analyze/batch", files=files, headers={"x-request-id": "m1"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["request_id"] == "m1" and (body["succeeded"], body["failed"]) == (1, 1)
    first, second = body["results"]
    assert first["status"] == 200 and first["response"]["request_id"] == "m1:0" and first["error"] is None
    assert first["response"]["decision"] == "accept" and first["response"]["trace"]["steps"]
    assert second["status"] in (400, 415) and second["response"] is None
    assert second["error"]["field"] == "images[1]" and second["error"]["request_id"] == "m1:1"

    images = [
        {"image_base64": base64.b64encode(GREY).decode()},
        {"image_base64": "%%% not base64"},
        {"image_base64": "eA==", "image_url": "http://example.com/a.png"},
        "not an object",
    ]
    body = client.post("/v1/analyze/batch", json={"images": images}, headers={"x-request-id": "j1"}).json()
    statuses = [(r["status"], (r["error"] or {}).get("field")) for r in body["results"]]
    assert statuses == [(200, None), (400, "images[1].image_base64"), (400, "images[2]"), (400, "images[3]")]
    assert body["results"][0]["response"]["review_item_id"]


@pytest.mark.parametrize(
    "send, field",
    [
        ({"files": [("image", ("a.png", RED, "image/png"))] * 5}, "image"),
        ({"files": [("image", ("a.png", b"x", "image/png"))] * 50}, "image"),
        ({"json": {"images": [{"image_base64": "eA=="}] * 5}}, "images"),
        ({"json": {"images": []}}, "images"),
        ({"json": {"images": [{"image_base64": "eA=="}], "task": "nope"}}, "task"),
        ({"json": {"pictures": []}}, "images"),
        ({"content": b"raw", "headers": {"content-type": "image/png"}}, "content-type"),
    ],
)
def test_http_batch_over_the_limit_or_malformed_is_one_4xx_naming_the_field(client, send, field):
    response = client.post("/v1/analyze/batch", **send)
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["field"] == field


class Context:
    def __init__(self) -> None:
        self.code, self.details = None, ""

    def request_id(self):
        return "g1"

    def invocation_metadata(self):
        return ()

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details

    def set_trailing_metadata(self, trailers):
        pass


def test_grpc_analyze_batch(tmp_path):
    service, _ = build(tmp_path, batch_max_images=3)
    endpoints = GrpcEndpoints()
    endpoints.service, endpoints.authenticator = service, make_authenticator(NO_KEYS)
    images = [pb.BatchImage(image=RED), pb.BatchImage(image=NOT_AN_IMAGE), pb.BatchImage()]
    context = Context()
    reply = run(endpoints.AnalyzeBatch(pb.AnalyzeBatchRequest(images=images), context))
    assert context.code is None, context.details
    assert (reply.request_id, reply.succeeded, reply.failed) == ("g1", 1, 2)
    ok, bad, empty = reply.results
    assert ok.WhichOneof("outcome") == "response" and ok.response.decision == "accept"
    assert ok.response.request_id == "g1:0" and ok.response.trace.steps
    assert bad.WhichOneof("outcome") == "error" and bad.error.field == "images[1]"
    assert bad.error.code == "INVALID_ARGUMENT" and bad.error.http_status in (400, 415)
    assert empty.error.field == "images[2]" and empty.request_id == "g1:2"

    context = Context()
    run(endpoints.AnalyzeBatch(pb.AnalyzeBatchRequest(images=[pb.BatchImage(image=RED)] * 4), context))
    assert context.code.name == "INVALID_ARGUMENT" and json.loads(context.details)["field"] == "images"
