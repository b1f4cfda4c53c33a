"""HTTP routes for recalibration from production (admin only: not in router/http/auth.py
ROUTE_ROLES); the job lives in router/services/recalibration.py."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from router.auth.principal import current_principal
from router.http.deps import service_of
from router.http.rollouts import _json, _rollouts
from router.services.recalibration import RecalibrationService
from router.services.rollouts import actor_of

router = APIRouter(prefix="/v1/admin/recalibrations", tags=["recalibration"])


def _recalibration(request: Request) -> RecalibrationService:
    _rollouts(request)  # 503 where this service has no rollouts
    return RecalibrationService.of(service_of(request))


@router.post("", summary="Recertify a task from production labels; propose the artefact as a shadow rollout")
async def start_recalibration(request: Request) -> JSONResponse:
    job = await _recalibration(request).start(actor_of(current_principal()), await _json(request))
    return JSONResponse(job, status_code=202)


@router.get("", summary="Recalibration jobs, newest first (optionally of one task)")
async def list_recalibrations(request: Request, task: str | None = None) -> dict[str, Any]:
    return await _recalibration(request).list(task)


@router.get("/{job_id}", summary="A recalibration job: running, succeeded, refused or failed, and why")
async def recalibration_status(request: Request, job_id: str) -> dict[str, Any]:
    return await _recalibration(request).status(job_id)
