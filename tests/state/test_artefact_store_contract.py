"""The calibration artefact store's contract on both backends (SQLite file, PostgreSQL schema):
artefacts keyed by the sha256 of their canonical text and checked on every read, recalibration
jobs' status, one job at a time across store instances (nodes), and a rollout naming an artefact."""

from __future__ import annotations

import pytest

from policies.artefact_store import ArtefactCorrupted, ArtefactStore, canonical, sha256_of
from policies.rollout_store import RolloutStore
from policies.sequential import RolloutConfig
from visionroute.errors import Conflict, NotFound

BODY = {
    "task": "colour",
    "version": "colour-v1+prod-abc",
    "thresholds": {"accept_threshold": 0.9},
    "bound": float("inf"),
}


@pytest.fixture
def stores(tmp_path, state):
    opened = [ArtefactStore(tmp_path / "artefacts.sqlite3", state) for _ in range(2)]  # two nodes
    yield opened
    for store in opened:
        store.close()


def test_artefacts_are_keyed_by_their_sha256_and_checked_on_read(stores):
    one, other = stores
    sha = one.put(BODY, actor="job")
    assert sha == sha256_of(canonical(BODY)) and one.put(BODY, actor="again") == sha  # idempotent
    assert other.get(sha)["bound"] == "inf"  # every node reads it; infinities as the certificate writes them
    assert [a["sha256"] for a in other.list("colour")] == [sha]
    with pytest.raises(NotFound):
        other.get("0" * 64)
    with one.database.write() as tx:
        tx.execute("UPDATE calibration_artefacts SET body = ? WHERE sha256 = ?", ('{"task":"colour"}', sha))
    with pytest.raises(ArtefactCorrupted):
        other.get(sha)


def test_jobs_record_their_outcome_and_one_node_runs_a_job_at_a_time(stores):
    one, other = stores
    job = one.create_job(task="colour", tenant=None, actor="alice@ops")
    assert other.job(job)["status"] == "running"
    one.finish_job(job, "refused", "too few labels", details={"needed_more": 12})
    seen = other.job(job)
    assert seen["status"] == "refused" and seen["details"] == {"needed_more": 12}
    with one.job_lock("colour:*"):
        with pytest.raises(Conflict):
            with other.job_lock("colour:*"):
                pass
        with other.job_lock("digits:*"):  # another task's job may run meanwhile
            pass
    with other.job_lock("colour:*"):  # released with the job
        pass


def test_a_rollout_names_an_artefact(tmp_path, state):
    store = RolloutStore(tmp_path / "rollouts.sqlite3", state)
    try:
        rollout = store.start(
            task="colour",
            candidate=None,
            policy=None,
            mode="shadow",
            fraction=0.1,
            sticky_by="request",
            audit_fraction=0.1,
            config=RolloutConfig(alpha=0.1, delta=0.1),
            actor="recalibration rc_1 (scheduler)",
            reason="recertified",
            artefact="a" * 64,
        )
        assert store.get(rollout.id).artefact == "a" * 64
        assert store.in_effect()[0].to_dict()["artefact"] == "a" * 64
    finally:
        store.close()


def test_the_incumbent_is_the_latest_promoted_rollouts_artefact_on_every_node(stores):
    one, other = stores
    older = one.put(BODY, actor="job")
    newer = one.put({**BODY, "version": "colour-v1+prod-def"}, actor="job")
    assert other.incumbents() == {}
    one.adopt("colour", newer, rollout_id="ro_2", started_at=200.0, actor="sequential-test")
    other.adopt("colour", newer, rollout_id="ro_2", started_at=200.0, actor="another replica")  # no-op
    # a replica that adopts an earlier rollout's artefact late never replaces a later one
    other.adopt("colour", older, rollout_id="ro_1", started_at=100.0, actor="late replica")
    seen = other.incumbents()["colour"]
    assert (seen["sha256"], seen["rollout_id"], seen["adopted_by"]) == (newer, "ro_2", "sequential-test")
    with pytest.raises(NotFound):  # only a stored (certified) artefact becomes an incumbent
        one.adopt("colour", "0" * 64, rollout_id="ro_3", started_at=300.0, actor="x")
    with pytest.raises(ValueError):
        one.adopt("digits", newer, rollout_id="ro_3", started_at=300.0, actor="x")
