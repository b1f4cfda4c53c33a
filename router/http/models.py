"""HTTP routes for model cards; the cards are built by router/services/model_cards.py.

GET /v1/models                      the cards this deployment has (name, kind, task)
GET /v1/models/{name}/card          one card: JSON, or Markdown with ?format=md or
                                    ``Accept: text/markdown``
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from router.http.deps import service_of
from visionroute.errors import InputError, NotFound
from visionroute.redaction import shown

router = APIRouter(prefix="/v1/models", tags=["models"])
FORMATS = ("json", "md")
MARKDOWN = "text/markdown"


def _cards(request: Request):
    """The service's ``models`` (a ``ModelCards``): the app's own ``state.service`` where it has
    one (an app built around a service object), else the service this process serves."""
    service = getattr(request.app.state, "service", None)
    if service is None:
        service = service_of(request)
    cards = getattr(service, "models", None)
    if cards is None:
        raise NotFound("this service was built without model cards", field="path")
    return cards


def _wants_markdown(requested: str | None, accept: str) -> bool:
    """``format`` decides when given; else an Accept header that lists text/markdown (q > 0)."""
    if requested is not None:
        if requested not in FORMATS:
            raise InputError(f"format {shown(requested)} is not one of {list(FORMATS)}", field="format")
        return requested == "md"
    for media_range in accept.split(","):
        media_type, *params = (part.strip() for part in media_range.split(";"))
        if media_type.lower() == MARKDOWN and not any(p.replace(" ", "") in ("q=0", "q=0.0") for p in params):
            return True
    return False


@router.get("", summary="The model cards of this deployment")
def list_models(request: Request) -> dict[str, Any]:
    return {"models": [entry.to_json() for entry in _cards(request).list()]}


@router.get(
    "/{name}/card",
    summary="One model card (JSON; Markdown with ?format=md or Accept: text/markdown)",
    responses={200: {"content": {MARKDOWN: {}}}},
)
def model_card(
    request: Request,
    name: str,
    format: str | None = Query(None, description="json (default) or md"),  # noqa: A002 (the API's name)
) -> Response:
    markdown = _wants_markdown(format, request.headers.get("accept", ""))
    card = _cards(request).card(name)
    if markdown:
        return Response(card.to_markdown(), media_type=f"{MARKDOWN}; charset=utf-8")
    return Response(card.model_dump_json(by_alias=True), media_type="application/json")
