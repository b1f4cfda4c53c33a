"""gRPC through Ray Serve's gRPC proxy, side by side with HTTP, on one service with API keys.

The cases mirror tests/integration/test_service.py: the same photos give the same answers,
the same bad inputs give the same error and field (as a gRPC status), the same review flow
works; plus health checking, reflection, keys, roles and tenant isolation on both faces.
"""

from __future__ import annotations

import glob
import io
import json
import os
import time
import uuid

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from router.grpc.ingress import SERVICE_NAME, pb, visionroute_pb2_grpc
from tests.support.keys import KEYS, key

pytestmark = [pytest.mark.server, pytest.mark.slow]


@pytest.fixture(scope="module")
def service(keyed_service):
    """The session's shared service with API keys (tests/integration/conftest.py; the keys:
    tests/support/keys.py). Other modules' items and entries may be in it: these tests look only
    at what they created, under their own keys' tenants and request ids."""
    return keyed_service


@pytest.fixture(scope="module")
def channel(service):
    with grpc.insecure_channel(service.grpc_target) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        yield channel


@pytest.fixture(scope="module")
def stub(channel):
    return visionroute_pb2_grpc.VisionRouteStub(channel)


def meta(name: str, **extra: str) -> list[tuple[str, str]]:
    return [("x-api-key", key(name)), *extra.items()]


def http_analyze(service, image: bytes, name: str = "acme_client", **fields) -> httpx.Response:
    return httpx.post(
        service.url + "/v1/analyze",
        files={"image": ("x.png", image, "image/png")},
        data=fields,
        headers={"x-api-key": key(name)},
        timeout=60,
    )


def grpc_error(call, *args, **kwargs) -> tuple[grpc.StatusCode, dict]:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, timeout=60, **kwargs)
    details = caught.value.details()
    try:
        return caught.value.code(), json.loads(details)
    except json.JSONDecodeError:
        return caught.value.code(), {"reason": details}


@pytest.mark.parametrize("photo, label", [("coffee", "espresso"), ("chelsea", "Egyptian cat")])
def test_grpc_and_http_give_the_same_answer(service, stub, photos_png, photo, label):
    reply = stub.Analyze(
        pb.AnalyzeRequest(image=photos_png[photo]),
        metadata=meta("acme_client", request_id=f"grpc-{photo}"),
        timeout=60,
    )
    http = http_analyze(service, photos_png[photo]).json()
    assert reply.decision == http["decision"] == "accept"
    assert reply.answer[0].label == http["answer"][0]["label"] == label
    assert reply.answer[0].confidence == pytest.approx(http["answer"][0]["confidence"], abs=1e-5)
    assert reply.request_id == f"grpc-{photo}" and not reply.review_item_id
    trace = json.loads(reply.trace_json)
    assert [s["stage"] for s in trace["steps"]] == [s["stage"] for s in http["trace"]["steps"]]
    assert trace["request_id"] == reply.request_id
    assert reply.image.width == http["image"]["width"] and reply.image.sha256 == http["image"]["sha256"]


def bomb_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "make_request, http_status, grpc_code, error, field",
    [
        (
            lambda p: {"image": b"plain text, not an image"},
            415,
            grpc.StatusCode.INVALID_ARGUMENT,
            "UnsupportedMediaType",
            "image",
        ),
        (
            lambda p: {"image": p["coffee"][:2000]},
            400,
            grpc.StatusCode.INVALID_ARGUMENT,
            "InputError",
            "image",
        ),
        (lambda p: {"image": bomb_png()}, 413, grpc.StatusCode.INVALID_ARGUMENT, "PayloadTooLarge", "image"),
        (
            lambda p: {"image": p["coffee"], "task": "ocr"},
            400,
            grpc.StatusCode.INVALID_ARGUMENT,
            "InputError",
            "task",
        ),
        (
            lambda p: {"image": p["coffee"], "tenant": "globex"},
            403,
            grpc.StatusCode.PERMISSION_DENIED,
            "PermissionDenied",
            "tenant",
        ),
    ],
    ids=["not-an-image", "truncated-png", "decompression-bomb", "unknown-task", "other-tenant"],
)
def test_bad_input_gets_the_same_error_on_both_faces(
    service, stub, photos_png, make_request, http_status, grpc_code, error, field
):
    fields = make_request(photos_png)
    code, details = grpc_error(stub.Analyze, pb.AnalyzeRequest(**fields), metadata=meta("acme_client"))
    assert code == grpc_code and details["error"] == error and details["field"] == field and details["reason"]
    http = http_analyze(service, fields["image"], **{k: v for k, v in fields.items() if k != "image"})
    assert http.status_code == http_status and http.json()["error"] == error and http.json()["field"] == field
    assert (
        stub.Analyze(
            pb.AnalyzeRequest(image=photos_png["coffee"]), metadata=meta("acme_client"), timeout=60
        ).decision
        == "accept"
    )


def test_empty_image_and_url_fetch_off(stub):
    code, details = grpc_error(stub.Analyze, pb.AnalyzeRequest(), metadata=meta("acme_client"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details["field"] == "image"
    code, details = grpc_error(
        stub.Analyze, pb.AnalyzeRequest(image_url="http://169.254.169.254/"), metadata=meta("acme_client")
    )
    assert (
        code == grpc.StatusCode.INVALID_ARGUMENT
        and details["field"] == "image_url"
        and "turned off" in details["reason"]
    )


def test_keys_and_roles_on_both_faces(service, stub, photos_png):
    code, details = grpc_error(stub.Analyze, pb.AnalyzeRequest(image=photos_png["coffee"]))
    assert code == grpc.StatusCode.UNAUTHENTICATED and details["field"] == "x-api-key"
    code, _ = grpc_error(
        stub.Analyze, pb.AnalyzeRequest(image=photos_png["coffee"]), metadata=[("x-api-key", "vr_wrong")]
    )
    assert code == grpc.StatusCode.UNAUTHENTICATED
    code, _ = grpc_error(stub.ListReviewItems, pb.ListReviewItemsRequest(), metadata=meta("acme_client"))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert (
        httpx.post(service.url + "/v1/analyze", files={"image": ("x.png", photos_png["coffee"])}).status_code
        == 401
    )
    assert (
        httpx.get(service.url + "/v1/review/items", headers={"x-api-key": key("acme_client")}).status_code
        == 403
    )
    assert (
        httpx.get(
            service.url + "/review", headers={"authorization": f"Bearer {key('acme_client')}"}
        ).status_code
        == 403
    )
    assert (
        httpx.get(
            service.url + "/v1/review/items", headers={"authorization": f"Bearer {key('acme_reviewer')}"}
        ).status_code
        == 200
    )
    assert httpx.get(service.url + "/metrics", headers={"x-api-key": key("acme_reviewer")}).status_code == 403
    assert (
        httpx.get(service.url + "/healthz").status_code == 200
        and httpx.get(service.url + "/readyz").status_code == 200
    )


def test_review_flow_over_grpc_and_tenant_isolation(service, stub, photos_png):
    reply = stub.Analyze(
        pb.AnalyzeRequest(image=photos_png["astronaut"]), metadata=meta("acme_client"), timeout=60
    )
    assert reply.decision == "review" and reply.review_item_id
    item_id = reply.review_item_id
    # limit: a shared queue may hold other tests' items (oldest first)
    listed = stub.ListReviewItems(
        pb.ListReviewItemsRequest(limit=1000), metadata=meta("acme_reviewer"), timeout=30
    )
    assert item_id in [json.loads(i.item_json)["id"] for i in listed.items]
    # Another tenant's reviewer sees nothing of it, on either face; an admin sees it.
    other = stub.ListReviewItems(
        pb.ListReviewItemsRequest(status="all", limit=1000), metadata=meta("globex_reviewer"), timeout=30
    )
    assert item_id not in [json.loads(i.item_json)["id"] for i in other.items]
    code, _ = grpc_error(
        stub.GetReviewItem, pb.GetReviewItemRequest(item_id=item_id), metadata=meta("globex_reviewer")
    )
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = grpc_error(
        stub.ClaimReviewItem,
        pb.ClaimReviewItemRequest(reviewer="globex_reviewer", item_id=item_id),
        metadata=meta("globex_reviewer"),
    )
    assert code == grpc.StatusCode.NOT_FOUND
    globex = {"x-api-key": key("globex_reviewer")}
    for path in (
        f"/v1/review/items/{item_id}",
        f"/v1/review/items/{item_id}/image",
        f"/v1/review/items/{item_id}/audit",
    ):
        assert httpx.get(service.url + path, headers=globex).status_code == 404, path
    assert item_id not in [
        i["id"]
        for i in httpx.get(service.url + "/v1/review/items?status=all&limit=1000", headers=globex).json()[
            "items"
        ]
    ]
    assert (
        httpx.get(f"{service.url}/v1/review/items/{item_id}", headers={"x-api-key": key("admin")}).status_code
        == 200
    )
    # The acme reviewer works it over gRPC: claim, a rival's claim, label, the same label again.
    # The acting reviewer is the key (its name); tests/integration/test_security_tenancy.py covers more.
    claim = stub.ClaimReviewItem(
        pb.ClaimReviewItemRequest(reviewer="acme_reviewer", item_id=item_id),
        metadata=meta("acme_reviewer"),
        timeout=30,
    )
    assert json.loads(claim.item.item_json)["id"] == item_id and claim.lease_token
    code, details = grpc_error(
        stub.ClaimReviewItem,
        pb.ClaimReviewItemRequest(item_id=item_id),
        metadata=meta("admin"),
    )
    assert code == grpc.StatusCode.ABORTED and details["error"] == "Conflict"
    label = json.dumps(
        {
            "reviewer": "acme_reviewer",
            "lease_token": claim.lease_token,
            "verdict": "correct",
            "label": "space shuttle",
        }
    )
    for _ in range(2):  # idempotent
        done = stub.LabelReviewItem(
            pb.LabelReviewItemRequest(item_id=item_id, label_json=label),
            metadata=meta("acme_reviewer"),
            timeout=30,
        )
        assert json.loads(done.item_json)["status"] == "labelled"
    code, details = grpc_error(
        stub.LabelReviewItem,
        pb.LabelReviewItemRequest(item_id=item_id, label_json="{}"),
        metadata=meta("acme_reviewer"),
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details["field"] in (
        "reviewer",
        "lease_token",
        "verdict",
    )


def test_search_on_both_faces_sees_only_the_callers_tenant(service, stub, photos_png):
    def index(name: str, photo: str) -> int:
        response = httpx.post(
            service.url + "/v1/search/items",
            files={"image": ("p.png", photos_png[photo], "image/png")},
            data={"metadata": '{"tenant": "someone-else"}'},
            headers={"x-api-key": key(name)},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        return response.json()["id"]

    acme_coffee, globex_coffee = index("acme_client", "coffee"), index("globex_reviewer", "coffee")
    over_http = httpx.post(
        service.url + "/v1/search",
        json={"text": "a cup of coffee", "k": 5},
        headers={"x-api-key": key("acme_client")},
        timeout=60,
    ).json()
    over_grpc = json.loads(
        stub.Search(
            pb.SearchRequest(query_text="a cup of coffee", k=5), metadata=meta("acme_client"), timeout=60
        ).result_json
    )
    for result in (over_http, over_grpc):
        ids = [hit["id"] for hit in result["hits"]]
        assert (
            acme_coffee in ids and globex_coffee not in ids
        )  # the key's tenant wins over the metadata it sent
        assert {hit["metadata"]["tenant"] for hit in result["hits"]} == {"acme"}
    assert [h["id"] for h in over_http["hits"]] == [h["id"] for h in over_grpc["hits"]]
    # Another tenant's entry does not exist for this key: not by id, not as a query, not to delete.
    acme = {"x-api-key": key("acme_client")}
    assert httpx.get(f"{service.url}/v1/search/items/{globex_coffee}", headers=acme).status_code == 404
    assert httpx.delete(f"{service.url}/v1/search/items/{globex_coffee}", headers=acme).status_code == 404
    code, details = grpc_error(
        stub.Search, pb.SearchRequest(item_id=globex_coffee, k=3), metadata=meta("acme_client")
    )
    assert code == grpc.StatusCode.NOT_FOUND and details["field"] == "id"
    code, details = grpc_error(stub.Search, pb.SearchRequest(k=3), metadata=meta("acme_client"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details["field"] == "query"


def test_search_takes_tenant_and_params_on_both_faces_with_typed_hits(service, stub):
    """The same request fields on both faces (issue 21), checked alike; typed hits beside the
    deprecated result_json, through Ray Serve's gRPC proxy."""
    acme = {"x-api-key": key("acme_client")}
    typed = stub.Search(
        pb.SearchRequest(
            query_text="a cup of coffee", k=5, tenant="acme", params=pb.SearchParams(exact=True)
        ),
        metadata=meta("acme_client"),
        timeout=60,
    )
    as_json = json.loads(typed.result_json)
    assert [h.id for h in typed.hits] == [h["id"] for h in as_json["hits"]] and typed.exact
    assert {h.metadata.tenant for h in typed.hits} <= {"acme"} and typed.query == "a cup of coffee"
    over_http = httpx.post(
        service.url + "/v1/search",
        json={"text": "a cup of coffee", "k": 5, "tenant": "acme", "params": {"exact": True}},
        headers=acme,
        timeout=60,
    ).json()
    assert [h["id"] for h in over_http["hits"]] == [h.id for h in typed.hits]
    for body, fields, status, code, field in (
        ({"tenant": "globex"}, {"tenant": "globex"}, 403, grpc.StatusCode.PERMISSION_DENIED, "tenant"),
        (
            {"params": {"ef_search": 0}},
            {"params": pb.SearchParams(ef_search=0)},
            400,
            grpc.StatusCode.INVALID_ARGUMENT,
            "params.ef_search",
        ),
    ):
        http = httpx.post(service.url + "/v1/search", json={"text": "cup", **body}, headers=acme, timeout=60)
        got, details = grpc_error(
            stub.Search, pb.SearchRequest(query_text="cup", **fields), metadata=meta("acme_client")
        )
        assert (http.status_code, http.json()["field"]) == (status, field)
        assert (got, details["field"]) == (code, field) and details["reason"] == http.json()["reason"]


def test_standard_health_checking_and_reflection(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service_name in ("", SERVICE_NAME):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service_name), timeout=30)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as caught:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=30)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30
    )
    names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


def test_logs_are_json_with_the_request_id_and_never_hold_a_key(service, stub, photos_png):
    request_id = "log-check-" + uuid.uuid4().hex
    stub.Analyze(
        pb.AnalyzeRequest(image=photos_png["coffee"]),
        metadata=meta("acme_client", request_id=request_id),
        timeout=60,
    )
    started = time.time() - 600
    files = [f for f in glob.glob("/tmp/ray/session_*/logs/serve/*.log") if os.path.getmtime(f) >= started]
    files.append(str(service.workdir / "serve.log"))
    deadline, lines = time.monotonic() + 15, []
    while time.monotonic() < deadline and not lines:  # log files are flushed asynchronously
        lines = [line for f in files for line in open(f, errors="replace") if request_id in line]
        time.sleep(0.5)
    assert lines, "the request id reached no Serve log"
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert records and all(r["request_id"] == request_id for r in records)
    for f in files:
        text = open(f, errors="replace").read()
        assert not any(k in text for _, _, k in KEYS.values()), f"an API key leaked into {f}"
