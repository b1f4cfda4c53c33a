"""The ingress's CPU per request, in process: the HTTP app over ASGI, no Ray, no network.

    python -m evals.benchmarks.ingress_cpu [--requests 120] [--profile out.prof]

The shipped serve_config.yaml's args (as ``visionroute bench serve`` builds them: placement
ingress, indexing off, redaction off) with the classify tier in this process; the bench's
skimage photos, round robin, as multipart uploads. Reported per request: the process's CPU
(every thread: the event loop, the drift worker, the review queue's writes), the cheap tier's
own CPU (ONNX Runtime and its pre/post-processing, measured on its thread) and the difference,
the ingress's CPU (what issue 24's "ingress other" and the review queue cost). ONNX Runtime
and OpenCV run single-threaded here, so each one's work is on the thread that called it. ``--profile``
writes a cProfile of the event loop's thread (the worker threads are timed, not profiled).
On a shared machine compare A/B within one run or in interleaved runs.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from evals.benchmarks.serve import bench_photos, service_args

# (module, qualified name) of sync functions on the request path whose CPU ``--items`` reports
ITEMS = (
    ("cascades.decode_budget", "decode_image"),
    ("router.drift.service", "DriftService.observe_request"),
    ("router.drift.service", "DriftService._on_request"),
    ("cascades.image_redaction", "Redactor.prepare"),
    ("policies.review_queue", "ReviewQueue.enqueue"),
    ("policies.review_queue", "ReviewQueue.enqueue_many"),
    ("policies.budgets", "BudgetLedger.reserve"),
    ("policies.budgets", "BudgetLedger.settle"),
    ("policies.budgets", "BudgetLedger.settle_many"),
    ("policies.budgets", "BudgetLedger.settle_later"),
    ("policies.budgets", "BudgetLedger.flush_usage"),
    ("visionroute.records", "Trace.to_dict"),
    ("router.services.analyze.response", "response_body"),
    ("router.http.api", "AnswerJSON.render"),
    ("router.metrics", "IngressMetrics.observe_trace"),
    ("starlette.formparsers", "MultiPartParser.parse"),  # async, but reads a body already in memory
)


class _ItemClock:
    """Thread CPU of each of ``ITEMS``, inclusive (an item that calls another counts it too)."""

    def __init__(self) -> None:
        self.cpu_s: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._local = threading.local()
        self._lock = threading.Lock()

    def install(self) -> None:
        import importlib
        import inspect

        for module_name, qualified in ITEMS:
            owner: Any = importlib.import_module(module_name)
            *path, name = qualified.split(".")
            for part in path:
                owner = getattr(owner, part)
            function = getattr(owner, name, None)
            if function is None:  # not in this version of the code (an A/B against an older one)
                continue
            wrapped = (
                self._async(qualified, function)
                if inspect.iscoroutinefunction(function)
                else self._sync(qualified, function)
            )
            setattr(owner, name, wrapped)
            if module_name == "router.services.analyze.response":  # imported by name elsewhere
                import router.http.api
                import router.services

                router.http.api.response_body = router.services.response_body = wrapped

    def _add(self, name: str, cpu_s: float) -> None:
        with self._lock:
            self.cpu_s[name] = self.cpu_s.get(name, 0.0) + cpu_s
            self.calls[name] = self.calls.get(name, 0) + 1

    def _sync(self, name: str, function: Any) -> Any:
        clock = self

        def timed(*args, **kwargs):
            inside = clock._local.__dict__.setdefault("inside", set())
            if name in inside:  # a recursive call: counted by the outer one
                return function(*args, **kwargs)
            inside.add(name)
            started = time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                inside.discard(name)
                clock._add(name, time.thread_time() - started)

        return timed

    def _async(self, name: str, function: Any) -> Any:
        clock = self

        async def timed(*args, **kwargs):
            started = time.thread_time()  # the loop's thread: valid while nothing else runs on it
            try:
                return await function(*args, **kwargs)
            finally:
                clock._add(name, time.thread_time() - started)

        return timed

    def reset(self) -> None:
        with self._lock:
            self.cpu_s, self.calls = {}, {}


class _TierClock:
    """Thread CPU spent inside the cheap tier's ``predict`` (it runs on a worker thread)."""

    def __init__(self) -> None:
        self.cpu_s = 0.0
        self._lock = threading.Lock()

    def wrap(self, stage: Any) -> None:
        predict = stage.predict

        def timed(images):
            started = time.thread_time()
            try:
                return predict(images)
            finally:
                with self._lock:
                    self.cpu_s += time.thread_time() - started

        stage.predict = timed


def build(models_dir: Path, work_dir: Path, clock: _TierClock):
    from router.config import parse_app_config
    from router.services import VisionRouteService
    from router.services.backends import LocalOnnxTier

    # one ONNX Runtime thread: all the tier's CPU is then on the thread that calls it (timed)
    args = service_args(models_dir, work_dir, "ingress", False, 8, 1)
    config = parse_app_config(args)
    tiers = {
        task: LocalOnnxTier(cascade.tier.model_dump(), config.models_dir)
        for task, cascade in config.cascades.items()
    }
    for tier in tiers.values():
        clock.wrap(tier.stage)
    return VisionRouteService.build(config, tiers=tiers)


async def _drive(
    app: Any, photos: list[bytes], n: int, profile: cProfile.Profile | None, settle: Any = None
) -> dict[str, Any]:
    import httpx

    transport = httpx.ASGITransport(app=app)
    decisions: dict[str, int] = {}
    async with httpx.AsyncClient(transport=transport, base_url="http://ingress") as client:
        for i in range(4):  # warm-up: imports, first ONNX runs, lazily opened stores
            await client.post(
                "/v1/analyze", files={"image": ("w.jpg", photos[i % len(photos)], "image/jpeg")}
            )
        if settle is not None:
            settle()
        wall, cpu, loop_cpu = time.perf_counter(), time.process_time(), time.thread_time()
        if profile is not None:
            profile.enable()
        for i in range(n):
            response = await client.post(
                "/v1/analyze", files={"image": (f"p{i}.jpg", photos[i % len(photos)], "image/jpeg")}
            )
            response.raise_for_status()
            decision = response.json()["decision"]
            decisions[decision] = decisions.get(decision, 0) + 1
        if profile is not None:
            profile.disable()
        if settle is not None:  # work after the responses (the drift worker's) belongs to them
            settle()
        return {
            "loop_cpu_s": time.thread_time() - loop_cpu,  # the event loop's thread: client and server
            "wall_s": time.perf_counter() - wall,
            "cpu_s": time.process_time() - cpu,
            "decisions": decisions,
        }


def measure(
    requests: int, models_dir: Path, profile_path: Path | None = None, items: bool = False
) -> dict[str, Any]:
    import logging

    import cv2

    from router.auth.keys import SecurityConfig
    from router.http.api import app
    from router.http.deps import attach

    logging.getLogger("httpx").setLevel(logging.WARNING)
    cv2.setNumThreads(1)  # OpenCV's work (drift statistics, decoding helpers) on the calling thread
    photos = list(bench_photos().values())
    clock = _TierClock()
    item_clock = _ItemClock()
    if items:
        item_clock.install()
    with tempfile.TemporaryDirectory(prefix="ingress-cpu-") as work:
        service = build(models_dir, Path(work), clock)
        attach(service, SecurityConfig(allow_insecure_bind=True))
        # thread CPU as the clock: waiting for the GIL or the disk is not charged to a function
        profile = cProfile.Profile(time.thread_time) if profile_path is not None else None

        async def run() -> dict[str, Any]:
            started = []

            def settle() -> None:  # the drift worker's backlog done; the clocks start at the first call
                if service.analyze.drift is not None:
                    service.analyze.drift.drain(30)
                if not started:
                    started.append(True)
                    clock.cpu_s = 0.0
                    item_clock.reset()

            result = await _drive(app, photos, requests, profile, settle)
            result["tier_cpu_s"] = clock.cpu_s
            return result

        result = asyncio.run(run())
        if profile is not None:
            profile.dump_stats(str(profile_path))
    per = 1000.0 / requests
    return {
        "requests": requests,
        "decisions": result["decisions"],
        "wall_ms": result["wall_s"] * per,
        "process_cpu_ms": result["cpu_s"] * per,
        "tier_cpu_ms": result["tier_cpu_s"] * per,
        "ingress_cpu_ms": (result["cpu_s"] - result["tier_cpu_s"]) * per,
        "loop_cpu_ms": result["loop_cpu_s"] * per,
        "items_cpu_ms": {
            name: cpu * per for name, cpu in sorted(item_clock.cpu_s.items(), key=lambda kv: -kv[1])
        },
        "items_calls": dict(item_clock.calls),
    }


def main(argv: list[str] | None = None) -> None:
    import os

    from visionroute import paths

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--models-dir", default=str(paths.models_dir()))
    parser.add_argument("--profile", type=Path, default=None, help="write a cProfile of the event loop")
    parser.add_argument("--items", action="store_true", help="each request-path item's CPU (ITEMS)")
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error("--requests must be at least 1")
    result = measure(args.requests, Path(args.models_dir), args.profile, args.items)
    print(
        f"{result['requests']} requests {result['decisions']}: per request wall {result['wall_ms']:.1f} ms, "
        f"process CPU {result['process_cpu_ms']:.1f} ms = cheap tier {result['tier_cpu_ms']:.1f} + "
        f"ingress {result['ingress_cpu_ms']:.1f}, of which the event loop's thread "
        f"{result['loop_cpu_ms']:.1f} (load {os.getloadavg()[0]:.1f})"
    )
    for name, cpu_ms in result["items_cpu_ms"].items():
        print(f"  {name:<36} {cpu_ms:6.2f} ms CPU per request ({result['items_calls'][name]} calls)")


if __name__ == "__main__":
    main()
