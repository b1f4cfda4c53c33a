"""Hostile input against the running service, HTTP and gRPC through Ray Serve's own proxies.

The session's shared service (tests/integration/conftest.py: ``serve run``, the shipped config:
analyse, search on the ConSE index, review) takes generated input on every route and RPC: bodies
shaped like each request plus arbitrary JSON, JSON nested thousands deep, lone surrogates,
non-UTF-8 bytes, ids beyond int64, values of 10,000 characters, multipart with arbitrary bytes,
arbitrary path, query and header values, and arbitrary gRPC messages (tests/support/fuzz.py).
Every answer must pass the same checks as the Ray-free suite (tests/router/test_fuzz_core.py): no
500 / INTERNAL, every 503 (ours or the proxy's) with Retry-After, our error shape with the request
id, no traceback or process internals in any body. The case count is printed (at least 1,000).
"""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given
from hypothesis import strategies as st

from router.grpc.ingress import MAX_DETAILS_CHARS, pb, visionroute_pb2_grpc
from tests.router.colour_model import solid_png
from tests.support.fuzz import (
    Cases,
    base64_of,
    check_grpc_status,
    check_http,
    deep,
    documented_operations,
    dumps,
    fuzz,
    ids,
    json_values,
    path_values,
    raw_json_bodies,
    texts,
)

pytestmark = [pytest.mark.server, pytest.mark.slow]
CASES = Cases()
PNG = solid_png((200, 40, 40), 48)


@pytest.fixture(scope="module")
def service(default_service):
    """The session's shared service (tests/integration/conftest.py): the shipped config."""
    yield default_service
    print(f"\nfuzz cases through the real proxies: {dict(CASES.counts)} = {CASES.total}")


@pytest.fixture(scope="module")
def client(service):
    with httpx.Client(base_url=service.url, timeout=120) as client:
        for png in (PNG, solid_png((128, 128, 128), 48)):  # an indexed image, review items
            assert client.post("/v1/analyze", files={"image": ("x.png", png, "image/png")}).status_code == 200
        yield client


@pytest.fixture(scope="module")
def operations(client):
    return documented_operations(client.get("/openapi.json").json())


def http(client, method: str, path: str, name: str | None = None, **options) -> httpx.Response:
    CASES.add(f"http {method} {name or path}")
    response = client.request(method, path, **options)
    check_http(response.status_code, dict(response.headers), response.text, where=f"{method} {path[:80]}")
    return response


JSON = {"content-type": "application/json"}


@fuzz(150)
@given(
    body=st.fixed_dictionaries(
        {},
        optional={
            "text": texts | st.sampled_from(["a cup of coffee", "x" * 2000]),
            "id": ids,
            "image_base64": st.sampled_from([base64_of(PNG), "!!", base64_of(b"junk")]),
            "k": ids,
            "filters": json_values | st.fixed_dictionaries({}, optional={"ids": st.lists(ids, max_size=2)}),
            "params": json_values,
        },
    )
)
def test_search_with_generated_queries(client, body):
    http(client, "POST", "/v1/search", content=dumps(body), headers=JSON)


@fuzz(180)
@given(
    path=st.sampled_from(
        ["/v1/search", "/v1/search/items", "/v1/analyze", "/v1/review/claim", "/v1/review/items/{id}/label"]
    ),
    body=raw_json_bodies,
    item_id=path_values,
    content_type=st.sampled_from(
        [
            "application/json",
            "application/json; charset=latin-1",
            "multipart/form-data",
            "multipart/form-data; boundary=x",
            "image/png",
            "",
        ]
    ),
)
def test_raw_bodies_on_every_body_route(client, path, body, item_id, content_type):
    headers = {"content-type": content_type} if content_type else {}
    http(client, "POST", path.replace("{id}", item_id), path, content=body, headers=headers)


@fuzz(150)
@given(data=st.data())
def test_every_openapi_operation_with_generated_values(client, operations, data):
    template, method = data.draw(st.sampled_from(operations))
    path = template
    for name in [p[1:-1] for p in template.split("/") if p.startswith("{")]:
        path = path.replace("{" + name + "}", data.draw(path_values))
    query = data.draw(
        st.dictionaries(st.sampled_from(["status", "limit", "offset", "k"]), st.builds(str, ids), max_size=2)
    )
    if method == "POST":
        body = dumps(data.draw(json_values))
        http(client, method, path, template, params=query, content=body, headers=JSON)
    else:
        http(client, method, path, template, params=query)


@fuzz(80)
@given(
    image=st.sampled_from([PNG, b""]) | st.binary(max_size=600),
    task=st.sampled_from(["", "classify", "text", "t" * 10_000]) | texts,
    tenant=st.sampled_from(["", "acme", "bad tenant"]),
)
def test_analyze_with_generated_fields(client, image, task, tenant):
    fields = {
        k: (None, v.encode("utf-8", "surrogatepass"))
        for k, v in {"task": task, "tenant": tenant}.items()
        if v
    }
    http(client, "POST", "/v1/analyze", files={"image": ("x.png", image, "image/png"), **fields})


@fuzz(60)
@given(
    image=st.sampled_from([PNG, b"", b"GIF89a"]),
    metadata=json_values
    | st.fixed_dictionaries({}, optional={"tags": st.lists(texts, max_size=2), "created_at": ids}),
)
def test_index_items_and_read_back_what_was_accepted(client, image, metadata):
    body = {"image_base64": base64.b64encode(image).decode(), "metadata": metadata}
    response = http(client, "POST", "/v1/search/items", content=dumps(body), headers=JSON)
    if response.status_code == 200:
        item_id = response.json()["id"]
        stored = http(client, "GET", f"/v1/search/items/{item_id}", "/v1/search/items/{id}")
        assert stored.status_code == 200 and stored.json()["id"] == item_id


@fuzz(60)
@given(reviewer=texts, verdict=st.sampled_from(["confirm", "reject", "correct"]) | texts, token=texts)
def test_review_flow_with_generated_fields(client, reviewer, verdict, token):
    claim = http(
        client, "POST", "/v1/review/claim", content=dumps({"reviewer": reviewer, "lease_s": 5}), headers=JSON
    )
    item = claim.json().get("item") if claim.status_code == 200 else None
    item_id = item["id"] if item else "missing"
    lease = claim.json()["lease_token"] if item else token
    body = {"reviewer": reviewer, "lease_token": lease, "verdict": verdict}
    http(
        client,
        "POST",
        f"/v1/review/items/{item_id}/release",
        "/v1/review/items/{id}/release",
        content=dumps(body),
        headers=JSON,
    )


def test_overload_answers_503_with_retry_after(service):
    """Ray Serve's own 503 (the ingress queue is full) carries Retry-After too."""

    def one(_):
        with httpx.Client(base_url=service.url, timeout=120) as client:
            return http(client, "POST", "/v1/analyze", files={"image": ("x.png", PNG, "image/png")})

    with ThreadPoolExecutor(40) as pool:
        statuses = [r.status_code for r in pool.map(one, range(40))]
    assert set(statuses) <= {200, 503}, statuses


# -- gRPC --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def channel(service):
    with grpc.insecure_channel(service.grpc_target) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        yield channel


@pytest.fixture(scope="module")
def stub(channel):
    return visionroute_pb2_grpc.VisionRouteStub(channel)


def call(method, request, name: str):
    CASES.add(f"grpc {name}")
    try:
        reply, rpc_call = method.with_call(request, timeout=120)
        check_grpc_status("OK", "", {}, where=name)
        return "OK", reply
    except grpc.RpcError as error:
        trailers = {k: v for k, v in (error.trailing_metadata() or ())}
        check_grpc_status(error.code().name, error.details() or "", trailers, where=name)
        return error.code().name, json.loads(error.details())


utf8 = texts.map(lambda t: t.encode("utf-8", "replace").decode())


@fuzz(150)
@given(
    text=utf8,
    item_id=st.integers(-(2**63), 2**63 - 1),
    k=st.integers(-(2**31), 2**31 - 1),
    filters=json_values.map(dumps).map(bytes.decode)
    | st.builds(deep, st.integers(1, 3000))
    | st.sampled_from(["[1]", "{"]),
    which=st.sampled_from(["text", "id", "image"]),
)
def test_grpc_search_with_generated_fields(stub, text, item_id, k, filters, which):
    request = pb.SearchRequest(
        query_text=text if which == "text" else "",
        item_id=item_id if which == "id" else 0,
        image=PNG if which == "image" else b"",
        k=k,
        filters_json=filters,
    )
    call(stub.Search, request, "Search")


@fuzz(70)
@given(
    item_id=utf8 | st.sampled_from(["x" * 10_000]),
    task=utf8 | st.sampled_from(["t" * 10_000, "classify"]),
    label=raw_json_bodies.map(lambda b: b.decode("utf-8", "replace")),
    number=st.integers(-(2**63), 2**63 - 1),
    limit=st.integers(-(2**31), 2**31 - 1),
    lease_s=st.floats(allow_nan=True),
)
def test_grpc_rpcs_with_generated_fields(stub, item_id, task, label, number, limit, lease_s):
    call(
        stub.Analyze,
        pb.AnalyzeRequest(
            image=PNG if len(task) % 2 else b"junk",
            task=task,
            image_url=item_id if len(item_id) % 3 == 0 else "",
        ),
        "Analyze",
    )
    call(stub.GetReviewItem, pb.GetReviewItemRequest(item_id=item_id), "GetReviewItem")
    call(
        stub.ClaimReviewItem,
        pb.ClaimReviewItemRequest(reviewer=task[:200], item_id=item_id, lease_s=lease_s),
        "ClaimReviewItem",
    )
    call(
        stub.LabelReviewItem, pb.LabelReviewItemRequest(item_id=item_id, label_json=label), "LabelReviewItem"
    )
    call(stub.IndexSearchItem, pb.IndexSearchItemRequest(image=PNG, metadata_json=label), "IndexSearchItem")
    call(stub.GetSearchItem, pb.SearchItemRequest(item_id=number), "GetSearchItem")
    call(stub.ListReviewItems, pb.ListReviewItemsRequest(limit=limit, offset=limit // 3), "ListReviewItems")


def test_grpc_echoes_of_long_values_stay_within_the_metadata_limit(stub):
    for method, request in (
        (stub.Analyze, pb.AnalyzeRequest(image=PNG, task="t" * 10_000)),
        (stub.GetReviewItem, pb.GetReviewItemRequest(item_id="x" * 10_000)),
    ):
        code, details = call(method, request, "long value")
        assert code in ("INVALID_ARGUMENT", "NOT_FOUND")
        assert "more characters]" in details["reason"] and len(json.dumps(details)) <= MAX_DETAILS_CHARS


def test_grpc_filters_that_are_not_an_object_or_too_deep_are_invalid_argument(stub):
    for filters in ("[1]", "[" * 3000 + "]" * 3000):
        code, details = call(stub.Search, pb.SearchRequest(query_text="cup", filters_json=filters), "Search")
        assert code == "INVALID_ARGUMENT" and details["field"] == "filters_json"


def test_grpc_health_check_and_watch(channel):
    health = health_pb2_grpc.HealthStub(channel)
    CASES.add("grpc Health")
    assert (
        health.Check(health_pb2.HealthCheckRequest(), timeout=30).status
        == health_pb2.HealthCheckResponse.SERVING
    )
    stream = health.Watch(health_pb2.HealthCheckRequest(), timeout=30)
    first = next(stream)
    stream.cancel()
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    stream = health.Watch(health_pb2.HealthCheckRequest(service="s" * 10_000), timeout=30)
    unknown = next(stream)
    stream.cancel()
    assert unknown.status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN  # as the protocol asks
    with pytest.raises(grpc.RpcError) as error:
        health.Check(health_pb2.HealthCheckRequest(service="s" * 10_000), timeout=30)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    check_grpc_status("NOT_FOUND", error.value.details(), {}, where="Check")


def test_enough_cases_ran(request):
    """Runs last in this module: the whole suite sent at least 1,000 cases through the proxies."""
    selected = {item.name for item in request.session.items if item.module is request.module}
    if selected != {name for name in vars(request.module) if name.startswith("test_")}:
        pytest.skip("only part of the module was selected; the count needs all of it")
    assert CASES.total >= 1_000, dict(CASES.counts)
