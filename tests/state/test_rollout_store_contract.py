"""The rollout store's contract on both backends (SQLite file, PostgreSQL schema): one rollout in
effect per task, evidence added by many replicas at once with nothing lost, each review item
counted once, the sequential test's decision taken once and audited."""

from __future__ import annotations

import threading

import pytest

from policies.rollout_store import RolloutStore
from policies.sequential import RolloutConfig
from visionroute.errors import Conflict, InputError, NotFound


@pytest.fixture
def open_store(tmp_path, state):
    opened: list[RolloutStore] = []

    def open_one() -> RolloutStore:
        store = RolloutStore(tmp_path / "rollouts.sqlite3", state)
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        store.close()


def start(store: RolloutStore, task: str = "colour", **overrides):
    arguments = {
        "task": task,
        "candidate": "cheaper",
        "policy": None,
        "mode": "canary",
        "fraction": 0.5,
        "sticky_by": "tenant",
        "audit_fraction": 1.0,
        "config": RolloutConfig(alpha=0.1, delta=0.1, min_cost_observations=5),
        "actor": "alice@ops",
        "reason": "test",
        **overrides,
    }
    return store.start(**arguments)


def test_one_rollout_in_effect_per_task_even_when_replicas_start_at_once(open_store):
    stores = [open_store() for _ in range(4)]
    outcomes: list[str] = []
    barrier = threading.Barrier(len(stores))  # every replica's start is in flight together

    def try_start(store):
        barrier.wait(timeout=30)
        try:
            start(store)
            outcomes.append("started")
        except Conflict:
            outcomes.append("refused")
        except Exception as error:  # shown in the assertion below
            outcomes.append(repr(error))

    threads = [threading.Thread(target=try_start, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["refused", "refused", "refused", "started"]
    assert len(stores[0].in_effect()) == 1
    start(stores[0], task="other")  # another task is independent


def test_concurrent_evidence_from_many_replicas_is_all_counted(open_store):
    first = open_store()
    rollout = start(first, config=RolloutConfig(alpha=0.5, delta=0.01, min_cost_observations=10_000))
    stores = [open_store() for _ in range(3)]

    def add(store, worker):
        for i in range(15):
            store.observe(rollout.id, "candidate", is_error=False, item_id=f"w{worker}-{i}")
            store.observe(rollout.id, "incumbent", cost_total=2.0, cost_count=2)

    threads = [threading.Thread(target=add, args=(store, n)) for n, store in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    arms = first.get(rollout.id).monitor.status()["arms"]
    assert arms["candidate"]["labelled"] == 45 and arms["candidate"]["errors"] == 0
    assert arms["incumbent"]["cost_observations"] == 90 and arms["incumbent"]["cost_units"] == 90.0


def test_an_item_counts_once_and_the_first_decision_is_final_and_audited(open_store):
    store = open_store()
    rollout = start(store)
    for _ in range(3):  # the same item's label submitted again (a retry): one observation
        store.observe(rollout.id, "candidate", is_error=True, item_id="item-1")
    assert store.get(rollout.id).monitor.arms["candidate"].cs.labelled == 1
    i = 2
    while store.get(rollout.id).status == "running" and i < 200:
        store.observe(rollout.id, "candidate", is_error=True, item_id=f"item-{i}")
        i += 1
    done = store.get(rollout.id)
    assert done.status == "rolled_back" and done.monitor.decision == "rollback"
    assert not store.in_effect()
    store.observe(rollout.id, "candidate", is_error=False, item_id="late")  # evidence still recorded
    assert store.get(rollout.id).status == "rolled_back"
    events = store.events(rollout.id)
    assert [(e["action"], e["actor"]) for e in events] == [
        ("start", "alice@ops"),
        ("rollback", "sequential-test"),
    ]
    assert events[1]["evidence"]["arms"]["candidate"]["errors"] == i - 1


def test_operator_actions_follow_the_allowed_transitions(open_store):
    store = open_store()
    rollout = start(store)
    with pytest.raises(Conflict):
        store.decide(rollout.id, "finish", actor="bob@ops", reason="too early")
    assert store.decide(rollout.id, "promote", actor="bob@ops", reason="ok").status == "promoted"
    assert store.in_effect()[0].candidate_serves_all
    with pytest.raises(Conflict):
        start(store)  # the promoted one is still in effect
    assert store.decide(rollout.id, "finish", actor="bob@ops", reason="deployed").status == "finished"
    assert start(store).status == "running"
    with pytest.raises(InputError):
        store.decide(rollout.id, "explode", actor="bob@ops", reason="")
    with pytest.raises(NotFound):
        store.observe("ro_missing", "candidate", is_error=False)
    with pytest.raises(InputError):
        store.observe(rollout.id, "third-arm", is_error=False)
