"""What the command line needs of the client: the shared ``--url`` / ``--api-key`` flags, the
client for them, and ``ServiceClient`` (the name the commands used before this package).

Every command that talks to the service (``index``, ``retrieval search|stats``, ``drift report``,
``rollout ...``) goes through ``VisionRouteClient``; a refusal reaches the user as the command
line's ``error (field): reason`` (visionroute/cli/__init__.py), with a hint on 401/403.
"""

from __future__ import annotations

import os
from typing import Any

from visionroute.client.clients import DEFAULT_URL, VisionRouteClient
from visionroute.client.errors import ServiceError

URL_ENV, KEY_ENV = "VISIONROUTE_URL", "VISIONROUTE_API_KEY"
KEY_HINT = f" (give a key with --api-key or {KEY_ENV})"


class ServiceClient(VisionRouteClient):
    """``VisionRouteClient`` with its old constructor (``client=``: an httpx.Client to send
    through, e.g. FastAPI's TestClient). A refusal's ``reason`` is the whole story the command
    line prints: the URL, operation, status and the service's reason (a key hint on 401/403)."""

    def __init__(
        self, url: str, api_key: str | None, timeout_s: float = 120.0, *, client: Any = None
    ) -> None:
        super().__init__(url, api_key, timeout_s=timeout_s, http_client=client)

    def _execute(self, call, request_id):
        try:
            return super()._execute(call, request_id)
        except ServiceError as error:
            hint = KEY_HINT if error.status in (401, 403) else ""
            error.reason = f"{self.url}: {error.args[0]}{hint}"
            raise


def service_answers(url: str) -> bool:
    """Whether anything HTTP answers at ``url`` (a starting service answers 404 or 503)."""
    import httpx

    try:
        httpx.get(url.rstrip("/") + "/healthz", timeout=2.0, trust_env=False)
        return True
    except httpx.HTTPError:
        return False


def add_service_arguments(parser: Any, *, key_help: str = "an API key", url_help: str = "") -> None:
    """``--url`` and ``--api-key`` (with the environment defaults) on ``parser``."""
    parser.add_argument(
        "--url",
        default=os.environ.get(URL_ENV, DEFAULT_URL),
        help=f"the running service{url_help} (default: ${URL_ENV} or %(default)s)",
    )
    parser.add_argument(
        "--api-key",
        "--key",
        dest="api_key",
        default=os.environ.get(KEY_ENV),
        help=f"{key_help} for --url (default: ${KEY_ENV})",
    )


def client_of(args: Any, *, timeout_s: float = 120.0) -> ServiceClient:
    """The client for a command's ``--url`` and ``--api-key``."""
    return ServiceClient(args.url, args.api_key, timeout_s=timeout_s)
