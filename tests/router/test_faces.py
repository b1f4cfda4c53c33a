"""The two faces translate only: parity of operations and fields, one error table, HTTP without Ray."""

from __future__ import annotations

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from router.auth.keys import SecurityConfig, hash_key
from router.errors import ERROR_TABLE, grpc_code_name, http_status
from router.grpc.ingress import GRPC_ROLES, GrpcEndpoints, pb
from router.http.api import app
from router.http.deps import attach
from router.schemas import AnalyzeResponse
from tests.router.colour_model import solid_png
from tests.router.test_service_core import build, make_config
from visionroute import errors

# Each HTTP operation and the RPC that does the same. HTTP-only routes say why.
RPC_FOR_ROUTE = {
    ("POST", "/v1/analyze"): "Analyze",
    ("POST", "/v1/analyze/batch"): "AnalyzeBatch",
    ("POST", "/v1/search"): "Search",
    ("POST", "/v1/search/items"): "IndexSearchItem",
    ("GET", "/v1/search/items/{item_id}"): "GetSearchItem",
    ("DELETE", "/v1/search/items/{item_id}"): "DeleteSearchItem",
    ("GET", "/v1/search/stats"): "GetSearchStats",
    ("GET", "/v1/review/items"): "ListReviewItems",
    ("GET", "/v1/review/items/{item_id}"): "GetReviewItem",
    ("GET", "/v1/review/items/{item_id}/image"): "GetReviewImage",
    ("GET", "/v1/review/items/{item_id}/audit"): "GetReviewAudit",
    ("POST", "/v1/review/claim"): "ClaimReviewItem",
    ("POST", "/v1/review/items/{item_id}/release"): "ReleaseReviewItem",
    ("POST", "/v1/review/items/{item_id}/label"): "LabelReviewItem",
    ("GET", "/v1/review/labels/{task}"): "GetReviewLabels",
    ("GET", "/v1/review/stats"): "GetReviewStats",
    ("GET", "/v1/policy"): "GetPolicy",
}
HTTP_ONLY = {
    ("GET", "/metrics"): "Prometheus scrapes HTTP",
    ("GET", "/healthz"): "gRPC has grpc.health.v1 Check",
    ("GET", "/readyz"): "gRPC has grpc.health.v1 Check",
    ("GET", "/review"): "the reviewers' web page, for a browser",
    ("GET", "/review/{asset}"): "the reviewers' web page, for a browser",
    ("POST", "/v1/session/login"): "the review page's cookie login, for a browser (gRPC sends a key)",
    ("GET", "/v1/session"): "the review page's cookie session, for a browser",
    ("GET", "/v1/review/reviewers"): "admin report on reviewers' error rates (issue 23), read over HTTP",
    ("GET", "/v1/rollouts"): "operator admin API, driven by `visionroute rollout` over HTTP",
    ("POST", "/v1/rollouts"): "operator admin API, driven by `visionroute rollout` over HTTP",
    ("GET", "/v1/rollouts/{rollout_id}"): "operator admin API, driven by `visionroute rollout` over HTTP",
    ("POST", "/v1/rollouts/{rollout_id}/promote"): "operator admin API (`visionroute rollout promote`)",
    ("POST", "/v1/rollouts/{rollout_id}/rollback"): "operator admin API (`visionroute rollout rollback`)",
    ("POST", "/v1/rollouts/{rollout_id}/finish"): "operator admin API (`visionroute rollout finish`)",
    ("GET", "/v1/models"): "documentation for people (JSON and Markdown), read by `visionroute card` too",
    (
        "GET",
        "/v1/models/{name}/card",
    ): "documentation for people (JSON and Markdown), read by `visionroute card` too",
    ("GET", "/v1/drift"): "operator report, read by `visionroute drift report`; alerts come from /metrics",
    ("POST", "/v1/session/logout"): "the review page's cookie session, for a browser",
    ("POST", "/v1/admin/recalibrations"): "operator admin API (`visionroute calibrate --from-production`)",
    ("GET", "/v1/admin/recalibrations"): "operator admin API: recalibration jobs' status",
    ("GET", "/v1/admin/recalibrations/{job_id}"): "operator admin API: one recalibration job's status",
}


def http_operations() -> set[tuple[str, str]]:
    """Every documented operation (OpenAPI sees included routers too) and every direct route."""
    documented = {(method.upper(), path) for path, item in app.openapi()["paths"].items() for method in item}
    direct = {
        (method, route.path)
        for route in app.routes
        if isinstance(route, APIRoute)
        for method in route.methods
        if method != "HEAD"
    }
    return documented | direct


def test_every_http_operation_has_an_rpc_or_a_reason_not_to():
    operations = http_operations()
    assert ("POST", "/v1/search") in operations  # included routers are seen
    missing = operations - set(RPC_FOR_ROUTE) - set(HTTP_ONLY)
    assert not missing, f"HTTP operations with no RPC: {sorted(missing)}"
    rpcs = set(pb.DESCRIPTOR.services_by_name["VisionRoute"].methods_by_name)
    assert set(RPC_FOR_ROUTE.values()) == rpcs
    for rpc in rpcs:  # each RPC is served, and has a role (deny by default otherwise)
        assert callable(getattr(GrpcEndpoints, rpc, None)), rpc
        assert rpc in GRPC_ROLES, rpc


def test_the_documented_analyze_response_names_every_field_the_service_returns(tmp_path):
    service = build(make_config(tmp_path))
    import asyncio

    from router.services import ImageRequest, response_body

    body = response_body(
        asyncio.run(service.analyze.analyze(ImageRequest(solid_png((255, 0, 0)), "r"), None))
    )
    assert set(body) == set(AnalyzeResponse.model_fields)
    proto_fields = set(pb.AnalyzeResponse.DESCRIPTOR.fields_by_name)
    assert {"trace" if f == "trace_json" else f for f in proto_fields} == set(body)


def test_one_table_maps_every_project_error_on_both_faces():
    kinds = [
        cls for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, errors.RouterError)
    ]
    for kind in kinds:
        if kind is errors.RouterError:
            continue
        error = kind("x", retry_after_s=1.0) if kind is errors.BudgetExceeded else kind("x")
        assert http_status(error) != 500 and grpc_code_name(error) != "INTERNAL", kind
    assert len({row[0] for row in ERROR_TABLE}) == len(ERROR_TABLE)


@pytest.fixture
def client(tmp_path):
    key = "vr_test_reviewer_key"
    security = SecurityConfig(api_keys=[{"sha256": hash_key(key), "tenant": "acme", "role": "reviewer"}])
    attach(build(make_config(tmp_path)), security)
    with TestClient(app) as client:
        client.headers["x-api-key"] = key
        yield client


def test_http_face_serves_the_core_without_ray(client):
    ok = client.post("/v1/analyze", files={"image": ("r.png", solid_png((255, 0, 0)), "image/png")})
    assert ok.status_code == 200 and ok.json()["answer"][0]["label"] == "red"
    bad = client.post("/v1/analyze", files={"image": ("x.png", b"no image", "image/png")})
    assert bad.status_code == 415 and bad.json()["field"] == "image"
    grey = client.post("/v1/analyze", files={"image": ("g.png", solid_png((128, 128, 128)), "image/png")})
    item_id = grey.json()["review_item_id"]
    assert client.get(f"/v1/review/items/{item_id}").json()["id"] == item_id
    assert (
        client.post("/v1/review/claim", json={"reviewer": "ann", "lease_s": -1}).json()["field"] == "lease_s"
    )
    assert client.get("/v1/review/items", headers={"x-api-key": "wrong"}).status_code == 401
    assert client.get("/v1/policy").status_code == 403  # admin only
    assert client.post("/v1/search", json={"text": "red"}).status_code == 503
    assert (
        client.post(
            "/v1/search", content=b"\xff\xfe{", headers={"content-type": "application/json"}
        ).status_code
        == 400
    )
