"""HTTP route for the drift monitors; the monitors live in router/drift/service.py.

``GET /v1/drift`` needs the admin role (router/http/auth.py ROUTE_ROLES: a route not listed there is admin).
The report is this replica's: behind several ingress replicas each answers with its own windows.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from router.http.deps import service_of
from visionroute.errors import BackendUnavailable

router = APIRouter(prefix="/v1/drift", tags=["drift"])


@router.get("", summary="Drift monitors of this replica: reference, window, latest test, alarm")
async def drift_report(request: Request) -> dict[str, Any]:
    service = service_of(request)
    drift = getattr(service, "drift", None)
    if drift is None:
        raise BackendUnavailable("the drift monitors are not running on this replica", field="drift")
    review = getattr(service, "review", None)  # its live policy: each task's audit fraction in force
    return drift.report(review.policies.current.audit if review is not None else None).to_json()
