"""Typed results (router/services/results.py) and both faces over them, without Ray.

The core returns dataclasses and pydantic models; HTTP sends ``to_json()`` (the body it always
sent), gRPC fills its typed messages and, for one release, the deprecated JSON fields with that
same body. Both faces take the same search fields (``tenant``, ``params``) and refuse them alike.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import pytest
from fastapi.testclient import TestClient

from policies.review.items import ReviewItem
from router.grpc import messages
from router.grpc.ingress import GrpcEndpoints, pb
from router.http.api import app
from router.http.deps import attach
from router.serve_context import make_authenticator
from router.services.results import ErasureSummary, ReviewItemView
from tests.router.test_tenancy_and_identity import (  # noqa: F401  (service: a fixture)
    DARK_GREY,
    GREY,
    KEYS,
    RED,
    SECURITY,
    analyze,
    service,
)

VOLATILE = {"age_s", "took_ms"}  # the faces answer at different moments


class Context:
    """What the servicer needs of grpc's context, recording the status it sets."""

    def __init__(self, who: str) -> None:
        self.metadata = [("x-api-key", KEYS[who][3])]
        self.code = None
        self.details = ""

    def request_id(self):
        return "typed-1"

    def invocation_metadata(self):
        return self.metadata

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details

    def set_trailing_metadata(self, trailers):
        pass


@pytest.fixture
def faces(service):  # noqa: F811  (the fixture imported above)
    attach(service, SECURITY)
    endpoints = GrpcEndpoints()
    endpoints.service, endpoints.authenticator = service, make_authenticator(SECURITY)

    def rpc(method: str, request, who: str = "root"):
        context = Context(who)
        reply = asyncio.run(getattr(endpoints, method)(request, context))
        if context.code is not None:
            return context.code.name, json.loads(context.details)
        return "OK", reply

    with TestClient(app) as client:

        def http(method: str, path: str, who: str = "root", **kwargs):
            response = client.request(method, path, headers={"x-api-key": KEYS[who][3]}, **kwargs)
            return response.status_code, response.json()

        yield service, http, rpc


def same(a, b) -> bool:
    """Equal JSON bodies, the values that change between two calls aside."""

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in VOLATILE}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(a) == strip(b)


# -- the result types ---------------------------------------------------------------------------


def test_a_review_item_view_is_the_public_dict_key_for_key():
    fields = {f.name: None for f in dataclasses.fields(ReviewItem)}
    item = ReviewItem(
        **{
            **fields,
            "id": "i",
            "request_id": "r",
            "tenant": "t",
            "task": "colour",
            "image_sha256": "0" * 64,
            "created_at": 1.0,
            "priority": 0.5,
            "reason": "why",
            "proposed": [{"label": "red", "class_id": 0, "confidence": 0.9, "xyxy": [0, 0, 1, 1]}],
            "trace": {"request_id": "r", "decision": "review", "cost_units": 1.0, "steps": []},
            "status": "pending",
            "lease_token": "secret",
            "kind": "review",
            "original_kept": False,
        }
    )
    view = ReviewItemView.from_item(item, now=5.0)
    assert json.dumps(view.to_json()) == json.dumps(item.public_dict(now=5.0))  # same keys, same order
    assert "lease_token" not in view.to_json() and not hasattr(view, "lease_token")


def test_an_erasure_summary_keeps_the_keys_and_order_of_its_json():
    common = dict(
        tenant="acme",
        review_items_erased=1,
        images_deleted=1,
        other_items_lost_image=0,
        search_entries_erased=None,
        search_log_vectors_zeroed=None,
        ledger_request_ids_cleared=2,
        review_item_ids=["a"],
    )
    by_item = ErasureSummary(erasure_id="erasure:1", selector="item", item_id="a", **common)
    assert list(by_item.to_json()) == [
        "erasure_id",
        "selector",
        "item_id",
        "tenant",
        "review_items_erased",
        "images_deleted",
        "other_items_lost_image",
        "search_entries_erased",
        "search_log_vectors_zeroed",
        "ledger_request_ids_cleared",
        "review_item_ids",
    ]
    subject = ErasureSummary(
        erasure_id="erasure:2", selector="subject", kind="image", subject_sha256="f" * 64, **common
    )
    event = subject.event_json("GDPR")
    assert list(event)[:4] == ["selector", "kind", "subject_sha256", "tenant"] and event["reason"] == "GDPR"
    assert "erasure_id" not in event and "review_item_ids" not in event


def test_json_values_become_protobuf_values_without_failing():
    struct = messages.struct({"n": 2**80, "huge": 10**400, "nested": {"list": [1, "a", None, True]}})
    assert struct["n"] == float(2**80) and struct["huge"] == str(10**400)
    assert list(struct["nested"]["list"]) == [1.0, "a", None, True]


# -- both faces ---------------------------------------------------------------------------------


def test_both_faces_take_tenant_and_params_and_refuse_them_alike(faces):
    core, http, rpc = faces
    analyze(core, RED, "acme_app", "a1")
    analyze(core, DARK_GREY, "globex_app", "g1")

    # an admin narrows to one tenant, with per-request params: the same hits on both faces
    status, body = http(
        "POST", "/v1/search", json={"text": "x", "tenant": "globex", "params": {"exact": True}}
    )
    code, reply = rpc(
        "Search",
        pb.SearchRequest(query_text="x", tenant="globex", params=pb.SearchParams(exact=True)),
    )
    assert status == 200 and code == "OK"
    assert {hit["metadata"]["tenant"] for hit in body["hits"]} == {"globex"} and body["exact"] is True
    assert [h.id for h in reply.hits] == [h["id"] for h in body["hits"]] and reply.exact
    assert same(json.loads(reply.result_json), body)

    refusals = [  # (HTTP body, gRPC request, who, HTTP status, gRPC code, field)
        ({"tenant": "has spaces"}, {"tenant": "has spaces"}, "root", 400, "INVALID_ARGUMENT", "tenant"),
        ({"tenant": "globex"}, {"tenant": "globex"}, "acme_app", 403, "PERMISSION_DENIED", "tenant"),
        (
            {"params": {"ef_search": 0}},
            {"params": pb.SearchParams(ef_search=0)},
            "root",
            400,
            "INVALID_ARGUMENT",
            "params.ef_search",
        ),
        (
            {"params": {"refine_k_factor": 0.5}},
            {"params": pb.SearchParams(refine_k_factor=0.5)},
            "acme_app",
            400,
            "INVALID_ARGUMENT",
            "params.refine_k_factor",
        ),
    ]
    for body, fields, who, http_status, grpc_code, field in refusals:
        status, error = http("POST", "/v1/search", who, json={"text": "x", **body})
        code, details = rpc("Search", pb.SearchRequest(query_text="x", **fields), who)
        assert (status, error["field"]) == (http_status, field), error
        assert (code, details["field"]) == (grpc_code, field), details
        assert error["reason"] == details["reason"] and error["error"] == details["error"]

    # a tenant's key may name its own tenant: the same as naming none
    status, own = http("POST", "/v1/search", "acme_app", json={"text": "x", "tenant": "acme"})
    assert status == 200 and {hit["metadata"]["tenant"] for hit in own["hits"]} == {"acme"}


def test_grpc_replies_carry_typed_fields_beside_the_deprecated_json(faces):
    core, http, rpc = faces
    item_id = analyze(core, GREY, "acme_app", "r1").review_item_id
    assert item_id

    code, listed = rpc("ListReviewItems", pb.ListReviewItemsRequest(), "ann")
    status, body = http("GET", "/v1/review/items", "ann")
    assert code == "OK" and status == 200
    assert [i.id for i in listed.items] == [i["id"] for i in body["items"]] == [item_id]
    assert same([json.loads(i.item_json) for i in listed.items], body["items"])
    assert listed.stats.depth == json.loads(listed.stats_json)["depth"] == body["depth"] == 1

    code, item = rpc("GetReviewItem", pb.GetReviewItemRequest(item_id=item_id), "ann")
    as_json = json.loads(item.item_json)
    assert same(as_json, http("GET", f"/v1/review/items/{item_id}", "ann")[1])
    assert (item.tenant, item.status, item.kind, item.image_available) == ("acme", "pending", "review", True)
    assert item.trace.request_id == "r1" and item.trace.decision == "review"
    assert [s.stage for s in item.trace.steps] == [s["stage"] for s in as_json["trace"]["steps"]]
    assert [d.label for d in item.proposed] == [d["label"] for d in as_json["proposed"]]
    assert not item.HasField("label") and not item.HasField("lease_owner")
    # every field of the HTTP item is typed too (issue 23's provenance and double-label fields)
    assert set(as_json) <= set(pb.ReviewItem.DESCRIPTOR.fields_by_name)
    typed = {
        name: getattr(item, name) if item.HasField(name) else None
        for name in ("audit_source", "inclusion_probability")
    }
    assert typed == {name: as_json[name] for name in typed} and as_json["inclusion_probability"] == 1.0
    assert (item.labels_wanted, item.needs_adjudication) == (as_json["labels_wanted"], False)

    code, claim = rpc("ClaimReviewItem", pb.ClaimReviewItemRequest(item_id=item_id), "ann")
    assert code == "OK" and claim.item.lease_owner == "ann" and claim.lease_token
    # the typed label (no JSON): validated as HTTP's body is; both at once is refused
    code, details = rpc(
        "LabelReviewItem",
        pb.LabelReviewItemRequest(item_id=item_id, lease_token=claim.lease_token, verdict="correct"),
        "ann",
    )
    assert code == "INVALID_ARGUMENT" and details["field"] == "label"
    code, details = rpc(
        "LabelReviewItem",
        pb.LabelReviewItemRequest(item_id=item_id, label_json="{}", verdict="reject"),
        "ann",
    )
    assert code == "INVALID_ARGUMENT" and "not both" in details["reason"]
    code, done = rpc(
        "LabelReviewItem",
        pb.LabelReviewItemRequest(
            item_id=item_id, lease_token=claim.lease_token, verdict="correct", label="green", note="n"
        ),
        "ann",
    )
    assert code == "OK" and done.status == "labelled" and done.labelled_by == "ann"
    assert (done.label.verdict, done.label.label, done.label.note) == ("correct", "green", "n")
    assert not done.label.HasField("boxes") and json.loads(done.item_json)["label"]["label"] == "green"

    code, audit = rpc("GetReviewAudit", pb.GetReviewItemRequest(item_id=item_id), "ann")
    assert json.loads(audit.json) == http("GET", f"/v1/review/items/{item_id}/audit", "ann")[1]
    assert [e.action for e in audit.events] == ["enqueue", "claim", "label"]
    assert audit.events[-1].new_value.struct_value["label"] == "green"

    code, labels = rpc("GetReviewLabels", pb.GetReviewLabelsRequest(task="colour"), "ann")
    assert json.loads(labels.json) == http("GET", "/v1/review/labels/colour", "ann")[1]
    assert labels.task == "colour" and (list(labels.labels) or None) == json.loads(labels.json)["labels"]
    assert labels.any_label == (json.loads(labels.json)["labels"] is None)

    code, stats = rpc("GetReviewStats", pb.Empty(), "ann")
    assert same(json.loads(stats.json), http("GET", "/v1/review/stats", "ann")[1])
    assert stats.stats.depth == 0 and stats.audit["colour"].task == "colour" and stats.sla_s > 0

    # the search index: typed metadata in, typed items out
    code, indexed = rpc(
        "IndexSearchItem",
        pb.IndexSearchItemRequest(image=RED, metadata=pb.ItemMetadata(tags=["dock"], source="upload")),
        "acme_app",
    )
    assert code == "OK" and json.loads(indexed.json) == {"id": indexed.id}
    code, found = rpc("GetSearchItem", pb.SearchItemRequest(item_id=indexed.id), "acme_app")
    assert json.loads(found.json) == http("GET", f"/v1/search/items/{indexed.id}", "acme_app")[1]
    assert (found.metadata.tenant, list(found.metadata.tags), found.metadata.source) == (
        "acme",
        ["dock"],
        "upload",
    )
    code, details = rpc(
        "IndexSearchItem",
        pb.IndexSearchItemRequest(image=RED, metadata_json="{}", metadata=pb.ItemMetadata(tags=["x"])),
    )
    assert code == "INVALID_ARGUMENT" and details["field"] == "metadata"
    code, hits = rpc(
        "Search",
        pb.SearchRequest(image=RED, k=5, filters=pb.SearchFilters(tags_any=["dock"], source=["upload"])),
        "acme_app",
    )
    assert code == "OK" and [h.id for h in hits.hits] == [indexed.id] and not hits.HasField("query")
    code, details = rpc(
        "Search",
        pb.SearchRequest(query_text="x", filters_json="{}", filters=pb.SearchFilters(tags_any=["a"])),
    )
    assert code == "INVALID_ARGUMENT" and details["field"] == "filters"

    code, mine = rpc("GetSearchStats", pb.Empty(), "acme_app")
    assert json.loads(mine.json) == http("GET", "/v1/search/stats", "acme_app")[1]
    assert (mine.tenant, mine.items, mine.dim, mine.space) == ("acme", 2, 4, "test-mean-colour")
    code, everything = rpc("GetSearchStats", pb.Empty())
    assert everything.items == json.loads(everything.json)["items"] and not everything.HasField("tenant")
    assert everything.report["kind"] == json.loads(everything.json)["kind"]

    code, gone = rpc("DeleteSearchItem", pb.SearchItemRequest(item_id=indexed.id), "acme_app")
    assert (gone.id, gone.deleted) == (indexed.id, True) and json.loads(gone.json) == {
        "id": indexed.id,
        "deleted": True,
    }

    code, policy = rpc("GetPolicy", pb.Empty())
    as_json = json.loads(policy.json)
    assert same(as_json, http("GET", "/v1/policy")[1]) and policy.version == as_json["version"]
    assert policy.policy["version"] == policy.version and policy.replica_pid == as_json["replica_pid"]


def test_the_typed_analyze_trace_is_the_json_trace(faces):
    core, http, rpc = faces
    code, reply = rpc("Analyze", pb.AnalyzeRequest(image=GREY, tenant="acme"), "acme_app")
    assert code == "OK"
    trace = json.loads(reply.trace_json)
    assert reply.trace.request_id == trace["request_id"] and reply.trace.decision == trace["decision"]
    for typed, step in zip(reply.trace.steps, trace["steps"], strict=True):
        assert typed.stage == step["stage"] and typed.reason == step["reason"]
        assert (typed.decision if typed.HasField("decision") else None) == step["decision"]
        assert (typed.score if typed.HasField("score") else None) == step["score"]
        assert dict(typed.threshold) == (step["threshold"] or {})
        assert typed.at_unix == step["at_unix"] and typed.at_unix <= time.time()
