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
