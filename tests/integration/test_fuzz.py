"""Hostile input against the running service, HTTP and gRPC: never a 500 (or INTERNAL).

Hypothesis generates bodies for every operation the OpenAPI spec lists (JSON from the spec's
own shapes plus arbitrary JSON, multipart with arbitrary bytes and fields, raw bytes with
arbitrary content types, arbitrary path and query values), and arbitrary gRPC request
messages (random bytes, random strings, random label JSON). The case counts are printed.
"""

from __future__ import annotations

import json
import string

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.grpc_ingress import pb, visionroute_pb2_grpc
from tests.integration.serve_process import ServeProcess

pytestmark = [pytest.mark.server, pytest.mark.slow]
CASES = {"http": 0, "grpc": 0}
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
fields = st.sampled_from(
    [
        "image_base64",
        "image_url",
        "task",
        "tenant",
        "reviewer",
        "lease_token",
        "verdict",
        "label",
        "boxes",
        "note",
        "item_id",
        "lease_s",
        "colour",
    ]
)
bodies = st.dictionaries(fields, json_values, max_size=5) | json_values
path_text = st.text(alphabet=string.ascii_letters + string.digits + "-_.%~", min_size=1, max_size=40)


@pytest.fixture(scope="module")
def service(prepared_models_dir, tmp_path_factory):
    process = ServeProcess(tmp_path_factory.mktemp("fuzz"), prepared_models_dir).start()
    yield process
    process.stop()
    print(f"\nfuzz cases: {CASES}")


@pytest.fixture(scope="module")
def client(service):
    with httpx.Client(base_url=service.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def operations(client):
    spec = client.get("/openapi.json").json()
    return [
        (path, method) for path, item in spec["paths"].items() for method in item if method in ("get", "post")
    ]


def check(response: httpx.Response) -> None:
    CASES["http"] += 1
    assert response.status_code < 500 or response.status_code == 503, (
        response.status_code,
        response.text[:500],
    )
    if response.status_code >= 400:
        assert response.headers["content-type"].startswith("application/json")


@FUZZ
@given(data=st.data())
def test_every_openapi_operation_with_arbitrary_json(client, operations, data):
    path, method = data.draw(st.sampled_from(operations))
    concrete = path
    for name in [p[1:-1] for p in path.split("/") if p.startswith("{")]:
        concrete = concrete.replace("{" + name + "}", data.draw(path_text))
    query = data.draw(
        st.dictionaries(
            st.sampled_from(["status", "limit", "offset", "k", "q"]), st.text(max_size=12), max_size=3
        )
    )
    if method == "post":
        check(client.post(concrete, params=query, json=data.draw(bodies)))
    else:
        check(client.get(concrete, params=query))


@FUZZ
@given(
    image=st.binary(max_size=4096),
    task=st.text(max_size=20),
    tenant=st.text(max_size=20),
    content_type=st.sampled_from(["image/png", "application/octet-stream", "", "text/plain"]),
)
def test_analyze_multipart_with_arbitrary_bytes_and_fields(client, image, task, tenant, content_type):
    data = {k: v for k, v in {"task": task, "tenant": tenant}.items() if v}
    check(
        client.post(
            "/v1/analyze",
            files={"image": ("x", image, content_type or "application/octet-stream")},
            data=data,
        )
    )


@FUZZ
@given(
    body=st.binary(max_size=2048),
    content_type=st.sampled_from(
        [
            "application/json",
            "multipart/form-data",
            "multipart/form-data; boundary=x",
            "image/png",
            "",
            "application/json; charset=latin-1",
        ]
    ),
)
def test_analyze_raw_bodies(client, body, content_type):
    check(
        client.post(
            "/v1/analyze", content=body, headers={"content-type": content_type} if content_type else {}
        )
    )


@pytest.fixture(scope="module")
def stub(service):
    with grpc.insecure_channel(service.grpc_target) as channel:
        yield visionroute_pb2_grpc.VisionRouteStub(channel)


def call(method, request) -> None:
    CASES["grpc"] += 1
    try:
        method(request, timeout=60)
    except grpc.RpcError as error:
        assert error.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), error.details()


@FUZZ
@given(
    image=st.binary(max_size=4096),
    task=st.text(max_size=20),
    tenant=st.text(max_size=20),
    url=st.text(max_size=40),
)
def test_grpc_analyze_with_arbitrary_fields(stub, image, task, tenant, url):
    call(
        stub.Analyze,
        pb.AnalyzeRequest(image=image, task=task, tenant=tenant, image_url=url if len(url) % 3 == 0 else ""),
    )


@FUZZ
@given(
    item_id=st.text(max_size=40),
    reviewer=st.text(max_size=20),
    lease_s=st.floats(allow_nan=True),
    label=bodies,
    status=st.text(max_size=10),
    limit=st.integers(-5, 5000),
    offset=st.integers(-5, 10),
)
def test_grpc_review_with_arbitrary_fields(stub, item_id, reviewer, lease_s, label, status, limit, offset):
    call(stub.ListReviewItems, pb.ListReviewItemsRequest(status=status, limit=limit, offset=offset))
    call(stub.GetReviewItem, pb.GetReviewItemRequest(item_id=item_id))
    call(stub.ClaimReviewItem, pb.ClaimReviewItemRequest(reviewer=reviewer, item_id=item_id, lease_s=lease_s))
    call(stub.LabelReviewItem, pb.LabelReviewItemRequest(item_id=item_id, label_json=json.dumps(label)))
