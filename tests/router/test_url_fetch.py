"""SSRF: which addresses an image_url may reach, decided by explicit tables (router/url_fetch.py).

Every IPv6 form that carries an IPv4 address is unwrapped and the IPv4 address judged, so
6to4 / NAT64 / mapped / compatible spellings of loopback or private space are refused on
every Python release, whatever ``ipaddress.is_global`` says about the IPv6 prefix.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from router.url_fetch import (
    UrlFetchConfig,
    address_refusal,
    embedded_ipv4,
    fetch_image_url,
    is_public_address,
)
from visionroute.errors import InputError

# (address, why it must be refused: a fragment of the reason)
REFUSED = [
    ("127.0.0.1", "loopback"),
    ("10.0.0.1", "private"),
    ("172.31.255.255", "private"),
    ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"),
    ("100.64.0.1", "carrier-grade NAT"),
    ("0.0.0.0", "this network"),
    ("192.0.0.8", "IETF protocol"),
    ("198.18.0.1", "benchmarking"),
    ("224.0.0.1", "multicast"),
    ("255.255.255.255", "reserved"),
    ("::1", "loopback"),
    ("::", "unspecified"),
    ("fe80::1", "link-local"),
    ("fd00::1", "unique local"),
    ("ff02::1", "multicast"),
    ("2001:db8::1", "documentation"),
    # IPv4 inside IPv6: the embedded address decides
    ("::ffff:127.0.0.1", "IPv4-mapped form of 127.0.0.1: loopback"),
    ("::ffff:10.0.0.1", "IPv4-mapped form of 10.0.0.1: private"),
    ("::ffff:0:a9fe:a9fe", "IPv4-translated form of 169.254.169.254: link-local"),
    ("::7f00:1", "IPv4-compatible form of 127.0.0.1: loopback"),
    ("2002:7f00:1::", "6to4 form of 127.0.0.1: loopback"),
    ("2002:a9fe:a9fe::1", "6to4 form of 169.254.169.254: link-local"),
    ("2002:c0a8:101:1::1", "6to4 form of 192.168.1.1: private"),
    ("64:ff9b::7f00:1", "NAT64 form of 127.0.0.1: loopback"),
    ("64:ff9b::a00:1", "NAT64 form of 10.0.0.1: private"),
    ("64:ff9b:1::a00:1", "local-use NAT64"),
    ("64:ff9b:1:ffff::808:808", "local-use NAT64"),
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", "Teredo"),
    ("2001:0:5db8:1::1", "Teredo"),
    ("fe80::1%eth0", "link-local"),
]

PUBLIC = ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "2a00:1450:4001:80b::200e", "::ffff:8.8.8.8"]


@pytest.mark.parametrize("address, reason", REFUSED, ids=[a for a, _ in REFUSED])
def test_special_purpose_addresses_are_refused_with_the_reason(address, reason):
    assert not is_public_address(address)
    assert reason in address_refusal(address)


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_allowed(address):
    assert address_refusal(address) is None


@pytest.mark.parametrize(
    "address, inner, form",
    [
        ("2002:7f00:1::", "127.0.0.1", "6to4"),
        ("2002:808:808::1", "8.8.8.8", "6to4"),
        ("64:ff9b::808:808", "8.8.8.8", "NAT64"),
        ("::ffff:1.2.3.4", "1.2.3.4", "IPv4-mapped"),
        ("::1.2.3.4", "1.2.3.4", "IPv4-compatible"),
        ("2606:4700::1", None, None),
    ],
)
def test_embedded_ipv4_is_unwrapped(address, inner, form):
    import ipaddress

    found = embedded_ipv4(ipaddress.IPv6Address(address))
    if inner is None:
        assert found is None
    else:
        assert (str(found[0]), found[1]) == (inner, form)


ON = UrlFetchConfig(enabled=True, schemes=["https", "http"])


@pytest.mark.parametrize(
    "url", ["http://[2002:7f00:1::]/x", "http://[64:ff9b::7f00:1]/x", "http://[64:ff9b:1::a00:1]/x"]
)
def test_literal_wrapped_loopback_urls_are_refused_before_any_connection(url):
    def never(request):
        raise AssertionError(f"connected to {request.url}")

    with pytest.raises(InputError, match="private") as caught:
        asyncio.run(fetch_image_url(url, ON, 1 << 20, transport=httpx.MockTransport(never)))
    assert caught.value.field == "image_url"


def test_a_name_resolving_to_a_6to4_loopback_is_refused():
    async def resolve(host, port):
        return ["2606:4700::1", "2002:7f00:1::"]

    with pytest.raises(InputError, match=r"2002:7f00:1::, .*6to4 form of 127\.0\.0\.1"):
        asyncio.run(fetch_image_url("https://images.example/a.png", ON, 1 << 20, resolve=resolve))
