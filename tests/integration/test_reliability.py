"""Faults and overload against the real service (loopback, bounded in time).

- a replica killed under load: Ray restarts it; each request succeeded or got a retryable
  error; every acknowledged review item is stored;
- the whole service killed with SIGKILL while items are enqueued: after a restart every
  acknowledged item is in the queue exactly once;
- an open-loop load test: the sustainable rate (p99 < 500 ms), then twice that: the service
  sheds (503 + Retry-After) instead of timing out, and recovers when the load drops.

Figures are printed (run with -s) and written to <tmp>/reliability.json.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.integration.serve_process import ServeProcess

pytestmark = [pytest.mark.server, pytest.mark.slow]
RETRYABLE = {503, 429}


def jpeg(png: bytes, size: int = 224) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").resize((size, size)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


async def one(client: httpx.AsyncClient, image: bytes, request_id: str) -> dict:
    started = time.perf_counter()
    try:
        response = await client.post(
            "/v1/analyze",
            files={"image": ("x.jpg", image, "image/jpeg")},
            headers={"x-request-id": request_id},
        )
        body = response.json() if response.status_code == 200 else {}
        return {
            "status": response.status_code,
            "latency_s": time.perf_counter() - started,
            "retry_after": response.headers.get("retry-after"),
            "item": body.get("review_item_id"),
            "request_id": request_id,
        }
    except httpx.HTTPError as exc:
        return {
            "status": type(exc).__name__,
            "latency_s": time.perf_counter() - started,
            "request_id": request_id,
        }


async def open_loop(url: str, image: bytes, rate_per_s: float, duration_s: float, during=None) -> list[dict]:
    """Requests started at a fixed rate whatever the answers (open loop: overload shows)."""
    limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
    async with httpx.AsyncClient(base_url=url, timeout=30.0, limits=limits) as client:
        tasks, started = [], time.perf_counter()
        for i in range(int(rate_per_s * duration_s)):
            delay = started + i / rate_per_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if during is not None and i == int(rate_per_s * duration_s) // 2:
                during()
            tasks.append(asyncio.create_task(one(client, image, f"load-{uuid.uuid4().hex}")))
        return list(await asyncio.gather(*tasks))


def summary(results: list[dict], rate: float) -> dict:
    ok = [r["latency_s"] for r in results if r["status"] == 200]
    return {
        "offered_rps": rate,
        "requests": len(results),
        "ok": len(ok),
        "shed": sum(r["status"] in RETRYABLE for r in results),
        "other": sorted(
            {str(r["status"]) for r in results if r["status"] != 200 and r["status"] not in RETRYABLE}
        ),
        "p50_ms": round(1000 * float(np.percentile(ok, 50)), 1) if ok else None,
        "p99_ms": round(1000 * float(np.percentile(ok, 99)), 1) if ok else None,
        "p99_all_ms": round(1000 * float(np.percentile([r["latency_s"] for r in results], 99)), 1),
    }


@pytest.fixture(scope="module")
def service(default_service):
    """The session's shared service (tests/integration/conftest.py); the kill -9 test starts its own."""
    return default_service


@pytest.fixture(scope="module")
def figures(service):
    collected: dict = {}
    yield collected
    (service.workdir / "reliability.json").write_text(json.dumps(collected, indent=2))
    print("\nreliability figures:", json.dumps(collected, indent=2))


# Step lengths for the suite (issue 21: suite time; were 4, 8 and 4 s). At twice the sustainable
# rate the bounded queue fills within seconds (seen: a 4 s step at 2x shed 10 of 80 requests),
# so 5 s still shows shedding instead of timeouts; sustained load with faults over minutes is
# `visionroute bench soak` (docs/soak.md).
STEP_S, OVERLOAD_S, RECOVERY_S = 2.5, 5.0, 3.0


def test_load_sheds_at_twice_the_sustainable_rate_and_recovers(service, photos_png, figures):
    image = jpeg(photos_png["coffee"])
    asyncio.run(open_loop(service.url, image, 5, 2.0))  # warm-up: first batches, connections
    # The sustainable rate is measured, never asserted: the highest step served whole with p99
    # under 500 ms (the steps stop at the first one over it), or on a machine too busy for
    # that, the highest step served whole.
    sustainable, served_whole, steps = 0.0, 0.0, []
    for rate in (5, 10, 20, 30, 45, 60):
        step = summary(asyncio.run(open_loop(service.url, image, rate, STEP_S)), rate)
        steps.append(step)
        if step["ok"] != step["requests"]:
            break
        served_whole = rate
        if step["p99_ms"] < 500:
            sustainable = rate
        elif sustainable:
            break  # past the knee: higher steps only queue longer
    sustainable = sustainable or served_whole
    assert sustainable >= 5, steps  # 5 requests/s are served, if slowly
    time.sleep(1)
    overload = summary(
        asyncio.run(open_loop(service.url, image, 2 * sustainable, OVERLOAD_S)), 2 * sustainable
    )
    figures.update({"steps": steps, "sustainable_rps": sustainable, "at_2x": overload})
    assert overload["other"] == [], overload  # no timeouts, no 500s: served or shed
    results_ok = overload["ok"] + overload["shed"] == overload["requests"]
    assert results_ok and overload["p99_all_ms"] < 10_000, overload
    time.sleep(2)
    recovered = summary(
        asyncio.run(open_loop(service.url, image, sustainable / 2, RECOVERY_S)), sustainable / 2
    )
    figures["recovered"] = recovered
    # recovered: every request served again, none shed (its latency is in the figures only)
    assert recovered["ok"] == recovered["requests"] and recovered["shed"] == 0, recovered


def test_overload_answers_503_with_retry_after(service, photos_png):
    image = jpeg(photos_png["coffee"])
    results = asyncio.run(open_loop(service.url, image, 400, 1.0))  # a burst far over the bounded queue
    shed = [r for r in results if r["status"] in RETRYABLE]
    assert shed, summary(results, 400)
    assert all(r["retry_after"] == "1" for r in shed)
    assert all(r["status"] in (200, *RETRYABLE) for r in results), summary(results, 400)


def replica_processes(service: ServeProcess, deployment: str) -> list[int]:
    """PIDs of this service's replica actors of one deployment (its own session: never
    another cluster on the machine). Reads /proc: Linux only, like the CI machines."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if (
                os.getsid(int(entry.name)) == service.process.pid
                and f"ServeReplica:visionroute:{deployment}" in cmdline
            ):
                found.append(int(entry.name))
        except (OSError, ProcessLookupError):
            continue
    return found


def test_a_replica_killed_under_load_loses_nothing_acknowledged(service, photos_png, figures):
    victims = replica_processes(service, "onnx_classify")
    assert victims, "no onnx_classify replica process found"
    image = jpeg(photos_png["astronaut"])  # unsure: every success is a review item

    results = asyncio.run(
        open_loop(
            service.url, image, 10, 8.0, during=lambda: [os.kill(pid, signal.SIGKILL) for pid in victims]
        )
    )
    statuses = {str(r["status"]) for r in results}
    ok = [r for r in results if r["status"] == 200]
    failed = [r for r in results if r["status"] != 200]
    figures["replica_kill"] = {
        "requests": len(results),
        "ok": len(ok),
        "failed": {s: sum(str(r["status"]) == s for r in failed) for s in statuses - {"200"}},
    }
    # Every request either succeeded or got a retryable status (the ingress maps a dead
    # replica to 503, never to a hang); and each acknowledged item is stored.
    assert all(r["status"] == 200 or r["status"] in RETRYABLE for r in results), figures["replica_kill"]
    for r in ok:
        assert r["item"] and httpx.get(f"{service.url}/v1/review/items/{r['item']}").status_code == 200
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not set(replica_processes(service, "onnx_classify")) - set(victims):
        time.sleep(1)
    assert replica_processes(service, "onnx_classify"), "Ray did not restart the replica"
    assert (
        httpx.post(service.url + "/v1/analyze", files={"image": ("x.jpg", image)}, timeout=60).status_code
        == 200
    )


def listed_items(url: str) -> list[dict]:
    """Every review item the service lists (all statuses), page by page."""
    items: list[dict] = []
    while True:
        page = httpx.get(
            url + "/v1/review/items", params={"status": "all", "limit": 1000, "offset": len(items)}
        )
        if not page.json()["items"]:
            return items
        items += page.json()["items"]


def test_kill_9_while_enqueuing_keeps_every_acknowledged_item_exactly_once(
    restartable_service, photos_png, figures
):
    image = jpeg(photos_png["astronaut"])
    first = restartable_service.running()  # the restart tests' own service, not the shared one
    killed_at = {}

    def kill() -> None:
        killed_at["t"] = time.monotonic()
        os.killpg(first.process.pid, signal.SIGKILL)

    try:
        results = asyncio.run(open_loop(first.url, image, 2, 1.5))  # acknowledged before the storm
        # 10 requests/s, the kill after the first half (1.5 s): requests are in flight at once
        results += asyncio.run(open_loop(first.url, image, 10, 3.0, during=kill))
    finally:
        first.stop(signal.SIGKILL)
        first.process.wait(timeout=30)
    acknowledged = {r["request_id"]: r["item"] for r in results if r["status"] == 200}
    assert acknowledged and len(acknowledged) < len(results)  # some before the kill, some cut off
    second = restartable_service.restart()  # a new `serve run` on the killed one's work dir
    listed = listed_items(second.url)  # with what earlier restart tests left (other request ids)
    by_request: dict[str, list[str]] = {}
    for item in listed:
        by_request.setdefault(item["request_id"], []).append(item["id"])
    sent = {r["request_id"] for r in results}
    figures["kill_9"] = {
        "sent": len(results),
        "acknowledged": len(acknowledged),
        "stored_after_restart": sum(len(by_request.get(request_id, [])) for request_id in sent),
    }
    for request_id, item_id in acknowledged.items():
        assert by_request.get(request_id) == [item_id], request_id
    assert all(len(ids) == 1 for ids in by_request.values())
