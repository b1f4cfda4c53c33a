"""HTTP routes for rollouts (admin only: not listed in router/http/auth.py ROUTE_ROLES, so the
default applies); the operations live in router/services/rollouts.py."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from router.auth.principal import current_principal
from router.http.deps import service_of
from router.http.inputs import read_body_limited
from router.services.common import parsed_json
from visionroute.errors import BackendUnavailable

router = APIRouter(prefix="/v1/rollouts", tags=["rollouts"])


def _rollouts(request: Request):
    service = service_of(request)
    if service.rollouts is None:
        raise BackendUnavailable("rollouts are not available in this service", field="rollouts")
    return service.rollouts


async def _json(request: Request, *, optional: bool = False) -> Any:
    raw = await read_body_limited(request, min(service_of(request).config.limits.max_body_bytes, 1 << 20))
    if optional and not raw.strip():
        return None
    return parsed_json(raw)


async def _decide(request: Request, rollout_id: str, action: str) -> dict[str, Any]:
    body = await _json(request, optional=True)
    return (await _rollouts(request).decide(current_principal(), rollout_id, action, body)).to_json()


@router.get("", summary="Rollouts, newest first (optionally of one task)")
async def list_rollouts(request: Request, task: str | None = None) -> dict[str, Any]:
    return (await _rollouts(request).list(task)).to_json()


@router.post("", summary="Start a shadow or canary rollout of a candidate")
async def start_rollout(request: Request) -> dict[str, Any]:
    return (await _rollouts(request).start(current_principal(), await _json(request))).to_json()


@router.get("/{rollout_id}", summary="A rollout's status: arms, bounds, evidence, audit log")
async def rollout_status(request: Request, rollout_id: str) -> dict[str, Any]:
    return (await _rollouts(request).status(rollout_id)).to_json()


@router.post("/{rollout_id}/promote", summary="Promote the candidate now (audited operator override)")
async def promote(request: Request, rollout_id: str) -> dict[str, Any]:
    return await _decide(request, rollout_id, "promote")


@router.post("/{rollout_id}/rollback", summary="Roll the candidate back now")
async def rollback(request: Request, rollout_id: str) -> dict[str, Any]:
    return await _decide(request, rollout_id, "rollback")


@router.post(
    "/{rollout_id}/finish", summary="End a promoted rollout once its candidate is the deployed incumbent"
)
async def finish(request: Request, rollout_id: str) -> dict[str, Any]:
    return await _decide(request, rollout_id, "finish")
