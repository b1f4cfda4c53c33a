"""Budgets, policy changes and the human-review loop against the real service on Ray Serve.

One local Ray cluster (2 CPUs, no dashboard) serves ``router.app:build_app`` on a free port,
deployed the way ``serve deploy`` does it (a declarative config), so a changed Ingress
``user_config`` reaches the running replica through ``reconfigure``. The service has API keys
on, as a shared deployment must: the API calls send a key (each reviewer's own, since the key
is the reviewer), and the browser logs in to the review page with a reviewer's key.
"""

from __future__ import annotations

import asyncio
import io
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from router.auth.keys import hash_key
from tests.support.ports import free_port
from tests.support.service import warm_up_service

pytestmark = [pytest.mark.server, pytest.mark.slow]

KEYS = {  # name -> (tenant, role, plain key); the service sees only the hashes
    "ops": ("ops", "admin", "vr_ops_" + uuid.uuid4().hex),
    # reviewers of every tenant's items (budget, audit and contention tests)
    **{name: ("ops", "admin", f"vr_{name}_" + uuid.uuid4().hex) for name in ("eve", "ann", "bob", "dan")},
    "carol": ("browser", "reviewer", "vr_carol_" + uuid.uuid4().hex),  # logs in to the page
    "lena": ("leases", "reviewer", "vr_lena_" + uuid.uuid4().hex),  # walks away from the page
}


LOCKOUT = {"max_failures": 5, "window_s": 60, "cooldown_s": 3}


def key(name: str = "ops") -> dict[str, str]:
    return {"x-api-key": KEYS[name][2]}


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LOADTEST_WINDOW_S = 366 * 86400
BUDGETS = [
    {
        "name": "loadtest",
        "tenant": "loadtest",
        "tiers": ["onnx"],
        # Windows are aligned to the epoch: with 3600 s, a run crossing the hour served 10 in each
        # window (20 of 50). The longest window makes a boundary inside the test all but impossible.
        "window_s": LOADTEST_WINDOW_S,
        "cap_units": 10,
        "degrade": "reject",
    },
    {  # room for one request: a resend under its X-Request-Id must not take a second unit
        "name": "retries",
        "tenant": "retries",
        "tiers": ["onnx"],
        "window_s": LOADTEST_WINDOW_S,
        "cap_units": 1,
        "degrade": "reject",
    },
    {
        "name": "to-review",
        "tenant": "broke-review",
        "tiers": ["onnx"],
        "window_s": 3600,
        "cap_units": 0,
        "degrade": "review",
    },
    {
        "name": "no-reviewers",
        "tenant": "broke-accept",
        "tiers": ["review"],
        "window_s": 3600,
        "cap_units": 0,
        "degrade": "accept_degraded",
    },
]


def noise_png(seed: int, size: int = 96) -> bytes:
    pixels = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def policy_set(version: str = "policies-v1", **overrides) -> dict:
    return {
        "version": version,
        "budgets": BUDGETS,
        "costs": {"review_units_per_minute": 2.0, "expected_review_minutes": 0.5},
        "review": {"error_cost_units": {"classify": 10.0}, "sla_s": 600},
        **overrides,
    }


class Service:
    def __init__(self, port: int, args: dict) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.args = args

    def deploy(
        self, user_config: dict | None = None, *, expect_running: bool = True, timeout_s: float = 120
    ) -> str:
        from ray import serve
        from ray.serve.context import _get_global_client
        from ray.serve.schema import ServeDeploySchema

        app = {
            "name": "visionroute",
            "route_prefix": "/",
            "import_path": "router.app:build_app",
            "args": self.args,
        }
        if user_config is not None:
            app["deployments"] = [{"name": "Ingress", "user_config": user_config}]
        _get_global_client().deploy_apps(ServeDeploySchema.model_validate({"applications": [app]}))
        deadline = time.monotonic() + timeout_s
        status = "?"
        while time.monotonic() < deadline:
            time.sleep(0.5)
            app_status = serve.status().applications.get("visionroute")
            status = app_status.status if app_status else "?"
            if status == "RUNNING" and expect_running:
                return status
            if status in ("DEPLOY_FAILED", "UNHEALTHY") and not expect_running:
                return status
        return status

    def analyze(self, image: bytes, **fields) -> httpx.Response:
        return httpx.post(
            self.url + "/v1/analyze",
            files={"image": ("x.png", image, "image/png")},
            data=fields,
            headers=key(),
            timeout=60,
        )

    def policy(self) -> dict:
        return httpx.get(self.url + "/v1/policy", headers=key(), timeout=10).json()


@pytest.fixture(scope="module")
def service(prepared_models_dir, tmp_path_factory):
    import ray
    from ray import serve

    workdir = tmp_path_factory.mktemp("review-loop")
    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {
        "models_dir": str(prepared_models_dir),
        "review": {"path": str(workdir / "review"), "lease_s": 60},
        "cascades": {
            "classify": {
                "tier": {"model": "efficientnet_lite0", "cost_units": 1.0},
                "num_cpus": 0.5,
                "policy": {"version": "classify-v1", "accept_threshold": 0.7, "escalate_threshold": 0.3},
            }
        },
        "policies": policy_set(),
        "ingress_num_cpus": 0.25,
        "retrieval": {"enabled": False},  # no test here searches: a search replica less to start
        "security": {
            "api_keys": [
                {"sha256": hash_key(k), "tenant": t, "role": r, "name": n} for n, (t, r, k) in KEYS.items()
            ],
            "session": {"secret_file": str(workdir / "session_secret")},
            "lockout": LOCKOUT,
        },
    }
    svc = Service(port, args)
    svc.workdir = workdir
    assert svc.deploy() == "RUNNING"
    for _ in range(240):
        if httpx.get(svc.url + "/readyz", timeout=10).status_code == 200:
            break
        time.sleep(0.25)
    # real read-only requests: the first one through a fresh app is slow
    warm_up_service(svc.url, search=False, headers=key())
    yield svc
    serve.shutdown()
    ray.shutdown()


# -- budgets -----------------------------------------------------------------------------------


def test_fifty_concurrent_requests_never_overspend_a_small_budget(service, photos_png):
    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120, headers=key()) as client:
            files = lambda: {"image": ("c.png", photos_png["coffee"], "image/png")}  # noqa: E731
            return await asyncio.gather(
                *[
                    client.post(service.url + "/v1/analyze", files=files(), data={"tenant": "loadtest"})
                    for _ in range(50)
                ]
            )

    responses = asyncio.run(fire())
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) == 10 and codes.count(429) == 40, codes
    refused = next(r for r in responses if r.status_code == 429)
    assert 1 <= int(refused.headers["retry-after"]) <= LOADTEST_WINDOW_S
    assert (
        refused.json()["field"] == "budget:loadtest" and "has used 10 of 10 units" in refused.json()["reason"]
    )
    budget = next(b for b in service.policy()["budgets"] if b["name"] == "loadtest")
    overspend = budget["used_units"] - budget["cap_units"]
    print(
        f"\nFIGURE overspend under 50 concurrent requests: {overspend:g} units (cap {budget['cap_units']:g}, "
        f"used {budget['used_units']:g}, {codes.count(200)} served, {codes.count(429)} refused)"
    )
    assert overspend <= 0 and budget["used_units"] == 10
    metrics = httpx.get(service.url + "/metrics", headers=key()).text
    assert 'visionroute_cost_units_total{feature="classify",tenant="loadtest",tier="onnx"} 10.0' in metrics
    assert 'visionroute_budget_refusals_total{budget="loadtest",degrade="reject"} 40.0' in metrics


def test_a_resent_request_is_charged_once(service, photos_png):
    request_id = "retry-" + uuid.uuid4().hex[:8]

    def send(rid: str) -> httpx.Response:
        return httpx.post(
            service.url + "/v1/analyze",
            files={"image": ("c.png", photos_png["coffee"], "image/png")},
            data={"tenant": "retries"},
            headers={**key(), "x-request-id": rid},
            timeout=60,
        )

    first, resent = send(request_id), send(request_id)
    assert (first.status_code, resent.status_code) == (200, 200), resent.text
    assert resent.json()["request_id"] == request_id
    assert send(request_id + "-other").status_code == 429  # a new request id is a new charge
    budget = next(b for b in service.policy()["budgets"] if b["name"] == "retries")
    assert budget["used_units"] == 1.0


def test_degrade_modes_review_and_accept_degraded(service, photos_png):
    to_review = service.analyze(photos_png["coffee"], tenant="broke-review").json()
    assert to_review["decision"] == "review" and to_review["degraded"] and to_review["answer"] == []
    assert [s["stage"] for s in to_review["trace"]["steps"]][-3:] == [
        "policy:budget",
        "privacy:redact",
        "review_queue",
    ]
    item_id = to_review["review_item_id"]
    assert httpx.get(f"{service.url}/v1/review/items/{item_id}", headers=key()).json()["kind"] == "budget"
    claim = httpx.post(
        service.url + "/v1/review/claim", json={"reviewer": "eve", "item_id": item_id}, headers=key("eve")
    ).json()
    label = {
        "reviewer": "eve",
        "lease_token": claim["lease_token"],
        "verdict": "correct",
        "label": "espresso",
    }
    assert (
        httpx.post(
            f"{service.url}/v1/review/items/{item_id}/label", json=label, headers=key("eve")
        ).status_code
        == 200
    )
    accepted = service.analyze(
        photos_png["astronaut"], tenant="broke-accept"
    ).json()  # unsure: would go to review
    assert accepted["decision"] == "accept" and accepted["degraded"] and accepted["review_item_id"] is None
    step = accepted["trace"]["steps"][-1]
    assert step["stage"] == "policy:budget" and step["policy_version"] == "policies-v1"
    assert step["details"]["budget"] == "no-reviewers"


# -- the review queue over HTTP -------------------------------------------------------------------


def test_contention_expired_lease_and_label_outside_the_set(service):
    item_id = service.analyze(noise_png(1000)).json()["review_item_id"]
    assert item_id

    async def race():
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(
                *[
                    client.post(
                        service.url + "/v1/review/claim",
                        json={"reviewer": who, "item_id": item_id, "lease_s": 1},
                        headers=key(who),
                    )
                    for who in ("ann", "bob")
                ]
            )

    first, second = asyncio.run(race())
    assert sorted([first.status_code, second.status_code]) == [200, 409]
    winner = first if first.status_code == 200 else second
    loser = second if winner is first else first
    assert "is leased by" in loser.json()["reason"]
    owner, token = winner.json()["item"]["lease_owner"], winner.json()["lease_token"]
    label_url = f"{service.url}/v1/review/items/{item_id}/label"
    outside = httpx.post(
        label_url,
        json={"reviewer": owner, "lease_token": token, "verdict": "correct", "label": "unicorn"},
        headers=key(owner),
    )
    assert outside.status_code == 400 and outside.json()["field"] == "label"
    assert "not in task 'classify'" in outside.json()["reason"]
    time.sleep(1.3)  # the 1 s lease runs out
    late = httpx.post(
        label_url, json={"reviewer": owner, "lease_token": token, "verdict": "confirm"}, headers=key(owner)
    )
    assert late.status_code == 409 and "expired" in late.json()["reason"]
    item = httpx.get(f"{service.url}/v1/review/items/{item_id}", headers=key()).json()
    assert item["status"] == "pending" and item["label"] is None
    again = httpx.post(
        service.url + "/v1/review/claim", json={"reviewer": "bob", "item_id": item_id}, headers=key("bob")
    ).json()
    assert again["item"]["lease_owner"] == "bob"
    ok = httpx.post(
        label_url,
        json={
            "reviewer": "bob",
            "lease_token": again["lease_token"],
            "verdict": "correct",
            "label": "jigsaw puzzle",
        },
        headers=key("bob"),
    )
    assert ok.status_code == 200 and ok.json()["label"]["label"] == "jigsaw puzzle"
    actions = [
        e["action"]
        for e in httpx.get(f"{service.url}/v1/review/items/{item_id}/audit", headers=key()).json()["events"]
    ]
    assert actions == ["enqueue", "claim", "lease_expired", "claim", "label"]


def ray_logs() -> str:
    import ray

    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())  # this test's cluster
    return "\n".join(f.read_text(errors="replace") for f in logs.rglob("*") if f.is_file())


def test_repeated_bad_keys_lock_the_address_out_and_no_key_is_logged(service):
    guesses = [f"vr_guess_{uuid.uuid4().hex}" for _ in range(LOCKOUT["max_failures"])]
    items = service.url + "/v1/review/items"
    assert [httpx.get(items, headers={"x-api-key": g}).status_code for g in guesses] == [401] * len(guesses)
    locked = httpx.get(items, headers=key())  # the right key too, while the cool-down lasts
    assert locked.status_code == 429 and locked.json()["error"] == "RateLimited"
    assert 1 <= int(locked.headers["retry-after"]) <= LOCKOUT["cooldown_s"]
    assert httpx.get(service.url + "/healthz").status_code == 200  # no credential: not locked out
    time.sleep(int(locked.headers["retry-after"]) + 0.5)
    assert httpx.get(items, headers=key()).status_code == 200
    logs = ray_logs()
    assert "locked out client 127.0.0.1" in logs  # the replica saw the caller's real address
    leaked = [g for g in guesses if g in logs] + [n for n, (_, _, k) in KEYS.items() if k in logs]
    assert not leaked, f"keys in the Ray logs: {leaked}"


# -- the web page in headless Chromium ---------------------------------------------------------------


def wait_until(page, expression: str, timeout_s: float = 20.0) -> None:
    """Poll ``expression`` in the page. (Playwright's wait_for_function evaluates a string,
    which the page's Content-Security-Policy forbids; page.evaluate goes through DevTools.)"""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            state = page.evaluate(
                "JSON.stringify({...document.body.dataset, focus: document.activeElement && document.activeElement.id})"
            )
            raise AssertionError(
                f"page never reached {expression}: {state}; message {page.inner_text('#message')!r}"
            )
        time.sleep(0.02)


@pytest.fixture(scope="module")
def playwright(missing_server):
    """Playwright's sync API, with Debian's Chromium to drive (scripts/browser_deps.sh). Missing,
    the browser tests skip, or fail under VISIONROUTE_REQUIRE_SERVERS=1 (the full run)."""
    if not Path(CHROMIUM).exists():
        missing_server(f"{CHROMIUM} is missing: scripts/browser_deps.sh installs it")
    try:
        from playwright import sync_api
    except ImportError as error:
        missing_server(f"playwright is not installed ({error}): it is in the test dependencies")
    return sync_api


def test_browser_reviewer_logs_in_skips_labels_and_items_leave_the_queue(playwright, service):
    n_items = 15
    ids = [
        service.analyze(noise_png(2000 + i), tenant="browser").json()["review_item_id"]
        for i in range(n_items)
    ]
    assert all(ids)
    carol_items = service.url + "/v1/review/items?limit=1000"
    pending_before = len(httpx.get(carol_items, headers=key("carol")).json()["items"])  # her tenant's
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(service.url + "/review")  # no key, no cookie: the page asks for a login
        page.wait_for_selector("body[data-state=login]")
        page.fill("#key", KEYS["ops"][2][:-1])  # a mistyped key
        page.keyboard.press("Enter")
        wait_until(page, "document.getElementById('login-message').textContent.includes('401')")
        page.fill("#key", KEYS["carol"][2])
        page.keyboard.press("Enter")
        page.wait_for_selector("body[data-state=idle]")
        assert page.inner_text("#who").startswith("carol")
        cookie = next(c for c in page.context.cookies() if c["name"] == "vr_session")
        assert (
            cookie["httpOnly"] and cookie["sameSite"] == "Strict" and KEYS["carol"][2] not in cookie["value"]
        )
        # a cookie-authenticated POST without the page's CSRF token is refused
        forged = page.request.post(service.url + "/v1/review/claim", data={})
        assert forged.status == 403 and forged.json()["field"] == "x-csrf-token"
        started = time.perf_counter()
        page.keyboard.press("n")  # nothing is claimed until the reviewer asks
        page.wait_for_selector("body[data-state=item]")
        assert page.locator("#canvas").get_attribute("data-boxes") == "1"  # the top label drawn on the image
        assert page.locator("#reason").inner_text() and "yours for" in page.inner_text("#lease")
        # skip the first item: it goes back to the queue and is passed over for now
        skipped = page.get_attribute("body", "data-item")
        page.keyboard.press("s")
        wait_until(
            page, f"document.body.dataset.item !== '{skipped}' && document.body.dataset.state === 'item'"
        )
        held = httpx.get(f"{service.url}/v1/review/items/{skipped}", headers=key("carol")).json()
        assert held["lease_owner"] is None and held["status"] == "pending"
        # next item: the keyboard (confirm); then a correction typed into the label box; rest: keys c / r
        first = page.get_attribute("body", "data-item")
        page.keyboard.press("c")
        wait_until(
            page, f"document.body.dataset.item !== '{first}' && document.body.dataset.state === 'item'"
        )
        page.keyboard.press("x")
        page.keyboard.type("unicorn")
        page.keyboard.press("Enter")
        assert "not in this task's label set" in page.locator("#message").inner_text()
        page.fill("#label", "jigsaw puzzle")
        page.keyboard.press("Enter")
        wait_until(page, "document.body.dataset.labelled === '2' && document.body.dataset.state !== 'busy'")
        done = 2
        seen = set()
        while page.get_attribute("body", "data-state") == "item":
            seen.add(page.get_attribute("body", "data-item"))
            page.keyboard.press("c" if done % 3 else "r")
            done += 1
            wait_until(
                page, f"document.body.dataset.labelled === '{done}' && document.body.dataset.state !== 'busy'"
            )
        assert skipped not in seen  # passed over while others waited
        page.wait_for_selector("body[data-state=skipped-only]")
        page.keyboard.press("n")  # only the skipped one is left: now it is offered
        page.wait_for_selector("body[data-state=item]")
        assert page.get_attribute("body", "data-item") == skipped
        page.keyboard.press("c")
        done += 1
        page.wait_for_selector("body[data-state=empty]")
        elapsed = time.perf_counter() - started
        page.click("#logout")
        page.wait_for_selector("body[data-state=login]")
        assert page.request.get(service.url + "/v1/session").status == 401  # the cookie is gone
        browser.close()
    assert not errors, errors
    assert done == pending_before >= n_items
    print(
        f"\nFIGURE review throughput in headless Chromium: {done / elapsed * 60:.0f} items/min ({done} items in {elapsed:.1f} s)"
    )
    after = httpx.get(carol_items, headers=key("carol")).json()
    assert after["items"] == []
    labelled = {
        i["id"]: i for i in httpx.get(carol_items + "&status=labelled", headers=key("carol")).json()["items"]
    }
    assert set(ids) <= set(labelled) and {labelled[i]["labelled_by"] for i in ids} == {"carol"}
    events = httpx.get(f"{service.url}/v1/review/items/{skipped}/audit", headers=key("carol")).json()[
        "events"
    ]
    assert [e["action"] for e in events] == ["enqueue", "claim", "release", "claim", "label"]
    assert {e["actor"] for e in events if e["action"] != "enqueue"} == {"carol"}


def test_browser_holds_an_item_only_while_the_reviewer_is_there(playwright, service):
    """The page's clock is Playwright's: minutes pass in an instant, the server's do not."""
    for i in range(2):
        assert service.analyze(noise_png(3000 + i), tenant="leases").json()["review_item_id"]

    def audit(item_id: str) -> list[str]:
        events = httpx.get(f"{service.url}/v1/review/items/{item_id}/audit", headers=key("lena")).json()
        return [e["action"] for e in events["events"]]

    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.clock.install()
        page.goto(service.url + "/review")
        page.wait_for_selector("body[data-state=login]")
        page.fill("#key", KEYS["lena"][2])
        page.keyboard.press("Enter")
        page.wait_for_selector("body[data-state=idle]")
        assert httpx.get(service.url + "/v1/review/items", headers=key("lena")).json()["leased"] == 0
        page.keyboard.press("n")
        page.wait_for_selector("body[data-state=item]")
        first = page.get_attribute("body", "data-item")
        page.clock.run_for(60_000)
        page.mouse.move(10, 10)  # at work: near the end of the lease, the page renews it
        page.clock.run_for(35_000)
        wait_until(page, "document.getElementById('lease').textContent.startsWith('yours for 1')")
        assert audit(first) == ["enqueue", "claim", "claim"]
        page.clock.run_for(200_000)  # away: no renewal; the page lets the item go
        page.wait_for_selector("body[data-state=expired]")
        assert audit(first) == ["enqueue", "claim", "claim"] and page.locator("#confirm").is_disabled()
        page.keyboard.press("n")
        page.wait_for_selector("body[data-state=item]")
        second = page.get_attribute("body", "data-item")
        assert second != first  # the first is still leased on the server's clock
        # Leaving the page gives the item back. Navigating away rather than closing the tab keeps
        # the renderer alive, so a slow machine cannot stop it before the release is sent.
        page.goto("about:blank")
        deadline = time.monotonic() + 90  # generous: a busy CI machine answers slowly
        while audit(second)[-1] != "release" and time.monotonic() < deadline:
            time.sleep(0.1)
        browser.close()
    assert audit(second) == ["enqueue", "claim", "release"]
    assert (
        httpx.get(f"{service.url}/v1/review/items/{second}", headers=key("lena")).json()["lease_owner"]
        is None
    )


# -- labels back out as a calibration set -------------------------------------------------------------


def test_reviewed_labels_export_and_calibrate(service, prepared_models_dir, tmp_path):
    from visionroute.cli import main

    out = tmp_path / "export"
    assert (
        main(
            [
                "review",
                "export",
                "--path",
                str(service.workdir / "review"),
                "--task",
                "classify",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = (out / "labels.csv").read_text().splitlines()
    assert len(rows) - 1 >= 10
    artefact = tmp_path / "reviewed.json"
    model = next(Path(prepared_models_dir).rglob("efficientnet_lite0*.onnx"))
    code = main(
        [
            "calibrate",
            "--images",
            str(out / "images"),
            "--labels",
            str(out / "labels.csv"),
            "--model",
            str(model),
            "--method",
            "temperature",
            "--out",
            str(artefact),
        ]
    )
    assert code == 0 and artefact.is_file()
    from cascades.calibration import load_calibration

    calibrator = load_calibration(artefact)
    assert calibrator.artifact.n_samples >= 2 and calibrator.artifact.temperature > 0


# -- policy changes at run time ---------------------------------------------------------------------------


def test_reconfigure_applies_without_restart_and_invalid_change_is_refused(service, photos_png):
    before = service.policy()
    changed = policy_set(
        "policies-v2",
        thresholds={
            "classify": {"version": "classify-v2", "accept_threshold": 0.95, "escalate_threshold": 0.3}
        },
    )
    assert service.deploy(changed) == "RUNNING"
    after = service.policy()
    assert after["version"] == "policies-v2" and after["replica_pid"] == before["replica_pid"]
    body = service.analyze(photos_png["chelsea"]).json()  # 0.76 < 0.95 now: review
    assert body["policy_version"] == "policies-v2" and body["decision"] == "review"
    thresholds = next(s for s in body["trace"]["steps"] if s["stage"] == "policy:thresholds")
    assert thresholds["policy_version"] == "classify-v2" and thresholds["threshold"]["accept"] == 0.95

    bad = policy_set("policies-v3", budgets=[{"name": "neg", "window_s": 60, "cap_units": -5}])
    assert service.deploy(bad) == "RUNNING"  # still serving, on the old set
    current = service.policy()
    assert current["version"] == "policies-v2" and current["replica_pid"] == before["replica_pid"]
    rejected = [h for h in current["history"] if h["result"] == "rejected"]
    assert rejected and "budgets.0.cap_units" in rejected[-1]["error"]
    metrics = httpx.get(service.url + "/metrics", headers=key()).text
    assert 'visionroute_policy_reconfigurations_total{result="rejected"}' in metrics
    assert service.analyze(photos_png["chelsea"]).json()["policy_version"] == "policies-v2"


def test_audit_samples_accepts_and_alerts_when_the_bound_exceeds_alpha(service, photos_png):
    audited = policy_set(
        "policies-v4",
        thresholds={
            "classify": {"version": "classify-v4", "accept_threshold": 0.5, "escalate_threshold": 0.3}
        },
        audit={"fraction": 1.0, "min_labelled": 3, "alpha": 0.05},
    )
    assert service.deploy(audited) == "RUNNING" and service.policy()["version"] == "policies-v4"
    accepted = service.analyze(photos_png["coffee"]).json()
    assert accepted["decision"] == "accept"
    audit_step = accepted["trace"]["steps"][-1]
    assert audit_step["stage"] == "review_queue:audit" and audit_step["decision"] is None
    for i in range(3):
        if i:
            service.analyze(photos_png["coffee"])
        claim = httpx.post(
            service.url + "/v1/review/claim", json={"reviewer": "dan"}, headers=key("dan")
        ).json()
        while claim["item"]["kind"] != "audit":  # label anything else in the way
            httpx.post(
                f"{service.url}/v1/review/items/{claim['item']['id']}/label",
                json={"reviewer": "dan", "lease_token": claim["lease_token"], "verdict": "reject"},
                headers=key("dan"),
            )
            claim = httpx.post(
                service.url + "/v1/review/claim", json={"reviewer": "dan"}, headers=key("dan")
            ).json()
        wrong = {"reviewer": "dan", "lease_token": claim["lease_token"], "verdict": "correct", "label": "cup"}
        assert (
            httpx.post(
                f"{service.url}/v1/review/items/{claim['item']['id']}/label", json=wrong, headers=key("dan")
            ).status_code
            == 200
        )
    audit = httpx.get(service.url + "/v1/review/stats", headers=key()).json()["audit"]["classify"]
    assert audit["labelled"] == 3 and audit["errors"] == 3 and audit["alert"] and audit["lower_bound"] > 0.05
    assert (
        'visionroute_audit_alert{task="classify"} 1.0'
        in httpx.get(service.url + "/metrics", headers=key()).text
    )
