"""``visionroute bench soak``: the service under mixed traffic while faults are injected.

One run: a throwaway PostgreSQL (visionroute/pg_local.py; or the caller's) holds every durable
store; ``serve run`` starts the service on it (two ingress replicas, search replicas following
the store, a budget on one tenant, durable search indexing so an analysed image's search id is
a promise). Client threads drive HTTP and gRPC through the project's client
(visionroute/client): analyse, batch (HTTP), search, index writes, review claims and labels,
each logical call retried with its one request id after a 503/429 Retry-After, as a caller would.
Faults on a schedule after the warm-up: PostgreSQL restarted, an ingress replica's process
killed (SIGKILL, as a crash or the OOM killer does; Ray restarts it), a search replica killed;
with ``--vlm``, a VLM tier on a real vLLM server whose process group is killed and restarted
(evals/benchmarks/soak_vlm.py).

Reported: every attempt by status (allowed: 200, 4xx, 429, 503 with Retry-After; anything else
listed, and marked when it was in flight at a replica kill), acknowledged items lost (review
items, search entries, labels), duplicate review items, budget overspend, and per process RSS,
open file descriptors and database connections at start, after the warm-up and at the end.
docs/soak.md says how to read it.

This module runs one soak and holds the command; the parts live beside it: ``soak_options``
(what runs, the mix, the fault rotation), ``soak_service`` (the config and ``serve run``),
``soak_traffic`` (client threads and the ledger of attempts), ``soak_faults`` (the schedule),
``soak_measurements`` (processes, RSS, fds, database connections by owner), ``soak_checks``
(lost, duplicates, overspend, statuses), ``soak_report`` (the table), ``soak_vlm`` (the VLM tier
and its fault).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from evals.benchmarks.soak_checks import statuses, verify
from evals.benchmarks.soak_faults import Faults
from evals.benchmarks.soak_measurements import growth, resource_snapshot
from evals.benchmarks.soak_options import FAULTS, KNOWN_FAULTS, SoakOptions
from evals.benchmarks.soak_report import format_report
from evals.benchmarks.soak_service import SoakService, soak_document, wait_until_serving, warm_up_analysis
from evals.benchmarks.soak_traffic import Ledger, Traffic
from evals.benchmarks.soak_vlm import (
    VlmServerFault,
    vlm_summary,
)

__all__ = ["SoakOptions", "format_report", "register", "run", "run_soak", "soak_document"]


# -- one run ---------------------------------------------------------------------------------------


def run_soak(
    options: SoakOptions, *, models_dir: Path, workdir: Path, pg: Any, dsn: str, log=print
) -> dict[str, Any]:
    """Start the service on ``dsn`` (a database on ``pg``, a ``LocalPostgres``: restarted as a
    fault), run the traffic and the faults for ``options.minutes``, check, stop; the report."""
    workdir.mkdir(parents=True, exist_ok=True)
    boot = time.monotonic()
    vlm = None
    if options.vlm:
        vlm = VlmServerFault.start()  # minutes on a loaded machine: before the service's clock
        log(f"soak: vLLM server warm in {time.monotonic() - boot:.0f} s at {vlm.endpoint}")
    service = SoakService(models_dir, workdir, dsn, options, vlm.endpoint if vlm else None)
    pg_data = Path(pg.dir) / "db" if getattr(pg, "dir", None) else None

    def snapshot() -> dict[str, Any]:
        return resource_snapshot(service, pg_data, vlm.session_id() if vlm else None)

    try:
        service.start()
        log(f"soak: service ready in {time.monotonic() - boot:.0f} s at {service.url} ({service.grpc_url})")
        wait_until_serving(service)
        warm_up_analysis(service)
        snapshots = {"start": snapshot()}
        ledger = Ledger()
        started = time.monotonic()
        schedule = options.schedule()
        traffic = Traffic(service, options, ledger, started)
        faults = Faults(service, pg, schedule, started, vlm)
        traffic.start()
        faults.thread.start()
        log(
            f"soak: {options.minutes:g} min at {options.rate_per_s:g} calls/s; faults at {[(round(t), f) for t, f in schedule]}"
        )
        time.sleep(options.warmup_s)
        snapshots["after_warmup"] = snapshot()
        while time.monotonic() - started < options.duration_s:
            time.sleep(min(10.0, options.duration_s - (time.monotonic() - started)) or 0.1)
            done = len(ledger.attempts)
            log(
                f"soak: {time.monotonic() - started:5.0f} s, {done} attempts, faults so far {[e['fault'] for e in faults.events]}"
            )
        traffic.finish()
        faults.stop.set()
        faults.thread.join(timeout=150)
        ran_s = time.monotonic() - started
        settle_s = wait_until_serving(service)
        if vlm is not None:
            vlm.wait_restarted(600.0)  # the end snapshot counts the vLLM server that is back
        snapshots["end"] = snapshot()
        checks = verify(dsn, ledger, options.budget_cap_units)
        report = {
            "options": {**options.__dict__, "faults": list(options.faults)},
            "service_start_s": round(started - boot, 1),
            "ran_s": round(ran_s, 1),
            "settled_after_s": round(settle_s, 1),
            "faults": [{k: v for k, v in e.items() if k != "at_monotonic"} for e in faults.events],
            "faults_not_run": {} if vlm else {"vlm": "no VLM tier in this run (--vlm adds it)"},
            "statuses": statuses(ledger, faults.kill_times(), started, faults.events),
            "vlm": vlm_summary(ledger.vlm_outcomes, faults.events, ran_s) if vlm else None,
            **checks,
            "resources": snapshots,
            "growth_after_warmup": growth(snapshots["after_warmup"], snapshots["end"]),
        }
        return report
    finally:
        service.stop()
        if vlm is not None:
            vlm.stop()


def run(args) -> int:
    import logging

    from visionroute import pg_local
    from visionroute.errors import ConfigError

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would bury the report
    models_dir = Path(args.models_dir)
    if not models_dir.is_dir() or not any(models_dir.iterdir()):
        raise ConfigError(
            f"no prepared models in {models_dir}; run `visionroute models prepare`", field="models_dir"
        )
    options = SoakOptions(
        minutes=args.minutes,
        rate_per_s=args.rate,
        clients=args.clients,
        faults=tuple(f for f in args.faults.split(",") if f)
        + (("vlm",) if args.vlm and args.faults == ",".join(FAULTS) else ()),
        vlm=args.vlm,
        fault_every_s=args.fault_every_s,
        search_replicas=args.search_replicas,
        budget_cap_units=args.budget_cap_units,
        seed=args.seed,
        pool_size=args.pool_size,
    )
    workdir = Path(args.work_dir) if args.work_dir else Path(tempfile_dir())
    reason = pg_local.available()
    if reason:
        raise ConfigError(f"the soak needs a local PostgreSQL: {reason}", field="postgres")
    with pg_local.LocalPostgres() as pg:
        report = run_soak(
            options, models_dir=models_dir, workdir=workdir, pg=pg, dsn=pg.create_database("soak")
        )
    print(format_report(report))
    out = Path(args.json) if args.json else workdir / "soak.json"
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"figures: {out}")
    s = report["statuses"]
    healthy = (
        not s["not_allowed_unexplained"]
        and report["lost_total"] == 0
        and not report["duplicate_review_items"]
        and report["budget"]["overspend_units"] == 0
        and not any("error" in e for e in report["faults"])
        and (report["vlm"] is None or report["vlm"]["healthy"])
    )
    return 0 if healthy else 1


def tempfile_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="visionroute-soak-")


def register(bench) -> None:
    soak = bench.add_parser(
        "soak", help="mixed HTTP/gRPC traffic under faults (PostgreSQL restart, replica kills): losses, leaks"
    )
    soak.add_argument("--minutes", type=float, default=30.0, help="traffic time (default: %(default)s)")
    soak.add_argument("--rate", type=float, default=4.0, help="calls per second, all clients together")
    soak.add_argument("--clients", type=int, default=4)
    soak.add_argument(
        "--faults",
        default=",".join(FAULTS),
        help=f"comma list of {', '.join(KNOWN_FAULTS)} (empty: none; vlm needs --vlm)",
    )
    soak.add_argument(
        "--vlm",
        action="store_true",
        help="add a VLM tier on the tiny local vLLM server (started here) and the vlm fault to the rotation",
    )
    soak.add_argument("--fault-every-s", type=float, default=60.0, help="seconds between faults (about)")
    soak.add_argument("--search-replicas", type=int, default=2)
    soak.add_argument("--budget-cap-units", type=float, default=20.0, help="the metered tenant's budget")
    soak.add_argument("--seed", type=int, default=0)
    soak.add_argument(
        "--pool-size",
        type=int,
        default=4,
        help="connections per store pool, opened at start (0: the shipped on-demand pools, 1 to 4)",
    )
    soak.add_argument("--models-dir", default=None, help="prepared models (default: VISIONROUTE_HOME's)")
    soak.add_argument("--work-dir", default=None, help="config, logs, review store (default: a temp dir)")
    soak.add_argument("--json", help="the report as JSON here (default: WORK_DIR/soak.json)")
    soak.set_defaults(func=_run_with_defaults)


def _run_with_defaults(args) -> int:
    from visionroute import paths

    if args.models_dir is None:
        args.models_dir = str(paths.models_dir())
    return run(args)
