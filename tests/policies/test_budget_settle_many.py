"""Many settles in one usage write (``BudgetLedger.settle_many``) and the service's grouping of
concurrent settles (router/services/analyze/grouped_writes.py): the usage totals are exactly
what settling one by one makes, and a capped reservation keeps its own durable settle."""

import asyncio

import pytest

from policies.budgets import BudgetExhausted, BudgetLedger, BudgetRule, Reservation
from router.services.analyze.grouped_writes import GroupedWrites


def reserve(ledger, tenant="t", tier="onnx", units=1.0, rules=()):
    return ledger.reserve(list(rules), tenant=tenant, feature="classify", tier=tier, units=units)


def test_settle_many_adds_what_settling_one_by_one_adds(tmp_path):
    one_by_one, many = BudgetLedger(tmp_path / "a.sqlite3"), BudgetLedger(tmp_path / "b.sqlite3")
    plan = [
        ("t", "onnx", 1.0, None),
        ("t", "onnx", 1.0, 0.5),
        ("u", "review", 2.0, None),
        ("t", "vlm", 3.0, 3.0),
    ]
    for tenant, tier, units, actual in plan:
        one_by_one.settle(reserve(one_by_one, tenant, tier, units), actual)
    settles = [(reserve(many, tenant, tier, units), actual) for tenant, tier, units, actual in plan]
    assert many.settle_many(settles) == [None] * len(plan)
    assert all(reservation.done for reservation, _ in settles)
    assert many.usage() == one_by_one.usage()
    assert many.settle_many(settles) == [None] * len(plan)  # settled already: nothing added twice
    assert many.usage() == one_by_one.usage()


def test_a_capped_reservation_is_settled_on_its_own_row(tmp_path):
    ledger = BudgetLedger(tmp_path / "b.sqlite3")
    rules = [BudgetRule(name="small", window_s=3600, cap_units=10.0)]
    capped = reserve(ledger, units=6.0, rules=rules)
    free = reserve(ledger, tier="review", units=1.0)
    assert (
        ledger.settle_many([(capped, 2.0), (free, None), (reserve(ledger, tier="review"), None)])
        == [None] * 3
    )
    # the cap counts the settled 2 units, not the 6 reserved: 8 more fit, then nothing does
    assert isinstance(reserve(ledger, units=8.0, rules=rules), Reservation)
    with pytest.raises(BudgetExhausted):
        reserve(ledger, units=1.0, rules=rules)
    totals = {row["tier"]: (row["units"], row["calls"]) for row in ledger.usage()}
    assert totals == {"onnx": (2.0, 1), "review": (2.0, 2)}


def test_concurrent_settles_share_a_usage_commit(tmp_path):
    ledger = BudgetLedger(tmp_path / "b.sqlite3")
    grouped = GroupedWrites(lambda settle: ledger.settle(*settle), ledger.settle_many)

    async def many():
        await asyncio.gather(*(grouped.write((reserve(ledger), None)) for _ in range(10)))

    asyncio.run(many())
    assert ledger.usage() == [
        {"tenant": "t", "feature": "classify", "tier": "onnx", "units": 10.0, "calls": 10}
    ]
    assert grouped.transactions < 10  # the first alone, the others together
