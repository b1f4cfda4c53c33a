"""A hostile client against the endpoints of issues 22-24, in process (no Ray Serve).

The attacker holds two tenants' keys (acme, globex) and a stock HTTP/gRPC client, and tries:
the batch API (POST /v1/analyze/batch, gRPC AnalyzeBatch), the recalibration admin API
(POST/GET /v1/admin/recalibrations), reviewer error rates (GET /v1/review/reviewers), double
labels (the label/claim routes over item_labels), the Label Studio import and the review
export formats. Every refusal must be a 4xx (gRPC: not INTERNAL/UNKNOWN) with our JSON error
naming the field, another tenant's items must answer as missing, and a refused request must
write nothing (tests/support/fuzz.py ``check_http`` / ``check_grpc_status``).
"""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import json
import struct
import uuid
import zlib

import pytest
from fastapi.testclient import TestClient

from router.auth.keys import SecurityConfig, hash_key
from router.config import parse_app_config
from router.grpc.ingress import GrpcEndpoints, pb
from router.http.api import app
from router.http.deps import attach
from router.serve_context import make_authenticator
from router.services import VisionRouteService
from router.services.backends import LocalOnnxTier
from tests.router.colour_model import LABELS, solid_png, write_colour_model
from tests.support.fuzz import check_grpc_status, check_http, deep

KEYS = {  # name -> (tenant, role, plain key); the name is the reviewer's name
    "acme_app": ("acme", "client", "vr_hostile_acme_app"),
    "ann": ("acme", "reviewer", "vr_hostile_ann"),
    "bob": ("acme", "reviewer", "vr_hostile_bob"),
    "globex_app": ("globex", "client", "vr_hostile_globex_app"),
    "gus": ("globex", "reviewer", "vr_hostile_gus"),
    "root": ("ops", "admin", "vr_hostile_root"),
}
SECURITY = SecurityConfig(
    api_keys=[
        {"sha256": hash_key(key), "tenant": tenant, "role": role, "name": name}
        for name, (tenant, role, key) in KEYS.items()
    ],
    rate_limit=None,
)
GREY, DARK_GREY, RED = solid_png((128, 128, 128)), solid_png((90, 90, 90)), solid_png((255, 0, 0))
BIG = 2**63


def auth(who: str, **headers: str) -> dict[str, str]:
    return {"x-api-key": KEYS[who][2], **headers}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The service core (double labels on every item, rollouts on) behind the HTTP face and the
    gRPC servicer, with two tenants' queued items."""
    tmp = tmp_path_factory.mktemp("hostile")
    model = write_colour_model(tmp / "colour.onnx")
    config = parse_app_config(
        {
            "models_dir": str(tmp),
            "default_task": "colour",
            "cascades": {
                "colour": {
                    "tier": {"model": str(model), "decoder": "classifier", "labels": LABELS, "size_hw": 32},
                    "policy": {"version": "colour-v1", "accept_threshold": 0.9, "escalate_threshold": 0.2},
                }
            },
            "review": {"path": str(tmp / "review")},
            "retrieval": {"enabled": False},
            "limits": {"batch_max_images": 8},
            "policies": {"review": {"double_label_fraction": 1.0}},
        }
    )
    tier = LocalOnnxTier(config.cascades["colour"].tier.model_dump(), config.models_dir)
    service = VisionRouteService.build(config, tiers={"colour": tier})
    attach(service, SECURITY)
    servicer = GrpcEndpoints()
    servicer.service, servicer.authenticator = service, make_authenticator(SECURITY)
    with TestClient(app) as client:
        yield service, client, servicer
    service.drift.close()


@pytest.fixture(scope="module")
def client(world):
    return world[1]


@pytest.fixture(scope="module")
def service(world):
    return world[0]


def queued(client, who: str, image: bytes, request_id: str) -> str:
    """A review item of ``who``'s tenant, made through the batch API (one image)."""
    response = batch_json(client, who, [image], **{"x-request-id": request_id})
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    assert result["status"] == 200 and result["response"]["review_item_id"], result
    return result["response"]["review_item_id"]


def batch_json(client, who: str | None, images: list[bytes], extra: dict | None = None, **headers):
    body = {"images": [{"image_base64": base64.b64encode(i).decode()} for i in images], **(extra or {})}
    return client.post("/v1/analyze/batch", json=body, headers=auth(who, **headers) if who else headers)


def refused(response, status: int, field: str | None = None):
    """A refusal with our error shape, the status and (when given) the field it names."""
    check_http(response.status_code, dict(response.headers), response.text)
    assert response.status_code == status, (response.status_code, response.text[:500])
    body = response.json()
    if field is not None:
        assert body["field"] == field, body
    return body


def item_count(service) -> int:
    return len(service.review.queue.list_items(status=None, limit=1000))


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` and holds one byte of pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


# -- the batch API over HTTP --------------------------------------------------------------------


def test_a_batch_cannot_act_for_another_tenant_and_writes_nothing(client, service):
    before = item_count(service)
    refused(batch_json(client, "globex_app", [GREY, GREY], {"tenant": "acme"}), 403, "tenant")
    response = client.post(
        "/v1/analyze/batch",
        files=[("image", ("a.png", GREY, "image/png"))],
        data={"tenant": "acme"},
        headers=auth("globex_app"),
    )
    refused(response, 403, "tenant")
    assert item_count(service) == before


def test_a_batch_without_a_key_or_with_a_wrong_one_is_refused(client):
    refused(batch_json(client, None, [GREY]), 401, "x-api-key")
    refused(batch_json(client, None, [GREY], **{"x-api-key": "vr_nobody"}), 401, "x-api-key")


@pytest.mark.parametrize(
    ("image", "status"),
    [
        (b"", 400),  # zero bytes
        (b"plain text, not an image", 415),
        (GREY[: len(GREY) // 2], 400),  # a truncated PNG
        (png_header(100_000, 100_000), 413),  # a decompression bomb by its header
        (png_header(0, 0), 400),
        (b"\x89PNG\r\n\x1a\n", 400),  # a signature and nothing else
    ],
)
def test_bad_bytes_are_that_images_error_and_the_others_still_answer(client, service, image, status):
    before = item_count(service)
    response = client.post(
        "/v1/analyze/batch",
        files=[("image", ("bad.png", image, "image/png")), ("image", ("red.png", RED, "image/png"))],
        headers=auth("acme_app"),
    )
    assert response.status_code == 200, response.text
    bad, good = response.json()["results"]
    assert good["status"] == 200 and good["response"]["decision"] == "accept"
    assert 400 <= bad["status"] < 500 and bad["response"] is None, bad
    assert bad["error"]["field"] == "images[0]" and bad["error"]["reason"], bad
    assert item_count(service) == before  # the red one is accepted: nothing queued


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"[" * 10_000 + b"]" * 10_000, "body"),  # depth 10k
        (b'{"images": ' + deep(10_000).encode() + b"}", "body"),
        (b'{"images": [{"image_base64": "AA=="}], "task": NaN}', "body"),
        (b'{"images": [{"image_base64": "AA=="}], "task": Infinity}', "body"),
        (b'{"images": 9223372036854775808}', "images"),
        (b'{"images": -1}', "images"),
        (b'{"images": 1e999}', "images"),
        (b'{"images": []}', "images"),
        (json.dumps({"images": [{"image_base64": "AA=="}] * 10_000}).encode(), "images"),
        (json.dumps({"images": [{"image_base64": "AA=="}], "task": "t" * 10_000}).encode(), "task"),
        (json.dumps({"images": [{"image_base64": "AA=="}], "tenant": "t" * 10_000}).encode(), "tenant"),
        (json.dumps({"images": [{"image_base64": "AA=="}], "tenant": 2**63}).encode(), "tenant"),
        (json.dumps({"images": [{"image_base64": "AA=="}], "x" * 10_000: 1}).encode(), None),
        (b'{"images": [{"image_base64": "AA=="}], "task": "\\ud800"}', "task"),
        (b"\xff\xfe{}", "body"),
        (b"null", "body"),
        (b"", "body"),
    ],
)
def test_a_bad_json_batch_is_a_400_naming_the_field(client, service, body, field):
    before = item_count(service)
    response = client.post(
        "/v1/analyze/batch", content=body, headers=auth("acme_app", **{"content-type": "application/json"})
    )
    refused(response, 400, field)
    assert len(response.text) < 4096 and item_count(service) == before


@pytest.mark.parametrize(
    "image",
    [
        "x" * 10_000,  # a 10,000-character string where an object goes
        {"image_base64": "not base64!"},
        {"image_base64": ""},
        {"image_base64": "AA==", "image_url": "http://example.com/a.png"},
        {},
        {"image_url": 12},
        {"image_base64": ["AA=="] * 10_000},
        {"image_url": "u" * 10_000},
        {"image_url": "file:///etc/passwd"},
        None,
        2**63,
    ],
)
def test_a_bad_image_object_is_that_images_400(client, image):
    body = {"images": [image, {"image_base64": base64.b64encode(RED).decode()}]}
    response = client.post("/v1/analyze/batch", json=body, headers=auth("acme_app"))
    assert response.status_code == 200, response.text
    bad, good = response.json()["results"]
    assert good["status"] == 200
    assert 400 <= bad["status"] < 500 and bad["error"]["field"].startswith("images[0]"), bad
    assert len(bad["error"]["reason"]) < 1200, bad


@pytest.mark.parametrize(
    ("content_type", "body", "status"),
    [
        ("text/plain", b'{"images": []}', 415),
        ("application/x-www-form-urlencoded", b"image=abc", 415),
        ("application/xml", b"<images/>", 415),
        ("", b"{}", 415),
        ("multipart/form-data", b"--x\r\nnot multipart", 400),  # no boundary
        ("multipart/form-data; boundary=x", b"--x\r\nContent-Disposition: form-data\r\n\r\n", 400),
    ],
)
def test_wrong_content_types_are_refused(client, content_type, body, status):
    headers = auth("acme_app", **({"content-type": content_type} if content_type else {}))
    refused(client.post("/v1/analyze/batch", content=body, headers=headers), status)


def test_a_huge_declared_size_is_refused_before_the_body_is_read(client):
    for declared in ("99999999999999999999", str(2**63), "-1", "abc"):
        response = client.post(
            "/v1/analyze/batch",
            content=b"{}",
            headers=auth("acme_app", **{"content-type": "application/json", "content-length": declared}),
        )
        check_http(response.status_code, dict(response.headers), response.text)
        assert 400 <= response.status_code < 500, (declared, response.status_code, response.text)


def test_multipart_abuse_is_refused_per_image_or_as_a_whole(client):
    too_many = [("image", (f"{n}.png", RED, "image/png")) for n in range(9)]
    refused(client.post("/v1/analyze/batch", files=too_many, headers=auth("acme_app")), 400, "image")
    response = client.post(
        "/v1/analyze/batch",
        data={"image": "not a file"},
        files=[("x", ("x", b"", "a/b"))],
        headers=auth("acme_app"),
    )
    assert response.status_code == 200 and response.json()["results"][0]["error"]["field"] == "images[0]"
    response = client.post(
        "/v1/analyze/batch",
        files=[("image", ("a.png", RED, "image/png"))],
        data={"task": "t" * 10_000},
        headers=auth("acme_app"),
    )
    refused(response, 400, "task")


def test_a_repeated_batch_request_id_is_the_same_items_per_tenant(client, service):
    first = batch_json(client, "acme_app", [GREY, DARK_GREY], **{"x-request-id": "dup-1"}).json()
    again = batch_json(client, "acme_app", [GREY, DARK_GREY], **{"x-request-id": "dup-1"}).json()
    ids = [r["response"]["review_item_id"] for r in first["results"]]
    assert all(ids) and ids == [r["response"]["review_item_id"] for r in again["results"]]
    other = batch_json(client, "globex_app", [GREY, DARK_GREY], **{"x-request-id": "dup-1"}).json()
    assert not set(ids) & {r["response"]["review_item_id"] for r in other["results"]}
    # the id of each image is <id>:<n>: an id with no room for the index is refused, not cut
    refused(batch_json(client, "acme_app", [GREY, GREY], **{"x-request-id": "r" * 127}), 400, "X-Request-Id")
    refused(batch_json(client, "acme_app", [GREY], **{"x-request-id": "a b"}), 400, "X-Request-Id")


# -- the batch API over gRPC --------------------------------------------------------------------


class Context:
    def __init__(self, who: str | None = None, request_id: str = "grpc-hostile-1"):
        self.metadata = [("x-api-key", KEYS[who][2])] if who else []
        self.rid, self.code, self.details, self.trailers = request_id, None, "", ()

    def request_id(self):
        return self.rid

    def invocation_metadata(self):
        return self.metadata

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details

    def set_trailing_metadata(self, trailers):
        self.trailers = trailers


def grpc_batch(servicer, who, images, request_id="grpc-hostile-1", **fields):
    request = pb.AnalyzeBatchRequest(images=[pb.BatchImage(**i) for i in images], **fields)
    context = Context(who, request_id)
    reply = asyncio.run(servicer.AnalyzeBatch(request, context))
    code = context.code.name if context.code else "OK"
    check_grpc_status(code, context.details, dict(context.trailers))
    return code, (json.loads(context.details) if context.details else None), reply


def test_grpc_batch_refuses_another_tenant_no_key_and_bad_batches(world):
    service, _, servicer = world
    before = item_count(service)
    code, details, _ = grpc_batch(servicer, "globex_app", [{"image": GREY}], tenant="acme")
    assert (code, details["field"]) == ("PERMISSION_DENIED", "tenant")
    assert grpc_batch(servicer, None, [{"image": GREY}])[0] == "UNAUTHENTICATED"
    assert grpc_batch(servicer, "acme_app", [])[1]["field"] == "images"
    code, details, _ = grpc_batch(servicer, "acme_app", [{"image": RED}] * 10_000)
    assert (code, details["field"]) == ("INVALID_ARGUMENT", "images")
    code, details, _ = grpc_batch(servicer, "acme_app", [{"image": RED}], task="t" * 10_000)
    assert (code, details["field"]) == ("INVALID_ARGUMENT", "task")
    code, details, _ = grpc_batch(servicer, "acme_app", [{"image": RED}], tenant="\u00e9" * 10_000)
    assert code in ("INVALID_ARGUMENT", "PERMISSION_DENIED") and details["field"] == "tenant"
    code, details, _ = grpc_batch(servicer, "acme_app", [{"image": RED}] * 2, request_id="r" * 127)
    assert (code, details["field"]) == ("INVALID_ARGUMENT", "request_id")
    assert item_count(service) == before


def test_grpc_batch_bad_bytes_are_each_images_error(world):
    _, _, servicer = world
    images = [
        {"image": b""},
        {"image": b"not an image"},
        {"image": GREY[:40]},
        {"image": png_header(100_000, 100_000)},
        {"image": RED, "image_url": "http://example.com/x.png"},
        {"image_url": "file:///etc/passwd"},
        {"image_url": "u" * 10_000},
        {"image": RED},
    ]
    code, _, reply = grpc_batch(servicer, "acme_app", images)
    assert code == "OK" and (reply.succeeded, reply.failed) == (1, 7)
    for n, result in enumerate(reply.results[:-1]):
        assert 400 <= result.error.http_status < 500 and result.error.field.startswith(f"images[{n}]"), result
        assert result.error.code not in ("INTERNAL", "UNKNOWN")


# -- recalibration (admin) ------------------------------------------------------------------------


def jobs(service) -> list:
    return service.rollouts.artefacts.jobs(None)


@pytest.mark.parametrize("who", [None, "acme_app", "ann", "gus", "globex_app"])
def test_recalibration_is_for_admins_only(client, service, who):
    headers = auth(who) if who else {}
    before = len(jobs(service))
    status = 401 if who is None else 403
    refused(client.post("/v1/admin/recalibrations", json={"task": "colour"}, headers=headers), status)
    refused(client.get("/v1/admin/recalibrations", headers=headers), status)
    refused(client.get("/v1/admin/recalibrations/rc_x", headers=headers), status)
    assert len(jobs(service)) == before


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"task": "colour", "alpha": NaN}', "body"),
        (b'{"task": "colour", "alpha": Infinity}', "body"),
        (b'{"task": "colour", "alpha": 1e999}', "alpha"),
        (b'{"task": "colour", "alpha": -1}', "alpha"),
        (b'{"task": "colour", "delta": 9223372036854775808}', "delta"),
        (b'{"task": "colour", "min_cost_observations": 9223372036854775808}', "min_cost_observations"),
        (b'{"task": "colour", "min_cost_observations": -1}', "min_cost_observations"),
        (b'{"task": "colour", "shadow_fraction": 1e999}', "shadow_fraction"),
        (b'{"task": "colour", "costs": {"review": 1e999}}', None),
        (b'{"task": "colour", "costs": {"review": -1}}', None),
        (b'{"task": "colour", "propose": "yes please"}', "propose"),
        (json.dumps({"task": "t" * 10_000}).encode(), "task"),
        (json.dumps({"task": "colour", "tenant": "t" * 10_000}).encode(), "tenant"),
        (json.dumps({"task": "colour", "tenant": "../../etc"}).encode(), "tenant"),
        (json.dumps({"task": "colour", "tenant": ""}).encode(), "tenant"),
        (json.dumps({"task": "colour", "reason": "r" * 10_000}).encode(), "reason"),
        (json.dumps({"task": "colour", "x" * 10_000: 1}).encode(), None),
        (json.dumps({"task": ["colour"] * 10_000}).encode(), "task"),
        (json.dumps([{"task": "colour"}] * 10_000).encode(), "body"),
        (deep(10_000).encode(), "body"),
        (b'{"task": "\\ud800"}', "task"),
        (b"\xff", "body"),
        (b"", "body"),
        (b"task=colour", "body"),
    ],
)
def test_a_bad_recalibration_request_is_a_400_and_opens_no_job(client, service, body, field):
    before = len(jobs(service))
    response = client.post(
        "/v1/admin/recalibrations", content=body, headers=auth("root", **{"content-type": "application/json"})
    )
    refused(response, 400, field)
    assert len(jobs(service)) == before


def test_recalibration_reads_with_hostile_ids_and_queries(client):
    for job_id in ("x" * 10_000, "%00", "..%2F..%2Fetc", str(BIG), "-1", "rc_" + "0" * 32):
        response = client.get(f"/v1/admin/recalibrations/{job_id}", headers=auth("root"))
        check_http(response.status_code, dict(response.headers), response.text)
        assert response.status_code in (400, 404), (job_id[:40], response.text[:300])
    for task in ("t" * 10_000, "\x00", str(BIG)):
        response = client.get("/v1/admin/recalibrations", params={"task": task}, headers=auth("root"))
        check_http(response.status_code, dict(response.headers), response.text)
        assert response.status_code in (200, 400) and response.json().get("jobs", []) == []


# -- reviewer error rates (admin) -----------------------------------------------------------------


@pytest.mark.parametrize(("who", "status"), [(None, 401), ("acme_app", 403), ("ann", 403), ("gus", 403)])
def test_reviewer_error_rates_are_for_admins_only(client, who, status):
    body = refused(client.get("/v1/review/reviewers", headers=auth(who) if who else {}), status)
    assert "reviewers" not in body
    assert client.get("/v1/review/reviewers", headers=auth("root")).status_code == 200


# -- double labels (item_labels) ------------------------------------------------------------------


def claim(client, who: str, item_id: str | None = None, **body):
    return client.post(
        "/v1/review/claim", json={**({"item_id": item_id} if item_id else {}), **body}, headers=auth(who)
    )


def label(client, who: str, item_id: str, token: str, **body):
    return client.post(
        f"/v1/review/items/{item_id}/label",
        json={"lease_token": token, "verdict": "correct", "label": "green", **body},
        headers=auth(who),
    )


def item_labels(service, item_id: str) -> list:
    with service.review.queue.database.read() as db:
        rows = db.execute("SELECT reviewer, role FROM item_labels WHERE item_id = ?", (item_id,)).fetchall()
    return sorted((row["reviewer"], row["role"]) for row in rows)


def test_another_tenant_cannot_read_claim_label_or_adjudicate_an_item(client, service):
    item_id = queued(client, "acme_app", GREY, "dl-cross")
    for who in ("gus", "globex_app"):
        for path in ("", "/image", "/audit"):
            response = client.get(f"/v1/review/items/{item_id}{path}", headers=auth(who))
            refused(response, 404 if who == "gus" else 403)
        refused(claim(client, who, item_id), 404 if who == "gus" else 403)
        refused(label(client, who, item_id, "t"), 404 if who == "gus" else 403)
    assert claim(client, "gus").json()["item"] is None or claim(client, "gus").json()["item"]["id"] != item_id
    token = claim(client, "ann", item_id).json()["lease_token"]
    refused(label(client, "gus", item_id, token), 404)  # a stolen lease token is no help
    refused(label(client, "bob", item_id, token), 409)
    assert item_labels(service, item_id) == []
    assert label(client, "ann", item_id, token).status_code == 200
    assert item_labels(service, item_id) == [("ann", "first")]


def test_double_label_rules_hold_against_hostile_reviewers(client, service):
    item_id = queued(client, "acme_app", GREY, "dl-rules")
    token = claim(client, "ann", item_id).json()["lease_token"]
    assert label(client, "ann", item_id, token).status_code == 200
    refused(claim(client, "ann", item_id), 409, "item_id")  # never twice by one reviewer
    assert label(client, "ann", item_id, token).status_code == 200  # a retry: idempotent, no write
    refused(label(client, "ann", item_id, token, label="red"), 409, "label")  # another label: never
    assert item_labels(service, item_id) == [("ann", "first")]
    refused(claim(client, "bob", item_id, reviewer="ann"), 403, "reviewer")  # not under another's name
    token = claim(client, "bob", item_id).json()["lease_token"]
    assert label(client, "bob", item_id, token, label="blue").status_code == 200  # they disagree
    assert client.get(f"/v1/review/items/{item_id}", headers=auth("ann")).json()["needs_adjudication"]
    for who in ("ann", "bob"):
        response = claim(client, who, item_id)
        assert response.status_code in (403, 409), response.text
    refused(claim(client, "gus", item_id), 404)
    token = claim(client, "root", item_id).json()["lease_token"]
    assert label(client, "root", item_id, token, label="red").status_code == 200
    assert item_labels(service, item_id) == [("ann", "first"), ("bob", "second"), ("root", "adjudication")]
    stats = client.get("/v1/review/reviewers", headers=auth("root")).json()
    assert {"ann", "bob"} <= {row["reviewer"] for row in stats["reviewers"]}


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        (
            {"boxes": [{"label": "red", "class_id": BIG, "confidence": 1.0, "xyxy": [0, 0, 1, 1]}]},
            "boxes.0.class_id",
        ),
        (
            {"boxes": [{"label": "red", "class_id": 2**31, "confidence": 1.0, "xyxy": [0, 0, 1, 1]}]},
            "boxes.0.class_id",  # the gRPC Detection's class_id is int32: it could never be read back
        ),
        (
            {"boxes": [{"label": "red", "class_id": -2, "confidence": 1.0, "xyxy": [0, 0, 1, 1]}]},
            "boxes.0.class_id",
        ),
        (
            {"boxes": [{"label": "red", "class_id": 0, "confidence": "1e999", "xyxy": [0, 0, 1, 1]}]},
            "boxes.0.confidence",
        ),
        (
            {"boxes": [{"label": "red", "class_id": 0, "confidence": -1, "xyxy": [0, 0, 1, 1]}]},
            "boxes.0.confidence",
        ),
        (
            {"boxes": [{"label": "red", "class_id": 0, "confidence": 1.0, "xyxy": [0.0] * 10_000}]},
            "boxes.0.xyxy",
        ),
        ({"boxes": [{"label": "red", "class_id": 0, "confidence": 1.0, "xyxy": [0, 0, 1]}]}, "boxes.0.xyxy"),
        (
            {"boxes": [{"label": "red", "class_id": 0, "confidence": 1.0, "xyxy": [0, 0, "-1e999", 1]}]},
            "boxes.0.xyxy",
        ),
        (
            {"boxes": [{"label": "red", "class_id": 0, "confidence": 1.0, "xyxy": [0, 0, 1, 1]}] * 10_000},
            "boxes",
        ),
        ({"label": "g" * 10_000}, "label"),
        ({"label": ["green"] * 10_000}, "label"),
        ({"note": "n" * 10_000}, "note"),
        ({"verdict": "v" * 10_000}, "verdict"),
        ({"reviewer": "r" * 10_000}, "reviewer"),
        ({"lease_token": "t" * 10_000}, None),
        ({"lease_token": BIG}, "lease_token"),
    ],
)
def test_a_hostile_label_is_refused_and_stores_nothing(client, service, extra, field):
    item_id = queued(client, "acme_app", GREY, f"dl-bad-{uuid.uuid4().hex[:12]}")
    token = claim(client, "ann", item_id).json()["lease_token"]
    response = label(client, "ann", item_id, token, **extra)
    check_http(response.status_code, dict(response.headers), response.text)
    assert 400 <= response.status_code < 500, response.text[:300]
    if field is not None:
        assert response.json()["field"] == field, response.json()
    assert item_labels(service, item_id) == []


def test_a_label_at_the_edges_is_read_back_on_both_faces(world):
    service, client, servicer = world
    item_id = queued(client, "acme_app", GREY, "dl-edges")
    token = claim(client, "ann", item_id).json()["lease_token"]
    box = {"label": "red", "class_id": 2**31 - 1, "confidence": 1.0, "xyxy": [0, 0, 1e300, 1]}
    assert label(client, "ann", item_id, token, boxes=[box]).status_code == 200
    assert client.get(f"/v1/review/items/{item_id}", headers=auth("bob")).status_code == 200
    context = Context("bob")
    asyncio.run(servicer.GetReviewItem(pb.GetReviewItemRequest(item_id=item_id), context))
    check_grpc_status(context.code.name if context.code else "OK", context.details, dict(context.trailers))
    context = Context("gus")
    asyncio.run(servicer.GetReviewItem(pb.GetReviewItemRequest(item_id=item_id), context))
    assert context.code.name == "NOT_FOUND"


def test_a_raw_non_finite_number_in_a_label_is_refused(client, service):
    item_id = queued(client, "acme_app", GREY, "dl-nonfinite")
    token = claim(client, "ann", item_id).json()["lease_token"]
    for number in (b"1e999", b"-1e999", b"NaN", b"Infinity"):
        body = (
            b'{"lease_token": "' + token.encode() + b'", "verdict": "correct", "boxes": [{"label": "red",'
            b' "class_id": 0, "confidence": ' + number + b', "xyxy": [0, 0, 1, 1]}]}'
        )
        response = client.post(
            f"/v1/review/items/{item_id}/label",
            content=body,
            headers=auth("ann", **{"content-type": "application/json"}),
        )
        refused(response, 400)
    for lease_s in (b"1e999", b"NaN", b"9223372036854775808", b"-1", b"0"):
        response = client.post(
            "/v1/review/claim",
            content=b'{"item_id": "' + item_id.encode() + b'", "lease_s": ' + lease_s + b"}",
            headers=auth("bob", **{"content-type": "application/json"}),
        )
        refused(response, 400)
    assert item_labels(service, item_id) == []
    assert client.get(f"/v1/review/items/{item_id}", headers=auth("ann")).status_code == 200


# -- Label Studio import and the export formats (operator tools, over the queue) -----------------


def studio_task(item, **annotation) -> dict:
    from policies.review.label_studio import item_version

    result = [{"type": "choices", "from_name": "label", "value": {"choices": ["green"]}}]
    return {
        "id": 1,
        "data": {"visionroute_item_id": item.id, "visionroute_item_version": item_version(item)},
        "annotations": [
            {"id": 7, "completed_by": {"id": 3, "email": "lee@acme"}, "result": result, **annotation}
        ],
    }


def import_outcomes(service, document, tenant=None, reviewers=None):
    from policies.review.label_import import LabelImport
    from policies.review.label_studio import parse_export

    return LabelImport(service.review.queue.database).apply(parse_export(document, reviewers), tenant=tenant)


@pytest.mark.parametrize(
    "change",
    [
        {"annotations": 5},
        {"annotations": "abc"},
        {"result": 5},
        {"result": [{"type": "rectanglelabels", "value": [1]}]},
        {"result": [{"type": "choices", "value": "green"}]},
        {"result": [{"type": "choices", "value": {"choices": 5}}]},
        {
            "result": [
                {
                    "type": "rectanglelabels",
                    "value": {"rectanglelabels": ["red"], "x": 10**400, "y": 0, "width": 1, "height": 1},
                    "original_width": 32,
                    "original_height": 32,
                }
            ]
        },
        {
            "result": [
                {
                    "type": "rectanglelabels",
                    "value": {"rectanglelabels": ["red"], "x": 1e308, "y": 0, "width": 1e308, "height": 1},
                    "original_width": 1e308,
                    "original_height": 32,
                }
            ]
        },
        {"completed_by": {"id": [1], "email": ["x"]}},
        {"completed_by": {"id": None, "email": {"a": 1}}},
        {"completed_by": "u" * 10_000},
        {"completed_by": True},
        {"completed_by": {"id": 2**63, "email": "e" * 10_000}},
        {"data": {"visionroute_item_id": ["x"] * 10_000, "visionroute_item_version": 1}},
        {"data": {"visionroute_item_id": {"a": 1}, "visionroute_item_version": {"b": 2}}},
        {"data": "x"},
    ],
)
def test_a_hostile_label_studio_task_is_refused_by_itself(client, service, change):
    item_id = queued(client, "acme_app", GREY, f"ls-{uuid.uuid4().hex[:12]}")
    item = service.review.queue.get(item_id)
    task = studio_task(item)
    annotation_keys = {"result", "completed_by", "annotations"}
    if set(change) <= annotation_keys - {"annotations"}:
        task["annotations"][0].update(change)
    else:
        task.update(change)
    for reviewers in (None, {"lee@acme": "lee"}):
        good_id = queued(client, "acme_app", GREY, f"ls-ok-{item_id[:8]}-{reviewers is None}")
        good = studio_task(service.review.queue.get(good_id))
        outcomes = import_outcomes(service, [task, good], reviewers=reviewers)
        assert outcomes[0].status in ("refused", "skipped") and outcomes[0].field, outcomes[0]
        assert outcomes[1].status in ("imported", "unchanged"), outcomes[1]
    assert service.review.queue.get(item_id).status == "pending"


def test_label_studio_import_for_one_tenant_never_labels_anothers_item(client, service):
    globex_item = service.review.queue.get(queued(client, "globex_app", DARK_GREY, "ls-globex"))
    (outcome,) = import_outcomes(service, [studio_task(globex_item)], tenant="acme")
    assert (outcome.status, outcome.field) == ("refused", "data.visionroute_item_id")
    assert service.review.queue.get(globex_item.id).status == "pending"


def test_the_cli_refuses_a_hostile_label_studio_file_with_the_field(tmp_path, service, capsys):
    from visionroute.cli import main as cli

    path = service.config.review.path
    for name, text in (
        ("deep.json", deep(10_000)),
        ("bigint.json", "[" + "9" * 5000 + "]"),
        ("nan.json", '[{"data": NaN}]'),
        ("bytes.json", "\udcff"),
    ):
        file = tmp_path / name
        file.write_bytes(text.encode("utf-8", "surrogateescape"))
        assert cli(["review", "import-label-studio", str(file), "--path", str(path)]) == 2, name
        err = capsys.readouterr().err
        assert "file" in err and "Traceback" not in err, (name, err[-500:])


def test_an_export_for_one_tenant_carries_none_of_anothers_items(client, service, tmp_path):
    from policies.review.export import Export

    globex_ids = {queued(client, "globex_app", DARK_GREY, f"ex-globex-{n}") for n in range(2)}
    for item_id in globex_ids:  # labelled, so every format would carry them
        token = claim(client, "gus", item_id).json()["lease_token"]
        assert label(client, "gus", item_id, token).status_code == 200
    queue = service.review.queue
    export = Export(queue.database, queue.blobs)
    for format_name in ("label-studio", "coco", "csv", "jsonl", "calibration"):
        out = tmp_path / format_name
        export.export(out, format_name, tenant="acme", status=None)
        written = "".join(
            p.read_text()
            for p in out.rglob("*")
            if p.is_file() and p.suffix in (".json", ".jsonl", ".csv", ".xml")
        )
        names = {p.stem for p in (out / "images").glob("*")} if (out / "images").exists() else set()
        assert not any(item_id in written or item_id in names for item_id in globex_ids), format_name
        assert "globex" not in written, format_name
        if format_name == "csv":
            rows = list(csv.DictReader(io.StringIO((out / "labels.csv").read_text())))
            assert {row["tenant"] for row in rows} <= {"acme"}
    from visionroute.errors import InputError

    for bad in ({"format_name": "xml"}, {"format_name": "label-studio", "status": "s" * 10_000}):
        with pytest.raises(InputError) as error:
            export.export(tmp_path / "bad", **{"status": "pending", **bad})
        assert error.value.field in ("format", "status")


# -- more of the same over gRPC, and races ---------------------------------------------------------


def grpc_call(servicer, method: str, who: str, request):
    context = Context(who)
    reply = asyncio.run(getattr(servicer, method)(request, context))
    code = context.code.name if context.code else "OK"
    check_grpc_status(code, context.details, dict(context.trailers))
    return code, (json.loads(context.details) if context.details else None), reply


def test_grpc_review_calls_keep_tenants_apart_and_refuse_hostile_labels(world):
    service, client, servicer = world
    item_id = queued(client, "acme_app", GREY, "grpc-dl")
    code, _, _ = grpc_call(servicer, "ClaimReviewItem", "gus", pb.ClaimReviewItemRequest(item_id=item_id))
    assert code == "NOT_FOUND"
    for lease_s in (float("nan"), float("inf"), -1.0, 1e300):
        request = pb.ClaimReviewItemRequest(item_id=item_id, lease_s=lease_s)
        code, details, _ = grpc_call(servicer, "ClaimReviewItem", "ann", request)
        assert (code, details["field"]) == ("INVALID_ARGUMENT", "lease_s"), lease_s
    code, _, reply = grpc_call(servicer, "ClaimReviewItem", "ann", pb.ClaimReviewItemRequest(item_id=item_id))
    token = reply.lease_token
    bad_box = {"label": "red", "class_id": 2**31, "confidence": 1.0, "xyxy": [0, 0, 1, 1]}
    for who, label_json, expected in (
        ("gus", {"lease_token": token, "verdict": "confirm"}, ("NOT_FOUND", "item_id")),
        ("ann", {"lease_token": token, "verdict": "correct", "boxes": [bad_box]}, ("INVALID_ARGUMENT", None)),
        (
            "ann",
            {"lease_token": token, "verdict": "correct", "label": "x" * 10_000},
            ("INVALID_ARGUMENT", None),
        ),
    ):
        request = pb.LabelReviewItemRequest(item_id=item_id, label_json=json.dumps(label_json))
        code, details, _ = grpc_call(servicer, "LabelReviewItem", who, request)
        assert code == expected[0] and (expected[1] is None or details["field"] == expected[1]), details
    request = pb.LabelReviewItemRequest(item_id=item_id, label_json='{"verdict": "confirm", "x": 1e999}')
    assert grpc_call(servicer, "LabelReviewItem", "ann", request)[0] == "INVALID_ARGUMENT"
    request = pb.LabelReviewItemRequest(item_id=item_id, label_json=deep(10_000))
    assert grpc_call(servicer, "LabelReviewItem", "ann", request)[1]["field"] == "label_json"
    assert item_labels(service, item_id) == []


def test_the_same_batch_sent_twice_at_once_makes_each_item_once(service):
    from router.auth.keys import Authenticator
    from router.services.batch import BatchImage

    caller = Authenticator(SECURITY).authenticate(KEYS["acme_app"][2], None, client="127.0.0.1")
    before = item_count(service)
    images = [BatchImage(GREY), BatchImage(DARK_GREY), BatchImage(b"junk")]

    async def twice():
        return await asyncio.gather(
            *(service.batch.analyze_batch(images, "race-1", caller) for _ in range(2))
        )

    first, second = asyncio.run(twice())
    ids = [item.analysis.review_item_id for item in first.items if item.analysis is not None]
    assert len(ids) == 2 and ids == [
        i.analysis.review_item_id for i in second.items if i.analysis is not None
    ]
    assert first.items[2].error.field == "images[2]" and item_count(service) == before + 2


def test_oversized_and_overfull_requests_are_refused_whole(client, service):
    before = len(jobs(service))
    response = client.post(
        "/v1/admin/recalibrations",
        content=b'{"task": "colour"}',
        headers=auth("root", **{"content-type": "application/json", "content-length": str(2**63)}),
    )
    check_http(response.status_code, dict(response.headers), response.text)
    assert 400 <= response.status_code < 500 and len(jobs(service)) == before
    many_fields = {f"f{n}": "x" for n in range(2000)}
    response = client.post(
        "/v1/analyze/batch",
        files=[("image", ("a.png", RED, "image/png"))],
        data=many_fields,
        headers=auth("acme_app"),
    )
    refused(response, 400, "body")
    response = client.post(
        "/v1/analyze/batch",
        files=[("image", ("a.png", RED, "image/png"))],
        data={"tenant": "t" * 10_000},
        headers=auth("acme_app"),
    )
    refused(response, 400, "tenant")
