"""Hostile input against both faces over the Ray-free service core: never a 500, never a leak.

The HTTP face is router.http.api.app under FastAPI's TestClient; the gRPC face is the real
servicer (router.grpc.ingress.GrpcEndpoints) called with a recording context on one event loop
(``loop``). Behind both is the real core (tests/router/test_service_core.py's tiny ONNX
classifier, SQLite review queue and budget ledger) with visual search through a real LocalSearch
over a real SearchService (FAISS + SQLite index, a tiny open_clip model built here). Hypothesis
generates the inputs (tests/support/fuzz.py); every answer must pass tests/support/fuzz.py's
checks, and anything accepted must be readable afterwards. The case count is printed (at least
10,000 in all).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st

from router.auth.keys import SecurityConfig, hash_key
from router.config import parse_app_config
from router.grpc.ingress import GrpcEndpoints, pb
from router.http.api import app
from router.http.deps import attach
from router.serve_context import make_authenticator
from router.services import VisionRouteService
from router.services.backends import LocalOnnxTier, LocalSearch
from tests.router.colour_model import LABELS, solid_png, write_colour_model
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

pytestmark = pytest.mark.slow
CASES = Cases()
KEYS = {
    "admin": ("ops", "admin", "vr_fuzz_admin_key"),
    "client": ("acme", "client", "vr_fuzz_client_key"),
    "reviewer": ("acme", "reviewer", "vr_fuzz_reviewer_key"),
}
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
RED, GREY = solid_png((255, 0, 0), 32), solid_png((128, 128, 128), 32)


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    """The service core with search on: tiny ONNX classifier, tiny open_clip, real index."""
    # Ray's request context, which both faces read per request (router/serve_context.py), is
    # imported here, before any thread runs: imported first on a TestClient thread while OpenCV's
    # first import swaps sys.path on a worker thread, Ray lost its vendored psutil path and
    # failed, and every later call tried the import again (most of this module's CPU, 2 runs of 3).
    import open_clip
    import ray.serve.context  # noqa: F401
    import torch

    from retrieval.config import OpenClipConfig
    from retrieval.embedders import build_embedder
    from retrieval.service import SearchService

    root = tmp_path_factory.mktemp("fuzz_core")
    (root / "clip").mkdir()
    (root / "clip" / "vr-fuzz-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(root / "clip")
    torch.manual_seed(0)
    checkpoint = root / "vr-fuzz-clip.pt"
    torch.save(
        {"state_dict": open_clip.create_model("vr-fuzz-clip", pretrained=None).state_dict()}, checkpoint
    )
    clip = OpenClipConfig(model_name="vr-fuzz-clip", pretrained=str(checkpoint), device="cpu")
    model = write_colour_model(root / "colour.onnx")
    config = parse_app_config(
        {
            "models_dir": str(root),
            "default_task": "colour",
            "cascades": {
                "colour": {
                    "tier": {"model": str(model), "decoder": "classifier", "labels": LABELS, "size_hw": 32},
                    "policy": {"version": "colour-v1", "accept_threshold": 0.9, "escalate_threshold": 0.2},
                }
            },
            "review": {"path": str(root / "review")},
            "retrieval": {
                "enabled": True,
                "index_dir": str(root / "index"),
                "index_analysed": True,
                "embedder": clip.model_dump(mode="json"),
            },
        }
    )
    search = SearchService(config.retrieval, embedder=build_embedder(clip))
    tier = LocalOnnxTier(config.cascades["colour"].tier.model_dump(), config.models_dir)
    service = VisionRouteService.build(config, tiers={"colour": tier}, search=LocalSearch(search))
    yield service
    search.close()
    print(f"\ncore fuzz cases: {dict(CASES.counts)} = {CASES.total}")


@pytest.fixture(scope="module")
def security():
    # No rate limit or lockout: thousands of requests a minute from one address, many with
    # wrong keys, are the point here (router/auth/limits.py has its own tests).
    return SecurityConfig(
        api_keys=[
            {"sha256": hash_key(k), "tenant": t, "role": r, "name": n} for n, (t, r, k) in KEYS.items()
        ],
        rate_limit=None,
        lockout=None,
    )


@pytest.fixture(scope="module")
def loop():
    """One event loop for the module's RPCs (a replica serves them all on one loop). Per call,
    ``asyncio.run`` built and tore down a loop and its executor threads: about half of the gRPC
    tests' CPU. (The HTTP face stays under TestClient: httpx's ASGI transport on this loop made
    the search requests several times slower.)"""
    loop = asyncio.new_event_loop()
    yield loop
    loop.run_until_complete(loop.shutdown_default_executor())
    loop.close()


@pytest.fixture(scope="module")
def client(core, security):
    attach(core, security)
    with TestClient(app, raise_server_exceptions=True) as client:
        client.headers["x-api-key"] = KEYS["admin"][2]
        # Something to find, claim and label: an indexed image and two review items.
        for png in (RED, GREY, solid_png((100, 120, 140), 32)):
            assert client.post("/v1/analyze", files={"image": ("x.png", png, "image/png")}).status_code == 200
        yield client


@pytest.fixture(scope="module")
def operations(client):
    return documented_operations(client.get("/openapi.json").json())


def http(client, method: str, path: str, name: str | None = None, **options):
    CASES.add(f"http {method} {name or path}")
    response = client.request(method, path, **options)
    check_http(response.status_code, dict(response.headers), response.text, where=f"{method} {path[:80]}")
    return response


keys = st.sampled_from(["admin", "client", "reviewer"]).map(lambda name: {"x-api-key": KEYS[name][2]})


# -- search -------------------------------------------------------------------------------------

search_bodies = st.fixed_dictionaries(
    {},
    optional={
        "text": texts | st.sampled_from(["red", "a photo", " ", "x" * 1200]),
        "id": ids | texts,
        "image_base64": st.sampled_from([base64_of(RED), "", "!!", base64_of(b"not an image")]) | texts,
        "k": ids | st.sampled_from([1, 3, 1000, 1001]),
        "filters": json_values
        | st.fixed_dictionaries(
            {},
            optional={
                "ids": st.lists(ids, max_size=3) | ids,
                "tenant": texts | st.lists(texts, max_size=2),
                "tags_any": st.lists(texts, max_size=3),
                "created_after": st.floats() | ids,
                "in_review": st.booleans() | texts,
                "nested": st.integers(1, 200).map(lambda d: json.loads(deep(min(d, 60)))),
            },
        ),
        "params": json_values
        | st.fixed_dictionaries(
            {},
            optional={
                "ef_search": ids,
                "exact": st.booleans() | ids,
                "nprobe": ids,
                "refine_k_factor": st.floats(),
            },
        ),
        "extra": json_values,
    },
)


@fuzz(1500)
@given(body=search_bodies, headers=keys)
def test_search_with_generated_queries(client, body, headers):
    response = http(
        client,
        "POST",
        "/v1/search",
        content=dumps(body),
        headers={"content-type": "application/json", **headers},
    )
    if response.status_code == 200:
        hits = response.json()["hits"]
        assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
        assert all(h["id"] >= 0 for h in hits)


@fuzz(1100)
@given(
    path=st.sampled_from(
        ["/v1/search", "/v1/search/items", "/v1/analyze", "/v1/review/claim"]
        + ["/v1/review/items/{id}/label", "/v1/review/items/{id}/release"]
    ),
    body=raw_json_bodies,
    content_type=st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain", ""]),
    item_id=path_values,
)
def test_raw_bodies_on_every_body_route(client, path, body, content_type, item_id):
    headers = {"content-type": content_type} if content_type else {}
    http(client, "POST", path.replace("{id}", item_id), name=path, content=body, headers=headers)


@fuzz(600)
@given(
    image=st.sampled_from([RED, GREY, b"", b"GIF89a", b"\x89PNG\r\n\x1a\n"]) | st.binary(max_size=200),
    metadata=json_values
    | st.fixed_dictionaries(
        {},
        optional={
            "tenant": texts,
            "tags": st.lists(texts, max_size=3),
            "created_at": st.floats() | ids,
            "extra": st.dictionaries(texts, json_values, max_size=3),
            "review_item_id": texts,
        },
    ),
    as_json=st.booleans(),
    headers=keys,
)
def test_index_items_and_read_back_what_was_accepted(client, image, metadata, as_json, headers):
    if as_json:
        body = {"image_base64": base64_of(image), "metadata": metadata}
        response = http(
            client,
            "POST",
            "/v1/search/items",
            content=dumps(body),
            headers={"content-type": "application/json", **headers},
        )
    else:
        data = {"metadata": dumps(metadata).decode()} if metadata is not None else {}
        response = http(
            client,
            "POST",
            "/v1/search/items",
            files={"image": ("x", image, "image/png")},
            data=data,
            headers=headers,
        )
    if response.status_code == 200:  # nothing accepted is lost: it reads back as stored
        item_id = response.json()["id"]
        stored = http(
            client, "GET", f"/v1/search/items/{item_id}", name="/v1/search/items/{id}", headers=headers
        )
        assert stored.status_code == 200 and stored.json()["id"] == item_id
        if isinstance(metadata, dict) and isinstance(metadata.get("tags"), list):
            assert set(stored.json()["metadata"]["tags"]) == set(metadata["tags"])  # tags are a set


@fuzz(400)
@given(item_id=path_values, method=st.sampled_from(["GET", "DELETE"]), headers=keys)
def test_search_items_by_arbitrary_id(client, item_id, method, headers):
    http(client, method, f"/v1/search/items/{item_id}", name="/v1/search/items/{id}", headers=headers)


# -- every operation, analyse, review ---------------------------------------------------------


# Built once, not per example (building and validating them was a tenth of the test's CPU).
query_params = st.dictionaries(
    st.sampled_from(["status", "limit", "offset", "k", "q"]), texts | st.builds(str, ids), max_size=3
)
operation_bodies = json_values | st.dictionaries(
    st.sampled_from(["reviewer", "lease_token", "verdict", "label", "boxes", "note", "item_id", "lease_s"]),
    json_values,
    max_size=5,
)


@fuzz(1400)
@given(data=st.data())
def test_every_openapi_operation_with_generated_values(client, operations, data):
    template, method = data.draw(st.sampled_from(operations))
    path = template
    for name in [p[1:-1] for p in template.split("/") if p.startswith("{")]:
        path = path.replace("{" + name + "}", data.draw(path_values))
    query = data.draw(query_params)
    query = {k: v.encode("utf-8", "surrogatepass").decode("utf-8", "replace") for k, v in query.items()}
    headers = data.draw(keys)
    if method == "POST":
        body = data.draw(operation_bodies)
        http(
            client,
            method,
            path,
            template,
            params=query,
            content=dumps(body),
            headers={"content-type": "application/json", **headers},
        )
    else:
        http(client, method, path, template, params=query, headers=headers)


@fuzz(700)
@given(
    image=st.sampled_from([RED, GREY, b""]) | st.binary(max_size=300),
    task=texts | st.sampled_from(["colour", "x" * 10_000]),
    tenant=texts | st.sampled_from(["acme", "globex", "x" * 10_000]),
    as_json=st.booleans(),
    headers=keys,
)
def test_analyze_with_generated_fields(client, image, task, tenant, as_json, headers):
    if as_json:
        body = {"image_base64": base64_of(image), "task": task or None, "tenant": tenant or None}
        response = http(
            client,
            "POST",
            "/v1/analyze",
            content=dumps(body),
            headers={"content-type": "application/json", **headers},
        )
    else:
        fields = {
            k: v.encode("utf-8", "surrogatepass") for k, v in {"task": task, "tenant": tenant}.items() if v
        }
        files = {"image": ("x.png", image, "image/png"), **{k: (None, v) for k, v in fields.items()}}
        response = http(client, "POST", "/v1/analyze", files=files, headers=headers)
    if response.status_code == 200 and response.json()["decision"] == "review":
        item_id = response.json()["review_item_id"]  # queued for review: it is there to read
        assert (
            http(client, "GET", f"/v1/review/items/{item_id}", "/v1/review/items/{id}").json()["id"]
            == item_id
        )


@fuzz(500)
@given(
    reviewer=texts | st.sampled_from(["ann", "x" * 200]),
    lease_s=st.floats() | ids | st.none(),
    verdict=st.sampled_from(["confirm", "correct", "reject", "nope"]) | texts,
    label=texts | st.none(),
    token=texts,
    note=texts | st.none(),
    headers=keys,
)
def test_review_flow_with_generated_fields(client, reviewer, lease_s, verdict, label, token, note, headers):
    claim = http(
        client,
        "POST",
        "/v1/review/claim",
        content=dumps({"reviewer": reviewer, "lease_s": lease_s}),
        headers={"content-type": "application/json", **headers},
    )
    item = claim.json().get("item") if claim.status_code == 200 else None
    item_id = item["id"] if item else "missing"
    lease = claim.json().get("lease_token") if item else token
    body = {
        "reviewer": reviewer,
        "lease_token": lease or token,
        "verdict": verdict,
        "label": label,
        "note": note,
    }
    http(
        client,
        "POST",
        f"/v1/review/items/{item_id}/label",
        "/v1/review/items/{id}/label",
        content=dumps(body),
        headers={"content-type": "application/json", **headers},
    )
    http(
        client,
        "POST",
        f"/v1/review/items/{item_id}/release",
        "/v1/review/items/{id}/release",
        content=dumps({"reviewer": reviewer, "lease_token": token}),
        headers={"content-type": "application/json", **headers},
    )


@fuzz(400)
@given(
    request_id=st.text(max_size=20) | st.sampled_from(["ok-1", "x" * 500, "a b", ""]),
    key=st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=20)
    | st.sampled_from([v[2] for v in KEYS.values()]),
    path=st.sampled_from(["/v1/review/items", "/v1/search/stats", "/v1/policy", "/nope", "/readyz"]),
)
def test_headers_and_unknown_routes(client, request_id, key, path):
    headers = {"x-api-key": key}
    if request_id:  # as raw header bytes, whatever they are
        headers["x-request-id"] = (
            request_id.encode("utf-8", "surrogatepass").replace(b"\r", b"").replace(b"\n", b"")
        )
    response = http(client, "GET", path, headers=headers)
    if response.status_code >= 400 and path != "/readyz":
        body = response.json()
        sent = headers.get("x-request-id", b"").strip()
        if sent and body["field"] != "X-Request-Id":
            assert body["request_id"] == sent.decode()  # a well-formed id of the caller's comes back


# -- the gRPC face, without Ray ------------------------------------------------------------------


class RecordingContext:
    """What the servicer needs of grpc's context, recording the status it sets."""

    def __init__(self, metadata):
        self.metadata = metadata
        self.code = None
        self.details = ""
        self.trailers = ()

    def request_id(self):
        return "fuzz-grpc-1"

    def invocation_metadata(self):
        return self.metadata

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details

    def set_trailing_metadata(self, trailers):
        self.trailers = trailers


@dataclass
class Servicer:
    endpoints: GrpcEndpoints
    loop: asyncio.AbstractEventLoop


@pytest.fixture(scope="module")
def servicer(client, core, security, loop):
    endpoints = GrpcEndpoints()
    endpoints.service = core
    endpoints.authenticator = make_authenticator(security)
    return Servicer(endpoints, loop)


def rpc(servicer: Servicer, method: str, request, key: str = "admin"):
    CASES.add(f"grpc {method}")
    context = RecordingContext([("x-api-key", KEYS[key][2])])

    async def call():
        result = getattr(servicer.endpoints, method)(request, context)
        if hasattr(result, "__aiter__"):  # Health/Watch streams: its first answer
            replies = []
            async for reply in result:
                replies.append(reply)
                break
            await result.aclose()
            return replies
        return await result

    reply = servicer.loop.run_until_complete(call())
    code = context.code.name if context.code is not None else "OK"
    check_grpc_status(code, context.details, dict(context.trailers), where=method)
    return code, reply


grpc_keys = st.sampled_from(["admin", "client", "reviewer"])


@fuzz(700)
@given(
    text=texts.map(lambda t: t.encode("utf-8", "replace").decode()),
    item_id=st.integers(-(2**63), 2**63 - 1),
    k=st.integers(-(2**31), 2**31 - 1),
    filters=st.one_of(
        json_values.map(dumps).map(bytes.decode),
        st.builds(deep, st.integers(1, 3000)),
        st.sampled_from(["[1]", "{", '{"ids": [18446744073709551616]}', '{"tenant": "\\ud800"}', "NaN", ""]),
    ),
    which=st.sampled_from(["text", "id", "image", "none"]),
    key=grpc_keys,
)
def test_grpc_search_with_generated_fields(servicer, text, item_id, k, filters, which, key):
    request = pb.SearchRequest(
        query_text=text if which == "text" else "",
        item_id=item_id if which == "id" else 0,
        image=RED if which == "image" else b"",
        k=k,
        filters_json=filters,
    )
    rpc(servicer, "Search", request, key)


@fuzz(550)
@given(
    item_id=texts.map(lambda t: t.encode("utf-8", "replace").decode()) | st.sampled_from(["x" * 10_000]),
    task=texts.map(lambda t: t.encode("utf-8", "replace").decode())
    | st.sampled_from(["t" * 10_000, "colour"]),
    label=raw_json_bodies.map(lambda b: b.decode("utf-8", "replace")),
    metadata=raw_json_bodies.map(lambda b: b.decode("utf-8", "replace")),
    number=ids.filter(lambda i: -(2**63) <= i < 2**63),
    limit=st.integers(-(2**31), 2**31 - 1),
    lease_s=st.floats(allow_nan=True),
    key=grpc_keys,
)
def test_grpc_other_rpcs_with_generated_fields(
    servicer, item_id, task, label, metadata, number, limit, lease_s, key
):
    url = item_id if len(item_id) % 3 == 0 else ""  # url fetching is off: refused, never fetched
    analyze = pb.AnalyzeRequest(image=RED if len(task) % 2 else b"junk", task=task, image_url=url)
    rpc(servicer, "Analyze", analyze, key)
    rpc(servicer, "GetReviewItem", pb.GetReviewItemRequest(item_id=item_id), key)
    claim = pb.ClaimReviewItemRequest(reviewer=task[:200], item_id=item_id, lease_s=lease_s)
    rpc(servicer, "ClaimReviewItem", claim, key)
    rpc(servicer, "LabelReviewItem", pb.LabelReviewItemRequest(item_id=item_id, label_json=label), key)
    rpc(servicer, "IndexSearchItem", pb.IndexSearchItemRequest(image=RED, metadata_json=metadata), key)
    rpc(servicer, "GetSearchItem", pb.SearchItemRequest(item_id=number), key)
    rpc(servicer, "ListReviewItems", pb.ListReviewItemsRequest(limit=limit, offset=limit // 3), key)
    rpc(servicer, "GetReviewLabels", pb.GetReviewLabelsRequest(task=task), key)


def test_grpc_health_check_and_watch(servicer):
    from grpc_health.v1 import health_pb2

    assert (
        rpc(servicer, "Check", health_pb2.HealthCheckRequest())[1].status
        == health_pb2.HealthCheckResponse.SERVING
    )
    code, replies = rpc(servicer, "Watch", health_pb2.HealthCheckRequest())
    assert code == "OK" and [r.status for r in replies] == [health_pb2.HealthCheckResponse.SERVING]
    code, replies = rpc(servicer, "Watch", health_pb2.HealthCheckRequest(service="s" * 10_000))
    assert code == "OK" and [r.status for r in replies] == [health_pb2.HealthCheckResponse.SERVICE_UNKNOWN]
    code, _ = rpc(servicer, "Check", health_pb2.HealthCheckRequest(service="s" * 10_000))
    assert code == "NOT_FOUND"


def test_enough_cases_ran(request):
    """Runs last in this module: the whole suite generated at least 10,000 cases."""
    selected = {item.name for item in request.session.items if item.module is request.module}
    if selected != {name for name in vars(request.module) if name.startswith("test_")}:
        pytest.skip("only part of the module was selected; the count needs all of it")
    assert CASES.total >= 10_000, dict(CASES.counts)
    print(f"\ncore fuzz cases: {CASES.total}")
