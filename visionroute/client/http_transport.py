"""The HTTP transport (httpx): one attempt of a ``Call``, its answer as JSON or a ServiceError.

Every attempt sends the API key (``x-api-key``) and the call's request id (``X-Request-Id``; the
service answers with it and keys its review items on it). A refusal's body is the service's
error body (router/errors.py ``error_body``); Retry-After (seconds, or an HTTP date) becomes
``retry_after_s``. A body that is not ours (a proxy's 502, Ray Serve's own 503 text) still gives
the status and its first 200 characters as the reason, with ``proxy_answer`` set (retry.py
resends Ray Serve's plain-text 500 for a call that is safe to send again).
"""

from __future__ import annotations

import email.utils
import time
from typing import Any

from visionroute.client.calls import Call
from visionroute.client.errors import ServiceError, ServiceUnreachable, service_error


def headers(api_key: str | None, user_agent: str) -> dict[str, str]:
    return {"user-agent": user_agent, **({"x-api-key": api_key} if api_key else {})}


def request_kwargs(call: Call, request_id: str) -> dict[str, Any]:
    http = call.http
    if http is None:
        raise ServiceError(
            operation=call.name,
            status=None,
            error="Unsupported",
            field="transport",
            reason="this operation has no HTTP route",
        )
    return {
        "method": http.method,
        "url": http.path,
        "json": http.json,
        "files": http.files,
        "data": http.data,
        "params": http.params,
        "headers": {"x-request-id": request_id},
    }


def retry_after_s(value: str | None) -> float | None:
    """A Retry-After header's wait: delay-seconds, or an HTTP date (RFC 9110); None if neither."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def answer(call: Call, response: Any, request_id: str) -> Any:
    """The answer's JSON (or ``(bytes, media type)`` for a file); a refusal raises its ServiceError."""
    if response.status_code < 400:
        if call.http is not None and call.http.binary:
            return response.content, response.headers.get("content-type", "application/octet-stream")
        return response.json()
    proxy_answer = False
    try:
        body = response.json()
        if not isinstance(body, dict) or "error" not in body:
            raise ValueError("not the service's error body")
    except ValueError:
        text = " ".join(response.text.split())[:200]
        body = {
            "error": f"HTTP {response.status_code}",
            "field": None,
            "reason": text or response.reason_phrase,
        }
        proxy_answer = True
    raise service_error(
        operation=call.name,
        status=response.status_code,
        error=str(body.get("error")),
        field=body.get("field"),
        reason=str(body.get("reason")),
        request_id=body.get("request_id") or request_id,
        retry_after_s=retry_after_s(response.headers.get("retry-after")),
        proxy_answer=proxy_answer,
    )


def unreachable(
    call: Call, exc: Exception, url: str, timeout_s: float, request_id: str
) -> ServiceUnreachable:
    import httpx

    sent = not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
    if isinstance(exc, httpx.TimeoutException):
        field, reason = "timeout_s", f"no answer from {url} within {timeout_s:g} s ({type(exc).__name__})"
    else:
        field, reason = "url", f"{url}: {type(exc).__name__}: {exc}"
    return ServiceUnreachable(
        operation=call.name, reason=reason, field=field, sent=sent, request_id=request_id
    )


class HttpTransport:
    """Blocking HTTP; ``client``: an ``httpx.Client`` to send through instead (FastAPI's TestClient)."""

    client_class = "Client"  # httpx's

    def __init__(self, url: str, api_key: str | None, timeout_s: float, user_agent: str, client: Any = None):
        import httpx

        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.owned = client is None
        if client is None:
            client = getattr(httpx, self.client_class)(
                base_url=self.url, headers=headers(api_key, user_agent), timeout=timeout_s, trust_env=False
            )
        self.client = client

    def send(self, call: Call, request_id: str) -> Any:
        import httpx

        try:
            response = self.client.request(**request_kwargs(call, request_id))
        except httpx.HTTPError as exc:
            raise unreachable(call, exc, self.url, self.timeout_s, request_id) from None
        return answer(call, response, request_id)

    def close(self) -> None:
        if self.owned:
            self.client.close()


class AsyncHttpTransport(HttpTransport):
    """asyncio HTTP; ``client``: an ``httpx.AsyncClient`` to send through instead."""

    client_class = "AsyncClient"

    async def send(self, call: Call, request_id: str) -> Any:
        import httpx

        try:
            response = await self.client.request(**request_kwargs(call, request_id))
        except httpx.HTTPError as exc:
            raise unreachable(call, exc, self.url, self.timeout_s, request_id) from None
        return answer(call, response, request_id)

    async def close(self) -> None:
        if self.owned:
            await self.client.aclose()
