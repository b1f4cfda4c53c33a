"""A retried request never charges a budget twice: reservations keyed on the request id.

A client resends a request under the same X-Request-Id; the ledger keys each reservation on
(tenant, feature, tier, request id) per budget (schema version 2), and a resend gets the first
send's reservation back, charged nothing. Every test runs on SQLite and on PostgreSQL (the
``state`` fixture of tests/conftest.py).
"""

from __future__ import annotations

import multiprocessing as mp
import threading

import pytest

from policies.budgets import MIGRATIONS, STORE, BudgetExhausted, BudgetLedger, BudgetRule
from tests.support.race_workers import reserve_at_the_barrier
from visionroute.migrations import migrate
from visionroute.state import open_database

NOW = 100.0  # inside the first hour window [0, 3600)


def rule(**overrides) -> BudgetRule:
    return BudgetRule(**{"name": "small", "window_s": 3600, "cap_units": 2.0, **overrides})


@pytest.fixture
def open_ledger(tmp_path, state):
    """Opens ledger objects on one store (as separate replicas would); closes them after."""
    opened: list[BudgetLedger] = []

    def open_one() -> BudgetLedger:
        opened.append(BudgetLedger(tmp_path / "budgets.sqlite3", state))
        return opened[-1]

    yield open_one
    for ledger in opened:
        ledger.close()


@pytest.fixture
def ledger(open_ledger) -> BudgetLedger:
    return open_ledger()


def reserve(ledger, rules, *, request_id, tier="onnx", tenant="acme", feature="classify", units=1.0, now=NOW):
    return ledger.reserve(
        rules, tenant=tenant, feature=feature, tier=tier, units=units, request_id=request_id, now=now
    )


def used(ledger: BudgetLedger, budget: BudgetRule, now: float = NOW) -> float:
    return ledger.status([budget], now=now)[0]["used_units"]


def test_a_retried_request_is_charged_once_and_gets_its_settled_reservation_back(ledger):
    rules = [rule(cap_units=2.0)]
    first = reserve(ledger, rules, request_id="req-1")
    ledger.settle(first, 0.75)
    retry = reserve(ledger, rules, request_id="req-1")
    ledger.settle(retry, 0.75)  # a replay is done: settling it charges nothing
    assert (retry.id, retry.units, retry.state, retry.budgets) == (first.id, 0.75, "settled", ["small"])
    assert retry.replayed and retry.done and not first.replayed
    assert used(ledger, rules[0]) == 0.75
    assert ledger.usage() == [
        {"tenant": "acme", "feature": "classify", "tier": "onnx", "units": 0.75, "calls": 1}
    ]
    # the colleague's reproduction: a cap of 2, two sends of req-1, then a third request fits
    reserve(ledger, rules, request_id="req-2")
    assert used(ledger, rules[0]) == 1.75


def test_a_retry_while_the_first_send_is_in_flight_shares_its_reservation(ledger):
    rules = [rule(cap_units=1.0)]
    first = reserve(ledger, rules, request_id="req-1")
    retry = reserve(ledger, rules, request_id="req-1")  # the window is full, but this request paid
    assert (retry.id, retry.state, retry.replayed, retry.done) == (first.id, "reserved", True, True)
    ledger.release(retry)  # the first send's to settle or release, not the replay's
    assert used(ledger, rules[0]) == 1.0
    ledger.settle(first, 0.5)
    assert used(ledger, rules[0]) == 0.5 and ledger.usage()[0]["calls"] == 1


def test_a_released_reservation_leaves_no_key_so_the_retry_that_runs_is_charged(ledger):
    rules = [rule()]
    ledger.release(reserve(ledger, rules, request_id="req-1"))  # the call did not run
    retry = reserve(ledger, rules, request_id="req-1")
    assert not retry.replayed and retry.state == "reserved"
    assert used(ledger, rules[0]) == 1.0


def test_each_tier_tenant_and_task_of_a_request_id_is_its_own_charge(ledger):
    rules = [rule(cap_units=100.0)]
    for tier in ("onnx", "vlm", "review"):
        ledger.settle(reserve(ledger, rules, request_id="req-1", tier=tier))
    reserve(ledger, rules, request_id="req-1", tenant="globex")
    reserve(ledger, rules, request_id="req-1", feature="text")
    assert used(ledger, rules[0]) == 5.0
    for tier in ("onnx", "vlm", "review"):  # and each of them once only
        assert reserve(ledger, rules, request_id="req-1", tier=tier).replayed
    assert used(ledger, rules[0]) == 5.0


def test_without_a_request_id_every_call_is_charged(ledger):
    rules = [rule(cap_units=2.0)]
    reserve(ledger, rules, request_id=None)
    reserve(ledger, rules, request_id=None)
    with pytest.raises(BudgetExhausted):
        reserve(ledger, rules, request_id=None)


def test_a_retry_after_erasure_is_a_new_charge(tmp_path, ledger, state):
    from policies.review_queue import ReviewQueue
    from router.services.erasure import Eraser, Subject

    rules = [rule(cap_units=10.0)]
    ledger.settle(reserve(ledger, rules, request_id="u-42:1"))
    queue = ReviewQueue(tmp_path / "review", state=state)
    try:
        Eraser(queue, ledger=ledger, actor="dpo@acme").erase_subject(
            Subject.parse("acme/u-42"), reason="art. 17"
        )
    finally:
        queue.close()
    assert not reserve(ledger, rules, request_id="u-42:1").replayed  # the key went with the request id
    assert used(ledger, rules[0]) == 2.0


def test_replicas_racing_with_one_request_id_charge_it_once(open_ledger):
    rules = [rule(cap_units=100.0)]
    replicas = [open_ledger() for _ in range(12)]
    got, failed = [], []
    barrier = threading.Barrier(len(replicas))

    def retry(replica: BudgetLedger) -> None:
        barrier.wait()
        try:
            got.append(reserve(replica, rules, request_id="req-1", units=3.0))
        except Exception as error:  # reported by the assertion below
            failed.append(error)

    threads = [threading.Thread(target=retry, args=(replica,)) for replica in replicas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failed, failed
    assert len({r.id for r in got}) == 1 and sum(not r.replayed for r in got) == 1 and len(got) == 12
    assert used(replicas[0], rules[0]) == 3.0


def test_processes_retrying_one_request_at_a_barrier_charge_it_once(tmp_path, state, open_ledger):
    path = str(tmp_path / "budgets.sqlite3")
    ledger = open_ledger()  # migrated before the race, so the processes race on the reservation
    n = 4
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(n), ctx.Queue()
    # each opens the ledger, waits for the others, then reserves req-1 (3 units)
    rules = [rule(cap_units=100.0)]
    resend = {
        "tenant": "acme",
        "feature": "classify",
        "tier": "onnx",
        "units": 3.0,
        "request_id": "req-1",
        "now": NOW,
    }
    processes = [
        ctx.Process(target=reserve_at_the_barrier, args=(path, state, rules, resend, barrier, out))
        for _ in range(n)
    ]
    for process in processes:
        process.start()
    try:
        reports = [out.get(timeout=180) for _ in processes]
    finally:
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    assert all(kind == "ok" for kind, _, _ in reports), reports
    assert len({rid for _, rid, _ in reports}) == 1
    assert sorted(replayed for _, _, replayed in reports) == [False] + [True] * (n - 1)
    assert used(ledger, rule(cap_units=100.0)) == 3.0


def test_a_lost_insert_rolls_back_and_returns_the_winners_reservation(ledger, monkeypatch):
    """The unique index is the backstop: were the key's lock bypassed (a lookup that missed the
    winner), the insert is turned away, nothing of it stays, and the retry reads the winner."""
    wide, narrow = rule(name="a-wide", cap_units=100.0), rule(name="b-narrow", cap_units=100.0)
    winner = reserve(ledger, [narrow], request_id="req-1")  # the key exists on b-narrow only
    missed = []
    real_existing = BudgetLedger._existing

    def miss_once(conn, reservation, request_id):
        if not missed:
            missed.append(1)
            return None
        return real_existing(conn, reservation, request_id)

    monkeypatch.setattr(BudgetLedger, "_existing", staticmethod(miss_once))
    got = reserve(ledger, [wide, narrow], request_id="req-1")  # a-wide inserts, b-narrow conflicts
    assert got.id == winner.id and got.replayed
    assert used(ledger, wide) == 0.0 and used(ledger, narrow) == 1.0  # a-wide's insert rolled back


def test_a_ledger_at_version_1_upgrades_and_keeps_its_rows(tmp_path, state):
    path = tmp_path / "budgets.sqlite3"
    database = open_database(state, "budgets", path)
    try:
        migrate(database, STORE, MIGRATIONS[:1])  # the ledger as the previous release left it
        with database.write() as conn:
            conn.execute(
                "INSERT INTO reservations (id, budget, window_start, window_end, units, state, created_at,"
                " request_id) VALUES ('old', 'small', 0, 3600, 1.0, 'settled', 50, 'req-1')"
            )
    finally:
        database.close()
    ledger = BudgetLedger(path, state)
    try:
        assert ledger.schema.applied == [2]
        rules = [rule(cap_units=3.0)]
        assert used(ledger, rules[0]) == 1.0  # the old row still counts
        # a version-1 row names no tenant or tier, so it never matches a key: req-1 is charged
        first = reserve(ledger, rules, request_id="req-1")
        assert not first.replayed and reserve(ledger, rules, request_id="req-1").replayed
        assert used(ledger, rules[0]) == 2.0
        with ledger.database.read() as conn:
            rows = conn.execute(
                "SELECT id, tenant, tier, request_id FROM reservations ORDER BY created_at"
            ).fetchall()
        assert [tuple(r) for r in rows] == [("old", None, None, "req-1"), (first.id, "acme", "onnx", "req-1")]
    finally:
        ledger.close()
    reopened = BudgetLedger(path, state)
    assert reopened.schema.applied == []
    reopened.close()


def test_the_policy_runtime_charges_a_resent_request_once(tmp_path):
    """Through PolicyRuntime.reserve, which every paid stage calls with the request's trace id."""
    import numpy as np

    from policies.policy_set import PolicySet
    from policies.runtime import PolicyRuntime, Refusal
    from policies.thresholds import ThresholdPolicy
    from visionroute.records import Analysis

    budget = {"name": "small", "tiers": ["onnx", "vlm"], "window_s": 3600, "cap_units": 2.0}
    runtime = PolicyRuntime(
        PolicySet(budgets=[budget]),
        BudgetLedger(tmp_path / "b.sqlite3"),
        tasks=["classify"],
        base_thresholds={"classify": ThresholdPolicy(version="classify-v1")},
    )

    def send(request_id: str, tier: str = "onnx"):
        analysis = Analysis(np.zeros((4, 4, 3), np.uint8), "0" * 64, "classify", tenant="acme")
        analysis.trace.request_id = request_id
        reservation = runtime.reserve(runtime.current, analysis, tier, 1.0)
        if not isinstance(reservation, Refusal):
            runtime.ledger.settle(reservation)
        return reservation

    assert not send("req-1").replayed and send("req-1").replayed
    assert not send("req-1", "vlm").replayed  # the request's VLM call is a charge of its own
    assert isinstance(send("req-2"), Refusal)  # the cap of 2 holds 2 calls, not 3
    assert runtime.current.budgets and runtime.ledger.status(runtime.current.budgets)[0]["used_units"] == 2.0
    runtime.ledger.close()


def test_through_the_analyse_pipeline_a_resent_request_is_charged_once_per_tier(tmp_path):
    """The service's own analyse path (in process, the real colour model): a resend of an
    accepted request and of one queued for review pays neither its cheap tier nor its review
    again, and gets the same review item (the queue's own idempotency) instead of a 429."""
    import asyncio

    from router.services import ImageRequest, VisionRouteService
    from router.services.backends import LocalOnnxTier
    from tests.router.colour_model import colour_app_config, solid_png
    from visionroute.errors import BudgetExceeded
    from visionroute.records import Decision

    budgets = [
        {"name": "cheap", "tiers": ["onnx"], "window_s": 3600, "cap_units": 2.0},
        {"name": "reviews", "tiers": ["review"], "window_s": 3600, "cap_units": 1.0},
    ]
    config = colour_app_config(tmp_path, policies={"budgets": budgets})
    tier = LocalOnnxTier(config.cascades["colour"].tier.model_dump(), config.models_dir)
    service = VisionRouteService.build(config, tiers={"colour": tier})
    red, grey = solid_png((255, 0, 0)), solid_png((128, 128, 128))  # grey is unsure: it goes to review

    def analyze(image: bytes, request_id: str):
        return asyncio.run(service.analyze.analyze(ImageRequest(image, request_id), None))

    assert [analyze(red, "req-1").decision for _ in range(2)] == [Decision.ACCEPT] * 2
    first, resent = analyze(grey, "req-2"), analyze(grey, "req-2")
    assert first.decision is Decision.REVIEW and resent.review_item_id == first.review_item_id
    with pytest.raises(BudgetExceeded):  # two requests filled the cheap tier's cap of 2
        analyze(red, "req-3")
    ledger, rules = service.analyze.policies.ledger, service.analyze.policies.current.budgets
    assert {s["name"]: s["used_units"] for s in ledger.status(rules)} == {"cheap": 2.0, "reviews": 1.0}
