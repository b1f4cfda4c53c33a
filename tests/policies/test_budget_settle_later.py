"""Usage totals deferred in memory (``BudgetLedger.settle_later``, the request path's settle):
this process reads them at once, the store gets them within ``usage_flush_s`` in one write, a
failed write keeps them, and a reservation a budget rule covers is still settled durably at once."""

import time

import pytest

from policies.budgets import BudgetExhausted, BudgetLedger, BudgetRule


def reserve(ledger, tenant="t", tier="onnx", units=1.0, rules=()):
    return ledger.reserve(list(rules), tenant=tenant, feature="classify", tier=tier, units=units)


def totals(ledger):
    return {(row["tenant"], row["tier"]): (row["units"], row["calls"]) for row in ledger.usage()}


def test_deferred_totals_are_read_at_once_here_and_written_for_others_within_the_period(tmp_path):
    ledger = BudgetLedger(tmp_path / "b.sqlite3")
    ledger.usage_flush_s = 0.05
    other = BudgetLedger(tmp_path / "b.sqlite3")  # another process's view: the rows only
    reservations = [reserve(ledger), reserve(ledger), reserve(ledger, tenant="u", tier="review")]
    for reservation, units in zip(reservations, (0.5, None, 2.0)):
        ledger.settle_later(reservation, units)
    ledger.settle_later(reservations[0], 9.0)  # settled already: nothing added twice
    expected = {("t", "onnx"): (1.5, 2), ("u", "review"): (2.0, 1)}
    assert totals(ledger) == expected
    deadline = time.monotonic() + 10
    while totals(other) != expected and time.monotonic() < deadline:
        time.sleep(0.02)
    assert totals(other) == expected and totals(ledger) == expected  # written once, not counted twice
    ledger.settle_later(reserve(ledger), None)
    ledger.close()  # a graceful stop writes what is pending
    assert totals(other) == {("t", "onnx"): (2.5, 3), ("u", "review"): (2.0, 1)}


def test_a_failed_write_keeps_the_totals_for_the_next(tmp_path, monkeypatch):
    ledger = BudgetLedger(tmp_path / "b.sqlite3")
    ledger.usage_flush_s = 3600  # flushed by hand here
    ledger.settle_later(reserve(ledger), None)

    def down():
        raise OSError("disk gone")

    with monkeypatch.context() as patched:
        patched.setattr(ledger, "_usage_transaction", down)
        with pytest.raises(OSError):
            ledger.flush_usage()
    ledger.settle_later(reserve(ledger), 2.0)
    assert totals(ledger) == {("t", "onnx"): (3.0, 2)}
    ledger.flush_usage()
    assert totals(BudgetLedger(tmp_path / "b.sqlite3")) == {("t", "onnx"): (3.0, 2)}
    assert totals(ledger) == {("t", "onnx"): (3.0, 2)}
    ledger.close()


def test_a_capped_reservation_is_settled_durably_at_once(tmp_path):
    ledger = BudgetLedger(tmp_path / "b.sqlite3")
    ledger.usage_flush_s = 3600
    rules = [BudgetRule(name="small", window_s=3600, cap_units=10.0)]
    capped = reserve(ledger, units=6.0, rules=rules)
    ledger.settle_later(capped, 2.0)
    other = BudgetLedger(tmp_path / "b.sqlite3")
    assert totals(other) == {("t", "onnx"): (2.0, 1)}  # its own transaction, not deferred
    # the cap counts the settled 2 units, on any process: 8 more fit, then nothing does
    assert reserve(other, units=8.0, rules=rules).budgets == ["small"]
    with pytest.raises(BudgetExhausted):
        reserve(ledger, units=1.0, rules=rules)
    ledger.close()
