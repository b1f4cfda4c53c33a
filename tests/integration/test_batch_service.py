"""The batch API through the running service (the session's shared no-key service, the shipped
serve_config.yaml): HTTP and gRPC, a bad image inside a batch, a batch over the limit, and the
shipped eventual indexing read back through the same ingress."""

from __future__ import annotations

import json
import uuid

import grpc
import httpx
import pytest

from router.grpc.ingress import pb, visionroute_pb2_grpc
from tests.router.colour_model import solid_png

pytestmark = [pytest.mark.server, pytest.mark.slow]

NOT_AN_IMAGE = b"these bytes are no image"
LIMIT = 32  # limits.batch_max_images: the shipped config keeps the default


def test_http_batch_answers_each_image_in_order_and_indexes_them(default_service, fresh_tenant, photos_png):
    url, batch_id = default_service.url, "batch-" + uuid.uuid4().hex[:8]
    files = [
        ("image", ("coffee.png", photos_png["coffee"], "image/png")),
        ("image", ("bad.png", NOT_AN_IMAGE, "image/png")),
        ("image", ("astronaut.png", photos_png["astronaut"], "image/png")),
    ]

    def send() -> dict:
        response = httpx.post(
            url + "/v1/analyze/batch",
            files=files,
            data={"tenant": fresh_tenant},
            headers={"x-request-id": batch_id},
            timeout=120,
        )
        assert response.status_code == 200, response.text
        return response.json()

    body = send()
    coffee, bad, astronaut = body["results"]
    assert [r["request_id"] for r in body["results"]] == [f"{batch_id}:{n}" for n in range(3)]
    assert (body["succeeded"], body["failed"]) == (2, 1)
    assert coffee["status"] == 200 and coffee["response"]["decision"] == "accept"
    assert astronaut["response"]["decision"] == "review" and astronaut["response"]["review_item_id"]
    assert bad["status"] in (400, 415) and bad["error"]["field"] == "images[1]" and bad["response"] is None
    for result in (coffee, astronaut):
        index_step = result["response"]["trace"]["steps"][-1]
        assert index_step["stage"] == "retrieval:index"
        assert index_step["details"]["search_index"] == {"mode": "eventual", "status": "queued"}

    # A retried batch is the same per-image requests: no second review item.
    again = send()
    assert again["results"][2]["response"]["review_item_id"] == astronaut["response"]["review_item_id"]

    # Indexed after the response; a search through the same ingress sees both images.
    hits = httpx.post(
        url + "/v1/search",
        json={"text": "a cup of coffee", "k": 5, "filters": {"tenant": fresh_tenant}},
        timeout=60,
    ).json()["hits"]
    indexed = {hit["metadata"]["image_sha256"] for hit in hits}
    assert indexed == {coffee["response"]["image"]["sha256"], astronaut["response"]["image"]["sha256"]}


def test_http_batch_over_the_limit_is_one_400_naming_the_field(default_service):
    tiny = solid_png((10, 10, 10), size=8)
    files = [("image", (f"{n}.png", tiny, "image/png")) for n in range(LIMIT + 1)]
    response = httpx.post(default_service.url + "/v1/analyze/batch", files=files, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["field"] == "image" and str(LIMIT) in response.json()["reason"]


def test_grpc_analyze_batch(default_service, fresh_tenant, photos_png):
    with grpc.insecure_channel(default_service.grpc_target) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        stub = visionroute_pb2_grpc.VisionRouteStub(channel)
        images = [pb.BatchImage(image=photos_png["coffee"]), pb.BatchImage(image=NOT_AN_IMAGE)]
        reply = stub.AnalyzeBatch(pb.AnalyzeBatchRequest(images=images, tenant=fresh_tenant), timeout=120)
        assert (reply.succeeded, reply.failed) == (1, 1)
        ok, bad = reply.results
        assert ok.WhichOneof("outcome") == "response" and ok.response.decision == "accept"
        assert ok.request_id == f"{reply.request_id}:0" and ok.response.request_id == ok.request_id
        assert bad.WhichOneof("outcome") == "error" and bad.error.field == "images[1]"
        assert bad.error.code == "INVALID_ARGUMENT"

        tiny = pb.BatchImage(image=solid_png((10, 10, 10), size=8))
        with pytest.raises(grpc.RpcError) as error:
            stub.AnalyzeBatch(pb.AnalyzeBatchRequest(images=[tiny] * (LIMIT + 1)), timeout=60)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert json.loads(error.value.details())["field"] == "images"
