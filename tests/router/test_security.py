"""API keys, roles, tenant scoping, the bind check and SSRF-safe URL fetching (no server)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from router.auth.keys import (
    ApiKey,
    Authenticator,
    SecurityConfig,
    check_bind,
    hash_key,
    key_from_headers,
    new_key,
)
from router.auth.principal import resolve_tenant, tenant_scope
from router.config import parse_app_config
from router.http.auth import required_role
from router.url_fetch import UrlFetchConfig, fetch_image_url, is_public_address
from visionroute.errors import ConfigError, InputError, PayloadTooLarge, PermissionDenied, Unauthenticated

KEYS = {
    "acme-client": ("acme", "client"),
    "acme-reviewer": ("acme", "reviewer"),
    "ops-admin": ("ops", "admin"),
}


def security() -> SecurityConfig:
    return SecurityConfig(
        api_keys=[ApiKey(sha256=hash_key(k), tenant=t, role=r) for k, (t, r) in KEYS.items()]
    )


def test_keys_are_stored_hashed_and_roles_are_ranked():
    auth = Authenticator(security())
    assert all(k not in repr(security()) for k in KEYS)
    assert auth.authenticate("acme-client", "client").tenant == "acme"
    assert auth.authenticate("ops-admin", "reviewer").role == "admin"
    with pytest.raises(PermissionDenied, match="'reviewer' role"):
        auth.authenticate("acme-client", "reviewer")
    with pytest.raises(Unauthenticated, match="required"):
        auth.authenticate(None, "client")
    with pytest.raises(Unauthenticated, match="matches no"):
        auth.authenticate("acme-client ", "client")
    assert auth.authenticate(None, None) is None  # public routes need no key


def test_without_keys_auth_is_off():
    assert Authenticator(SecurityConfig()).authenticate(None, "admin") is None


def test_new_keys_are_random_and_match_their_hash():
    (key_a, sha_a), (key_b, _) = new_key(), new_key()
    assert key_a != key_b and hash_key(key_a) == sha_a and len(key_a) > 40


def test_config_refuses_plain_or_duplicate_keys():
    with pytest.raises(ConfigError, match="security.api_keys.0.sha256"):
        parse_app_config({"security": {"api_keys": [{"sha256": "my-secret", "tenant": "a"}]}})
    digest = hash_key("k")
    with pytest.raises(ConfigError, match="same key twice"):
        parse_app_config(
            {"security": {"api_keys": [{"sha256": digest, "tenant": "a"}, {"sha256": digest, "tenant": "b"}]}}
        )
    with pytest.raises(ConfigError, match="security.api_keys.0.role"):
        parse_app_config({"security": {"api_keys": [{"sha256": digest, "tenant": "a", "role": "root"}]}})


def test_security_config_names_bad_limit_session_and_proxy_fields():
    digest = hash_key("k")
    keys = [{"sha256": digest, "tenant": "a", "role": "reviewer"}]
    for section, value, field in [
        ("rate_limit", {"requests_per_s": 0}, "security.rate_limit.requests_per_s"),
        ("rate_limit", {"burst": 0}, "security.rate_limit.burst"),
        ("lockout", {"max_failures": 0}, "security.lockout.max_failures"),
        ("lockout", {"cooldown": 5}, "security.lockout.cooldown"),
        ("session", {"ttl_s": 30 * 86400}, "security.session.ttl_s"),
        ("session", {"secret_env": "not a name"}, "security.session.secret_env"),
        ("trusted_proxies", ["not-a-network"], "security.trusted_proxies.0"),
    ]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            parse_app_config({"security": {"api_keys": keys, section: value}})
    relaxed = parse_app_config(
        {
            "security": {
                "api_keys": keys,
                "rate_limit": None,
                "lockout": None,
                "trusted_proxies": ["10.0.0.0/8"],
            }
        }
    ).security
    assert relaxed.rate_limit is None and relaxed.lockout is None
    assert relaxed.session.secret_file.is_absolute()
    defaults = parse_app_config({}).security
    assert defaults.rate_limit.requests_per_s > 0 and defaults.lockout.max_failures > 0
    with pytest.raises(ConfigError, match="security.api_keys.0.rate_limit.burst"):
        parse_app_config({"security": {"api_keys": [{**keys[0], "rate_limit": {"burst": -1}}]}})


def test_headers_and_metadata_carry_the_key():
    assert key_from_headers([("X-Api-Key", "k1")]) == "k1"
    assert key_from_headers([("authorization", "Bearer k2")]) == "k2"
    assert key_from_headers([("authorization", "Basic abc")]) is None


@pytest.mark.parametrize(
    "path, role",
    [
        ("/healthz", None),
        ("/readyz", None),
        ("/openapi.json", None),
        ("/v1/analyze", "client"),
        ("/v1/review/items/x", "reviewer"),
        ("/review", "reviewer"),
        ("/review/app.js", "reviewer"),
        ("/v1/session/login", None),
        ("/v1/session/logout", None),
        ("/v1/session", "reviewer"),
        ("/metrics", "admin"),
        ("/v1/policy", "admin"),
        ("/v1/rollouts", "admin"),
        ("/v1/models/classify.efficientnet_lite0/card", "client"),
        ("/v1/rollouts/ro_1/promote", "admin"),
        ("/v1/analyzer", "admin"),
        ("/anything-new", "admin"),
    ],
)
def test_routes_are_deny_by_default(path, role):
    assert required_role(path) == role


def test_tenants_are_scoped_to_the_key():
    auth = Authenticator(security())
    client = auth.authenticate("acme-client", "client")
    assert resolve_tenant(client, None) == "acme" and resolve_tenant(client, "acme") == "acme"
    assert tenant_scope(client) == "acme"
    with pytest.raises(PermissionDenied, match="cannot act for tenant 'globex'"):
        resolve_tenant(client, "globex")
    admin = auth.authenticate("ops-admin", "admin")
    assert resolve_tenant(admin, "globex") == "globex" and tenant_scope(admin) is None
    assert resolve_tenant(None, None) == "default" and tenant_scope(None) is None  # auth off


@pytest.mark.parametrize(
    "host, grpc, refused",
    [
        ("127.0.0.1", False, False),
        ("localhost", False, False),
        ("::1", False, False),
        ("0.0.0.0", False, True),
        ("10.0.0.5", False, True),
        ("example.com", False, True),
        ("127.0.0.1", True, True),
    ],
)
def test_no_public_bind_without_keys(host, grpc, refused):
    if refused:
        with pytest.raises(ConfigError, match="allow_insecure_bind"):
            check_bind(SecurityConfig(), host, grpc)
    else:
        check_bind(SecurityConfig(), host, grpc)
    check_bind(security(), host, grpc)  # keys configured
    check_bind(SecurityConfig(allow_insecure_bind=True), host, grpc)  # explicitly told


# -- SSRF ---------------------------------------------------------------------------------------

ON = UrlFetchConfig(enabled=True, schemes=["https", "http"])


def fetch(url: str, config: UrlFetchConfig = ON, **kwargs) -> bytes:
    return asyncio.run(fetch_image_url(url, config, 1 << 20, **kwargs))


def test_url_fetch_is_off_by_default():
    with pytest.raises(InputError, match="turned off"):
        fetch("https://example.com/cat.png", UrlFetchConfig())
    assert parse_app_config({}).limits.url_fetch.enabled is False


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x.png",
        "http://localhost:8000/x",
        "http://[::1]/x",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.1.2.3/x",
        "http://192.168.0.1/x",
        "http://172.16.0.1/x",
        "http://0.0.0.0/x",
        "http://[::ffff:127.0.0.1]/x",
        "http://[fe80::1]/x",
        "http://100.64.0.1/x",
        "http://224.0.0.1/x",
        "http://2130706433/x",
        "http://0x7f000001/x",
    ],
)
def test_private_loopback_and_link_local_are_refused(url):
    with pytest.raises(InputError, match="private|does not resolve|not a valid"):
        fetch(url)


def test_a_name_resolving_to_any_private_address_is_refused():
    async def rebinding(host, port):
        return ["93.184.216.34", "127.0.0.1"]

    with pytest.raises(InputError, match="private"):
        fetch("https://images.example/cat.png", resolve=rebinding)


def test_scheme_credentials_and_allowlist():
    with pytest.raises(InputError, match="scheme 'file'"):
        fetch("file:///etc/passwd")
    with pytest.raises(InputError, match="scheme 'http'"):
        fetch("http://example.com/x", UrlFetchConfig(enabled=True))
    with pytest.raises(InputError, match="credentials"):
        fetch("https://user:pw@example.com/x")
    with pytest.raises(InputError, match="allowed_hosts"):
        fetch("https://evil.example/x", UrlFetchConfig(enabled=True, allowed_hosts=["images.example"]))


async def public(host, port):
    return ["93.184.216.34"]


def test_connects_to_the_vetted_address_with_the_name_in_host_and_sni():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b"png-bytes")

    assert (
        fetch("https://images.example/cat.png", resolve=public, transport=httpx.MockTransport(handler))
        == b"png-bytes"
    )
    assert seen[0].url.host == "93.184.216.34" and seen[0].headers["host"] == "images.example"
    assert seen[0].extensions["sni_hostname"] == "images.example"


def test_redirects_are_vetted_again_and_bounded():
    def to_metadata(request):
        return httpx.Response(302, headers={"location": "http://169.254.169.254/latest/"})

    with pytest.raises(InputError, match="private"):
        fetch("https://images.example/a", resolve=public, transport=httpx.MockTransport(to_metadata))

    def loop(request):
        return httpx.Response(302, headers={"location": "/again"})

    with pytest.raises(InputError, match="redirected more than 3"):
        fetch("https://images.example/a", resolve=public, transport=httpx.MockTransport(loop))


def test_body_size_is_limited_while_streaming():
    def big(request):
        return httpx.Response(200, content=b"x" * (2 << 20))

    with pytest.raises(PayloadTooLarge, match="image_url"):
        fetch("https://images.example/a", resolve=public, transport=httpx.MockTransport(big))


@given(st.ip_addresses())
def test_public_addresses_are_exactly_the_global_non_special_ones(ip):
    unwrapped = getattr(ip, "ipv4_mapped", None) or ip
    if is_public_address(str(ip)):
        assert unwrapped.is_global and not (
            unwrapped.is_private or unwrapped.is_loopback or unwrapped.is_link_local
        )
    if unwrapped.is_loopback or unwrapped.is_private or unwrapped.is_link_local:
        assert not is_public_address(str(ip))


def test_keys_new_cli_prints_the_key_once_and_its_hashed_entry(capsys):
    from visionroute.cli import main

    assert main(["keys", "new", "--tenant", "acme", "--role", "reviewer"]) == 0
    out = capsys.readouterr().out
    key = out.split("shown once, store it in the caller's secret store): ")[1].split()[0]
    assert hash_key(key) in out and f"sha256: {hash_key(key)}" in out and "tenant: acme" in out
