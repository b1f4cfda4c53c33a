"""The gRPC transport: one attempt of a ``Call`` through the project's compiled stubs.

The stubs are generated from router/proto/visionroute.proto (router/grpc/build.py) on first use.
Every attempt sends, as metadata, the API key (``x-api-key``), the call's request id
(``request_id``: Ray Serve's gRPC proxy hands it to the ingress, which keys review items on it)
and, when given, ``application``: the Serve application to route to (Ray Serve's proxy needs it
when several applications run; ``visionroute`` in the shipped serve_config.yaml). A refusal's
status details are the service's JSON error body; its ``retry-after`` trailer becomes
``retry_after_s``. Ray Serve's own refusals (back-pressure, an unavailable replica) carry text,
not our body: the code and text are kept.
"""

from __future__ import annotations

import json
from typing import Any

from visionroute.client.calls import Call
from visionroute.client.errors import ServiceError, ServiceUnreachable, service_error, status_of_grpc
from visionroute.errors import InputError

# codes that mean no answer came from the service (rather than a refusal it sent)
NO_ANSWER = {"DEADLINE_EXCEEDED": "timeout_s", "CANCELLED": "url"}
# what gRPC's UNAVAILABLE says when the request never left (no connection could be made)
NEVER_SENT = ("failed to connect", "connection refused", "dns resolution failed")
# a batch's answer (up to limits.batch_max_images traces) can pass gRPC's 4 MiB default
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]


def generated() -> tuple[Any, Any]:
    """(visionroute_pb2, visionroute_pb2_grpc), generated from the .proto if stale."""
    from router.grpc.build import ensure_generated

    ensure_generated()
    from router.grpc.proto import visionroute_pb2, visionroute_pb2_grpc

    return visionroute_pb2, visionroute_pb2_grpc


def metadata(api_key: str | None, application: str | None, request_id: str) -> list[tuple[str, str]]:
    out = [("request_id", request_id)]
    if api_key:
        out.append(("x-api-key", api_key))
    if application:
        out.append(("application", application))
    return out


def request_message(call: Call, pb: Any) -> Any:
    if call.grpc is None:
        raise ServiceError(
            operation=call.name, status=None, error="Unsupported", field="transport", reason="no gRPC method"
        )
    try:
        return call.grpc.message(pb)
    except (TypeError, ValueError) as exc:  # protobuf refuses a field it does not have, or a wrong type
        raise InputError(f"{call.name}: {exc}", field="request") from None


def error_of(call: Call, exc: Any, target: str, timeout_s: float, request_id: str) -> ServiceError:
    """The ServiceError (or ServiceUnreachable) a failed RPC is."""
    code = exc.code().name if exc.code() is not None else "UNKNOWN"
    details = exc.details() or ""
    trailers = {key: value for key, value in exc.trailing_metadata() or ()}
    if code == "UNAVAILABLE" and not details.startswith("{") and "retry-after" not in trailers:
        # the channel's own UNAVAILABLE: nothing listened (never sent), or the connection broke
        never_sent = any(sign in details.lower() for sign in NEVER_SENT)
        return ServiceUnreachable(
            operation=call.name,
            reason=f"{target}: {details}",
            field="url",
            sent=not never_sent,
            request_id=request_id,
        )
    if code in NO_ANSWER:
        reason = f"no answer from {target} within {timeout_s:g} s" if code == "DEADLINE_EXCEEDED" else details
        return ServiceUnreachable(
            operation=call.name, reason=reason, field=NO_ANSWER[code], sent=True, request_id=request_id
        )
    try:
        body = json.loads(details)
        if not isinstance(body, dict) or "error" not in body:
            raise ValueError("not the service's error body")
        proxy_answer = False
    except ValueError:  # Ray Serve's own text (an actor that died under the call: INTERNAL/UNKNOWN)
        body = {"error": code, "field": None, "reason": details[:200]}
        proxy_answer = True
    wait = trailers.get("retry-after")
    return service_error(
        operation=call.name,
        status=status_of_grpc(code, body.get("error")),
        error=str(body.get("error")),
        field=body.get("field"),
        reason=str(body.get("reason")),
        request_id=body.get("request_id") or request_id,
        retry_after_s=float(wait) if wait is not None else None,
        grpc_code=code,
        proxy_answer=proxy_answer,
    )


def _channel_target(url: str) -> tuple[str, bool]:
    """``grpc://host:port`` (plain) or ``grpcs://host:port`` (TLS) -> (host:port, tls)."""
    scheme, _, target = url.partition("://")
    return target.rstrip("/"), scheme == "grpcs"


class GrpcTransport:
    """Blocking gRPC over one channel (``channel``: send through this one instead)."""

    def __init__(
        self, url: str, api_key: str | None, timeout_s: float, application: str | None, channel: Any = None
    ):
        self.url = url
        self.target, self.tls = _channel_target(url)
        self.api_key, self.application, self.timeout_s = api_key, application, timeout_s
        self.pb, self.stubs = generated()
        self.owned = channel is None
        self.channel = channel
        self.stub = self.stubs.VisionRouteStub(channel) if channel is not None else None

    def _open(self, channels: Any) -> Any:
        """The stub, over a channel opened on first use (``channels``: ``grpc`` or ``grpc.aio``)."""
        if self.stub is None:
            import grpc

            self.channel = (
                channels.secure_channel(self.target, grpc.ssl_channel_credentials(), options=CHANNEL_OPTIONS)
                if self.tls
                else channels.insecure_channel(self.target, options=CHANNEL_OPTIONS)
            )
            self.stub = self.stubs.VisionRouteStub(self.channel)
        return self.stub

    def send(self, call: Call, request_id: str) -> Any:
        import grpc

        message = request_message(call, self.pb)
        method = getattr(self._open(grpc), call.grpc.method)
        try:
            reply = method(
                message, metadata=metadata(self.api_key, self.application, request_id), timeout=self.timeout_s
            )
        except grpc.RpcError as exc:
            raise error_of(call, exc, self.target, self.timeout_s, request_id) from None
        return call.grpc.reply(reply)

    def close(self) -> None:
        if self.owned and self.channel is not None:
            self.channel.close()


class AsyncGrpcTransport(GrpcTransport):
    """asyncio gRPC (``grpc.aio``) over one channel, opened on the first call's event loop."""

    async def send(self, call: Call, request_id: str) -> Any:
        import grpc

        message = request_message(call, self.pb)
        method = getattr(self._open(grpc.aio), call.grpc.method)
        try:
            reply = await method(
                message, metadata=metadata(self.api_key, self.application, request_id), timeout=self.timeout_s
            )
        except grpc.RpcError as exc:
            raise error_of(call, exc, self.target, self.timeout_s, request_id) from None
        return call.grpc.reply(reply)

    async def close(self) -> None:
        if self.owned and self.channel is not None:
            await self.channel.close()
