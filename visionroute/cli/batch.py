"""``visionroute batch run``: analyse a folder or a manifest on Ray Data (router/batch/, docs/batch.md).

The serve config is checked as ``serve`` checks it and its packaged models prepared, then every
item runs through the service's analyse pipeline inside Ray Data actors; results go to
``OUT/results.jsonl`` and ``OUT/parquet/``. Ray and Ray Data are imported only when it runs.
"""

from __future__ import annotations

from pathlib import Path

from router.serve_config import REPO_CONFIG


def _run(args) -> int:
    from cascades.models import prepare_models
    from router.batch.job import run_batch
    from router.serve_config import app_config, check_serve_config

    for app in check_serve_config(args.config):  # a typo or a bad model fails here, before Ray starts
        if app.to_prepare and (args.app is None or app.name == args.app):
            prepare_models(Path(app.config.models_dir), app.to_prepare)
    config = app_config(args.config, args.app)
    summary = run_batch(
        config,
        args.input,
        args.out,
        address=args.address,
        actors=args.actors,
        num_cpus=args.num_cpus,
        batch_size=args.batch_size,
        retry_errors=args.retry_errors,
        progress=not args.no_progress,
        ray_init={"num_cpus": args.local_cpus} if args.address == "local" and args.local_cpus else None,
    )
    for line in summary.lines():
        print(line)
    return 0


def register(subparsers, bench) -> None:
    batch = subparsers.add_parser("batch", help="analyse a folder or a manifest of images on Ray Data")
    commands = batch.add_subparsers(dest="batch_command", required=True)
    run = commands.add_parser(
        "run",
        help="every image of a folder or manifest through the service's pipeline -> Parquet + JSONL",
        description="Analyse every image file under a folder, or every row of a manifest (CSV, JSONL or "
        "Parquet with a 'path' or 'url' column and optional 'id', 'tenant', 'task'), through the same "
        "cascade, policies, budgets, review queue and privacy as the service, on Ray Data. Each item's "
        "decision, answer and trace (or its error) go to OUT/results.jsonl and OUT/parquet/. A rerun "
        "skips the items OUT already has and never queues an item for review twice.",
    )
    run.add_argument("input", type=Path, help="a folder of images, or a manifest (.csv, .jsonl, .parquet)")
    run.add_argument("--out", type=Path, required=True, help="output folder (created; reruns append)")
    run.add_argument(
        "--config", type=Path, default=REPO_CONFIG, help="Ray Serve config (default: %(default)s)"
    )
    run.add_argument("--app", default=None, help="the VisionRoute application, when the config has several")
    run.add_argument(
        "--address",
        default="local",
        help="Ray cluster: 'local' (a Ray of its own, the default), 'auto' (the running cluster, e.g. "
        "the service's) or HOST:PORT / ray://HOST:PORT",
    )
    run.add_argument("--actors", type=int, default=1, help="analysing actors (each holds one service core)")
    run.add_argument("--num-cpus", type=float, default=1.0, help="CPUs reserved per actor")
    run.add_argument("--local-cpus", type=int, default=None, help="CPUs of the local Ray (--address local)")
    run.add_argument("--batch-size", type=int, default=32, help="items per Ray Data batch (per actor call)")
    run.add_argument("--retry-errors", action="store_true", help="analyse again the items that failed before")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(func=_run)
