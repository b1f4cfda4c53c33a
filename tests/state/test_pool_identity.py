"""Each store's pool names its connections (``application_name``: this process and the store),
so pg_stat_activity tells whose connections are open; its size and idle limit come from the
config (a fixed pool, pool_min == pool_max, is open in full before the first request)."""

from __future__ import annotations

import os
import time

import psycopg
import pytest

from visionroute.state import StateConfig, open_database


def connections_named(dsn: str) -> list[tuple[str, str]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(
            "SELECT application_name, COALESCE(state, '') FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid() ORDER BY 1"
        ).fetchall()


def wait_for(condition, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while not (found := condition()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return found


def test_a_fixed_pool_opens_every_connection_at_start_each_naming_its_process_and_store(
    postgres_dsn, tmp_path
):
    config = StateConfig(backend="postgres", pool_min=3, pool_max=3, pool_max_idle_s=30)
    database = open_database(config, "identity", tmp_path / "unused")
    try:
        assert database.pool.max_idle == 30
        expected = f"visionroute pid={os.getpid()} store=visionroute_identity"
        named = wait_for(
            lambda: [n for n, _ in connections_named(postgres_dsn) if n == expected][:3] == [expected] * 3
        )
        assert named, connections_named(postgres_dsn)
        with database.read() as conn:  # in use or not, the pool stays at its size
            assert conn.execute("SELECT 1").fetchone()[0] == 1
        assert sum(n == expected for n, _ in connections_named(postgres_dsn)) == 3
    finally:
        database.close()
    assert wait_for(lambda: not any(n == expected for n, _ in connections_named(postgres_dsn)))


def test_an_application_name_in_the_dsn_wins(postgres_dsn, monkeypatch, tmp_path):
    monkeypatch.setenv("VISIONROUTE_PG_DSN", postgres_dsn + "?application_name=ops-console")
    database = open_database(StateConfig(backend="postgres", pool_min=1), "named", tmp_path / "unused")
    try:
        with database.read() as conn:
            assert conn.execute("SHOW application_name").fetchone()[0] == "ops-console"
    finally:
        database.close()


def test_a_pool_idle_limit_out_of_range_names_the_field():
    with pytest.raises(ValueError, match="pool_max_idle_s"):
        StateConfig(backend="postgres", pool_max_idle_s=0)
