"""Fetch an analysed image by URL, off by default, and never from a private address (no SSRF).

Every hop (the URL and each redirect) is checked: scheme in the allowed list, no userinfo,
the host resolved once and *every* address it resolves to public. "Public" is decided by the
explicit tables below, not by ``ipaddress``'s ``is_global`` alone (its answer for 6to4, NAT64
and Teredo changed between Python patch releases); ``is_global`` is only a second, fail-closed
check. IPv6 forms that carry an IPv4 address are unwrapped and the IPv4 address judged:
IPv4-mapped and IPv4-translated (``::ffff:a.b.c.d``, ``::ffff:0:a.b.c.d``), IPv4-compatible
(``::a.b.c.d``), 6to4 (``2002:AABB:CCDD::/16``) and NAT64's well-known prefix
(``64:ff9b::/96``). The local-use NAT64 prefix ``64:ff9b:1::/48`` and Teredo (``2001::/32``,
whose client address is obfuscated) are refused outright.
The connection then goes to the vetted address itself, with the name kept for the Host
header and TLS (SNI and certificate check), so a second DNS answer cannot swap in a private
address (DNS rebinding). Proxies from the environment are ignored for the same reason.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from router.limits import read_limited
from visionroute.errors import InputError

if TYPE_CHECKING:
    import httpx

Resolver = Callable[[str, int], Awaitable[list[str]]]


class UrlFetchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="accept image_url in analyse requests")
    schemes: list[Literal["https", "http"]] = Field(default_factory=lambda: ["https"])
    allowed_hosts: list[str] = Field(default_factory=list, description="if set, only these host names")
    timeout_s: float = Field(5.0, gt=0, le=60)
    max_redirects: int = Field(3, ge=0, le=10)


# Never public: (network, what it is). RFC 6890 and the IANA special-purpose registries.
BLOCKED_IPV4: tuple[tuple[ipaddress.IPv4Network, str], ...] = tuple(
    (ipaddress.IPv4Network(net), what)
    for net, what in (
        ("0.0.0.0/8", "this network"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "carrier-grade NAT (shared)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local (cloud metadata)"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "IETF protocol assignments"),
        ("192.0.2.0/24", "documentation"),
        ("192.88.99.0/24", "6to4 relay anycast"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),
    )
)
BLOCKED_IPV6: tuple[tuple[ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.IPv6Network(net), what)
    for net, what in (
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("64:ff9b:1::/48", "local-use NAT64"),
        ("100::/64", "discard-only"),
        ("2001::/32", "Teredo (client address obfuscated)"),
        ("2001:2::/48", "benchmarking"),
        ("2001:db8::/32", "documentation"),
        ("2001:10::/28", "ORCHID"),
        ("3fff::/20", "documentation"),
        ("5f00::/16", "segment routing"),
        ("fc00::/7", "unique local (private)"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local"),
        ("ff00::/8", "multicast"),
    )
)
GLOBAL_UNICAST_IPV6 = ipaddress.IPv6Network("2000::/3")
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")
_COMPATIBLE = ipaddress.IPv6Network("::/96")
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, str] | None:
    """The IPv4 address an IPv6 form carries, and the form's name; None for plain IPv6."""
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _MAPPED:
        return low32, "IPv4-mapped"
    if ip in _TRANSLATED:
        return low32, "IPv4-translated"
    if ip in _NAT64:
        return low32, "NAT64"
    if ip in _SIX_TO_FOUR:
        return ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF), "6to4"
    if ip in _COMPATIBLE and int(ip) > 1:  # :: and ::1 are blocked as themselves
        return low32, "IPv4-compatible"
    return None


def _ipv4_refusal(ip: ipaddress.IPv4Address) -> str | None:
    for network, what in BLOCKED_IPV4:
        if ip in network:
            return f"{what} ({network})"
    if not ip.is_global:  # fail-closed second opinion; never the only check
        return "not globally routable"
    return None


def address_refusal(address: str) -> str | None:
    """Why ``address`` must not be fetched from, or None when it is public."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return "not an IP address"
    if isinstance(ip, ipaddress.IPv4Address):
        return _ipv4_refusal(ip)
    for network, what in BLOCKED_IPV6:
        if ip in network:
            return f"{what} ({network})"
    embedded = embedded_ipv4(ip)
    if embedded is not None:
        inner, form = embedded
        refusal = _ipv4_refusal(inner)
        return f"{form} form of {inner}: {refusal}" if refusal else None
    if ip not in GLOBAL_UNICAST_IPV6:
        return "not global unicast (outside 2000::/3)"
    if not ip.is_global:
        return "not globally routable"
    return None


def is_public_address(address: str) -> bool:
    return address_refusal(address) is None


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
    if not addresses:
        raise InputError(f"image_url host {host!r} resolves to no address", field="image_url")
    refused = [(a, why) for a in addresses if (why := address_refusal(a)) is not None]
    if refused:
        address, why = refused[0]
        raise InputError(
            f"image_url host {host!r} resolves to {address}, which is not public ({why}); private, "
            "loopback, link-local and other special-purpose addresses are refused",
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
    import httpx  # imported on use: config readers (check-config) do not need it

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
