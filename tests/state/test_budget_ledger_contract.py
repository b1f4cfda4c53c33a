"""The budget ledger's contract, the same on both backends: a SQLite file and a PostgreSQL schema.

Every test here runs twice (``state`` is None for SQLite, a postgres StateConfig otherwise), so a
behaviour that differs between the backends fails one of the two runs.
"""

from __future__ import annotations

import threading

import pytest

from policies.budgets import BudgetExhausted, BudgetLedger, BudgetRule
from tests.support.pg_outage import (
    OUTAGE_CONNECT_TIMEOUT_S,
    quick_reconnect,  # noqa: F401 (a fixture)
)
from visionroute.errors import BudgetExceeded, InputError
from visionroute.state import StateConfig, StateUnavailable

WINDOW_S = 3600.0
NOW = 100.0  # inside the first window [0, 3600): Retry-After there is 3500 s


def rule(**overrides) -> BudgetRule:
    return BudgetRule(**{"name": "small", "window_s": WINDOW_S, "cap_units": 10.0, **overrides})


def postgres_state() -> StateConfig:
    # A short connect timeout: the outage test waits this long for a refusal.
    return StateConfig(backend="postgres", connect_timeout_s=2)


@pytest.fixture(params=["sqlite", "postgres"])
def state(request) -> StateConfig | None:
    if request.param == "sqlite":
        return None
    request.getfixturevalue("postgres_dsn")  # a fresh database, its DSN in VISIONROUTE_PG_DSN
    return postgres_state()


@pytest.fixture
def open_ledger(tmp_path, state):
    """Opens ledger objects on the same store (as separate replicas would); closes them after."""
    opened: list[BudgetLedger] = []

    def open_one() -> BudgetLedger:
        ledger = BudgetLedger(tmp_path / "budgets.sqlite3", state)
        opened.append(ledger)
        return ledger

    yield open_one
    for ledger in opened:
        ledger.close()


@pytest.fixture
def ledger(open_ledger) -> BudgetLedger:
    return open_ledger()


def reserve(
    ledger: BudgetLedger, rules: list[BudgetRule], units: float, *, now: float = NOW, feature="classify"
):
    return ledger.reserve(rules, tenant="t", feature=feature, tier="onnx", units=units, now=now)


def used(ledger: BudgetLedger, budget: BudgetRule, now: float = NOW) -> float:
    return ledger.status([budget], now=now)[0]["used_units"]


def test_the_ledger_lives_where_state_says(ledger, state, tmp_path):
    reserve(ledger, [rule()], 1)
    assert (tmp_path / "budgets.sqlite3").exists() == (state is None)
    assert ledger.database.dialect.name == ("sqlite" if state is None else "postgres")


def test_reserve_release_and_settle_move_the_window_total(ledger):
    rules = [rule()]
    first = reserve(ledger, rules, 6)
    assert used(ledger, rules[0]) == 6.0
    ledger.release(first)
    assert used(ledger, rules[0]) == 0.0
    second = reserve(ledger, rules, 6)
    ledger.settle(second, 4.0)  # below the reservation: the rest is freed
    assert used(ledger, rules[0]) == 4.0
    assert ledger.usage() == [
        {"tenant": "t", "feature": "classify", "tier": "onnx", "units": 4.0, "calls": 1}
    ]
    # a finished reservation is final: settling again or releasing it changes nothing
    ledger.settle(second, 9.0)
    ledger.release(second)
    assert used(ledger, rules[0]) == 4.0
    assert ledger.usage()[0]["calls"] == 1


def test_status_reports_the_window(ledger):
    rules = [rule()]
    reserve(ledger, rules, 2.5)
    [status] = ledger.status(rules, now=NOW)
    assert status["name"] == "small" and status["cap_units"] == 10.0
    assert status["used_units"] == 2.5 and status["remaining_units"] == 7.5
    assert status["window_start"] == 0.0
    assert status["resets_in_s"] == pytest.approx(WINDOW_S - NOW)


def test_settling_above_the_reservation_caps_the_charge_but_records_the_true_cost(ledger):
    rules = [rule()]
    reservation = reserve(ledger, rules, 3)
    ledger.settle(reservation, 8.0)
    assert used(ledger, rules[0]) == 3.0  # the cap only ever counts what was reserved
    assert ledger.usage()[0]["units"] == 8.0


def test_a_call_no_rule_meters_only_adds_to_the_usage_totals(ledger):
    metered_elsewhere = [rule(feature="text")]
    for actual in (1.5, 2.0):
        reservation = reserve(ledger, metered_elsewhere, 1)
        assert reservation.budgets == []
        ledger.settle(reservation, actual)
    assert ledger.usage() == [
        {"tenant": "t", "feature": "classify", "tier": "onnx", "units": 3.5, "calls": 2}
    ]
    assert used(ledger, metered_elsewhere[0]) == 0.0


def test_a_full_window_refuses_with_the_seconds_until_it_resets(ledger):
    rules = [rule()]
    reserve(ledger, rules, 6)
    with pytest.raises(BudgetExhausted) as info:
        reserve(ledger, rules, 6)
    assert isinstance(info.value, BudgetExceeded) and info.value.rule.name == "small"
    assert info.value.field == "budget:small"
    assert info.value.retry_after_s == pytest.approx(WINDOW_S - NOW)
    assert "has used 6 of 10 units" in info.value.reason
    with pytest.raises(BudgetExhausted) as late:
        reserve(ledger, rules, 6, now=WINDOW_S - 0.5)
    assert late.value.retry_after_s == pytest.approx(0.5)
    assert used(ledger, rules[0]) == 6.0  # a refusal reserves nothing
    reserve(ledger, rules, 10, now=WINDOW_S)  # the next window starts empty


def test_a_reservation_is_all_or_nothing_over_every_matching_rule(ledger):
    wide, narrow = rule(name="wide", cap_units=100.0), rule(name="narrow", feature="text", cap_units=1.0)
    reserve(ledger, [wide, narrow], 1, feature="text")
    with pytest.raises(BudgetExhausted) as info:
        reserve(ledger, [wide, narrow], 1, feature="text")
    assert info.value.rule.name == "narrow"
    assert used(ledger, wide) == 1.0  # the refused call reserved nothing on the rule that had room
    reserve(ledger, [wide, narrow], 1, feature="classify")  # "narrow" does not meter classify
    assert used(ledger, wide) == 2.0 and used(ledger, narrow) == 1.0


def test_prune_drops_ended_windows_and_keeps_the_usage_totals(ledger):
    rules = [rule()]
    ledger.settle(reserve(ledger, rules, 2, now=NOW))
    reserve(ledger, rules, 3, now=WINDOW_S + NOW)
    assert ledger.prune(older_than_s=60, now=WINDOW_S + 30) == 0  # the first window ended only 30 s ago
    assert ledger.prune(older_than_s=60, now=WINDOW_S + 90) == 1
    assert used(ledger, rules[0], now=NOW) == 0.0
    assert used(ledger, rules[0], now=WINDOW_S + NOW) == 3.0
    assert ledger.usage()[0]["units"] == 2.0


def test_bad_reservations_are_input_errors(ledger):
    with pytest.raises(InputError, match="unknown tier"):
        ledger.reserve([rule()], tenant="t", feature="classify", tier="gpu", units=1)
    for units in (-1.0, float("nan"), float("inf")):
        with pytest.raises(InputError, match="finite units"):
            reserve(ledger, [rule()], units)


def test_replicas_racing_for_the_last_units_never_overspend(open_ledger):
    rules = [rule(cap_units=10.0)]
    replicas = [open_ledger() for _ in range(40)]  # one ledger object each, as separate replicas
    granted, refused, failed = [], [], []
    barrier = threading.Barrier(len(replicas))

    def race(replica: BudgetLedger) -> None:
        barrier.wait()
        try:
            granted.append(reserve(replica, rules, 1))
        except BudgetExhausted:
            refused.append(1)
        except Exception as error:  # reported by the assertion below
            failed.append(error)

    threads = [threading.Thread(target=race, args=(replica,)) for replica in replicas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failed
    assert len(granted) == 10 and len(refused) == 30
    assert used(replicas[0], rules[0]) == 10.0


@pytest.mark.usefixtures("quick_reconnect")
def test_a_postgres_outage_refuses_with_state_unavailable_then_recovers(
    tmp_path, postgres_server, postgres_dsn
):
    state = postgres_state().model_copy(update={"connect_timeout_s": OUTAGE_CONNECT_TIMEOUT_S})
    ledger, rules = BudgetLedger(tmp_path / "budgets.sqlite3", state), [rule()]
    try:
        reserve(ledger, rules, 3)
        try:
            postgres_server.stop_server()
            with pytest.raises(StateUnavailable) as info:
                reserve(ledger, rules, 1)
            assert info.value.retry_after_s > 0
        finally:
            postgres_server.start_server()
        # the same object works again, and the refused reservation left nothing behind
        reserve(ledger, rules, 1)
        assert used(ledger, rules[0]) == 4.0
    finally:
        ledger.close()
