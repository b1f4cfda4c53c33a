"""The issue's one-minute soak (evals/benchmarks/soak.py, ``visionroute bench soak``) in the suite.

Its own service on the session's PostgreSQL (the soak restarts the server and kills a replica:
a shared service would carry that into other tests), mixed HTTP and gRPC traffic for a minute
with the faults that fit a minute (the soak's schedule: PostgreSQL restarted, then an ingress
replica killed), so traffic runs before, through and after each. It asserts the report's
invariants; the resource figures are printed (``-s``), never asserted (they depend on the
machine). Longer runs, where durations and resource growth mean something, are the bench's
(``visionroute bench soak --minutes 30``; figures in docs/soak.md).
"""

from __future__ import annotations

import json

import pytest

from evals.benchmarks.soak import SoakOptions, format_report, run_soak

pytestmark = [pytest.mark.server, pytest.mark.slow]


def test_traffic_under_faults_loses_nothing_and_answers_only_allowed_statuses(
    prepared_models_dir, postgres_server, tmp_path
):
    # A low cap (1 unit a call): the metered tenant, about 7.5% of the calls (seen: 4 in 30 s,
    # 19 in 60 s), spends it in the first seconds, so the overspend check judges calls refused at the cap.
    options = SoakOptions(
        minutes=1.0, faults=("postgres", "ingress"), search_replicas=1, budget_cap_units=2.0
    )
    assert [f for _, f in options.schedule()] == ["postgres", "ingress"]  # both, with traffic after
    assert options.schedule()[-1][0] <= options.duration_s - 10
    report = run_soak(
        options,
        models_dir=prepared_models_dir,
        workdir=tmp_path,
        pg=postgres_server,
        dsn=postgres_server.create_database("soak"),
    )
    (tmp_path / "soak.json").write_text(json.dumps(report, indent=2, default=str))
    print("\n" + format_report(report))

    faults = report["faults"]
    assert [e["fault"] for e in faults] == ["postgres", "ingress"], faults
    assert not [e for e in faults if "error" in e], faults
    statuses = report["statuses"]
    assert statuses["by_status"].get("200", 0) > 0, statuses
    # 200, 4xx, 429, 503 with Retry-After; anything else only on a request in flight on the
    # killed replica (Ray Serve's own answer for it), as the cluster tests allow
    assert statuses["not_allowed_unexplained"] == [], statuses["not_allowed_unexplained"]
    assert statuses["retry_after_missing_on_503"] == 0
    acknowledged = report["acknowledged"]
    assert acknowledged["review_items"] > 0 and acknowledged["search_entries"] > 0, acknowledged
    assert report["lost_total"] == 0, report["lost"]
    assert report["duplicate_review_items"] == []
    budget = report["budget"]
    assert budget["overspend_units"] == 0 and budget["ledger_units"] <= budget["cap_units"], budget
    # every connection is a live process's pool, each within its fixed size (the killed ingress
    # replica's connections went with it); the count itself is printed, not asserted
    owners = report["resources"]["end"]["db_connections_by_owner"]
    assert owners["of_processes_gone"] == 0, owners
    assert 0 < owners["largest_pool"] <= options.pool_size, owners
