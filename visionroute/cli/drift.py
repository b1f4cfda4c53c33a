"""``visionroute drift report``: the running service's drift monitors as a table (and a plot).

It asks ``GET /v1/drift`` (admin) of the service at ``--url`` (default ``$VISIONROUTE_URL`` or
http://127.0.0.1:8000) with ``--api-key`` (default ``$VISIONROUTE_API_KEY``). Each ingress
replica keeps its own windows, so the report is the replica that answered (its ``replica``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from visionroute.client import ServiceClient, add_service_arguments

COLUMNS = ("task", "monitor", "status", "score", "p_value", "alarm", "n_ref", "n_window")


def fetch_report(url: str, api_key: str | None, *, client=None) -> dict[str, Any]:
    """The report from ``url``; ``client`` (an httpx.Client, e.g. FastAPI's TestClient) for tests."""
    return ServiceClient(url, api_key, timeout_s=30.0, client=client).call("GET", "/v1/drift")


def _number(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_report(report: dict[str, Any]) -> str:
    """A fixed-width table: one row per (task, monitor)."""
    rows = [
        (
            row["task"],
            row["monitor"],
            row["status"],
            _number(row.get("score"), ".4g"),
            _number(row.get("p_value"), ".3g"),
            "ALARM" if row.get("alarm") else "no",
            str(row.get("n_reference", 0)),
            str(row.get("n_window", 0)),
        )
        for row in report.get("monitors", [])
    ]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)] if rows else None
    lines = [
        f"drift on {report.get('replica', '?')} ({report.get('scope', '')}); level "
        f"{report.get('config', {}).get('level')}; requests dropped under load: {report.get('dropped_requests', 0)}"
    ]
    if not report.get("enabled", True):
        return lines[0] + "\ndrift monitors are off (drift.enabled: false)"
    if not rows:
        return lines[0] + "\nno task is watched (drift.tasks)"
    for values in (COLUMNS, *rows):
        lines.append("  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip())
    notes = [f"{r['task']}/{r['monitor']}: {r['note']}" for r in report["monitors"] if r.get("note")]
    sources = sorted({f"{r['task']}/{r['monitor']}: {r['reference_source']}" for r in report["monitors"]})
    return "\n".join(lines + ["", "references:", *sources] + (["", "notes:", *notes] if notes else []))


def plot_report(report: dict[str, Any], path: str | Path) -> Path:
    """Each tested monitor's p-values over its tests (log scale) with the alarm level, one panel per task."""
    from evals.plots import _grid, _pyplot, _save

    plt = _pyplot()
    tasks = sorted({row["task"] for row in report.get("monitors", [])}) or ["(none)"]
    fig, axes = _grid(plt, len(tasks), width=4.0, height=3.0)
    level = report.get("config", {}).get("level")
    for ax, task in zip(axes, tasks):
        for row in report.get("monitors", []):
            if row["task"] != task or not row.get("history"):
                continue
            observed = [h["observed"] for h in row["history"]]
            p_values = [max(h["p_value"], 1e-12) for h in row["history"]]
            ax.plot(observed, p_values, marker=".", label=row["monitor"])
        if level:
            ax.axhline(level, color="red", linestyle="--", linewidth=1, label=f"level {level:g}")
        ax.set_yscale("log")
        ax.set_title(task)
        ax.set_xlabel("observations")
        ax.set_ylabel("p-value")
        ax.legend(fontsize=7)
    fig.suptitle(f"drift p-values ({report.get('replica', '?')})")
    return _save(fig, path)


def _report(args) -> int:
    report = fetch_report(args.url, args.api_key)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    if args.plot:
        print(f"plot: {plot_report(report, args.plot)}")
    return 1 if any(row.get("alarm") for row in report.get("monitors", [])) else 0


def register(subparsers, bench) -> None:
    drift = subparsers.add_parser("drift", help="the running service's drift monitors")
    commands = drift.add_subparsers(dest="drift_command", required=True, metavar="COMMAND")
    report = commands.add_parser(
        "report",
        help="table of every task's monitors (score, p-value, alarm, sizes); exit 1 while one alarms",
        description="Fetch GET /v1/drift (admin) from the running service and print one row per task "
        "and monitor. The report is the answering ingress replica's own windows.",
    )
    add_service_arguments(report, key_help="an admin API key")
    report.add_argument("--json", action="store_true", help="print the whole report as JSON")
    report.add_argument("--plot", metavar="PNG", help="also draw each monitor's p-values over its tests")
    report.set_defaults(func=_report)
