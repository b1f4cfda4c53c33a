"""Budget ledger: atomic reservations under threads and processes, windows, config errors."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
import threading
from contextlib import closing

import pytest

from policies.budgets import BudgetExhausted, BudgetLedger, BudgetRule
from policies.policy_set import parse_policy_set
from tests.support.race_workers import reserve_repeatedly
from visionroute.errors import BudgetExceeded, ConfigError


def window_total(ledger: BudgetLedger, budget: str, window_start: float) -> float:
    """Units reserved or settled against ``budget`` in the window starting at ``window_start``."""
    with closing(sqlite3.connect(ledger.path)) as db:
        row = db.execute(
            "SELECT COALESCE(SUM(units), 0) FROM reservations WHERE budget = ? AND window_start = ?",
            (budget, window_start),
        ).fetchone()
    return float(row[0])


def rule(**overrides) -> BudgetRule:
    return BudgetRule(**{"name": "small", "window_s": 3600, "cap_units": 10.0, **overrides})


def test_reserve_settle_release_and_exhaustion(tmp_path):
    ledger, rules = BudgetLedger(tmp_path / "b.sqlite3"), [rule()]
    first = ledger.reserve(rules, tenant="t", feature="classify", tier="onnx", units=6, now=100.0)
    with pytest.raises(BudgetExhausted) as info:
        ledger.reserve(rules, tenant="t", feature="classify", tier="onnx", units=6, now=100.0)
    assert isinstance(info.value, BudgetExceeded) and info.value.rule.name == "small"
    assert info.value.retry_after_s == pytest.approx(3500.0)
    assert "has used 6 of 10 units" in info.value.reason
    ledger.release(first)
    second = ledger.reserve(rules, tenant="t", feature="classify", tier="onnx", units=6, now=100.0)
    ledger.settle(second, 4.0)  # actual below the reservation frees the rest
    assert window_total(ledger, "small", 0.0) == 4.0
    assert ledger.usage() == [
        {"tenant": "t", "feature": "classify", "tier": "onnx", "units": 4.0, "calls": 1}
    ]
    # the next window starts empty
    ledger.reserve(rules, tenant="t", feature="classify", tier="onnx", units=10, now=3600.0)


def test_rules_match_by_tenant_feature_and_tier(tmp_path):
    ledger = BudgetLedger(tmp_path / "b.sqlite3")
    rules = [rule(name="acme-vlm", tenant="acme", tiers=["vlm"], cap_units=1.0)]
    # other tenants and other tiers are not metered by this rule
    for _ in range(3):
        ledger.reserve(rules, tenant="other", feature="classify", tier="vlm", units=1, now=0.0)
        ledger.reserve(rules, tenant="acme", feature="classify", tier="onnx", units=1, now=0.0)
    ledger.reserve(rules, tenant="acme", feature="classify", tier="vlm", units=1, now=0.0)
    with pytest.raises(BudgetExhausted):
        ledger.reserve(rules, tenant="acme", feature="text", tier="vlm", units=1, now=0.0)


def test_all_matching_rules_or_none(tmp_path):
    ledger = BudgetLedger(tmp_path / "b.sqlite3")
    rules = [rule(name="wide", cap_units=100.0), rule(name="narrow", feature="text", cap_units=1.0)]
    ledger.reserve(rules, tenant="t", feature="text", tier="onnx", units=1, now=0.0)
    with pytest.raises(BudgetExhausted) as info:
        ledger.reserve(rules, tenant="t", feature="text", tier="onnx", units=1, now=0.0)
    assert info.value.rule.name == "narrow"
    assert window_total(ledger, "wide", 0.0) == 1.0  # the failed attempt reserved nothing anywhere


def test_fifty_concurrent_threads_never_overspend(tmp_path):
    ledger, rules = BudgetLedger(tmp_path / "b.sqlite3"), [rule(cap_units=7.0)]
    granted, refused = [], []
    barrier = threading.Barrier(50)

    def worker() -> None:
        barrier.wait()
        try:
            granted.append(ledger.reserve(rules, tenant="t", feature="classify", tier="onnx", units=0.5))
        except BudgetExhausted:
            refused.append(1)

    threads = [threading.Thread(target=worker) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(granted) == 14 and len(refused) == 36
    assert ledger.status(rules)[0]["used_units"] == pytest.approx(7.0)


def test_processes_sharing_the_file_never_overspend(tmp_path):
    path = str(tmp_path / "b.sqlite3")
    BudgetLedger(path)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=reserve_repeatedly, args=(path, [rule(cap_units=5.0)], 10, out)) for _ in range(4)
    ]
    for p in procs:
        p.start()
    granted = sum(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert granted == 5
    assert BudgetLedger(path).status([rule(cap_units=5.0)])[0]["used_units"] == 5.0


@pytest.mark.parametrize(
    "budget, field",
    [
        ({"name": "b", "window_s": 60, "cap_units": -1}, "budgets.0.cap_units"),
        ({"name": "b", "window_s": -5, "cap_units": 1}, "budgets.0.window_s"),
        ({"name": "b", "window_s": 60, "cap_units": 1, "degrade": "sometimes"}, "budgets.0.degrade"),
        ({"name": "b", "window_s": 60, "cap_units": 1, "tiers": ["gpu"]}, "budgets.0.tiers.0"),
        ({"name": "b", "window_s": 60, "cap_units": 1, "cap": 3}, "budgets.0.cap"),
    ],
)
def test_bad_budget_config_names_the_field(budget, field):
    with pytest.raises(ConfigError) as info:
        parse_policy_set({"budgets": [budget]})
    assert info.value.field == field
    assert field in info.value.reason


def test_review_degrade_cannot_meter_review():
    with pytest.raises(ConfigError, match="degrade mode 'review' cannot apply"):
        parse_policy_set({"budgets": [{"name": "b", "window_s": 60, "cap_units": 1, "degrade": "review"}]})
    parse_policy_set(
        {"budgets": [{"name": "b", "window_s": 60, "cap_units": 1, "degrade": "review", "tiers": ["onnx"]}]}
    )


def test_unknown_feature_and_duplicate_names():
    with pytest.raises(ConfigError, match="expected '\\*' or one of \\['classify'\\]"):
        parse_policy_set(
            {"budgets": [{"name": "b", "feature": "clasify", "window_s": 60, "cap_units": 1}]},
            tasks=["classify"],
        )
    with pytest.raises(ConfigError, match="repeated: \\['b'\\]"):
        parse_policy_set({"budgets": [{"name": "b", "window_s": 60, "cap_units": 1}] * 2})
