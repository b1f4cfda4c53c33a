"""Regression tests of issue 11 part B, over both faces without Ray: bad input is a 4xx naming
the field; errors carry the request id and our own error name; echoed values are bounded; no
dependency's text (paths, pids, node addresses, actor ids, tracebacks) reaches a client; every
503 carries Retry-After; grpc.health.v1 Watch streams the status.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.testclient import TestClient
from grpc_health.v1 import health_pb2

from router.auth.keys import SecurityConfig
from router.errors import error_body, grpc_code_name, http_status, retry_after_s, unexpected_error
from router.grpc.ingress import MAX_DETAILS_CHARS, GrpcEndpoints, pb
from router.http.api import app
from router.http.deps import attach
from router.serve_context import make_authenticator
from router.services.backends import LocalSearch
from router.services.common import parsed_json
from router.tiers import RemoteSearch, RemoteTier, RemoteVlmTier
from tests.router.colour_model import solid_png
from tests.router.test_service_core import build, make_config
from tests.support.fuzz import LEAKS
from visionroute.errors import BackendUnavailable, InputError, NotFound
from visionroute.redaction import failure_summary, scrubbed, shown

RAY_STYLE_TEXT = (
    "\x1b[36mray::ServeReplica:visionroute:SearchTier.call()\x1b[39m (pid=3195, ip=192.0.2.2, "
    "actor_id=c6bd8b38a75384af1ba992b101000000, repr=<ray.serve._private.replica.ServeReplica "
    'object at 0x7ff04c715d90>)\n  File "/work/main/.venv/lib/python3.11/site-packages/ray/serve/'
    '_private/replica.py", line 1820, in handle_request\nOverflowError: Python int too large'
)

# No keys, and no Serve to ask for its bind: without allow_insecure_bind the bind check looks for
# Serve's controller, and that look-up started a local Ray instance (seconds of CPU, and daemons
# left running for the rest of the session) only to find none.
NO_KEYS = SecurityConfig(allow_insecure_bind=True)


class FakeIndex:
    """Stands in for SearchService behind LocalSearch: records calls, fails on demand."""

    def __init__(self, fail_with: BaseException | None = None) -> None:
        self.calls: list[tuple[str, tuple]] = []
        self.fail_with = fail_with

    def _call(self, name: str, *args, **kwargs):
        self.calls.append((name, args))
        if self.fail_with is not None:
            raise self.fail_with
        if name == "get":
            raise NotFound(f"no item with id {args[0]} in the index", field="id")
        return {"hits": [], "k": kwargs.get("k", 10)}

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: self._call(name, *args, **kwargs)


def make_client(tmp_path, index=None, security=None):
    config = make_config(tmp_path)
    from router.services import VisionRouteService
    from router.services.backends import LocalOnnxTier

    tier = LocalOnnxTier(config.cascades["colour"].tier.model_dump(), config.models_dir)
    service = VisionRouteService.build(
        config, tiers={"colour": tier}, search=LocalSearch(index) if index is not None else None
    )
    attach(service, security or NO_KEYS)
    return service, TestClient(app)


@pytest.fixture
def index():
    return FakeIndex()


@pytest.fixture
def client(tmp_path, index):
    _, client = make_client(tmp_path, index)
    with client:
        yield client


def post_json(client, path: str, body: bytes, **headers):
    return client.post(path, content=body, headers={"content-type": "application/json", **headers})


# -- finding 3: bad input on the search path is a 400 naming the field ---------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"id": 18446744073709551616}', "id"),
        (b'{"id": -9223372036854775809}', "id"),
        (b'{"text": "red", "filters": {"ids": [18446744073709551616]}}', "filters.ids.0"),
        (b'{"text": "\\ud800"}', "text"),
        (b'{"text": "red", "filters": {"tags_any": ["ok", "\\udfff"]}}', "filters.tags_any.1"),
        (b'{"text": "\xff\xfe"}', "body"),
        (b"[" * 3000 + b"]" * 3000, "body"),
        (b'{"text": "red", "filters": {"x": ' + b"[" * 3000 + b"]" * 3000 + b"}}", "body"),
        (b'{"text": "red", "k": NaN}', "body"),
    ],
)
def test_bad_search_input_is_a_400_naming_the_field(client, index, body, field):
    response = post_json(client, "/v1/search", body)
    assert response.status_code == 400, response.text
    assert response.json()["field"] == field and response.json()["error"] == "InputError"
    assert index.calls == [], "refused before the index is asked"


def test_broken_json_to_index_an_item_is_a_400(client):
    response = post_json(client, "/v1/search/items", b'{"image_base64": ')
    assert response.status_code == 400 and response.json()["field"] == "body"
    response = client.post(
        "/v1/search/items", files={"image": ("x.png", b"x", "image/png")}, data={"metadata": "[1"}
    )
    assert response.status_code == 400 and response.json()["field"] == "metadata"


def test_an_id_outside_int64_in_the_path_is_a_400(client, index):
    for method in ("GET", "DELETE"):
        response = client.request(method, "/v1/search/items/18446744073709551616")
        assert response.status_code == 400 and response.json()["field"] == "id", response.text
    assert client.get("/v1/search/items/9223372036854775807").status_code == 404
    assert [name for name, _ in index.calls] == ["get"]


def test_the_index_refuses_ids_outside_int64_itself(tmp_path):
    from retrieval.schemas import SearchFilters, parse_model
    from retrieval.service import SearchService

    with pytest.raises(InputError) as error:
        parse_model(SearchFilters, {"ids": [2**63]}, "filters")
    assert error.value.field == "filters.ids.0"
    for method in ("get", "delete"):
        with pytest.raises(InputError) as error:
            getattr(SearchService, method)(SearchService.__new__(SearchService), 2**64)
        assert error.value.field == "id"


def test_review_bodies_parsed_by_fastapi_get_the_same_checks(client):
    response = post_json(client, "/v1/review/claim", b'{"reviewer": "\\ud800"}')
    assert response.status_code == 400 and response.json()["field"] == "reviewer"
    response = post_json(client, "/v1/review/claim", b"[" * 3000 + b"]" * 3000)
    assert response.status_code == 400 and response.json()["field"] == "body"
    response = client.get("/v1/review/items", params={"limit": str(2**70)})
    assert response.status_code == 400 and response.json()["field"] == "limit"


# -- finding 4: our error names, and the request id on every route -----------------------------


def test_every_error_body_carries_the_request_id(client):
    sent = {"x-request-id": "order-1234"}
    answers = [
        post_json(client, "/v1/search", b"{", **sent),
        client.get("/v1/search/items/1", headers=sent),
        client.get("/v1/review/items/nope", headers=sent),
        post_json(client, "/v1/review/claim", b"{}", **sent),
        client.get("/no/such/route", headers=sent),
        client.put("/v1/search", headers=sent),
        client.post("/v1/analyze", content=b"x", headers={"content-type": "text/plain", **sent}),
    ]
    for response in answers:
        assert response.status_code in (400, 404, 405, 415), response.text
        assert response.json()["request_id"] == "order-1234", response.text
    generated = client.get("/v1/review/items/nope").json()["request_id"]
    assert generated and generated != "order-1234"
    malformed = client.get("/v1/review/items", headers={"x-request-id": "a b"})
    assert malformed.status_code == 400 and malformed.json()["field"] == "X-Request-Id"
    assert malformed.json()["request_id"] and malformed.json()["request_id"] != "a b"


def ray_wrapped(error: Exception) -> Exception:
    from ray.exceptions import RayTaskError

    return RayTaskError("call", RAY_STYLE_TEXT, error, pid=3195, ip="192.0.2.2").as_instanceof_cause()


class RaisingHandle:
    def __init__(self, error: Exception) -> None:
        self.error = error

    def __getattr__(self, name: str):
        handle = self

        class Method:
            async def remote(self, *args, **kwargs):
                raise handle.error

        return Method()


def test_remote_search_gives_back_our_own_error_not_rays_wrapper():
    wrapped = ray_wrapped(InputError("k must be in [1, 1000]", field="k"))
    assert type(wrapped).__name__ == "RayTaskError(InputError)"
    with pytest.raises(InputError) as error:
        asyncio.run(RemoteSearch(RaisingHandle(wrapped)).call("search_text", "red"))
    assert type(error.value) is InputError and error.value.field == "k"
    assert error_body(wrapped, "r1")["error"] == "InputError"  # even if one slipped through


def test_a_failing_replica_is_a_503_that_names_the_kind_only():
    with pytest.raises(BackendUnavailable) as error:
        asyncio.run(RemoteSearch(RaisingHandle(ray_wrapped(OverflowError("int too big")))).call("get", 1))
    body = error_body(error.value, "r1")
    assert "OverflowError" in body["reason"] and not LEAKS.search(json.dumps(body))
    assert retry_after_s(error.value) == 1
    for client_class in (RemoteTier, RemoteVlmTier):
        with pytest.raises(BackendUnavailable) as error:
            asyncio.run(client_class(RaisingHandle(ray_wrapped(RuntimeError(RAY_STYLE_TEXT)))).describe())
        assert not LEAKS.search(error.value.reason) and "192.0.2.2" not in error.value.reason


# -- finding 5: the gRPC face ----------------------------------------------------------------------


class Context:
    def __init__(self, metadata=()):
        self.metadata, self.code, self.details, self.trailers = list(metadata), None, "", ()

    def request_id(self):
        return "grpc-req-1"

    def invocation_metadata(self):
        return self.metadata

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details

    def set_trailing_metadata(self, trailers):
        self.trailers = trailers


@pytest.fixture
def servicer(tmp_path, index):
    service, _ = make_client(tmp_path, index)
    endpoints = GrpcEndpoints()
    endpoints.service, endpoints.authenticator = service, make_authenticator(NO_KEYS)
    return endpoints


def call(servicer, method, request):
    context = Context()
    reply = asyncio.run(getattr(servicer, method)(request, context))
    return (context.code.name if context.code else "OK"), context, reply


@pytest.mark.parametrize(
    ("filters_json", "field"),
    [
        ("[1]", "filters_json"),
        ("[" * 3000 + "]" * 3000, "filters_json"),
        ('{"a": ' + "[" * 40 + "]" * 40 + "}", "filters_json.a" + ".0" * 31),
        ('{"tags_any": ["\\ud800"]}', "filters_json.tags_any.0"),
        ('{"ids": [18446744073709551616]}', "filters.ids.0"),
        ("{", "filters_json"),
    ],
)
def test_grpc_search_with_bad_filters_is_invalid_argument(servicer, filters_json, field):
    code, context, _ = call(servicer, "Search", pb.SearchRequest(query_text="red", filters_json=filters_json))
    assert code == "INVALID_ARGUMENT", context.details
    details = json.loads(context.details)
    assert details["field"] == field and details["request_id"] == "grpc-req-1"


@pytest.mark.parametrize(
    ("method", "request_message"),
    [
        ("GetReviewItem", pb.GetReviewItemRequest(item_id="x" * 10_000)),
        ("Analyze", pb.AnalyzeRequest(image=solid_png((255, 0, 0)), task="t" * 10_000)),
        ("GetReviewLabels", pb.GetReviewLabelsRequest(task="\u00e9" * 10_000)),
        (
            "LabelReviewItem",
            pb.LabelReviewItemRequest(
                item_id="i",
                label_json=json.dumps(
                    {"reviewer": "a", "lease_token": "t", "verdict": "reject", "y" * 10_000: 1}
                ),
            ),
        ),
    ],
)
def test_grpc_errors_echo_long_values_bounded(servicer, method, request_message):
    code, context, _ = call(servicer, method, request_message)
    assert code in ("INVALID_ARGUMENT", "NOT_FOUND"), context.details
    assert len(context.details) <= MAX_DETAILS_CHARS and "more characters]" in context.details


def test_http_errors_echo_long_values_bounded(client):
    response = client.post(
        "/v1/analyze",
        files={"image": ("x.png", solid_png((255, 0, 0)), "image/png")},
        data={"task": "t" * 10_000},
    )
    assert response.status_code == 400 and response.json()["field"] == "task"
    assert len(response.text) < 2000 and "more characters]" in response.json()["reason"]


def test_grpc_health_watch_streams_the_status(servicer):
    async def first(request):
        context = Context()
        stream = servicer.Watch(request, context)
        replies = [reply async for reply in _take(stream, 1)]
        await stream.aclose()
        return context, replies

    context, replies = asyncio.run(first(health_pb2.HealthCheckRequest()))
    assert context.code is None and [r.status for r in replies] == [health_pb2.HealthCheckResponse.SERVING]
    context, replies = asyncio.run(first(health_pb2.HealthCheckRequest(service="nope" * 5000)))
    assert context.code is None
    assert [r.status for r in replies] == [health_pb2.HealthCheckResponse.SERVICE_UNKNOWN]
    code, context, _ = call(servicer, "Check", health_pb2.HealthCheckRequest(service="nope" * 5000))
    assert code == "NOT_FOUND" and len(context.details) <= MAX_DETAILS_CHARS


async def _take(stream, n):
    async for item in stream:
        yield item
        n -= 1
        if n == 0:
            return


# -- finding 6: no dependency's text reaches a client; every 503 has Retry-After ----------------


def test_an_unexpected_exception_is_a_generic_answer_logged_with_the_request_id(tmp_path, caplog):
    _, client = make_client(tmp_path, FakeIndex(fail_with=RuntimeError(RAY_STYLE_TEXT)))
    with client:
        response = post_json(client, "/v1/search", b'{"text": "red"}', **{"x-request-id": "bug-1"})
    assert response.status_code == 500 and response.json()["error"] == "InternalError"
    assert response.json()["request_id"] == "bug-1" and not LEAKS.search(response.text)
    assert "192.0.2.2" not in response.text
    assert any("bug-1" in r.getMessage() and r.exc_info for r in caplog.records)


def test_a_dependency_failure_is_a_503_with_retry_after_on_both_faces(tmp_path, servicer):
    from ray.exceptions import ActorDiedError

    _, client = make_client(tmp_path, FakeIndex(fail_with=ActorDiedError()))
    with client:
        response = post_json(client, "/v1/search", b'{"text": "red"}')
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert "ActorDiedError" in response.json()["reason"] and not LEAKS.search(response.text)
    servicer.service.search.backend = LocalSearch(FakeIndex(fail_with=ActorDiedError()))
    code, context, _ = call(servicer, "Search", pb.SearchRequest(query_text="red"))
    assert code == "UNAVAILABLE" and dict(context.trailers) == {"retry-after": "1"}
    servicer.service.search.backend = LocalSearch(FakeIndex(fail_with=KeyError(RAY_STYLE_TEXT)))
    code, context, _ = call(servicer, "Search", pb.SearchRequest(query_text="red"))
    assert code == "INTERNAL" and not LEAKS.search(context.details)
    assert json.loads(context.details)["request_id"] == "grpc-req-1"


def test_every_503_carries_retry_after(tmp_path):
    _, client = make_client(tmp_path, index=None)  # search not enabled: BackendUnavailable
    with client:
        response = post_json(client, "/v1/search", b'{"text": "red"}')
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert client.get("/readyz").status_code == 200
    assert retry_after_s(BackendUnavailable("x")) == 1 and http_status(BackendUnavailable("x")) == 503


def test_server_side_reasons_lose_paths_and_addresses():
    error = BackendUnavailable(
        "the review queue could not store the item: [Errno 28] No space left on device: "
        "'/var/lib/visionroute/review/images/ab/cd.png' (node 10.1.2.3, pid=77)"
    )
    reason = error_body(error, "r")["reason"]
    assert "/var/lib" not in reason and "10.1.2.3" not in reason and "pid=77" not in reason
    assert "No space left on device" in reason
    # A caller's own value echoed in an InputError stays readable (bounded, not redacted).
    assert "/etc/x" in error_body(InputError("unknown task '/etc/x'", field="task"), "r")["reason"]
    assert unexpected_error(ValueError(RAY_STYLE_TEXT)).reason.startswith("internal error")
    assert grpc_code_name(unexpected_error(TimeoutError())) == "UNAVAILABLE"


def test_a_failed_tier_step_keeps_the_kind_and_drops_the_internals(tmp_path):
    from router.services import ImageRequest

    class DyingTier:
        async def predict(self, image_rgb):
            raise ray_wrapped(RuntimeError("CUDA error at /opt/conda/lib/libcudnn.so.8 on 10.0.0.7"))

        async def describe(self):
            return {}

    service = build(make_config(tmp_path), tier=DyingTier())
    analysis = asyncio.run(service.analyze.analyze(ImageRequest(solid_png((255, 0, 0)), "r"), None))
    step = next(s for s in analysis.trace.steps if s.stage == "onnx:colour")
    assert step.error.startswith("RuntimeError: CUDA error at <path>") and "10.0.0.7" not in step.error
    assert analysis.decision.value == "review" and not LEAKS.search(step.error)


def test_redaction_helpers():
    summary = failure_summary(ray_wrapped(OSError("disk full at /srv/x/y")))
    assert summary == "OSError: disk full at <path>"
    assert scrubbed(RAY_STYLE_TEXT).startswith("ray::ServeReplica:visionroute:SearchTier.call()")
    assert not LEAKS.search(scrubbed(RAY_STYLE_TEXT))
    assert shown("x" * 100) == "'" + "x" * 79 + "…[22 more characters]"
    with pytest.raises(InputError) as error:
        parsed_json(b'{"a": {"b": ["\\udc00"]}}', "metadata")
    assert error.value.field == "metadata.a.b.0"
