"""What every HTTP route reaches: the service this process serves and its authenticator.

Ray Serve serves a frozen copy of the FastAPI app, so the routes and the key check reach the
service through this module, not through the app object. ``attach`` is called once per
process by the ingress deployment (router/ingress.py); the routes of router/http/ call
``service_of(request)`` / ``current_authenticator()``, which answer 503 while it is starting.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from router.auth.keys import Authenticator, SecurityConfig
from router.serve_context import make_authenticator
from visionroute.errors import BackendUnavailable

if TYPE_CHECKING:
    from router.services import VisionRouteService


class _Attached:
    """The service this process serves, and its key check."""

    service: VisionRouteService | None = None
    authenticator: Authenticator | None = None


def attach(service: VisionRouteService, security: SecurityConfig) -> Authenticator:
    """Serve ``service`` behind the API-key check (refuses an unsafe bind); one per process."""
    _Attached.authenticator = make_authenticator(security)
    _Attached.service = service
    return _Attached.authenticator


def current_authenticator() -> Authenticator:
    if _Attached.authenticator is None:
        raise BackendUnavailable("the service is starting", field="service")
    return _Attached.authenticator


def service_of(request: Any = None) -> VisionRouteService:
    if _Attached.service is None:
        raise BackendUnavailable("the service is starting", field="service")
    return _Attached.service
