"""``visionroute bench state``: the per-request state work on SQLite vs PostgreSQL, and search
reads with read replicas and shards.

State: what one analysed request costs the stores, measured in one run on both backends:
a budget reservation and its settle (the paid call's bookkeeping), and a review enqueue
(image + row, acknowledged durable). PostgreSQL is a throwaway local server (``--dsn`` to
measure a real one) with the same durability (fsync on, synchronous_commit on).

Search: queries/s through 1 vs 2 read replicas (two index objects following one shared
database, queried from two threads) and 1 vs 2 shards (the exact index split by id, each
query scattered to both and merged). On a 2-core machine a second replica or shard can at
best double throughput when both cores are free; the report says what it measured.
"""

from __future__ import annotations

import hashlib
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def _percentiles(samples_s: list[float]) -> dict[str, float]:
    ordered = sorted(samples_s)
    return {
        "p50_ms": 1000 * statistics.median(ordered),
        "p95_ms": 1000 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        "n": len(ordered),
    }


def _timed(operation: Callable[[int], Any], n: int, warmup: int = 5) -> dict[str, float]:
    for i in range(warmup):
        operation(-1 - i)
    samples = []
    for i in range(n):
        start = time.perf_counter()
        operation(i)
        samples.append(time.perf_counter() - start)
    return _percentiles(samples)


def measure_state(state: Any, root: Path, n: int) -> dict[str, dict[str, float]]:
    """p50/p95 of budget reserve+settle and of a review enqueue on one backend."""
    from policies.budgets import BudgetLedger, BudgetRule
    from policies.review_queue import ReviewQueue

    ledger = BudgetLedger(root / "budgets.sqlite3", state=state)
    queue = ReviewQueue(root / "review", state=state)
    rules = [BudgetRule(name="bench", window_s=3600, cap_units=1e12)]
    image = np.random.default_rng(0).integers(0, 255, 20_000, dtype=np.uint8).tobytes()

    def budget(i: int) -> None:
        reservation = ledger.reserve(rules, tenant="t", feature="classify", tier="onnx", units=1.0)
        ledger.settle(reservation, 1.0)

    def enqueue(i: int) -> None:
        data = image + str(i).encode()  # a distinct image per request, as in production
        queue.enqueue(
            request_id=f"bench-{i}",
            tenant="t",
            task="classify",
            image_bytes=data,
            image_sha256=hashlib.sha256(data).hexdigest(),
            reason="bench",
            priority=0.5,
            proposed=[],
            trace={},
        )

    try:
        return {"budget_reserve_settle": _timed(budget, n), "review_enqueue": _timed(enqueue, n)}
    finally:
        for store in (ledger, queue):
            getattr(store, "close", lambda: None)()


def run(args) -> int:
    from visionroute.state import StateConfig

    results: dict[str, Any] = {}
    server = None
    dsn = args.dsn
    if dsn is None:
        from visionroute import pg_local

        reason = pg_local.available()
        if reason:
            print(f"bench state: {reason}")
            return 2
        server = pg_local.LocalPostgres()
        server.start()
        dsn = server.create_database("bench")
    try:
        import os

        os.environ["VISIONROUTE_BENCH_PG_DSN"] = dsn
        with tempfile.TemporaryDirectory() as tmp:
            results["sqlite"] = measure_state(None, Path(tmp) / "sqlite", args.n)
            postgres = StateConfig(backend="postgres", dsn_env="VISIONROUTE_BENCH_PG_DSN")
            results["postgres"] = measure_state(postgres, Path(tmp) / "postgres", args.n)
            if "search" in args.parts:
                from evals.benchmarks.state_search import measure_search

                results["search"] = measure_search(postgres, Path(tmp) / "search", args)
    finally:
        if server is not None:
            server.stop()
    _print(results)
    if args.json:
        import json

        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def _print(results: dict[str, Any]) -> None:
    print("per-request state work (ms)           SQLite p50/p95      PostgreSQL p50/p95   ratio p50")
    for name in ("budget_reserve_settle", "review_enqueue"):
        lite, pg = results["sqlite"][name], results["postgres"][name]
        print(
            f"  {name:<34} {lite['p50_ms']:7.2f} /{lite['p95_ms']:7.2f}    {pg['p50_ms']:7.2f} /{pg['p95_ms']:7.2f}"
            f"     {pg['p50_ms'] / lite['p50_ms']:5.2f}x"
        )
    search = results.get("search")
    if search:
        for line in search.get("lines", []):
            print(line)


def register(bench) -> None:
    state = bench.add_parser(
        "state", help="budget/review state work on SQLite vs PostgreSQL; search replicas, shards"
    )
    state.add_argument("--n", type=int, default=300, help="timed operations per measurement")
    state.add_argument(
        "--dsn", help="an existing PostgreSQL database (default: start a throwaway local server)"
    )
    state.add_argument("--parts", default="state,search", help="comma list of state, search")
    state.add_argument("--vectors", type=int, default=20_000, help="vectors in the search part")
    state.add_argument("--queries", type=int, default=2000, help="queries per search measurement")
    state.add_argument("--json", help="also write the figures as JSON here")
    state.set_defaults(func=run)
