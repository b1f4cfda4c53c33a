"""The ``visionroute`` command line: one module per command group in this package.

Only the module that registers the command being run is imported (the others appear in
``--help`` from the table below), and those modules import their heavy dependencies inside
the command functions, so read-only commands (``--help``, ``models list``, ``check-config``,
``policies check``, ``keys new``) start without Ray, torch or FAISS. The command line is the
top of the import layers (tests/test_import_graph.py): it may import any package, none
imports it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from visionroute.errors import RouterError

# One module per command group, each with ``register(subparsers, bench)``: it adds its commands to
# ``subparsers`` (bench.py adds the benchmarks to ``bench``: ``visionroute bench <name>``); each
# parser sets ``func(args) -> int``. Commands that call the running service use
# visionroute/client/ (VisionRouteClient).
COMMAND_MODULES = tuple(
    f"visionroute.cli.{name}"
    for name in (
        "models",
        "calibrate",
        "search",
        "vlm",
        "serve",
        "example",
        "card",
        "drift",
        "rollout",
        "db",
        "review",
        "policies",
        "keys",
        "batch",
        "bench",
    )
)
BENCH_MODULE = "visionroute.cli.bench"
# top-level command -> (the module that registers it, its one-line help for --help)
COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("visionroute.cli.models", "prepare and list the ONNX models"),
    "predict": ("visionroute.cli.models", "run one ONNX model on image files (no service)"),
    "calibrate": ("visionroute.cli.calibrate", "fit a calibrator, certify thresholds, write the artefact"),
    "eval": ("visionroute.cli.calibrate", "evaluate and write a Markdown + JSON + PNG report"),
    "gate": ("visionroute.cli.calibrate", "compare a report.json with a baseline report.json (CI)"),
    "index": ("visionroute.cli.search", "embed and index every image in a folder (progress bar)"),
    "retrieval": ("visionroute.cli.search", "maintain and query the search index"),
    "vlm": ("visionroute.cli.vlm", "the VLM tier's local vLLM server"),
    "serve": ("visionroute.cli.serve", "prepare the default models and start the service on Ray Serve"),
    "check-config": ("visionroute.cli.serve", "validate a Ray Serve config: VisionRoute args, models, bind"),
    "example": ("visionroute.cli.example", "build, certify and serve a worked example"),
    "card": ("visionroute.cli.card", "a deployed model's or policy set's card (Markdown or JSON), offline"),
    "drift": ("visionroute.cli.drift", "the running service's drift monitors: report (table, plot)"),
    "rollout": (
        "visionroute.cli.rollout",
        "shadow and canary rollouts: start, status, promote, rollback, finish",
    ),
    "db": ("visionroute.cli.db", "the durable stores: schema status, migrate, copy SQLite -> PostgreSQL"),
    "review": ("visionroute.cli.review", "the human-review queue: export labels, purge images, stats"),
    "budgets": ("visionroute.cli.review", "budget use in the current windows and cost totals"),
    "policies": ("visionroute.cli.policies", "policy sets (thresholds, costs, budgets, review, audit)"),
    "privacy": ("visionroute.cli.review", "erase an item's or a subject's images and records (audited)"),
    "keys": ("visionroute.cli.keys", "API keys (stored hashed in the config)"),
    "batch": ("visionroute.cli.batch", "analyse a folder or a manifest of images on Ray Data"),
}
BENCH_HELP = "benchmarks: print a figure and its baseline"


def _command_word(argv: list[str]) -> str | None:
    return next((word for word in argv if not word.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for ``argv``: only the modules its command needs are imported (every module
    when ``argv`` is None, or when the command is unknown, so argparse can list the choices)."""
    command = _command_word(argv) if argv is not None else None
    if command in COMMANDS:
        modules: tuple[str, ...] = (COMMANDS[command][0],)
    elif command == "bench":
        modules = (BENCH_MODULE,)
    elif argv is not None and command is None:
        modules = ()  # bare --help: the table is enough
    else:
        modules = COMMAND_MODULES
    parser = argparse.ArgumentParser(prog="visionroute", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    bench = subparsers.add_parser("bench", help=BENCH_HELP)
    bench_subparsers = bench.add_subparsers(dest="bench", required=True)
    for module_name in modules:
        importlib.import_module(module_name).register(subparsers, bench_subparsers)
    for name, (_, help_text) in COMMANDS.items():
        if name not in subparsers.choices:  # listed in --help; never selected (its module was not needed)
            subparsers.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except RouterError as exc:
        where = f" ({exc.field})" if exc.field else ""
        print(f"error{where}: {exc.reason}", file=sys.stderr)
        return 2
