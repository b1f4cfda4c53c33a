"""The soak's report as a table on stdout."""

from __future__ import annotations

from typing import Any

from evals.benchmarks.soak_vlm import (
    format_vlm,
)


def format_report(report: dict[str, Any]) -> str:
    s = report["statuses"]
    lines = [
        f"soak: {report['ran_s']:.0f} s of traffic, {s['attempts']} attempts; faults: "
        + ", ".join(
            f"{e['fault']}@{e['at_s']:.0f}s"
            + (f" (back in {e['recovered_after_s']:.0f} s)" if "recovered_after_s" in e else "")
            + (f" ERROR {e['error']}" if "error" in e else "")
            + (" (skipped: the last restart not ready)" if "skipped" in e else "")
            for e in report["faults"]
        ),
        "",
        f"{'status':>14} {'attempts':>9}",
        *(f"{status:>14} {count:>9}" for status, count in s["by_status"].items()),
        f"not allowed: {len(s['not_allowed'])} ({len(s['not_allowed_unexplained'])} not in flight at a replica kill);"
        f" 503 without Retry-After: {s['retry_after_missing_on_503']}",
        *(f"  {u}" for u in s["not_allowed"][:20]),
        "",
        f"acknowledged: {report['acknowledged']}; lost: {report['lost_total']}"
        + (f" {report['lost']}" if report["lost_total"] else ""),
        f"duplicate review items: {len(report['duplicate_review_items'])}",
        "budget: cap {cap_units:g}, ledger {ledger_units:g} units in {reservations} reservations,"
        " acknowledged {acknowledged_units:g}; overspend {overspend_units:g}".format(**report["budget"]),
        "",
        f"{'role':<24} {'start MiB/fds':>15} {'warm MiB/fds':>15} {'end MiB/fds':>15} {'growth rss/fds':>15}",
    ]
    snaps, grow = report["resources"], report["growth_after_warmup"]
    roles = sorted(set().union(*(snap["roles"] for snap in snaps.values())))

    def cell(snap: dict[str, Any], role: str) -> str:
        row = snap["roles"].get(role)
        return f"{row['rss_mib']:.0f}/{row['fds']}" if row else "-"

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:+.0f}%"

    for role in roles:
        g = grow["roles"].get(role, {})
        lines.append(
            f"{role:<24} {cell(snaps['start'], role):>15} {cell(snaps['after_warmup'], role):>15}"
            f" {cell(snaps['end'], role):>15} {pct(g.get('rss')) + '/' + pct(g.get('fds')):>15}"
        )
    t = grow["totals"]
    lines.append(
        f"{'service total':<24} "
        + " ".join(
            f"{snaps[k]['service_rss_mib']:.0f}/{snaps[k]['service_fds']:>5}".rjust(15)
            for k in ("start", "after_warmup", "end")
        )
        + f" {pct(t['service_rss_mib']) + '/' + pct(t['service_fds']):>15}"
    )
    lines.append(
        f"{'db connections':<24} "
        + " ".join(f"{snaps[k]['db_connections']}".rjust(15) for k in ("start", "after_warmup", "end"))
        + f" {pct(t['db_connections']):>15}"
    )
    lines.append(
        "db connections by state: "
        + "; ".join(f"{k} {snaps[k]['db_connections_by_state']}" for k in ("start", "after_warmup", "end"))
    )
    for k in ("start", "after_warmup", "end"):
        owners = snaps[k].get("db_connections_by_owner") or {}
        lines.append(
            f"db connections at {k}: by role {owners.get('by_role')}; {owners.get('pools')} pools,"
            f" largest {owners.get('largest_pool')}; of processes gone {owners.get('of_processes_gone')}"
        )
    if snaps["start"].get("vllm_rss_mib") is not None:
        lines.append(
            f"{'vLLM server total':<24} "
            + " ".join(
                f"{snaps[k]['vllm_rss_mib']:.0f}/{snaps[k]['vllm_fds']:>5}".rjust(15)
                for k in ("start", "after_warmup", "end")
            )
            + "  (restarted as a fault: end is a new process)"
        )
    lines.append(f"growth after warm-up within {100 * grow['limit']:.0f}%: {grow['within_limit']}")
    if report.get("vlm"):
        lines += ["", *format_vlm(report["vlm"])]
    return "\n".join(lines)
