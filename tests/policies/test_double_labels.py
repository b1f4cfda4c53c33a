"""Double labels in the review queue (issue 23), on SQLite and PostgreSQL: a drawn item waits for
a second, different reviewer; agreement labels it, disagreement waits for an admin's label."""

from __future__ import annotations

import hashlib

import pytest

from policies.policy_set import parse_policy_set
from policies.review.double_labels import same_answer, wants_two_labels
from policies.review.schema import MIGRATIONS, STORE
from policies.review_queue import ReviewQueue
from visionroute.errors import ConfigError, Conflict, PermissionDenied
from visionroute.migrations import migrate
from visionroute.state import SqliteDatabase

IMAGE = b"img"
SHA = hashlib.sha256(IMAGE).hexdigest()
CAT = {"verdict": "confirm", "label": "cat", "boxes": [{"label": "cat"}]}
DOG = {"verdict": "correct", "label": "dog", "boxes": None}


def enqueue(queue: ReviewQueue, request_id: str, fraction: float = 1.0, kind: str = "review"):
    return queue.enqueue(
        request_id=request_id,
        image_bytes=IMAGE,
        image_sha256=SHA,
        tenant="t",
        task="classify",
        reason="review",
        proposed=[{"label": "cat"}],
        trace={"steps": []},
        kind=kind,
        double_label_fraction=fraction,
    )


def label(queue: ReviewQueue, reviewer: str, item_id: str, value: dict, adjudicator: bool = False):
    claim = queue.claim(reviewer, item_id=item_id, adjudicator=adjudicator)
    return queue.submit_label(
        item_id, reviewer=reviewer, lease_token=claim.lease_token, label=value, adjudicator=adjudicator
    )


@pytest.fixture
def queue(tmp_path, state):
    queue = ReviewQueue(tmp_path, state=state)
    yield queue
    queue.close()


def test_an_agreeing_second_reviewer_labels_the_item_and_the_first_cannot_take_it_again(queue):
    single, double = enqueue(queue, "s", fraction=0.0), enqueue(queue, "d")
    assert (single.labels_wanted, double.labels_wanted) == (1, 2)
    claim = queue.claim("ann", item_id=double.id)
    first = queue.submit_label(double.id, reviewer="ann", lease_token=claim.lease_token, label=CAT)
    assert first.status == "pending" and first.label is None and not first.is_leased(0)
    retry = queue.submit_label(double.id, reviewer="ann", lease_token=claim.lease_token, label=CAT)
    assert retry.status == "pending"  # a retry changes nothing; another label of hers is refused
    with pytest.raises(Conflict, match="already labelled"):
        queue.submit_label(double.id, reviewer="ann", lease_token=claim.lease_token, label=DOG)
    with pytest.raises(Conflict, match="another reviewer"):
        queue.claim("ann", item_id=double.id)
    assert queue.claim("ann").id == single.id  # her next item is never the one she labelled
    second = label(queue, "bob", double.id, {"verdict": "correct", "label": "cat", "boxes": None})
    assert second.status == "labelled" and second.labelled_by == "bob" and not second.needs_adjudication
    by_reviewer = {j.reviewer: j for j in queue.judged_labels()}
    assert {r: j.role for r, j in by_reviewer.items()} == {"ann": "first", "bob": "second"}
    assert all(j.final == second.label and not j.adjudicated for j in by_reviewer.values())


def test_a_disagreement_waits_for_an_admin_who_labelled_neither_side(queue):
    item = enqueue(queue, "d", kind="audit")
    label(queue, "ann", item.id, CAT)
    disputed = label(queue, "bob", item.id, DOG)
    assert disputed.status == "pending" and disputed.needs_adjudication
    assert queue.claim("carol") is None  # reviewers are not offered it
    with pytest.raises(PermissionDenied, match="admin"):
        queue.claim("carol", item_id=item.id)
    with pytest.raises(Conflict):
        queue.claim("ann", item_id=item.id, adjudicator=True)  # a side of the dispute cannot decide it
    assert queue.audit_outcomes("classify", 100) == (0, 0)  # no audit outcome until it is decided
    decided = label(queue, "root", item.id, DOG, adjudicator=True)
    assert decided.status == "labelled" and decided.label == DOG and decided.labelled_by == "root"
    assert not decided.needs_adjudication
    assert queue.audit_outcomes("classify", 100) == (1, 1)
    roles = {j.reviewer: (j.role, j.adjudicated) for j in queue.judged_labels()}
    assert roles == {"ann": ("first", True), "bob": ("second", True), "root": ("adjudication", True)}
    actions = [event["action"] for event in queue.audit_log(item.id)]
    assert "disagreement" in actions and actions[-1] == "adjudicate"


def test_erasing_an_item_removes_its_reviewers_labels(queue):
    item = enqueue(queue, "d")
    label(queue, "ann", item.id, CAT)
    queue.erase([item.id], actor="dpo", reason="subject request")
    assert queue.judged_labels() == []


def test_answers_are_compared_by_verdict_label_and_box_classes():
    proposed = [{"label": "cat"}]
    assert same_answer(CAT, {"verdict": "correct", "label": "cat", "boxes": None}, proposed)
    assert not same_answer(CAT, DOG, proposed)
    assert same_answer({"verdict": "reject"}, {"verdict": "reject", "note": "blurred"}, proposed)
    assert not same_answer(CAT, {"verdict": "reject"}, proposed)
    two = {"verdict": "correct", "label": "cat", "boxes": [{"label": "cat"}, {"label": "dog"}]}
    assert not same_answer(CAT, two, proposed)  # a box class more


def test_the_draw_is_deterministic_and_near_the_fraction():
    drawn = [wants_two_labels(f"r{i}", 0.2) for i in range(2000)]
    assert drawn == [wants_two_labels(f"r{i}", 0.2) for i in range(2000)]
    assert 0.16 < sum(drawn) / len(drawn) < 0.24
    assert not any(wants_two_labels(f"r{i}", 0.0) for i in range(100))


@pytest.mark.parametrize(
    "review, field",
    [
        ({"double_label_fraction": 1.5}, "review.double_label_fraction"),
        ({"reviewer_error_limit": 0.0}, "review.reviewer_error_limit"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(review, field):
    with pytest.raises(ConfigError) as error:
        parse_policy_set({"review": review})
    assert error.value.field == field and next(iter(review)) in str(error.value)


def test_labels_given_before_the_migration_are_copied_in(tmp_path):
    database = SqliteDatabase(tmp_path / "review.sqlite3")
    migrate(database, STORE, MIGRATIONS[:5])  # the release before double labels
    with database.write() as db:
        db.execute(
            "INSERT INTO items (id, request_id, tenant, task, image_sha256, created_at, reason, proposed_json,"
            " trace_json, kind, status, label_json, labelled_by, labelled_at) VALUES ('old', 'req', 't',"
            " 'classify', ?, 1.0, 'audit', '[{\"label\": \"cat\"}]', '{}', 'audit', 'labelled',"
            " '{\"verdict\": \"reject\"}', 'ann', 2.0)",
            (SHA,),
        )
    database.close()
    queue = ReviewQueue(tmp_path)
    try:
        (old,) = queue.list_items(status=None)
        assert old.labels_wanted == 1 and not old.needs_adjudication
        (judged,) = queue.judged_labels()
        assert (judged.reviewer, judged.role, judged.kind, judged.label) == (
            "ann",
            "single",
            "audit",
            {"verdict": "reject"},
        )
    finally:
        queue.close()


def annotation(item, reviewer: str, chosen: str, task_id: int = 1):
    from policies.review.label_studio import CHOICES, StudioAnnotation, item_version

    return StudioAnnotation(
        task_id=task_id,
        annotation_id=task_id,
        item_id=item.id,
        item_version=item_version(item),
        kind=CHOICES,
        reviewer=reviewer,
        classes=(chosen,),
        boxes=(),
        rejected=False,
    )


def test_label_studio_imports_take_the_double_label_path_and_count_for_reviewer_quality(queue):
    from policies.review.label_import import LabelImport
    from policies.reviewer_quality import reviewer_quality

    imports = LabelImport(queue.database)
    single, double = enqueue(queue, "s", fraction=0.0, kind="audit"), enqueue(queue, "d")
    # a single-label item: labelled at once, and the label is a row of item_labels like the queue's
    assert imports.record(annotation(single, "ann", "cat")).status == "imported"
    assert queue.get(single.id).status == "labelled"
    # a double-labelled item: the first import leaves it pending for a second, different reviewer
    first = imports.record(annotation(double, "ann", "cat"))
    assert first.status == "imported" and "first of two" in first.reason
    assert queue.get(double.id).status == "pending"
    assert imports.record(annotation(double, "ann", "cat")).status == "unchanged"  # re-imported
    changed_mind = imports.record(annotation(double, "ann", "dog"))
    assert changed_mind.status == "refused" and changed_mind.field == "completed_by"
    with pytest.raises(Conflict):  # nor may she label it again in the queue
        queue.claim("ann", item_id=double.id)
    second = imports.record(annotation(double, "bob", "dog"))  # disagrees: an admin decides
    assert second.status == "imported" and "disagree" in second.reason
    assert queue.get(double.id).needs_adjudication
    third = imports.record(annotation(double, "cy", "cat"))  # an import never adjudicates
    assert third.status == "refused" and "admin" in third.reason
    label(queue, "admin", double.id, DOG, adjudicator=True)
    assert queue.get(double.id).label == DOG
    rows = {
        row.reviewer: row
        for row in reviewer_quality(queue.judged_labels(), limit=0.2, alpha=0.05, confidence=0.9)
    }
    assert (rows["ann"].labels, rows["ann"].double_judged, rows["ann"].double_errors) == (2, 1, 1)
    assert (rows["ann"].audits_judged, rows["bob"].double_errors) == (1, 0)
