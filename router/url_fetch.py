"""Fetch an analysed image by URL, off by default, and never from a private address (no SSRF).

Every hop (the URL and each redirect) is checked: scheme in the allowed list, no userinfo,
the host resolved once and *every* address it resolves to public (not private, loopback,
link-local, multicast, reserved or the cloud metadata range; IPv4-mapped IPv6 unwrapped).
The connection then goes to the vetted address itself, with the name kept for the Host
header and TLS (SNI and certificate check), so a second DNS answer cannot swap in a private
address (DNS rebinding). Proxies from the environment are ignored for the same reason.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from typing import Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field

from router.limits import read_limited
from visionroute.errors import InputError

Resolver = Callable[[str, int], Awaitable[list[str]]]


class UrlFetchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="accept image_url in analyse requests")
    schemes: list[Literal["https", "http"]] = Field(default_factory=lambda: ["https"])
    allowed_hosts: list[str] = Field(default_factory=list, description="if set, only these host names")
    timeout_s: float = Field(5.0, gt=0, le=60)
    max_redirects: int = Field(3, ge=0, le=10)


def is_public_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (
        ip.is_multicast or ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved
    )


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


async def vetted_address(url: httpx.URL, config: UrlFetchConfig, resolve: Resolver) -> str:
    if url.scheme not in config.schemes:
        raise InputError(
            f"image_url scheme {url.scheme!r} is not allowed; allowed: {config.schemes}", field="image_url"
        )
    if url.userinfo:
        raise InputError("image_url must not carry credentials", field="image_url")
    host = url.host
    if not host:
        raise InputError("image_url has no host", field="image_url")
    if config.allowed_hosts and host not in config.allowed_hosts:
        raise InputError(
            f"image_url host {host!r} is not in limits.url_fetch.allowed_hosts", field="image_url"
        )
    try:
        addresses = [str(ipaddress.ip_address(host))]  # a literal address is never looked up
    except ValueError:
        addresses = []
    try:
        addresses = addresses or await resolve(host, url.port or (443 if url.scheme == "https" else 80))
    except (OSError, UnicodeError) as exc:
        raise InputError(f"image_url host {host!r} does not resolve: {exc}", field="image_url") from None
    private = [a for a in addresses if not is_public_address(a)]
    if not addresses or private:
        raise InputError(
            f"image_url host {host!r} resolves to a private, loopback or link-local address; refused",
            field="image_url",
        )
    return addresses[0]


async def fetch_image_url(
    url: str,
    config: UrlFetchConfig,
    max_bytes: int,
    *,
    resolve: Resolver = system_resolver,
    transport: httpx.AsyncBaseTransport | None = None,
) -> bytes:
    """The bytes at ``url`` (at most ``max_bytes``), following at most ``max_redirects`` hops."""
    if not config.enabled:
        raise InputError("fetching images by URL is turned off (limits.url_fetch.enabled)", field="image_url")
    try:
        current = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise InputError(f"image_url is not a valid URL: {exc}", field="image_url") from None
    async with httpx.AsyncClient(
        transport=transport, trust_env=False, follow_redirects=False, timeout=config.timeout_s
    ) as client:
        for _ in range(config.max_redirects + 1):
            address = await vetted_address(current, config, resolve)
            pinned = current.copy_with(host=address)
            host_header = current.netloc.decode("ascii")
            try:
                async with client.stream(
                    "GET", pinned, headers={"Host": host_header}, extensions={"sni_hostname": current.host}
                ) as response:
                    if response.is_redirect:
                        current = current.join(response.headers.get("location", ""))
                        continue
                    if response.status_code != 200:
                        raise InputError(f"image_url answered HTTP {response.status_code}", field="image_url")
                    return await read_limited(
                        response.aiter_bytes(),
                        declared=response.headers.get("content-length"),
                        max_bytes=max_bytes,
                        field="image_url",
                        what="image_url body",
                    )
            except httpx.HTTPError as exc:
                raise InputError(
                    f"could not fetch image_url: {type(exc).__name__}: {exc}", field="image_url"
                ) from None
    raise InputError(f"image_url redirected more than {config.max_redirects} times", field="image_url")
