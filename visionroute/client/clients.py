"""``VisionRouteClient`` (blocking) and ``AsyncVisionRouteClient`` (asyncio): one interface over
HTTP or gRPC, chosen by the URL's scheme (``http(s)://host:8000`` or ``grpc(s)://host:9000``).

Both share every operation (``Operations`` below: ``analyze``, ``search``, the review queue, the
search index, ``policy``); each method builds the operation's ``Call`` (calls.py) and hands it to
``_execute``, which the blocking client runs and the asyncio client awaits, so an operation is
written once. ``_execute`` settles the call's request id once (the caller's, or a new one), sends
every attempt with it and retries under the ``RetryPolicy`` (retry.py, tenacity).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from visionroute import __version__
from visionroute.client import calls
from visionroute.client.retry import RetryPolicy
from visionroute.errors import ConfigError, InputError

if TYPE_CHECKING:
    from visionroute.client.calls import Call

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 60.0
SCHEMES = ("http", "https", "grpc", "grpcs")
USER_AGENT = f"visionroute-client/{__version__}"
REQUEST_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")  # what the service accepts (router/services/common.py)


def checked_url(url: str) -> str:
    scheme, separator, rest = str(url).partition("://")
    if not separator or scheme not in SCHEMES or not rest.strip("/"):
        raise ConfigError(
            f"url must be {' or '.join(f'{s}://host:port' for s in SCHEMES)}, got {url!r}", field="url"
        )
    return url.rstrip("/")


def checked_timeout(timeout_s: float) -> float:
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or not timeout_s > 0:
        raise ConfigError(f"timeout_s must be a number of seconds > 0, got {timeout_s!r}", field="timeout_s")
    return float(timeout_s)


def request_id_for(given: str | None) -> str:
    """The caller's request id, checked as the service checks it, or a new one."""
    if given is None:
        return uuid.uuid4().hex
    if not isinstance(given, str) or not REQUEST_ID.fullmatch(given):
        raise InputError(
            f"request_id must be 1-128 characters from [A-Za-z0-9_.:-], got {given!r}", field="request_id"
        )
    return given


class Operations:
    """The service's operations; ``_execute(call, request_id)`` runs one (or returns its awaitable).

    ``request_id``: the id of this logical call, sent with every attempt (``X-Request-Id`` /
    gRPC ``request_id``). Give your own to make a call idempotent across processes (resending an
    analyse after a crash never makes a second review item); by default each call gets a new one.
    """

    def _execute(self, call: Call, request_id: str | None) -> Any:
        raise NotImplementedError

    # -- analyse and search ---------------------------------------------------------------------

    def analyze(
        self,
        image: bytes | str | None = None,
        *,
        task: str | None = None,
        tenant: str | None = None,
        image_url: str | None = None,
        request_id: str | None = None,
    ):
        """One image (its bytes or a path; or ``image_url``) through the cascade -> ``AnalyzeResponse``
        (router/schemas.py: decision, answer, review_item_id, cost_units, trace, ...)."""
        return self._execute(calls.analyze(image, task=task, tenant=tenant, image_url=image_url), request_id)

    def search(
        self,
        text: str | None = None,
        *,
        image: bytes | str | None = None,
        item_id: int | None = None,
        k: int = 10,
        filters: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        tenant: str | None = None,
        request_id: str | None = None,
    ):
        """Nearest neighbours of a text, an example image or an indexed item -> ``SearchResponse``
        (retrieval/schemas.py). ``filters``/``params`` as the HTTP body's (docs/search.md)."""
        call = calls.search(
            text=text, image=image, item_id=item_id, k=k, filters=filters, params=params, tenant=tenant
        )
        return self._execute(call, request_id)

    def index_item(
        self, image: bytes | str, metadata: Mapping[str, Any] | None = None, *, request_id: str | None = None
    ):
        """Make an image searchable -> ``IndexedSearchItem`` (its id). Not retried after a lost answer."""
        return self._execute(calls.index_item(image, metadata), request_id)

    def search_item(self, item_id: int, *, request_id: str | None = None):
        """An indexed item's metadata -> ``SearchItem``."""
        return self._execute(calls.search_item(item_id), request_id)

    def delete_search_item(self, item_id: int, *, request_id: str | None = None):
        """-> ``DeletedSearchItem``."""
        return self._execute(calls.delete_search_item(item_id), request_id)

    def search_stats(self, *, request_id: str | None = None):
        """-> ``IndexStats`` (a tenant's key: its own entries; an admin: the operator report)."""
        return self._execute(calls.search_stats(), request_id)

    # -- review ---------------------------------------------------------------------------------

    def review_items(
        self, status: str = "pending", *, limit: int = 50, offset: int = 0, request_id: str | None = None
    ):
        """A page of the review queue -> ``ReviewPage`` (items and the queue's stats)."""
        return self._execute(calls.review_items(status, limit, offset), request_id)

    def review_item(self, item_id: str, *, request_id: str | None = None):
        """-> ``ReviewItemView``."""
        return self._execute(calls.review_item(item_id), request_id)

    def review_image(self, item_id: str, *, request_id: str | None = None):
        """The item's stored image -> ``(bytes, media type)``."""
        return self._execute(calls.review_image(item_id), request_id)

    def review_audit(self, item_id: str, *, request_id: str | None = None):
        """Who did what to an item -> ``AuditLog``."""
        return self._execute(calls.review_audit(item_id), request_id)

    def review_labels(self, task: str, *, request_id: str | None = None):
        """The labels a task's reviewers may use -> ``LabelSet``."""
        return self._execute(calls.review_labels(task), request_id)

    def review_stats(self, *, request_id: str | None = None):
        """Queue depth, SLA, audit estimates -> ``ReviewStats``."""
        return self._execute(calls.review_stats(), request_id)

    def claim(
        self,
        reviewer: str | None = None,
        *,
        item_id: str | None = None,
        lease_s: float | None = None,
        request_id: str | None = None,
    ):
        """Lease the most valuable pending item (or ``item_id``) -> ``Claim`` (item and lease token;
        both None when nothing waits). ``reviewer``: needed only on a service without API keys."""
        return self._execute(calls.claim(reviewer, item_id, lease_s), request_id)

    def label(
        self,
        item_id: str,
        *,
        lease_token: str,
        verdict: str,
        label: str | None = None,
        boxes: Sequence[Mapping[str, Any]] | None = None,
        note: str | None = None,
        reviewer: str | None = None,
        request_id: str | None = None,
    ):
        """A reviewer's verdict (confirm | correct | reject) on a claimed item -> ``ReviewItemView``."""
        call = calls.label(
            item_id,
            lease_token=lease_token,
            verdict=verdict,
            label=label,
            boxes=boxes,
            note=note,
            reviewer=reviewer,
        )
        return self._execute(call, request_id)

    def release(
        self, item_id: str, *, lease_token: str, reviewer: str | None = None, request_id: str | None = None
    ):
        """Give a claimed item back unlabelled -> ``ReviewItemView``."""
        return self._execute(calls.release(item_id, lease_token=lease_token, reviewer=reviewer), request_id)

    # -- operations -----------------------------------------------------------------------------

    def policy(self, *, request_id: str | None = None):
        """The policy set in force, budgets and history (admin) -> ``PolicyView``."""
        return self._execute(calls.policy(), request_id)

    def call(self, method: str, path: str, *, request_id: str | None = None, **http: Any):
        """Any HTTP route (``json=``, ``params=``, ...) -> its JSON: the routes with no typed
        operation here (rollouts, drift). HTTP only."""
        return self._execute(calls.raw(method, path, **http), request_id)


class _Settings:
    def __init__(
        self,
        url: str,
        api_key: str | None,
        timeout_s: float,
        retry: RetryPolicy | None,
        application: str | None,
    ) -> None:
        self.url = checked_url(url)
        self.timeout_s = checked_timeout(timeout_s)
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise ConfigError(f"retry must be a RetryPolicy, got {type(retry).__name__}", field="retry")
        self.retry = retry or RetryPolicy()
        self.api_key = api_key
        self.application = application
        self.transport_name = "grpc" if self.url.startswith("grpc") else "http"

    def transport(self, http_client: Any, grpc_channel: Any, *, asyncio: bool) -> Any:
        """The transport the URL's scheme names (modules imported here: httpx or grpc, not both)."""
        if self.transport_name == "grpc":
            from visionroute.client import grpc_transport

            kind = grpc_transport.AsyncGrpcTransport if asyncio else grpc_transport.GrpcTransport
            return kind(self.url, self.api_key, self.timeout_s, self.application, grpc_channel)
        from visionroute.client import http_transport

        kind = http_transport.AsyncHttpTransport if asyncio else http_transport.HttpTransport
        return kind(self.url, self.api_key, self.timeout_s, USER_AGENT, http_client)


class VisionRouteClient(Operations):
    """The running service, blocking. ``VisionRouteClient("http://127.0.0.1:8000", api_key=...)``
    or ``("grpc://127.0.0.1:9000", ...)``; use it as a context manager, or ``close()`` it.

    ``timeout_s``: per attempt. ``retry``: a ``RetryPolicy`` (``NO_RETRY`` to send once).
    ``application``: the Ray Serve application (gRPC metadata; needed when several run).
    ``http_client`` / ``grpc_channel``: send through these instead (tests, custom TLS).
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        api_key: str | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        application: str | None = None,
        http_client: Any = None,
        grpc_channel: Any = None,
    ) -> None:
        settings = _Settings(url, api_key, timeout_s, retry, application)
        self.url, self.timeout_s, self.retry = settings.url, settings.timeout_s, settings.retry
        self.transport_name = settings.transport_name
        self.transport = settings.transport(http_client, grpc_channel, asyncio=False)

    def _execute(self, call: Call, request_id: str | None) -> Any:
        import tenacity

        request_id = request_id_for(request_id)  # once per logical call: every attempt sends it
        for attempt in tenacity.Retrying(**self.retry.tenacity_kwargs(call.idempotent)):
            with attempt:
                answer = self.transport.send(call, request_id)
        return call.parse(answer)

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> VisionRouteClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncVisionRouteClient(Operations):
    """The running service, for asyncio: the same operations and arguments as
    ``VisionRouteClient``, each awaited. ``async with AsyncVisionRouteClient(url) as client:``."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        api_key: str | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        application: str | None = None,
        http_client: Any = None,
        grpc_channel: Any = None,
    ) -> None:
        settings = _Settings(url, api_key, timeout_s, retry, application)
        self.url, self.timeout_s, self.retry = settings.url, settings.timeout_s, settings.retry
        self.transport_name = settings.transport_name
        self.transport = settings.transport(http_client, grpc_channel, asyncio=True)

    async def _execute(self, call: Call, request_id: str | None) -> Any:
        import tenacity

        request_id = request_id_for(request_id)
        async for attempt in tenacity.AsyncRetrying(**self.retry.tenacity_kwargs(call.idempotent)):
            with attempt:
                answer = await self.transport.send(call, request_id)
        return call.parse(answer)

    async def close(self) -> None:
        await self.transport.close()

    async def __aenter__(self) -> AsyncVisionRouteClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
