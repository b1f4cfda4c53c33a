"""Faults and overload against the real service (loopback, bounded in time).

- a replica killed under load: Ray restarts it; each request succeeded or got a retryable
  error; every acknowledged review item is stored;
- an open-loop load test: the sustainable rate (p99 < 500 ms), then twice that: the service
  sheds (503 + Retry-After) instead of timing out, and recovers when the load drops.

Figures are printed (run with -s) and written to <tmp>/reliability.json. The whole service
killed with SIGKILL while items are enqueued (after a restart every acknowledged item is in the
queue exactly once) is in test_serve_start.py, which shares its one restart with the other
restart checks.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from tests.integration.open_loop import RETRYABLE, jpeg, open_loop
from tests.integration.serve_process import ServeProcess

pytestmark = [pytest.mark.server, pytest.mark.slow]


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
    """The session's shared service (tests/integration/conftest.py)."""
    return default_service


@pytest.fixture(scope="module")
def figures(service):
    collected: dict = {}
    yield collected
    (service.workdir / "reliability.json").write_text(json.dumps(collected, indent=2))
    print("\nreliability figures:", json.dumps(collected, indent=2))


# Step lengths for the suite (issue 21: suite time; were 4, 8 and 4 s, then 2.5, 5 and 3 s). At
# twice the sustainable rate the bounded queue (one Ingress replica: 8 ongoing + 8 queued) fills
# within seconds (seen: a 4 s step at 2x shed 10 of 80 requests), so 4 s still shows shedding
# instead of timeouts; sustained load with faults over minutes is `visionroute bench soak`
# (docs/soak.md). The rates stay fine past 20 (1.5x apart): with doubling steps the measured
# rate could be half the knee, and twice it only the knee itself, not an overload.
STEP_S, OVERLOAD_S, RECOVERY_S = 2.0, 4.0, 2.0
RATES = (5, 10, 20, 30, 45, 60)
# Between phases: open_loop returns once every answer is in, so the ingress queue is empty
# then; the pause lets the after-response work (the eventual index queue) catch up only.
SETTLE_S = 0.5


def test_load_sheds_at_twice_the_sustainable_rate_and_recovers(service, photos_png, figures):
    image = jpeg(photos_png["coffee"])
    asyncio.run(open_loop(service.url, image, 5, 1.0))  # warm-up: first batches, connections
    # The sustainable rate is measured, never asserted: the highest step served whole with p99
    # under 500 ms (the steps stop at the first one over it), or on a machine too busy for
    # that, the highest step served whole.
    sustainable, served_whole, steps = 0.0, 0.0, []
    for rate in RATES:
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
    time.sleep(SETTLE_S)
    overload = summary(
        asyncio.run(open_loop(service.url, image, 2 * sustainable, OVERLOAD_S)), 2 * sustainable
    )
    figures.update({"steps": steps, "sustainable_rps": sustainable, "at_2x": overload})
    assert overload["other"] == [], overload  # no timeouts, no 500s: served or shed
    results_ok = overload["ok"] + overload["shed"] == overload["requests"]
    assert results_ok and overload["p99_all_ms"] < 10_000, overload
    time.sleep(2 * SETTLE_S)
    recovered = summary(
        asyncio.run(open_loop(service.url, image, sustainable / 2, RECOVERY_S)), sustainable / 2
    )
    figures["recovered"] = recovered
    # recovered: every request served again, none shed (its latency is in the figures only)
    assert recovered["ok"] == recovered["requests"] and recovered["shed"] == 0, recovered


def ingress_capacity(service: ServeProcess) -> int:
    """Requests the service takes in at once before it sheds: per Ingress replica, Serve's
    ``max_ongoing_requests`` + ``max_queued_requests`` (serve_config.yaml: 8 + 8), times the
    replicas (``ingress_replicas``)."""
    app = yaml.safe_load(service.config_path.read_text())["applications"][0]
    (ingress,) = [d for d in app["deployments"] if d["name"] == "Ingress"]
    replicas = app["args"].get("ingress_replicas", 1)
    return replicas * (ingress["max_ongoing_requests"] + ingress["max_queued_requests"])


def test_overload_answers_503_with_retry_after(service, photos_png, figures):
    image = jpeg(photos_png["coffee"])
    # A burst of 4x what the bounded queue holds, sent at 400/s (64 in 0.16 s with the shipped
    # limits; was 400 requests in 1 s): far more arrive than a few requests' worth of serving
    # time can take off the queue, so the rest must be shed.
    burst = 4 * ingress_capacity(service)
    results = asyncio.run(open_loop(service.url, image, 400, burst / 400))
    shed = [r for r in results if r["status"] in RETRYABLE]
    figures["burst"] = {"requests": len(results), "shed": len(shed)}
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


# The load around the kill (issue 21: was 8 s): 10 requests/s, the kill at its midpoint, so
# requests are in flight at the kill and 2 s of them meet the dead replica or its restart.
KILL_LOAD_S = 4.0


def test_a_replica_killed_under_load_loses_nothing_acknowledged(service, photos_png, figures):
    victims = replica_processes(service, "onnx_classify")
    assert victims, "no onnx_classify replica process found"
    image = jpeg(photos_png["astronaut"])  # unsure: every success is a review item

    results = asyncio.run(
        open_loop(
            service.url,
            image,
            10,
            KILL_LOAD_S,
            during=lambda: [os.kill(pid, signal.SIGKILL) for pid in victims],
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
    with httpx.Client(base_url=service.url, timeout=60) as client:  # one connection for the reads
        for r in ok:
            assert r["item"] and client.get(f"/v1/review/items/{r['item']}").status_code == 200
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not set(replica_processes(service, "onnx_classify")) - set(victims):
        time.sleep(0.25)
    assert replica_processes(service, "onnx_classify"), "Ray did not restart the replica"
    assert (
        httpx.post(service.url + "/v1/analyze", files={"image": ("x.jpg", image)}, timeout=60).status_code
        == 200
    )
