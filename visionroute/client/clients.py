"""``VisionRouteClient`` (blocking) and ``AsyncVisionRouteClient`` (asyncio): one interface over
HTTP or gRPC, chosen by the URL's scheme (``http(s)://host:8000`` or ``grpc(s)://host:9000``).

Both are ``Operations`` (operations.py: every operation once) over one constructor
(``ClientBase``); each writes only how a call runs: ``_execute`` (a call, under the retry
policy: run, or awaited) and ``_run_batch`` (a batch's chunks, one after another). ``_execute``
settles the call's request id once (the caller's, or a new one), sends every attempt with it and
retries under the ``RetryPolicy`` (retry.py, tenacity).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from visionroute import __version__
from visionroute.client.calls import request_id_for
from visionroute.client.operations import Operations
from visionroute.client.retry import RetryPolicy
from visionroute.errors import ConfigError

if TYPE_CHECKING:
    from visionroute.client.batch import BatchRun
    from visionroute.client.calls import Call
    from visionroute.client.results import AnalyzeBatchResult

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 60.0
SCHEMES = ("http", "https", "grpc", "grpcs")
USER_AGENT = f"visionroute-client/{__version__}"


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


class ClientBase(Operations):
    """The running service. ``ClientBase("http://127.0.0.1:8000", api_key=...)`` or
    ``("grpc://127.0.0.1:9000", ...)``.

    ``timeout_s``: per attempt. ``retry``: a ``RetryPolicy`` (``NO_RETRY`` to send once).
    ``application``: the Ray Serve application (gRPC metadata; needed when several run).
    ``http_client`` / ``grpc_channel``: send through these instead (tests, custom TLS).
    """

    is_async = False

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
        self.url = checked_url(url)
        self.timeout_s = checked_timeout(timeout_s)
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise ConfigError(f"retry must be a RetryPolicy, got {type(retry).__name__}", field="retry")
        self.retry = retry or RetryPolicy()
        self.transport_name = "grpc" if self.url.startswith("grpc") else "http"
        # the transport the URL's scheme names (modules imported here: httpx or grpc, not both)
        if self.transport_name == "grpc":
            from visionroute.client import grpc_transport

            kind = grpc_transport.AsyncGrpcTransport if self.is_async else grpc_transport.GrpcTransport
            self.transport = kind(self.url, api_key, self.timeout_s, application, grpc_channel)
        else:
            from visionroute.client import http_transport

            kind = http_transport.AsyncHttpTransport if self.is_async else http_transport.HttpTransport
            self.transport = kind(self.url, api_key, self.timeout_s, USER_AGENT, http_client)


class VisionRouteClient(ClientBase):
    """The running service, blocking; use it as a context manager, or ``close()`` it.
    Arguments: ``ClientBase``'s."""

    def _execute(self, call: Call, request_id: str | None) -> Any:
        import tenacity

        request_id = request_id_for(request_id)  # once per logical call: every attempt sends it
        for attempt in tenacity.Retrying(**self.retry.tenacity_kwargs(call.idempotent)):
            with attempt:
                answer = self.transport.send(call, request_id)
        return call.parse(answer)

    def _run_batch(self, run: BatchRun) -> AnalyzeBatchResult:
        for chunk in run.chunks():
            run.add(self._execute(chunk.call, chunk.request_id))
        return run.result()

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> VisionRouteClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncVisionRouteClient(ClientBase):
    """The running service, for asyncio: the same operations and arguments as
    ``VisionRouteClient``, each awaited. ``async with AsyncVisionRouteClient(url) as client:``."""

    is_async = True

    async def _execute(self, call: Call, request_id: str | None) -> Any:
        import tenacity

        request_id = request_id_for(request_id)
        async for attempt in tenacity.AsyncRetrying(**self.retry.tenacity_kwargs(call.idempotent)):
            with attempt:
                answer = await self.transport.send(call, request_id)
        return call.parse(answer)

    async def _run_batch(self, run: BatchRun) -> AnalyzeBatchResult:
        for chunk in run.chunks():
            run.add(await self._execute(chunk.call, chunk.request_id))
        return run.result()

    async def close(self) -> None:
        await self.transport.close()

    async def __aenter__(self) -> AsyncVisionRouteClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
