"""The gRPC transport gives the same typed results as HTTP, and the requests both faces read alike.

Each typed result goes through the service's own gRPC translation (router/grpc/messages.py) and
back through the client's (visionroute/client/grpc_replies.py, results.py): it must come back
equal to what HTTP's ``to_json()`` parses into. Each gRPC request the client builds must read,
through the ingress's own request translation, as the HTTP body of the same call.
"""

from __future__ import annotations

import dataclasses
import json

from policies.audit_sampling import AuditEstimate
from retrieval.schemas import ItemMetadata
from router.grpc import messages
from router.services.results import (
    AuditEvent,
    AuditLog,
    Claim,
    DeletedSearchItem,
    IndexedSearchItem,
    IndexStats,
    LabelSet,
    PolicyView,
    QueueStats,
    ReviewItemView,
    ReviewPage,
    ReviewStats,
    SearchItem,
    SearchResponse,
)
from visionroute.client import grpc_replies as replies
from visionroute.client import results
from visionroute.client.grpc_transport import generated
from visionroute.client.operations import Operations
from visionroute.records import Decision, Step, Trace

pb, _ = generated()
BOXES = [{"label": "espresso", "class_id": 967, "confidence": 0.9, "xyxy": [0.0, 1.0, 30.5, 40.0]}]


def a_trace(request_id: str = "r-1") -> dict:
    trace = Trace(request_id)
    trace.append(Step("input", details={"format": "PNG", "width": 600, "height": 400}, at_unix=1.5))
    trace.append(
        Step(
            "policy:thresholds",
            decision=Decision.REVIEW,
            reason="unsure",
            model="efficientnet_lite0",
            model_version="v1",
            policy_version="p1",
            score=0.28,
            threshold={"accept": 0.7, "escalate": 0.3},
            cost_units=1.0,
            latency_ms=9.1,
            at_unix=2.5,
        )
    )
    return trace.to_dict()


def an_item(**changes) -> ReviewItemView:
    fields = {
        "id": "item-1",
        "request_id": "r-1",
        "tenant": "acme",
        "task": "classify",
        "image_sha256": "a" * 64,
        "created_at": 10.0,
        "priority": 0.5,
        "reason": "unsure",
        "proposed": BOXES,
        "trace": a_trace(),
        "status": "pending",
        "lease_owner": None,
        "lease_expires_at": None,
        "label": None,
        "labelled_by": None,
        "labelled_at": None,
        "kind": "review",
        "sla_due_at": 3610.0,
        "image_deleted_at": None,
        "stored_sha256": "b" * 64,
        "image_withheld": None,
        "original_kept": False,
        "age_s": 1.25,
        "is_leased": False,
        "is_overdue": False,
        "image_available": True,
    }
    # a field added since (the gRPC message may not carry it yet): unset, as a stored item before it
    unset = {f.name: None for f in dataclasses.fields(ReviewItemView) if f.name not in fields}
    return ReviewItemView(**{**unset, **fields, **changes})


def test_an_analysis_reads_back_as_http_sends_it():
    body = {
        "request_id": "r-1",
        "task": "classify",
        "decision": "review",
        "answer": BOXES,
        "text": None,
        "image": {"sha256": "c" * 64, "width": 600, "height": 400},
        "review_item_id": "item-1",
        "cost_units": 1.0,
        "trace": a_trace(),
        "policy_version": "p1",
        "degraded": False,
    }
    assert results.analysis(replies.analysis(messages.analyze_response(body))) == results.analysis(body)
    assert replies.analysis(messages.analyze_response(body)) == body  # numbers in details: 600 == 600.0


def test_review_results_read_back_equal():
    labelled = an_item(
        status="labelled",
        lease_owner="ann",
        lease_expires_at=99.0,
        label={"verdict": "correct", "label": "space shuttle", "boxes": None, "note": "blurry"},
        labelled_by="ann",
        labelled_at=50.0,
        image_withheld="redaction failed",
        image_available=False,
    )
    for item in (
        an_item(),
        labelled,
        an_item(label={"verdict": "confirm", "label": "espresso", "boxes": BOXES}),
    ):
        assert results.review_item(replies.review_item(messages.review_item(item))) == item
    stats = QueueStats(depth=3, oldest_age_s=2.5, overdue=1, leased=1)
    page = ReviewPage(items=[an_item(), labelled], stats=stats)
    assert results.review_page(replies.review_page(messages.review_page(page))) == page
    assert results.review_page(page.to_json()) == page  # the HTTP body parses the same
    for claim in (Claim(item=an_item(), lease_token="t-1"), Claim(item=None, lease_token=None)):
        assert results.claim(replies.claim(messages.claim(claim))) == claim
        assert results.claim(claim.to_json()) == claim
    estimates = {
        "classify": AuditEstimate("classify", 10, 1, 0.1, 0.01, 0.4, 0.05, 0.95, False, "fine"),
        "text": AuditEstimate("text", 0, 0, None, 0.0, 1.0, 0.05, 0.95, False, "0 of the 30 needed"),
    }
    review_stats = ReviewStats(stats=stats, sla_s=3600.0, audit=estimates)
    assert results.review_stats(replies.review_stats(messages.review_stats(review_stats))) == review_stats
    assert results.review_stats(review_stats.to_json()) == review_stats
    log = AuditLog(
        "item-1",
        [
            AuditEvent(
                1, "item-1", 1.0, "service", "enqueue", json.dumps(None), json.dumps({"kind": "review"})
            ),
            AuditEvent(2, "item-1", 2.0, "ann", "claim", json.dumps(None), json.dumps({"lease_s": 600.5})),
        ],
    )
    assert results.audit_log(replies.review_audit(messages.review_audit(log))) == log
    for labels in (LabelSet("classify", ["espresso", "cat"]), LabelSet("text", None)):
        assert results.label_set(replies.review_labels(messages.review_labels(labels))) == labels


def test_search_results_read_back_equal():
    metadata = ItemMetadata(
        tenant="acme", tags=["a", "b"], source="upload", created_at=5.0, extra={"path": "x.png", "n": 3}
    )
    bare = ItemMetadata(tenant="acme", created_at=6.0)
    response = SearchResponse.model_validate(
        {
            "hits": [
                {"id": 4, "score": 0.9, "metadata": metadata},
                {"id": 5, "score": 0.5, "metadata": bare},
            ],
            "k": 2,
            "index_kind": "flat",
            "exact": True,
            "took_ms": 1.5,
            "query": "a cup",
        }
    )
    assert results.search_response(replies.search_response(messages.search_response(response))) == response
    item = SearchItem(id=4, metadata=metadata)
    assert results.search_item(replies.search_item(messages.search_item(item))) == item
    assert results.indexed(replies.indexed(messages.indexed(IndexedSearchItem(7)))) == IndexedSearchItem(7)
    assert results.deleted(replies.deleted(messages.deleted(DeletedSearchItem(7)))) == DeletedSearchItem(7)
    for report in (
        {"tenant": "acme", "items": 3, "dim": 384, "space": "conse"},
        {"items": 9, "kind": "flat", "shards": 1},
    ):
        stats = IndexStats.from_report(report)
        back = results.index_stats(replies.search_stats(messages.search_stats(stats)))
        assert (back.items, back.tenant, back.dim, back.space) == (
            stats.items,
            stats.tenant,
            stats.dim,
            stats.space,
        )
        assert back.report == report


def test_the_policy_view_reads_back_equal():
    view = PolicyView(
        "p1", {"version": "p1", "costs": {"onnx": 1.0}}, [{"name": "ten", "cap_units": 10.0}], [], 42
    )
    assert results.policy_view(replies.policy_view(messages.policy_view(view))) == view
    assert results.policy_view(view.to_json()) == view


class Built(Operations):
    """Each operation's ``Call`` as built, not sent."""

    def _execute(self, call, request_id):
        return call


def test_the_grpc_requests_read_as_the_http_bodies():
    calls = Built()
    filters = {"tenant": "acme", "tags_any": ["dock"], "in_review": True, "created_after": 1.0}
    search = calls.search("a dock", k=3, filters=filters, params={"exact": True})
    message = search.grpc.message(pb)
    assert message.query_text == "a dock" and message.k == 3 and search.http.json["filters"] == filters
    assert messages.search_filters(message.filters) == {**filters, "tenant": ["acme"]}  # a list of one
    assert messages.search_params(message.params) == {"exact": True}

    label = calls.label(
        "item-1", lease_token="t", verdict="correct", label="cat", boxes=BOXES, note="n", reviewer="ann"
    )
    assert messages.label_fields(label.grpc.message(pb)) == label.http.json

    metadata = {
        "tenant": "acme",
        "tags": ["a"],
        "source": "cli",
        "image_sha256": "d" * 64,
        "extra": {"path": "x.png"},
    }
    index = calls.index_item(b"bytes", metadata)
    request = index.grpc.message(pb)
    assert request.image == b"bytes" and messages.metadata_fields(request.metadata) == metadata
    assert json.loads(index.http.data["metadata"]) == metadata and not index.idempotent

    claim_next, claim_one = calls.claim("ann"), calls.claim("ann", item_id="item-1", lease_s=60.0)
    assert not claim_next.idempotent and claim_one.idempotent  # a lost answer's retry must not lease twice
    assert claim_one.grpc.message(pb).lease_s == 60.0 and claim_one.http.json == {
        "reviewer": "ann",
        "item_id": "item-1",
        "lease_s": 60.0,
    }
