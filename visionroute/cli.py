"""The ``visionroute`` command line: each package registers its own subcommands."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from visionroute.errors import RouterError

# Each module has ``register(subparsers, bench)``: it adds its commands to ``subparsers`` and
# its benchmarks to ``bench`` (``visionroute bench <name>``); each parser sets
# ``func(args) -> int``.
COMMAND_MODULES = (
    "cascades.cli",
    "evals.cli",
    "retrieval.cli",
    "cascades.vlm.cli",
    "router.cli",
    "policies.cli",
    "router.security_cli",
    "evals.benchmarks.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visionroute", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    bench = subparsers.add_parser("bench", help="benchmarks: print a figure and its baseline")
    bench_subparsers = bench.add_subparsers(dest="bench", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers, bench_subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
