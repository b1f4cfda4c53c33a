"""The median of several ``visionroute bench serve --json`` runs, for the shipped config's targets.

One run on a shared 2-core machine swings by 2x and more (docs/operations.md, Performance), so
the targets are judged on the median of >= 3 runs, each ratio against the floor of its own run:

    for i in 1 2 3; do visionroute bench serve --placement both --indexing on \\
        --requests 100 --faces http grpc --json bench-serve-$i.json; done
    python -m evals.benchmarks.serve_median bench-serve-1.json bench-serve-2.json bench-serve-3.json

judges the config serve_config.yaml ships (its classify placement and `index_analysed`);
``--config "ingress/indexing on"`` (a key of the runs' ``service``) judges another.

prints one row per run and the median row: HTTP and gRPC sequential p50 / floor (target <= 1.2),
8-client throughput / floor (>= 0.9), the batch API's images/s / the single-image API's over
HTTP (>= 2), and the load average during each run.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from visionroute.errors import InputError

SERVE_CONFIG = Path(__file__).resolve().parents[2] / "serve_config.yaml"


def shipped_key(serve_config: Path = SERVE_CONFIG) -> str:
    """The bench serve result key of the config serve_config.yaml ships: its classify cascade's
    placement and whether analysed images are indexed (``"ingress/indexing on"``)."""
    import yaml

    args = yaml.safe_load(serve_config.read_text())["applications"][0]["args"]
    placement = args["cascades"]["classify"].get("placement", "deployment")
    retrieval = args.get("retrieval", {})
    indexing = retrieval.get("enabled", False) and retrieval.get("index_analysed", False)
    return f"{placement}/indexing {'on' if indexing else 'off'}"


SHIPPED = shipped_key()
COLUMNS: tuple[tuple[str, str, float], ...] = (  # (column, which way is better, target)
    ("HTTP p50/floor", "<=", 1.2),
    ("HTTP req/s/floor", ">=", 0.9),
    ("gRPC p50/floor", "<=", 1.2),
    ("gRPC req/s/floor", ">=", 0.9),
    ("batch/single", ">=", 2.0),
)


def ratios(run: Mapping[str, Any], name: str = "run", config: str = SHIPPED) -> dict[str, float]:
    """One run's target ratios for ``config`` (NaN for a part the run did not measure)."""
    try:
        floor, shipped = run["floor"], run["service"][config]
    except (KeyError, TypeError):
        placement, _, indexing = config.partition("/indexing ")
        raise InputError(
            f"{name} has no floor or no {config!r} results: run bench serve with --placement {placement} "
            f"(or both) --indexing {indexing} (or both) and --json",
            field=name,
        ) from None
    out = {column: float("nan") for column, _, _ in COLUMNS}
    for face, label in (("http", "HTTP"), ("grpc", "gRPC")):
        if face in shipped:
            out[f"{label} p50/floor"] = shipped[face]["sequential"]["p50_ms"] / floor["sequential"]["p50_ms"]
            out[f"{label} req/s/floor"] = shipped[face]["requests_per_s"] / floor["requests_per_s"]
    if "batch" in shipped:
        out["batch/single"] = shipped["batch"]["vs_single"]
    return out


def median_table(runs: Sequence[tuple[str, Mapping[str, Any]]], config: str = SHIPPED) -> str:
    """Per-run rows, the median row and the verdicts for ``config``, as a Markdown table."""
    if not runs:
        raise InputError("no runs given: pass the --json files of bench serve runs", field="runs")
    rows = [(name, ratios(run, name, config), run.get("load_average", {})) for name, run in runs]
    header = "| run (load start -> end) | " + " | ".join(c for c, _, _ in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, values, load in rows:
        where = (
            f"{load['start']:.0f} -> {load['end']:.0f}"
            if {"start", "end"} <= set(load)
            else "load not recorded"
        )
        lines.append(f"| {name} ({where}) | " + " | ".join(f"{values[c]:.2f}" for c, _, _ in COLUMNS) + " |")
    medians = {c: statistics.median(values[c] for _, values, _ in rows) for c, _, _ in COLUMNS}
    lines.append(
        f"| **median of {len(rows)}** | " + " | ".join(f"**{medians[c]:.2f}**" for c, _, _ in COLUMNS) + " |"
    )
    verdicts = []
    for column, way, target in COLUMNS:
        met = medians[column] <= target if way == "<=" else medians[column] >= target
        verdicts.append(f"{column} {medians[column]:.2f} ({way} {target:g}: {'met' if met else 'NOT met'})")
    return f"config: {config}\n" + "\n".join(lines) + "\n\ntargets on the median: " + "; ".join(verdicts)


def main(argv: Sequence[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    config = SHIPPED
    if argv[0] == "--config":
        if len(argv) < 2:
            raise InputError("--config needs a key such as 'ingress/indexing on'", field="config")
        config, argv = argv[1], argv[2:]
    runs = [(Path(path).stem, json.loads(Path(path).read_text())) for path in argv]
    print(median_table(runs, config))
    return 0


def _main_with_clear_errors(argv: Sequence[str]) -> int:
    try:
        return main(argv)
    except InputError as error:
        print(f"serve_median: {error.field}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(_main_with_clear_errors(sys.argv[1:]))
