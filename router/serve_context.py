"""What Ray Serve knows about the running service that the core must not depend on.

The caller's address of the current request (no public API gives it), the proxies the running
Serve instance was started with (for the bind check), the request id Serve assigned and the
node a replica runs on. Ray's private APIs are used here and nowhere else; the faces and the
ingress wiring call these, the transport-free core (router/auth, router/services) never does.
"""

from __future__ import annotations

import functools
import logging

from router.auth.keys import Authenticator, SecurityConfig, check_bind

log = logging.getLogger("visionroute.security")


def host_of(address: str) -> str:
    """The host of ``host:port``, ``[v6]:port``, gRPC's ``ipv4:host:port`` or a bare address."""
    for prefix in ("ipv4:", "ipv6:"):
        if address.startswith(prefix):
            address = address[len(prefix) :].replace("%5B", "[").replace("%5D", "]")
    if address.startswith("["):
        return address[1 : address.find("]")] if "]" in address else address[1:]
    if address.count(":") == 1:
        return address.split(":")[0]
    return address


def serve_client_address() -> str:
    """The caller's address Ray Serve recorded for the current request, HTTP or gRPC;
    "unknown" outside Serve (then every such caller shares one lockout)."""
    try:
        from ray.serve.context import _get_serve_request_context

        context = _get_serve_request_context()  # no public API gives the client address
        address = context._client or (context.grpc_context.peer() if context.grpc_context else "")
    except Exception:  # not inside Serve
        address = ""
    return host_of(address) or "unknown"


def serve_request_id() -> str:
    """The request id Ray Serve assigned to the current request (gRPC calls without one)."""
    from ray.serve.context import _get_serve_request_context

    return _get_serve_request_context().request_id


@functools.cache
def serving_node() -> str:
    """The Ray node this replica runs on ("" outside Ray): the ``X-VisionRoute-Node`` header, so
    a caller (and the multi-node tests) can see which node answered."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # not under Ray, or no runtime context: no header
        return ""


def check_serve_bind(security: SecurityConfig) -> None:
    """check_bind against the proxies the running Serve instance was started with."""
    if security.enabled or security.allow_insecure_bind:
        return
    import ray

    if not ray.is_initialized():  # not inside Serve; _get_global_client would start a local Ray
        return
    try:
        from ray.serve.context import _get_global_client

        controller = _get_global_client()._controller  # no public API exposes the proxy options
        http = ray.get(controller.get_http_config.remote(), timeout=30)
        grpc = ray.get(controller.get_grpc_config.remote(), timeout=30)
    except Exception as exc:  # not inside Serve (unit tests, local testing mode)
        log.debug("no Serve controller to check the bind address against: %s", exc)
        return
    check_bind(security, http.host, grpc.port > 0 and bool(grpc.grpc_servicer_functions))


def make_authenticator(security: SecurityConfig) -> Authenticator:
    """The key check for ``security``, after refusing an unsafe bind."""
    check_serve_bind(security)
    if not security.enabled:
        log.warning("no API keys configured: authentication is off (local development only)")
    return Authenticator(security, client_address=serve_client_address)
