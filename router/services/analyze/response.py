"""The answer both faces return for an ``Analysis`` (router/schemas.py AnalyzeResponse documents it)."""

from __future__ import annotations

from typing import Any

from visionroute.records import Analysis


def _image_size(analysis: Analysis) -> dict[str, int]:
    """The file's own size (a large image may have been decoded smaller: cascades/decode_budget.py)."""
    width, height = analysis.metadata.get("image_size", (analysis.width, analysis.height))
    return {"width": width, "height": height}


def response_body(analysis: Analysis) -> dict[str, Any]:
    """The answer both faces return (router/schemas.py AnalyzeResponse documents it)."""
    trace = analysis.trace.to_dict()
    return {
        "request_id": analysis.trace.request_id,
        "task": analysis.task,
        "decision": trace["decision"],
        "answer": analysis.detections.to_dicts() if analysis.detections is not None else [],
        "text": analysis.answer_text,
        "image": {"sha256": analysis.image_sha256, **_image_size(analysis)},
        "review_item_id": analysis.review_item_id,
        "cost_units": trace["cost_units"],
        "trace": trace,
        "policy_version": analysis.policy_version,
        "degraded": analysis.degraded,
    }
