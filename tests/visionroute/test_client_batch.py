"""The client's batch (``analyze_batch``) against the service's real batch faces, without Ray.

The HTTP face is the FastAPI app (router/http/api.py) over a real service core (the colour
model, a SQLite review queue), reached through FastAPI's TestClient (one event loop: the service's locks belong to it) or an
httpx ASGI transport;
the gRPC face is the real ingress (router/grpc/ingress.py ``AnalyzeBatch``) behind a loopback
gRPC server. The service allows 3 images a batch, so a longer list must go in chunks: results in
the caller's order, each image its own answer or error, progress after each chunk, and the same
list again under the same request id must be the same per-image requests (no second review item).
"""

from __future__ import annotations

import asyncio
import threading
from concurrent import futures

import grpc
import httpx
import pytest
from fastapi.testclient import TestClient

from router.grpc.ingress import GrpcEndpoints
from router.http.api import app
from router.http.deps import attach
from router.serve_context import make_authenticator
from tests.router.test_batch import GREY, NO_KEYS, NOT_AN_IMAGE, RED, build
from visionroute.client import AsyncVisionRouteClient, ServiceError, VisionRouteClient
from visionroute.client.batch import chunk_bounds
from visionroute.client.grpc_transport import generated
from visionroute.errors import InputError, PayloadTooLarge

SERVICE_LIMIT = 3  # limits.batch_max_images of the service under test
IMAGES = [RED, GREY, NOT_AN_IMAGE, RED, GREY, RED, GREY]  # 7 images: chunks of 3, 3, 1


@pytest.fixture
def service(tmp_path):
    service, _ = build(tmp_path, batch_max_images=SERVICE_LIMIT, batch_max_body_bytes=4000)
    attach(service, NO_KEYS)
    return service


def check_results(result, request_id: str) -> None:
    assert result.request_id == request_id and len(result) == len(IMAGES)
    assert [item.index for item in result] == list(range(len(IMAGES)))
    ids = [item.request_id for item in result]
    assert ids[:4] == [f"{request_id}.0:0", f"{request_id}.0:1", f"{request_id}.0:2", f"{request_id}.3:0"]
    assert (result.succeeded, result.failed) == (6, 1)
    bad = result[2]
    assert not bad.ok and bad.response is None and bad.status in (400, 415)
    assert isinstance(bad.error, InputError) and isinstance(bad.error, ServiceError)
    assert bad.error.field == "images[2]" and bad.error.request_id == ids[2]
    with pytest.raises(ServiceError):
        bad.unwrap()
    red, grey = result[0].unwrap(), result[1].unwrap()
    assert red.decision == "accept" and red.answer[0].label == "red" and red.request_id == ids[0]
    assert grey.decision == "review" and grey.review_item_id
    assert result[6].response.request_id == ids[6] and result[6].response.decision == "review"


def test_a_long_list_goes_in_chunks_in_order_with_each_images_error_and_progress(service, tmp_path):
    paths = []
    for n, image in enumerate(IMAGES):  # paths and bytes alike; a file is read when its chunk goes
        paths.append(tmp_path / f"{n}.png")
        paths[-1].write_bytes(image)
    seen = []
    with TestClient(app) as http, VisionRouteClient("http://testserver", http_client=http) as client:
        result = client.analyze_batch(
            [*paths[:4], *IMAGES[4:]], request_id="bulk-1", batch_size=SERVICE_LIMIT, on_progress=seen.append
        )
        check_results(result, "bulk-1")
        assert [(p.done, p.total, p.failed, len(p.items)) for p in seen] == [
            (3, 7, 1, 3),
            (6, 7, 1, 3),
            (7, 7, 1, 1),
        ]
        assert [item.index for item in seen[1].items] == [3, 4, 5]  # numbered in the caller's list

        # the same list under the same id: the same per-image requests, no second review item
        again = client.analyze_batch(IMAGES, request_id="bulk-1", batch_size=SERVICE_LIMIT)
        assert [i.request_id for i in again] == [i.request_id for i in result]
        assert [i.response.review_item_id for i in again if i.ok] == [
            i.response.review_item_id for i in result if i.ok
        ]

        # an image's error names its place in the caller's list, not in its chunk
        late = client.analyze_batch([RED, RED, RED, NOT_AN_IMAGE], batch_size=SERVICE_LIMIT)
        assert late[3].error.field == "images[3]" and late[3].request_id.endswith(".3:0")

        # a list that fits one request goes under the call's own id, as the service numbers it
        one = client.analyze_batch([RED, GREY], request_id="small-1")
        assert [i.request_id for i in one] == ["small-1:0", "small-1:1"] and one.failed == 0


def test_a_chunk_refused_whole_raises_after_the_chunks_before_it_were_reported(service):
    big = RED + bytes(5000)  # over the service's limits.batch_max_body_bytes (4000) on its own
    seen = []
    with TestClient(app) as http, VisionRouteClient("http://testserver", http_client=http) as client:
        with pytest.raises(PayloadTooLarge) as refused:
            client.analyze_batch([RED, GREY, big], max_batch_bytes=3000, on_progress=seen.append)
        assert refused.value.status == 413 and refused.value.field == "body"
        assert [p.done for p in seen] == [2]  # the first chunk's results came before the refusal
        # more images than the service takes: the batch's own 400, naming the field
        with pytest.raises(InputError) as refused:
            client.analyze_batch([RED] * 4, batch_size=4)
        assert refused.value.status == 400 and refused.value.field == "image"


def test_the_async_client_sends_the_same_chunks(service):
    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            async with AsyncVisionRouteClient("http://testserver", http_client=http) as client:
                return await client.analyze_batch(IMAGES, request_id="bulk-2", batch_size=SERVICE_LIMIT)

    check_results(asyncio.run(scenario()), "bulk-2")


class IngressServer:
    """A loopback gRPC server whose AnalyzeBatch is the real ingress's, run on one event loop
    (the service's locks belong to it); the request id is read from the metadata as Ray Serve's
    gRPC proxy hands it on."""

    def __init__(self, service) -> None:
        endpoints = GrpcEndpoints()
        endpoints.service, endpoints.authenticator = service, make_authenticator(NO_KEYS)
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        _, stubs = generated()
        server = self

        class Context:
            def __init__(self, context) -> None:
                self.context, self.code, self.details = context, None, ""

            def request_id(self):
                return dict(self.context.invocation_metadata()).get("request_id")

            def invocation_metadata(self):
                return self.context.invocation_metadata()

            def set_code(self, code):
                self.code = code

            def set_details(self, details):
                self.details = details

            def set_trailing_metadata(self, trailers):
                self.context.set_trailing_metadata(trailers)

        class Servicer(stubs.VisionRouteServicer):
            def AnalyzeBatch(self, request, context):
                adapter = Context(context)
                work = endpoints.AnalyzeBatch(request, adapter)
                reply = asyncio.run_coroutine_threadsafe(work, server.loop).result(timeout=60)
                if adapter.code is not None:
                    context.abort(adapter.code, adapter.details)
                return reply

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        stubs.add_VisionRouteServicer_to_server(Servicer(), self.server)
        self.url = f"grpc://127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"

    def __enter__(self):
        self.server.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop(grace=None)
        self.loop.call_soon_threadsafe(self.loop.stop)


def test_grpc_batches_read_as_http_ones(service):
    with IngressServer(service) as server:
        with VisionRouteClient(server.url) as client:
            check_results(
                client.analyze_batch(IMAGES, request_id="bulk-3", batch_size=SERVICE_LIMIT), "bulk-3"
            )
            with pytest.raises(InputError) as refused:
                client.analyze_batch([RED] * 4, batch_size=4)
            assert refused.value.field == "images" and refused.value.grpc_code == "INVALID_ARGUMENT"

        async def scenario():
            async with AsyncVisionRouteClient(server.url) as client:
                return await client.analyze_batch(IMAGES, request_id="bulk-4", batch_size=SERVICE_LIMIT)

        check_results(asyncio.run(scenario()), "bulk-4")


def test_bad_batch_arguments_name_the_field_before_anything_is_sent(tmp_path):
    client = VisionRouteClient("http://127.0.0.1:1")  # nothing listens: a send would fail otherwise
    cases = [
        (lambda: client.analyze_batch([RED, tmp_path / "missing.png"]), "images[1]"),
        (lambda: client.analyze_batch([RED, 7]), "images[1]"),
        (lambda: client.analyze_batch([RED], image_urls=["http://x/a.png"]), "images"),
        (lambda: client.analyze_batch(image_urls=["http://x/a.png", ""]), "image_urls[1]"),
        (lambda: client.analyze_batch([RED], batch_size=0), "batch_size"),
        (lambda: client.analyze_batch([RED], max_batch_bytes=-1), "max_batch_bytes"),
        (lambda: client.analyze_batch([RED] * 40, request_id="r" * 125), "request_id"),
        (lambda: client.analyze_batch([RED], on_progress="print"), "on_progress"),
    ]
    for make, field in cases:
        with pytest.raises(InputError) as raised:
            make()
        assert raised.value.field == field, raised.value
    assert len(client.analyze_batch([])) == 0  # an empty list is an empty answer, nothing sent


def test_chunks_hold_at_most_the_count_and_the_bytes():
    assert chunk_bounds([1] * 7, 3, 100) == [(0, 3), (3, 6), (6, 7)]
    assert chunk_bounds([40, 40, 40, 10], 10, 100) == [(0, 2), (2, 4)]
    assert chunk_bounds([10, 500, 10], 10, 100) == [(0, 1), (1, 2), (2, 3)]  # too big: alone
    assert chunk_bounds([], 3, 100) == []
