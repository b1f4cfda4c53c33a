"""The soak's database measurement tells whose connections are open (each store pool names its
process, visionroute/state.py), and the soak's pools are fixed at the size it is told."""

from __future__ import annotations

import os

import pytest

from evals.benchmarks.soak import SoakOptions, soak_document
from evals.benchmarks.soak_measurements import connections_by_owner
from visionroute.errors import ConfigError


def test_connections_are_grouped_by_the_role_of_the_process_that_owns_them_and_dead_owners_show():
    rows = [
        ("visionroute pid=101 store=visionroute_review", "idle", 2),
        ("visionroute pid=101 store=visionroute_budgets", "idle", 1),
        ("visionroute pid=101 store=visionroute_review", "active", 1),
        ("visionroute pid=202 store=visionroute_search", "idle", 2),
        ("visionroute pid=999 store=visionroute_review", "idle", 3),  # its process is gone
        ("psql", "idle", 1),
        ("", "idle", 1),
    ]
    owners = connections_by_owner(rows, {101: "replica:Ingress", 202: "replica:search"})
    assert owners["by_role"] == {
        "other client": 2,
        "process gone": 3,
        "replica:Ingress": 4,
        "replica:search": 2,
    }
    assert owners["by_state"] == {"active": 1, "idle": 10}
    assert owners["by_store"] == {"visionroute_budgets": 1, "visionroute_review": 6, "visionroute_search": 2}
    assert owners["pools"] == 4 and owners["largest_pool"] == 3
    assert owners["of_processes_gone"] == 3 and owners["processes_gone"] == [999]


@pytest.mark.parametrize("pool_size, expected", [(4, (4, 4)), (0, (None, None))])
def test_the_soak_config_fixes_the_pools_at_the_size_asked_or_leaves_the_shipped_ones(
    tmp_path, pool_size, expected
):
    from router.config import AppConfig

    document = soak_document(tmp_path / "models", tmp_path, SoakOptions(minutes=1, pool_size=pool_size))
    state = document["applications"][0]["args"]["state"]
    assert (state.get("pool_min"), state.get("pool_max")) == expected
    config = AppConfig.model_validate(document["applications"][0]["args"])
    assert config.state.backend == "postgres"


def test_a_pool_size_out_of_range_names_the_field():
    with pytest.raises(ConfigError) as caught:
        SoakOptions(minutes=1, pool_size=-1)
    assert caught.value.field == "pool_size"


def test_the_pool_name_matches_what_the_state_layer_sets(monkeypatch):
    from visionroute.state import _application_name

    name = _application_name("postgresql://u@127.0.0.1:5432/db", "visionroute_review")["application_name"]
    owners = connections_by_owner([(name, "idle", 1)], {os.getpid(): "me"})
    assert owners["by_role"] == {"me": 1}


def test_a_disallowed_status_is_placed_against_the_fault_schedule():
    from evals.benchmarks.soak_checks import statuses
    from evals.benchmarks.soak_traffic import Attempt, Ledger

    ledger = Ledger()
    ledger.add(Attempt("analyze", "http", 200, 101.0, 101.1, False))
    ledger.add(Attempt("analyze", "grpc", 503, 102.0, 102.1, True))
    ledger.add(Attempt("analyze", "grpc", 500, 109.0, 111.0, False, "actor died"))  # the kill at 110
    ledger.add(Attempt("search", "grpc", "no answer", 112.5, 142.5, False, "no answer within 30 s"))
    faults = [
        {"fault": "postgres", "at_monotonic": 105.0},
        {"fault": "ingress", "at_monotonic": 110.0, "pid": 7},
    ]
    report = statuses(ledger, [110.0], started=100.0, faults=faults)
    assert report["by_status"] == {"200": 1, "500": 1, "503": 1, "no answer": 1}
    killed, unexplained = report["not_allowed"]
    assert (
        killed["in_flight_at_kill"]
        and killed["sent_at_s"] == 9.0
        and killed["after_fault"] == "postgres 4.0 s before"
    )
    assert not unexplained["in_flight_at_kill"]
    assert unexplained["sent_at_s"] == 12.5 and unexplained["answered_after_s"] == 30.0
    assert unexplained["after_fault"] == "ingress 2.5 s before"
    assert report["not_allowed_unexplained"] == [unexplained]
