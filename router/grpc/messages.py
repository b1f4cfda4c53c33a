"""Typed results of the service core to the messages of router/proto/visionroute.proto, and
typed request messages to what the core takes.

Every reply fills its typed fields and, for one release, the deprecated JSON field that held
the HTTP body before (``item_json``, ``result_json``, ``json``, ...), from the same result's
``to_json()``, so the JSON is what HTTP sends. Free-form JSON values (a trace step's details,
metadata's ``extra``, the policy set) become ``google.protobuf.Struct`` / ``Value``: numbers are
doubles there (an integer beyond 2^53 loses precision; one beyond a double's range is sent as
its decimal text), so the deprecated JSON keeps the exact values while it lasts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pydantic_core
from google.protobuf import struct_pb2

from router.grpc.build import ensure_generated
from router.services.results import (
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
from visionroute.errors import InputError

ensure_generated()
from router.grpc.proto import visionroute_pb2 as pb  # noqa: E402  (generated just above)

# -- JSON values ----------------------------------------------------------------------------------


def value(data: Any) -> struct_pb2.Value:
    """A JSON value (as ``json.dumps`` takes it) as a ``google.protobuf.Value``."""
    out = struct_pb2.Value()
    if data is None:
        out.null_value = struct_pb2.NULL_VALUE
    elif isinstance(data, bool):
        out.bool_value = data
    elif isinstance(data, int | float):
        try:
            out.number_value = float(data)
        except OverflowError:  # an integer beyond a double: its digits, not a wrong number
            out.string_value = str(data)
    elif isinstance(data, str):
        out.string_value = data
    elif isinstance(data, Mapping):
        out.struct_value.CopyFrom(struct(data))
    elif isinstance(data, list | tuple):
        out.list_value.values.extend(value(v) for v in data)
    else:  # what json.dumps(default=str) would send
        out.string_value = str(data)
    return out


def struct(data: Mapping[str, Any] | None) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    for key, item in (data or {}).items():
        out.fields[str(key)].CopyFrom(value(item))
    return out


def json_text(data: Any) -> str:
    """A deprecated ``*_json`` field: the HTTP body, as JSON text, encoded as HTTP's answers are
    (pydantic's Rust encoder, a quarter of ``json.dumps``' CPU; NaN and infinities as null)."""
    return pydantic_core.to_json(data, inf_nan_mode="null").decode()


def _optional(**fields: Any) -> dict[str, Any]:
    """Keyword arguments for a message, without the unset (None) optional fields."""
    return {name: v for name, v in fields.items() if v is not None}


# -- analyze and traces -------------------------------------------------------------------------


def detection(d: Mapping[str, Any]) -> pb.Detection:
    return pb.Detection(
        label=d.get("label") or "",
        class_id=int(d.get("class_id") or 0),
        confidence=float(d.get("confidence") or 0.0),
        xyxy=[float(v) for v in d.get("xyxy") or ()],
    )


def trace(data: Mapping[str, Any] | None) -> pb.Trace:
    """A trace as ``Trace.to_dict`` gives it (a stored one may lack fields)."""
    data = data or {}
    return pb.Trace(
        request_id=data.get("request_id") or "",
        cost_units=float(data.get("cost_units") or 0.0),
        steps=[trace_step(step) for step in data.get("steps") or ()],
        **_optional(decision=data.get("decision")),
    )


def trace_step(step: Mapping[str, Any]) -> pb.TraceStep:
    threshold = {
        str(name): float(v) for name, v in (step.get("threshold") or {}).items() if isinstance(v, int | float)
    }
    return pb.TraceStep(
        stage=step.get("stage") or "",
        reason=step.get("reason") or "",
        threshold=threshold,
        cost_units=float(step.get("cost_units") or 0.0),
        latency_ms=float(step.get("latency_ms") or 0.0),
        details=struct(step.get("details")),
        at_unix=float(step.get("at_unix") or 0.0),
        **_optional(
            decision=step.get("decision"),
            model=step.get("model"),
            model_version=step.get("model_version"),
            policy_version=step.get("policy_version"),
            score=_number_or_none(step.get("score")),
            error=step.get("error"),
        ),
    )


def _number_or_none(number: Any) -> float | None:
    return float(number) if isinstance(number, int | float) and not isinstance(number, bool) else None


def analyze_response(body: Mapping[str, Any]) -> pb.AnalyzeResponse:
    """The analyze answer (router/services/analyze ``response_body``: HTTP's body)."""
    return pb.AnalyzeResponse(
        request_id=body["request_id"],
        task=body["task"],
        decision=body["decision"],
        answer=[detection(d) for d in body["answer"]],
        image=pb.ImageInfo(**body["image"]),
        review_item_id=body["review_item_id"] or "",
        cost_units=body["cost_units"],
        trace_json=json_text(body["trace"]),
        trace=trace(body["trace"]),
        policy_version=body["policy_version"] or "",
        degraded=body["degraded"],
        text=body["text"] or "",
    )


# -- review -------------------------------------------------------------------------------------


def review_label(label: Mapping[str, Any]) -> pb.ReviewLabel:
    boxes = label.get("boxes")
    return pb.ReviewLabel(
        verdict=label.get("verdict") or "",
        **_optional(
            label=label.get("label") if isinstance(label.get("label"), str) else None,
            boxes=pb.DetectionList(detections=[detection(b) for b in boxes])
            if isinstance(boxes, list)
            else None,
            note=label.get("note"),
        ),
    )


def review_item(item: ReviewItemView) -> pb.ReviewItem:
    return pb.ReviewItem(
        item_json=json_text(item.to_json()),
        id=item.id,
        request_id=item.request_id,
        tenant=item.tenant,
        task=item.task,
        image_sha256=item.image_sha256,
        created_at=item.created_at,
        priority=item.priority,
        reason=item.reason,
        proposed=[detection(d) for d in item.proposed],
        trace=trace(item.trace),
        status=item.status,
        kind=item.kind,
        original_kept=item.original_kept,
        age_s=item.age_s,
        is_leased=item.is_leased,
        is_overdue=item.is_overdue,
        image_available=item.image_available,
        labels_wanted=item.labels_wanted,
        needs_adjudication=item.needs_adjudication,
        **_optional(
            audit_source=item.audit_source,
            inclusion_probability=item.inclusion_probability,
            lease_owner=item.lease_owner,
            lease_expires_at=item.lease_expires_at,
            label=review_label(item.label) if item.label is not None else None,
            labelled_by=item.labelled_by,
            labelled_at=item.labelled_at,
            sla_due_at=item.sla_due_at,
            image_deleted_at=item.image_deleted_at,
            stored_sha256=item.stored_sha256,
            image_withheld=item.image_withheld,
        ),
    )


def queue_stats(stats: QueueStats) -> pb.QueueStats:
    return pb.QueueStats(
        depth=stats.depth, oldest_age_s=stats.oldest_age_s, overdue=stats.overdue, leased=stats.leased
    )


def review_page(page: ReviewPage) -> pb.ListReviewItemsResponse:
    return pb.ListReviewItemsResponse(
        items=[review_item(item) for item in page.items],
        stats_json=json_text(page.stats.to_json()),
        stats=queue_stats(page.stats),
    )


def claim(claimed: Claim) -> pb.ClaimReviewItemResponse:
    if claimed.item is None:
        return pb.ClaimReviewItemResponse()
    return pb.ClaimReviewItemResponse(item=review_item(claimed.item), lease_token=claimed.lease_token or "")


def _parsed(text: str | None) -> Any:
    try:
        return json.loads(text) if text is not None else None
    except ValueError:
        return text


def review_audit(log: AuditLog) -> pb.ReviewAudit:
    return pb.ReviewAudit(
        json=json_text(log.to_json()),
        item_id=log.item_id,
        events=[
            pb.AuditEvent(
                id=event.id,
                item_id=event.item_id,
                at=event.at,
                actor=event.actor,
                action=event.action,
                previous_value=value(_parsed(event.previous_json)),
                new_value=value(_parsed(event.new_json)),
            )
            for event in log.events
        ],
    )


def review_labels(labels: LabelSet) -> pb.ReviewLabels:
    return pb.ReviewLabels(
        json=json_text(labels.to_json()),
        task=labels.task,
        labels=labels.labels or [],
        any_label=labels.labels is None,
    )


def review_stats(stats: ReviewStats) -> pb.ReviewStats:
    return pb.ReviewStats(
        json=json_text(stats.to_json()),
        stats=queue_stats(stats.stats),
        sla_s=stats.sla_s,
        audit={
            task: pb.AuditEstimate(
                task=e.task,
                labelled=e.labelled,
                errors=e.errors,
                lower_bound=e.lower_bound,
                upper_bound=e.upper_bound,
                alpha=e.alpha,
                confidence=e.confidence,
                alert=e.alert,
                reason=e.reason,
                **_optional(rate=e.rate),
            )
            for task, e in stats.audit.items()
        },
    )


# -- search -------------------------------------------------------------------------------------


def item_metadata(metadata: Any) -> pb.ItemMetadata:
    """retrieval's ``ItemMetadata`` as the message."""
    return pb.ItemMetadata(
        tenant=metadata.tenant,
        tags=list(metadata.tags),
        created_at=metadata.created_at,
        extra=struct(metadata.extra),
        **_optional(
            source=metadata.source,
            image_sha256=metadata.image_sha256,
            review_item_id=metadata.review_item_id,
        ),
    )


def search_response(result: SearchResponse) -> pb.SearchResponse:
    return pb.SearchResponse(
        result_json=json_text(result.model_dump()),
        hits=[pb.SearchHit(id=h.id, score=h.score, metadata=item_metadata(h.metadata)) for h in result.hits],
        k=result.k,
        index_kind=result.index_kind,
        exact=result.exact,
        took_ms=result.took_ms,
        **_optional(query=result.query, query_id=result.query_id),
    )


def search_item(item: SearchItem) -> pb.SearchItem:
    return pb.SearchItem(json=json_text(item.to_json()), id=item.id, metadata=item_metadata(item.metadata))


def indexed(result: IndexedSearchItem) -> pb.IndexSearchItemResponse:
    return pb.IndexSearchItemResponse(json=json_text(result.to_json()), id=result.id)


def deleted(result: DeletedSearchItem) -> pb.DeleteSearchItemResponse:
    return pb.DeleteSearchItemResponse(json=json_text(result.to_json()), id=result.id, deleted=result.deleted)


def search_stats(stats: IndexStats) -> pb.SearchStats:
    return pb.SearchStats(
        json=json_text(stats.to_json()),
        items=stats.items,
        report=struct(stats.report),
        **_optional(tenant=stats.tenant, dim=stats.dim, space=stats.space),
    )


def policy_view(view: PolicyView) -> pb.PolicyView:
    return pb.PolicyView(
        json=json_text(view.to_json()),
        version=view.version,
        policy=struct(view.policy),
        budgets=[struct(b) for b in view.budgets],
        history=[struct(h) for h in view.history],
        replica_pid=view.replica_pid,
    )


# -- typed requests -------------------------------------------------------------------------------
# Each gives the dict the HTTP body would hold, so the core validates both faces' fields alike.


def _present(message: Any, names: tuple[str, ...]) -> dict[str, Any]:
    return {name: getattr(message, name) for name in names if message.HasField(name)}


def search_filters(message: pb.SearchFilters) -> dict[str, Any]:
    """The set conditions (an empty list is no condition)."""
    repeated = ("tenant", "source", "tags_any", "tags_all", "review_item_ids", "ids", "image_sha256")
    out = {name: list(getattr(message, name)) for name in repeated if len(getattr(message, name))}
    out.update(_present(message, ("created_after", "created_before", "in_review")))
    return out


def search_params(message: pb.SearchParams) -> dict[str, Any]:
    return _present(message, ("ef_search", "nprobe", "refine_k_factor", "exact"))


def metadata_fields(message: pb.ItemMetadata) -> dict[str, Any]:
    out = _present(message, ("tenant", "source", "created_at", "image_sha256", "review_item_id"))
    if len(message.tags):
        out["tags"] = list(message.tags)
    if message.HasField("extra"):
        out["extra"] = _from_struct(message.extra)
    return out


def _from_struct(message: struct_pb2.Struct) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(message)


def label_fields(message: pb.LabelReviewItemRequest) -> dict[str, Any]:
    """A LabelRequest's fields from the typed label (empty strings: not given, as proto3 sends them)."""
    out: dict[str, Any] = {
        name: getattr(message, name)
        for name in ("reviewer", "lease_token", "verdict")
        if getattr(message, name)
    }
    out.update(_present(message, ("label", "note")))
    if message.HasField("boxes"):
        out["boxes"] = [
            {"label": d.label, "class_id": d.class_id, "confidence": d.confidence, "xyxy": list(d.xyxy)}
            for d in message.boxes.detections
        ]
    return out


def one_of(json_field: str, json_value: Any, typed_field: str, typed: dict[str, Any] | None) -> Any:
    """A request's JSON field (deprecated) or its typed field, never both."""
    if json_value is not None and typed is not None:
        raise InputError(f"send {typed_field} or {json_field} (deprecated), not both", field=typed_field)
    return json_value if json_value is not None else typed
