"""The checks after a soak: acknowledged items looked up in PostgreSQL (lost, duplicates),
the budget's overspend, and every attempt by status."""

from __future__ import annotations

from collections import Counter
from typing import Any

from evals.benchmarks.soak_options import BUDGET_NAME
from evals.benchmarks.soak_traffic import Ledger

# -- the checks after the run ----------------------------------------------------------------------


def _sql(dsn: str, query: str, *params: Any) -> list[tuple]:
    import psycopg

    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        return conn.execute(query, params).fetchall()


def verify(dsn: str, ledger: Ledger, cap_units: float) -> dict[str, Any]:
    """What was acknowledged against what the stores hold now."""
    review_ids = list(ledger.review_items)
    stored = {
        row[0]: (row[1], row[2], row[3])
        for row in _sql(
            dsn,
            "SELECT id, tenant, request_id, status FROM visionroute_review.items WHERE id = ANY(%s)",
            review_ids,
        )
    }
    lost_review = sorted(set(review_ids) - set(stored))
    wrong_owner = sorted(i for i, key in ledger.review_items.items() if i in stored and stored[i][:2] != key)
    request_ids = sorted({request_id for _, request_id in ledger.review_items.values()})
    duplicates = _sql(
        dsn,
        "SELECT tenant, request_id, COUNT(*) FROM visionroute_review.items WHERE request_id = ANY(%s)"
        " GROUP BY tenant, request_id, kind HAVING COUNT(*) > 1",
        request_ids,
    )
    found_search = {
        row[0]
        for row in _sql(
            dsn, "SELECT id FROM visionroute_search.items WHERE id = ANY(%s)", sorted(ledger.search_ids)
        )
    }
    lost_search = sorted(ledger.search_ids - found_search)
    label_status = dict(
        _sql(
            dsn, "SELECT id, status FROM visionroute_review.items WHERE id = ANY(%s)", sorted(ledger.labelled)
        )
    )
    lost_labels = sorted(i for i in ledger.labelled if label_status.get(i) != "labelled")
    charged, reservations = _sql(
        dsn,
        "SELECT COALESCE(SUM(units), 0), COUNT(*) FROM visionroute_budgets.reservations WHERE budget = %s",
        BUDGET_NAME,
    )[0]
    charged = float(charged)
    return {
        "acknowledged": {
            "review_items": len(review_ids),
            "search_entries": len(ledger.search_ids),
            "labels": len(ledger.labelled),
        },
        "lost": {
            "review_items": lost_review + wrong_owner,
            "search_entries": lost_search,
            "labels": lost_labels,
        },
        "lost_total": len(lost_review) + len(wrong_owner) + len(lost_search) + len(lost_labels),
        "duplicate_review_items": [list(row) for row in duplicates],
        "budget": {
            "cap_units": cap_units,
            "ledger_units": charged,
            "reservations": int(reservations),
            "acknowledged_units": round(ledger.metered_units, 3),
            "overspend_units": round(max(0.0, charged - cap_units, ledger.metered_units - cap_units), 3),
        },
    }


def statuses(
    ledger: Ledger, kill_times: list[float], started: float | None = None, faults: list[dict] | None = None
) -> dict[str, Any]:
    """Attempts by status; the disallowed ones listed, each marked when it was in flight at a
    replica kill (sent before, answered after: what a request on a killed replica gets), with
    when it was sent (seconds into the traffic) and the last fault before it, so an unexplained
    one can be placed against the schedule."""
    by_status = Counter(str(a.status) for a in ledger.attempts)
    unexpected = []
    for a in ledger.attempts:
        allowed = (
            a.status == 200
            or (isinstance(a.status, int) and 400 <= a.status < 500)
            or (a.status == 503 and a.retry_after)
        )
        if allowed:
            continue
        in_flight = any(a.started <= t <= a.ended for t in kill_times)
        entry = {
            "op": a.op,
            "face": a.face,
            "status": str(a.status),
            "in_flight_at_kill": in_flight,
            "reason": a.reason,
        }
        if started is not None:
            entry["sent_at_s"] = round(a.started - started, 1)
            entry["answered_after_s"] = round(a.ended - a.started, 1)
            before = [e for e in faults or [] if e["at_monotonic"] <= a.started]
            if before:
                entry["after_fault"] = (
                    f"{before[-1]['fault']} {a.started - before[-1]['at_monotonic']:.1f} s before"
                )
        unexpected.append(entry)
    return {
        "attempts": len(ledger.attempts),
        "by_status": dict(sorted(by_status.items())),
        "retry_after_missing_on_503": sum(
            1 for a in ledger.attempts if a.status == 503 and not a.retry_after
        ),
        "not_allowed": unexpected,
        "not_allowed_unexplained": [u for u in unexpected if not u["in_flight_at_kill"]],
        "calls": {f"{op} {face} {outcome}": n for (op, face, outcome), n in sorted(ledger.calls.items())},
    }
