"""Review items keep their audit provenance: which source sampled them and with what chance
(the Horvitz-Thompson weight production certification needs), on both backends; rows queued
before the column existed read as unknown."""

from __future__ import annotations

import hashlib
import json

import pytest

from policies.audit_sampling import inclusion_probability, rollout_audit_fraction
from policies.review.schema import MIGRATIONS, STORE
from policies.review_queue import ReviewQueue
from visionroute.errors import InputError
from visionroute.migrations import migrate
from visionroute.state import SqliteDatabase

IMAGE = b"img"
SHA = hashlib.sha256(IMAGE).hexdigest()


def enqueue(queue: ReviewQueue, request_id: str, **kwargs):
    return queue.enqueue(
        request_id=request_id,
        image_bytes=IMAGE,
        image_sha256=SHA,
        tenant="t",
        task="classify",
        reason="audit sample",
        proposed=[{"label": "cat"}],
        trace={"steps": []},
        **kwargs,
    )


def test_two_sources_sample_an_accept_with_the_union_of_their_chances():
    assert inclusion_probability(0.1) == pytest.approx(0.1)
    assert inclusion_probability(0.1, 0.2) == pytest.approx(1 - 0.9 * 0.8)
    assert inclusion_probability(0.05, 0.0) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        inclusion_probability(0.1, 1.5)


def test_a_rollout_samples_only_while_it_runs():
    class Rollout:
        def __init__(self, status):
            self.status, self.audit_fraction = status, 0.2

    class Choice:
        def __init__(self, status):
            self.rollout = Rollout(status)

    assert rollout_audit_fraction(None) == 0.0
    assert rollout_audit_fraction(Choice("running")) == 0.2
    assert rollout_audit_fraction(Choice("promoted")) == 0.0


def test_the_queue_stores_and_shows_the_source_and_the_inclusion_probability(tmp_path, state):
    queue = ReviewQueue(tmp_path, state=state)
    try:
        audit = enqueue(queue, "a", kind="audit", audit_source="rollout", inclusion_probability=0.28)
        review = enqueue(queue, "r", kind="review", audit_source="none", inclusion_probability=1.0)
        unknown = enqueue(queue, "u", kind="audit")
        read = {item.request_id: item for item in queue.list_items()}
        assert (read["a"].audit_source, read["a"].inclusion_probability) == ("rollout", 0.28)
        assert (read["r"].audit_source, read["r"].inclusion_probability) == ("none", 1.0)
        assert (read["u"].audit_source, read["u"].inclusion_probability) == (None, None)
        shown = json.loads(json.dumps(audit.public_dict()))
        assert shown["audit_source"] == "rollout" and shown["inclusion_probability"] == 0.28
        assert review.inclusion_probability == 1.0 and unknown.audit_source is None
    finally:
        queue.close()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"audit_source": "chance"}, "audit_source"),
        ({"audit_source": "policy", "inclusion_probability": 0.0}, "inclusion_probability"),
        ({"audit_source": "policy", "inclusion_probability": 1.5}, "inclusion_probability"),
    ],
)
def test_bad_provenance_is_refused_naming_the_field(tmp_path, kwargs, field):
    queue = ReviewQueue(tmp_path)
    try:
        with pytest.raises(InputError) as error:
            enqueue(queue, "x", kind="audit", **kwargs)
        assert error.value.field == field
        assert queue.list_items() == []
    finally:
        queue.close()


def test_rows_queued_before_the_migration_read_as_unknown(tmp_path):
    database = SqliteDatabase(tmp_path / "review.sqlite3")
    migrate(database, STORE, MIGRATIONS[:4])  # the release before provenance
    with database.write() as db:
        db.execute(
            "INSERT INTO items (id, request_id, tenant, task, image_sha256, created_at, reason, proposed_json,"
            " trace_json, kind) VALUES ('old', 'req', 't', 'classify', ?, 1.0, 'audit sample (5.0% of"
            " auto-accepts)', '[]', '{}', 'audit')",
            (SHA,),
        )
    database.close()
    queue = ReviewQueue(tmp_path)
    try:
        assert queue.schema.to_version == len(MIGRATIONS) and queue.schema.from_version == 4
        (old,) = queue.list_items()
        assert old.id == "old" and old.audit_source is None and old.inclusion_probability is None
    finally:
        queue.close()
