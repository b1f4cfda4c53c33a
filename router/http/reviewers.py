"""HTTP route for reviewer quality; the operation lives in router/services/review.py.

``GET /v1/review/reviewers`` needs the admin role (router/http/auth.py ROUTE_ROLES lists it as
admin ahead of the reviewers' ``/v1/review``; the service checks the role again): each
reviewer's label count, estimated error rate with its interval, and whether they are flagged
(policies/reviewer_quality.py).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from router.auth.principal import current_principal
from router.http.deps import service_of

router = APIRouter(prefix="/v1/review", tags=["review"])


@router.get("/reviewers", summary="Each reviewer's labels, estimated error rate and interval, and flag")
async def reviewers(request: Request) -> dict[str, Any]:
    return (await service_of(request).review.reviewers(current_principal())).to_json()
