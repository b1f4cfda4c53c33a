"""The review page's login, CSRF, per-key rate limits and the lockout, on the HTTP app (no Ray)
and through the gRPC face's key check; the service core is the one tests/router/test_faces.py builds."""

from __future__ import annotations

import asyncio
import os

import pytest
from fastapi.testclient import TestClient

from router.auth.keys import ApiKey, Authenticator, SecurityConfig, hash_key
from router.auth.limits import KeyRateLimiter, Lockout, LockoutConfig, RateLimitConfig, RateLimited
from router.auth.sessions import SESSION_COOKIE, InvalidSession, SessionConfig, SessionSigner, load_secret
from router.grpc.ingress import GrpcEndpoints, pb
from router.http.api import app
from router.http.auth import client_address, session_from_cookies
from router.http.deps import attach
from tests.router.colour_model import solid_png
from tests.router.test_service_core import build, make_config
from visionroute.errors import ConfigError, PermissionDenied, Unauthenticated

SECRET = b"0123456789abcdef0123456789abcdef-test"
KEYS = {  # plain key -> (tenant, role, name)
    "vr_ann_reviewer": ("acme", "reviewer", "ann"),
    "vr_acme_client": ("acme", "client", "acme-app"),
    "vr_ops_admin": ("ops", "admin", "ops"),
}


def security(**overrides) -> SecurityConfig:
    keys = [ApiKey(sha256=hash_key(k), tenant=t, role=r, name=n) for k, (t, r, n) in KEYS.items()]
    return SecurityConfig(api_keys=keys, **overrides)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def service(tmp_path):
    return build(make_config(tmp_path))


@pytest.fixture
def serve(service, tmp_path, monkeypatch):
    """Attach the core behind ``security`` (secret from the environment); yield a TestClient maker."""
    monkeypatch.setenv("VISIONROUTE_SESSION_SECRET", SECRET.decode())

    def start(config: SecurityConfig | None = None, client=("203.0.113.7", 50000)) -> TestClient:
        attach(service, config or security(session=SessionConfig(secret_file=tmp_path / "unused")))
        return TestClient(app, client=client)

    return start


def login(client: TestClient, key: str = "vr_ann_reviewer") -> dict:
    response = client.post("/v1/session/login", json={"key": key})
    assert response.status_code == 200, response.json()
    return response.json()


def queue_grey_item(client: TestClient) -> str:
    grey = client.post(
        "/v1/analyze",
        files={"image": ("g.png", solid_png((128, 128, 128)), "image/png")},
        headers={"x-api-key": "vr_ops_admin"},
        data={"tenant": "acme"},
    )
    return grey.json()["review_item_id"]


# -- sessions: signing, expiry, revocation -------------------------------------------------------


def test_a_session_is_signed_expires_and_cannot_be_altered():
    signer = SessionSigner(SessionConfig(ttl_s=60), SECRET)
    digest = hash_key("vr_ann_reviewer")
    token, session = signer.issue(digest, now=1000)
    assert session.kid == digest[:32] and session.expires_at == 1060
    assert signer.verify(token, now=1059) == session  # the CSRF token is derived again, equal
    with pytest.raises(Unauthenticated, match="expired 1 s ago") as expired:
        signer.verify(token, now=1061)
    assert not isinstance(expired.value, InvalidSession)  # expiry is no guess: no lockout count
    version, payload, signature = token.split(".")
    forged_payload = payload[:-2] + ("AA" if payload[-2:] != "AA" else "BB")
    for forged in (
        f"{version}.{forged_payload}.{signature}",
        f"{version}.{payload}.{signature[::-1]}",
        f"v2.{payload}.{signature}",
        "garbage",
        f"{version}.{payload}",
    ):
        with pytest.raises(InvalidSession):
            signer.verify(forged, now=1000)
    other_server = SessionSigner(SessionConfig(ttl_s=60), b"another-secret-of-at-least-32-chars!!")
    with pytest.raises(InvalidSession, match="signature"):
        other_server.verify(token, now=1000)
    # two logins of one key are two sessions, each with its own CSRF token
    assert signer.issue(digest, now=1000)[1].csrf_token != session.csrf_token


def test_the_secret_comes_from_the_environment_or_one_shared_file(tmp_path, monkeypatch):
    config = SessionConfig(secret_env="VR_TEST_SECRET", secret_file=tmp_path / "state" / "secret")
    monkeypatch.delenv("VR_TEST_SECRET", raising=False)
    first = load_secret(config)
    assert len(first) >= 32 and load_secret(config) == first  # a second replica reads the same
    assert oct(os.stat(config.secret_file).st_mode & 0o777) == "0o600"
    assert [p.name for p in config.secret_file.parent.iterdir()] == ["secret"]  # no temporary left
    monkeypatch.setenv("VR_TEST_SECRET", "x" * 40)
    assert load_secret(config) == b"x" * 40
    monkeypatch.setenv("VR_TEST_SECRET", "short")
    with pytest.raises(ConfigError, match=r"\$VR_TEST_SECRET has 5 characters; it needs at least 32"):
        load_secret(config)


def test_a_session_ends_when_its_key_is_revoked():
    auth = Authenticator(security(), session_secret=SECRET)
    _, token, _ = auth.login("vr_ann_reviewer", client="198.51.100.1")
    principal, _ = auth.authenticate_session(token, "reviewer", client="198.51.100.1")
    assert (principal.name, principal.tenant) == ("ann", "acme")
    revoked = security()
    revoked.api_keys = [k for k in revoked.api_keys if k.name != "ann"]
    after = Authenticator(revoked, session_secret=SECRET)  # the redeployed config, same secret
    with pytest.raises(Unauthenticated, match="no longer configured"):
        after.authenticate_session(token, "reviewer", client="198.51.100.1")
    demoted = security()
    demoted.api_keys[0] = demoted.api_keys[0].model_copy(update={"role": "client"})
    with pytest.raises(PermissionDenied, match="'reviewer' role"):
        Authenticator(demoted, session_secret=SECRET).authenticate_session(token, "reviewer", client="x")


# -- the login routes and the cookie ----------------------------------------------------------------


def test_login_sets_a_strict_http_only_expiring_cookie_and_the_page_works_with_it(serve):
    client = serve()
    assert client.get("/review").status_code == 200  # the page itself needs no login ...
    assert client.get("/v1/session").status_code == 401  # ... and finds it has none
    body = login(client)
    assert body["reviewer"] == "ann" and body["tenant"] == "acme" and body["via"] == "session"
    set_cookie = client.post("/v1/session/login", json={"key": "vr_ann_reviewer"}).headers["set-cookie"]
    assert f"{SESSION_COOKIE}=v1." in set_cookie
    for attribute in ("HttpOnly", "SameSite=Strict", "Max-Age=28800", "Path=/"):
        assert attribute in set_cookie
    assert "Secure" not in set_cookie  # plain http here
    assert client.cookies.get(SESSION_COOKIE, "").startswith("v1.")  # the client keeps it
    item_id = queue_grey_item(client)
    assert client.get("/v1/review/items").json()["items"][0]["id"] == item_id  # no x-api-key sent
    assert client.get("/v1/session").json()["csrf_token"] == client.get("/v1/session").json()["csrf_token"]


def test_the_cookie_is_secure_over_https_and_behind_a_trusted_proxy(serve):
    https = serve()
    https.base_url = "https://testserver"
    assert "Secure" in https.post("/v1/session/login", json={"key": "vr_ann_reviewer"}).headers["set-cookie"]
    proxied = serve(security(trusted_proxies=["10.0.0.0/8"]), client=("10.1.2.3", 4000))
    forwarded = {"x-forwarded-proto": "https", "x-forwarded-for": "192.0.2.44, 10.9.9.9"}
    answer = proxied.post("/v1/session/login", json={"key": "vr_ann_reviewer"}, headers=forwarded)
    assert "Secure" in answer.headers["set-cookie"]
    untrusted = serve(security(), client=("10.1.2.3", 4000))  # no trusted proxies: the header is ignored
    answer = untrusted.post("/v1/session/login", json={"key": "vr_ann_reviewer"}, headers=forwarded)
    assert "Secure" not in answer.headers["set-cookie"]


def test_login_refuses_clients_keys_bad_keys_and_bad_bodies_naming_the_field(serve):
    client = serve()
    refused = client.post("/v1/session/login", json={"key": "vr_acme_client"})
    assert refused.status_code == 403 and refused.json()["field"] == "key"
    assert "'client'" in refused.json()["reason"]
    wrong = client.post("/v1/session/login", json={"key": "vr_nobody"})
    assert wrong.status_code == 401 and wrong.json()["field"] == "key"
    assert "vr_nobody" not in wrong.text  # the presented key is never echoed
    missing = client.post("/v1/session/login", json={})
    assert missing.status_code == 400 and missing.json()["field"] == "key"
    extra = client.post("/v1/session/login", json={"key": "vr_ann_reviewer", "role": "admin"})
    assert extra.status_code == 400 and extra.json()["field"] == "role"
    not_json = client.post("/v1/session/login", content=b"key=vr_ann_reviewer")
    assert not_json.status_code == 400 and not_json.json()["field"] == "body"
    huge = client.post("/v1/session/login", json={"key": "k" * 10_000})
    assert huge.status_code == 413 and huge.json()["field"] == "body"
    assert "set-cookie" not in refused.headers and "set-cookie" not in wrong.headers


def test_a_session_cookie_counts_on_the_review_routes_only(serve):
    client = serve()
    login(client, "vr_ops_admin")  # even an admin's session ...
    assert client.get("/v1/policy").status_code == 401  # ... is no key for the API at large
    analyse = client.post("/v1/analyze", files={"image": ("r.png", solid_png((255, 0, 0)), "image/png")})
    assert analyse.status_code == 401
    assert client.get("/v1/review/stats").status_code == 200


def test_logout_and_dead_cookies_are_deleted(serve):
    client = serve()
    login(client)
    out = client.post("/v1/session/logout")
    assert out.status_code == 200 and "Max-Age=0" in out.headers["set-cookie"]
    assert client.get("/v1/session").status_code == 401
    client.cookies.set(SESSION_COOKIE, "v1.e30.AAAA")
    dead = client.get("/v1/review/items")
    assert dead.status_code == 401 and dead.json()["field"] == "session"
    assert "Max-Age=0" in dead.headers["set-cookie"]
    client.cookies.set(SESSION_COOKIE, "v1.e30.AAAA")
    page = client.get("/review")  # the page still loads, to show its login form
    assert page.status_code == 200 and "login-form" in page.text
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]


def test_api_clients_with_a_key_are_unaffected(serve):
    client = serve()
    login(client)  # a cookie is there too, but the key decides and needs no CSRF token
    claimed = client.post(
        "/v1/review/claim", json={"reviewer": "ann"}, headers={"x-api-key": "vr_ann_reviewer"}
    )
    assert claimed.status_code == 200
    client.cookies.clear()
    assert (
        client.post("/v1/review/claim", json={}, headers={"x-api-key": "vr_ann_reviewer"}).status_code == 200
    )


# -- CSRF ----------------------------------------------------------------------------------------


def test_a_cookie_post_without_the_csrf_token_or_from_another_origin_is_403(serve):
    client = serve()
    csrf = login(client)["csrf_token"]
    item_id = queue_grey_item(client)
    no_token = client.post("/v1/review/claim", json={"item_id": item_id})
    assert no_token.status_code == 403 and no_token.json()["field"] == "x-csrf-token"
    wrong_token = client.post(
        "/v1/review/claim", json={"item_id": item_id}, headers={"x-csrf-token": "x" + csrf}
    )
    assert wrong_token.status_code == 403
    other_login = TestClient(app, client=("203.0.113.8", 1))
    other_csrf = login(other_login)["csrf_token"]  # another session's token is not this one's
    assert client.post("/v1/review/claim", json={}, headers={"x-csrf-token": other_csrf}).status_code == 403
    cross = client.post(
        "/v1/review/claim", json={}, headers={"x-csrf-token": csrf, "origin": "https://evil.example"}
    )
    assert cross.status_code == 403 and cross.json()["field"] == "origin"
    cross_site = client.post(
        "/v1/review/claim", json={}, headers={"x-csrf-token": csrf, "sec-fetch-site": "cross-site"}
    )
    assert cross_site.status_code == 403
    login_elsewhere = client.post(
        "/v1/session/login", json={"key": "vr_ann_reviewer"}, headers={"origin": "https://evil.example"}
    )
    assert login_elsewhere.status_code == 403 and "set-cookie" not in login_elsewhere.headers
    # nothing was claimed by the refused requests; the right token and origin work
    assert client.get(f"/v1/review/items/{item_id}").json()["lease_owner"] is None
    ok = client.post(
        "/v1/review/claim",
        json={"item_id": item_id},
        headers={"x-csrf-token": csrf, "origin": "http://testserver"},
    )
    assert ok.status_code == 200 and ok.json()["item"]["lease_owner"] == "ann"
    token = ok.json()["lease_token"]
    released = client.post(
        f"/v1/review/items/{item_id}/release", json={"lease_token": token}, headers={"x-csrf-token": csrf}
    )
    assert released.status_code == 200 and released.json()["lease_owner"] is None
    assert client.get("/v1/review/items").status_code == 200  # a GET needs no token


# -- rate limits and lockout --------------------------------------------------------------------


def test_a_key_over_its_rate_gets_429_with_retry_after_and_other_keys_do_not(serve):
    slow = RateLimitConfig(requests_per_s=0.01, burst=2)
    config = security(rate_limit=RateLimitConfig(requests_per_s=1000, burst=1000))
    config.api_keys[0] = config.api_keys[0].model_copy(update={"rate_limit": slow})  # ann's own limit
    client = serve(config)
    ann = {"x-api-key": "vr_ann_reviewer"}
    assert [client.get("/v1/review/stats", headers=ann).status_code for _ in range(2)] == [200, 200]
    limited = client.get("/v1/review/stats", headers=ann)
    assert limited.status_code == 429 and limited.json()["error"] == "RateLimited"
    assert 90 <= int(limited.headers["retry-after"]) <= 100  # one token at 0.01/s
    assert "'ann'" in limited.json()["reason"] and "vr_ann_reviewer" not in limited.text
    assert client.get("/v1/review/stats", headers={"x-api-key": "vr_ops_admin"}).status_code == 200
    client.cookies.clear()
    assert client.post("/v1/session/login", json={"key": "vr_ann_reviewer"}).status_code == 429  # same bucket


def test_the_token_bucket_refills_at_its_rate():
    clock = Clock()
    limiter = KeyRateLimiter(clock)
    limit = RateLimitConfig(requests_per_s=2, burst=3)
    for _ in range(3):
        limiter.take("k", limit, who="k")
    with pytest.raises(RateLimited) as refused:
        limiter.take("k", limit, who="k")
    assert refused.value.retry_after_s == 1  # half a second, rounded up to a whole one
    clock.now += 0.5
    limiter.take("k", limit, who="k")  # one token back
    with pytest.raises(RateLimited):
        limiter.take("k", limit, who="k")
    clock.now += 100
    for _ in range(3):  # refilled to the burst, no further
        limiter.take("k", limit, who="k")
    with pytest.raises(RateLimited):
        limiter.take("k", limit, who="k")
    limiter.take("other", limit, who="other")
    limiter.take("k", None, who="k")  # no limit configured


def test_repeated_bad_keys_lock_the_address_out_even_for_a_good_key(serve, caplog):
    config = security(lockout=LockoutConfig(max_failures=3, window_s=60, cooldown_s=120))
    client = serve(config)
    for attempt in ("vr_guess_1", "vr_guess_2"):
        assert client.get("/v1/review/items", headers={"x-api-key": attempt}).status_code == 401
    assert client.post("/v1/session/login", json={"key": "vr_guess_3"}).status_code == 401  # the 3rd
    locked = client.get("/v1/review/items", headers={"x-api-key": "vr_ann_reviewer"})
    assert locked.status_code == 429 and 110 <= int(locked.headers["retry-after"]) <= 120
    assert "too many failed authentications" in locked.json()["reason"]
    assert client.post("/v1/session/login", json={"key": "vr_ann_reviewer"}).status_code == 429
    assert client.get("/healthz").status_code == 200  # no credential, no lockout
    elsewhere = TestClient(app, client=("198.51.100.9", 1))  # another address: unaffected
    assert elsewhere.get("/v1/review/items", headers={"x-api-key": "vr_ann_reviewer"}).status_code == 200
    logged = caplog.text
    assert "locked out client 203.0.113.7" in logged
    assert not any(guess in logged for guess in ("vr_guess", "vr_ann_reviewer"))  # keys never logged


def test_forged_cookies_count_towards_the_lockout(serve):
    client = serve(security(lockout=LockoutConfig(max_failures=2, window_s=60, cooldown_s=60)))
    for _ in range(2):
        client.cookies.set(SESSION_COOKIE, "v1.eyJraWQiOiJ4In0.bm90LWEtc2lnbmF0dXJl")
        assert client.get("/v1/review/items").status_code == 401
    client.cookies.clear()
    assert client.get("/v1/review/items", headers={"x-api-key": "vr_ann_reviewer"}).status_code == 429


def test_the_lockout_window_and_cooldown():
    clock = Clock()
    lockout = Lockout(LockoutConfig(max_failures=3, window_s=10, cooldown_s=30), clock)
    lockout.failed("a")
    lockout.failed("a")
    clock.now += 11  # both fell out of the window
    lockout.failed("a")
    lockout.failed("a")
    lockout.check("a")  # 2 within the window: still allowed
    lockout.failed("a")
    with pytest.raises(RateLimited) as locked:
        lockout.check("a")
    assert locked.value.retry_after_s == 30
    lockout.check("b")
    clock.now += 30
    lockout.check("a")  # the cool-down is over, and the count starts again
    assert not lockout.is_locked("a")
    Lockout(None, clock).failed("a")  # lockout: null turns it off


def test_the_client_address_believes_forwarded_for_only_from_trusted_proxies():
    trusted = SecurityConfig(trusted_proxies=["10.0.0.0/8"]).trusted_proxies
    forwarded = [("x-forwarded-for", "192.0.2.1, 198.51.100.5, 10.0.0.2")]
    assert client_address({"client": ("10.0.0.1", 1)}, forwarded, trusted) == "198.51.100.5"
    assert client_address({"client": ("203.0.113.1", 1)}, forwarded, trusted) == "203.0.113.1"
    assert client_address({"client": ("10.0.0.1", 1)}, [], trusted) == "10.0.0.1"
    assert client_address({"client": ("::1", 1)}, forwarded, []) == "::1"
    assert session_from_cookies([("cookie", f"a=b; {SESSION_COOKIE}=v1.x.y; c=d")]) == "v1.x.y"
    assert session_from_cookies([("cookie", "a=b")]) is None


# -- the gRPC face shares the limits ------------------------------------------------------------------


class FakeGrpcContext:
    def __init__(self, key: str, peer: str = "ipv4:192.0.2.77:5555") -> None:
        self.key, self._peer, self.code, self.details, self.trailing = key, peer, None, None, []

    def request_id(self) -> str:
        return "grpc-test"

    def invocation_metadata(self):
        return [("x-api-key", self.key)]

    def peer(self) -> str:
        return self._peer

    def set_code(self, code) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def set_trailing_metadata(self, metadata) -> None:
        self.trailing = list(metadata)


def test_grpc_calls_count_towards_the_same_lockout_and_rate_limit(service):
    import grpc
    from ray.serve.context import _RequestContext, _serve_request_context

    from router.serve_context import serve_client_address

    endpoints = GrpcEndpoints()
    endpoints.service = service
    endpoints.authenticator = Authenticator(  # as router.serve_context.make_authenticator builds it
        security(lockout=LockoutConfig(max_failures=2, window_s=60, cooldown_s=60)),
        session_secret=SECRET,
        client_address=serve_client_address,
    )

    def stats(key: str, client: str = "", peer: str = "ipv4:192.0.2.77:5555") -> FakeGrpcContext:
        context = FakeGrpcContext(key, peer)
        _serve_request_context.set(_RequestContext(_client=client, grpc_context=context))
        asyncio.run(endpoints.GetReviewStats(pb.Empty(), context))
        return context

    assert stats("vr_ann_reviewer", "192.0.2.77:5555").code is None  # served
    assert stats("vr_bad_1", "192.0.2.77:5555").code == grpc.StatusCode.UNAUTHENTICATED
    assert stats("vr_bad_2", "").code == grpc.StatusCode.UNAUTHENTICATED  # the peer names it
    locked = stats("vr_ann_reviewer", "192.0.2.77:5555")
    assert locked.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "too many failed" in locked.details
    assert locked.trailing and locked.trailing[0][0] == "retry-after" and int(locked.trailing[0][1]) >= 59
    assert stats("vr_ann_reviewer", "[2001:db8::1]:80").code is None  # another address
    assert endpoints.authenticator.lockout.is_locked("192.0.2.77")
