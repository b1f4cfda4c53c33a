"""gRPC replies as the JSON the HTTP face sends for the same operation, from the typed fields
(router/grpc/messages.py builds them; the deprecated ``*_json`` fields are not read).

Unset optional fields become None, as HTTP sends them. Free-form values travel as
``google.protobuf.Struct`` (a trace step's details, search metadata's ``extra``, the policy set),
whose numbers are doubles: ``600`` arrives as ``600.0`` (docs/grpc.md).
"""

from __future__ import annotations

import json
from typing import Any


def _struct(message: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(message)


def _value(message: Any) -> Any:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(message)


def _optional(message: Any, *names: str) -> dict[str, Any]:
    return {name: getattr(message, name) if message.HasField(name) else None for name in names}


def detection(d: Any) -> dict[str, Any]:
    return {
        "label": d.label or None,
        "class_id": d.class_id,
        "confidence": d.confidence,
        "xyxy": list(d.xyxy),
    }


def trace(t: Any) -> dict[str, Any]:
    return {
        "request_id": t.request_id,
        "decision": t.decision if t.HasField("decision") else None,
        "cost_units": t.cost_units,
        "steps": [trace_step(s) for s in t.steps],
    }


def trace_step(s: Any) -> dict[str, Any]:
    return {
        "stage": s.stage,
        **_optional(s, "decision"),
        "reason": s.reason,
        **_optional(s, "model", "model_version", "policy_version", "score"),
        "threshold": dict(s.threshold) or None,
        "cost_units": s.cost_units,
        "latency_ms": s.latency_ms,
        **_optional(s, "error"),
        "details": _struct(s.details),
        "at_unix": s.at_unix,
    }


def analysis(r: Any) -> dict[str, Any]:
    return {
        "request_id": r.request_id,
        "task": r.task,
        "decision": r.decision,
        "answer": [detection(d) for d in r.answer],
        "text": r.text or None,
        "image": {"sha256": r.image.sha256, "width": r.image.width, "height": r.image.height},
        "review_item_id": r.review_item_id or None,
        "cost_units": r.cost_units,
        "trace": trace(r.trace),
        "policy_version": r.policy_version,
        "degraded": r.degraded,
    }


def analyze_batch(r: Any) -> dict[str, Any]:
    return {
        "request_id": r.request_id,
        "succeeded": r.succeeded,
        "failed": r.failed,
        "results": [batch_item(item) for item in r.results],
    }


def batch_item(item: Any) -> dict[str, Any]:
    """One image's result; its error as HTTP's body (``http_status`` is HTTP's ``status``)."""
    if item.WhichOneof("outcome") == "response":
        status, response, error = 200, analysis(item.response), None
    else:
        e = item.error
        status, response = e.http_status, None
        error = {
            "error": e.error,
            "field": e.field or None,
            "reason": e.reason,
            "request_id": item.request_id,
            "retry_after_s": e.retry_after_s or None,
        }
    return {
        "index": item.index,
        "request_id": item.request_id,
        "status": status,
        "response": response,
        "error": error,
    }


# -- search ---------------------------------------------------------------------------------------


def item_metadata(m: Any) -> dict[str, Any]:
    return {
        "tenant": m.tenant,
        "tags": list(m.tags),
        **_optional(m, "source"),
        "created_at": m.created_at,
        **_optional(m, "image_sha256", "review_item_id"),
        "extra": _struct(m.extra),
    }


def search_response(r: Any) -> dict[str, Any]:
    return {
        "hits": [{"id": h.id, "score": h.score, "metadata": item_metadata(h.metadata)} for h in r.hits],
        "k": r.k,
        "index_kind": r.index_kind,
        "exact": r.exact,
        "took_ms": r.took_ms,
        **_optional(r, "query", "query_id"),
    }


def search_item(r: Any) -> dict[str, Any]:
    return {"id": r.id, "metadata": item_metadata(r.metadata)}


def indexed(r: Any) -> dict[str, Any]:
    return {"id": r.id}


def deleted(r: Any) -> dict[str, Any]:
    return {"id": r.id, "deleted": r.deleted}


def search_stats(r: Any) -> dict[str, Any]:
    """The whole answer is ``report`` (an admin's: the index's operator report); the typed fields
    give its integers back as integers."""
    typed = {
        "items": r.items,
        **{k: v for k, v in _optional(r, "tenant", "dim", "space").items() if v is not None},
    }
    return {**_struct(r.report), **typed}


# -- review ---------------------------------------------------------------------------------------


def review_label(label: Any) -> dict[str, Any]:
    out = {
        "verdict": label.verdict,
        "label": label.label if label.HasField("label") else None,
        "boxes": [detection(d) for d in label.boxes.detections] if label.HasField("boxes") else None,
    }
    if label.HasField("note"):
        out["note"] = label.note
    return out


def review_item(i: Any) -> dict[str, Any]:
    return {
        "id": i.id,
        "request_id": i.request_id,
        "tenant": i.tenant,
        "task": i.task,
        "image_sha256": i.image_sha256,
        "created_at": i.created_at,
        "priority": i.priority,
        "reason": i.reason,
        "proposed": [detection(d) for d in i.proposed],
        "trace": trace(i.trace),
        "status": i.status,
        **_optional(i, "lease_owner", "lease_expires_at"),
        "label": review_label(i.label) if i.HasField("label") else None,
        **_optional(i, "labelled_by", "labelled_at"),
        "kind": i.kind,
        **_optional(i, "sla_due_at", "image_deleted_at", "stored_sha256", "image_withheld"),
        "original_kept": i.original_kept,
        "age_s": i.age_s,
        "is_leased": i.is_leased,
        "is_overdue": i.is_overdue,
        "image_available": i.image_available,
    }


def queue_stats(s: Any) -> dict[str, Any]:
    return {"depth": s.depth, "oldest_age_s": s.oldest_age_s, "overdue": s.overdue, "leased": s.leased}


def review_page(r: Any) -> dict[str, Any]:
    return {"items": [review_item(i) for i in r.items], **queue_stats(r.stats)}


def claim(r: Any) -> dict[str, Any]:
    if not r.HasField("item"):
        return {"item": None, "lease_token": None}
    return {"item": review_item(r.item), "lease_token": r.lease_token}


def _json_text(value: Any) -> str:
    """An audit event's value as HTTP's ``*_json`` text (the service stores ``json.dumps``)."""
    return json.dumps(_value(value))


def review_audit(r: Any) -> dict[str, Any]:
    return {
        "item_id": r.item_id,
        "events": [
            {
                "id": e.id,
                "item_id": e.item_id,
                "at": e.at,
                "actor": e.actor,
                "action": e.action,
                "previous_json": _json_text(e.previous_value),
                "new_json": _json_text(e.new_value),
            }
            for e in r.events
        ],
    }


def review_labels(r: Any) -> dict[str, Any]:
    return {"task": r.task, "labels": None if r.any_label else list(r.labels)}


def review_stats(r: Any) -> dict[str, Any]:
    return {
        **queue_stats(r.stats),
        "sla_s": r.sla_s,
        "audit": {
            task: {
                "task": e.task,
                "labelled": e.labelled,
                "errors": e.errors,
                "rate": e.rate if e.HasField("rate") else None,
                "lower_bound": e.lower_bound,
                "upper_bound": e.upper_bound,
                "alpha": e.alpha,
                "confidence": e.confidence,
                "alert": e.alert,
                "reason": e.reason,
            }
            for task, e in r.audit.items()
        },
    }


def review_image(r: Any) -> tuple[bytes, str]:
    return r.image, r.media_type


def policy_view(r: Any) -> dict[str, Any]:
    return {
        "version": r.version,
        "policy": _struct(r.policy),
        "budgets": [_struct(b) for b in r.budgets],
        "history": [_struct(h) for h in r.history],
        "replica_pid": r.replica_pid,
    }
