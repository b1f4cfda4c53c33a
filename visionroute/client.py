"""The one client for calling a running VisionRoute service over HTTP.

Every command that talks to the service (``index``, ``retrieval search|stats``, ``drift report``,
``rollout ...``) goes through ``ServiceClient``: one place that sends the API key, maps a
refused request to a ``ConfigError`` naming the service's field and reason, and tells the
user how to pass a key on a 401/403. ``add_service_arguments`` gives a command the shared
``--url`` and ``--api-key`` flags (defaults ``$VISIONROUTE_URL`` or http://127.0.0.1:8000, and
``$VISIONROUTE_API_KEY``). httpx is imported on first use, so ``--help`` stays light.
"""

from __future__ import annotations

import os
from typing import Any

from visionroute.errors import ConfigError

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV, KEY_ENV = "VISIONROUTE_URL", "VISIONROUTE_API_KEY"


class ServiceClient:
    """The running service's HTTP API: ``call(method, path, **httpx_kwargs) -> dict``."""

    def __init__(
        self, url: str, api_key: str | None, timeout_s: float = 120.0, *, client: Any = None
    ) -> None:
        """``client``: an ``httpx.Client`` to send through instead (e.g. FastAPI's TestClient)."""
        self.url = url.rstrip("/")
        if client is None:
            import httpx

            headers = {"x-api-key": api_key} if api_key else {}
            client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s, trust_env=False)
        self.client = client

    def call(self, method: str, path: str, **kwargs: Any) -> dict:
        import httpx

        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ConfigError(f"{self.url}{path}: {type(exc).__name__}: {exc}", field="url") from None
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = {"error": f"HTTP {response.status_code}", "reason": response.text[:200]}
            hint = ""
            if response.status_code in (401, 403):
                hint = f" (give a key with --api-key or {KEY_ENV})"
            raise ConfigError(
                f"{self.url}{path} answered {response.status_code} {body.get('error')}: "
                f"{body.get('reason')}{hint}",
                field=body.get("field") or "url",
            )
        return response.json()


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
