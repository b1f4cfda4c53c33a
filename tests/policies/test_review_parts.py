"""The review queue's parts on their own: leases and labels with the clock in the test's hand
(no sleeping for a lease to run out), on both state backends."""

from __future__ import annotations

import hashlib

import pytest

from policies.review.blobs import BlobStore, DatabaseBlobs
from policies.review.intake import Intake, blobs_to_store
from policies.review.items import ReviewItem
from policies.review.labels import Labels
from policies.review.leases import Leases, require_live_lease
from policies.review.queries import ReviewReads
from policies.review.schema import MIGRATIONS, STORE, adopt_unversioned
from visionroute.errors import Conflict, InputError
from visionroute.migrations import migrate
from visionroute.state import open_database

T0 = 1_000_000.0  # the test's clock; items are queued at the real time, far later


@pytest.fixture
def database(tmp_path, state):
    database = open_database(state, "review", tmp_path / "review.sqlite3")
    migrate(database, STORE, MIGRATIONS, adopt_unversioned=adopt_unversioned)
    yield database
    database.close()


@pytest.fixture
def intake(database, tmp_path):
    blobs = BlobStore(tmp_path / "images") if database.dialect.name == "sqlite" else DatabaseBlobs(database)
    return Intake(database, blobs)


def queue_item(
    intake: Intake, request_id: str, *, priority: float = 0.0, sla_s: float | None = None
) -> ReviewItem:
    image = f"image of {request_id}".encode()
    return intake.enqueue(
        request_id=request_id,
        image_bytes=image,
        image_sha256=hashlib.sha256(image).hexdigest(),
        tenant="acme",
        task="classify",
        reason="unsure",
        proposed=[{"label": "cat"}],
        trace={"steps": []},
        priority=priority,
        sla_s=sla_s,
        label_set=["cat", "dog"],
    )


def actions(database, item_id: str) -> list[str]:
    return [event["action"] for event in ReviewReads(database).audit_log(item_id)]


def test_a_lease_holds_the_item_until_it_runs_out_then_another_reviewer_gets_it(database, intake):
    item = queue_item(intake, "r1")
    leases = Leases(database)
    held = leases.claim("ann", lease_s=60, now=T0)
    assert held.id == item.id and held.lease_owner == "ann" and held.lease_expires_at == T0 + 60
    # While it runs: nobody else gets the item, by name or as the next one.
    assert leases.claim("bob", lease_s=60, now=T0 + 59) is None
    with pytest.raises(Conflict, match="leased by ann for another 1 s"):
        leases.claim("bob", lease_s=60, now=T0 + 59, item_id=item.id)
    # Once it ran out, the next claim gives it back to the queue first, audited.
    again = leases.claim("bob", lease_s=60, now=T0 + 61)
    assert again.id == item.id and again.lease_owner == "bob" and again.lease_token != held.lease_token
    assert actions(database, item.id) == ["enqueue", "claim", "lease_expired", "claim"]


def test_the_next_item_is_overdue_first_then_most_valuable_then_oldest(database, intake):
    low = queue_item(intake, "low", priority=1.0)
    high = queue_item(intake, "high", priority=5.0)
    overdue = queue_item(intake, "overdue", priority=0.0, sla_s=1.0)
    also_low = queue_item(intake, "also-low", priority=1.0)
    leases = Leases(database)
    now = overdue.sla_due_at + 1
    claimed = [leases.claim(f"reviewer-{i}", lease_s=60, now=now).id for i in range(4)]
    assert claimed == [overdue.id, high.id, low.id, also_low.id]
    assert leases.claim("reviewer-5", lease_s=60, now=now) is None


def test_a_label_needs_the_live_lease_of_its_reviewer(database, intake):
    item = queue_item(intake, "r1")
    held = Leases(database).claim("ann", lease_s=60, now=T0)
    labels = Labels(database)
    with pytest.raises(Conflict, match="does not match"):
        labels.submit(
            item.id, reviewer="bob", lease_token=held.lease_token, label={"label": "cat"}, now=T0 + 1
        )
    with pytest.raises(Conflict, match="expired 1 s ago"):
        labels.submit(
            item.id, reviewer="ann", lease_token=held.lease_token, label={"label": "cat"}, now=T0 + 61
        )
    with pytest.raises(InputError, match=r"\['horse'\] are not in task 'classify'"):
        labels.submit(
            item.id, reviewer="ann", lease_token=held.lease_token, label={"label": "horse"}, now=T0 + 1
        )
    done = labels.submit(
        item.id, reviewer="ann", lease_token=held.lease_token, label={"label": "dog"}, now=T0 + 1
    )
    assert (done.status, done.label, done.labelled_at, done.lease_token) == (
        "labelled",
        {"label": "dog"},
        T0 + 1,
        None,
    )
    # The same label again is the same success, even after the lease; another is a Conflict.
    retry = labels.submit(
        item.id, reviewer="ann", lease_token=held.lease_token, label={"label": "dog"}, now=T0 + 99
    )
    assert retry == done
    with pytest.raises(Conflict, match="already labelled"):
        labels.submit(
            item.id, reviewer="ann", lease_token=held.lease_token, label={"label": "cat"}, now=T0 + 2
        )


def test_lease_checks_without_a_database():
    item = ReviewItem(
        **{
            "id": "i",
            "request_id": "r",
            "tenant": "t",
            "task": "classify",
            "image_sha256": "0" * 64,
            "created_at": T0,
            "priority": 0.0,
            "reason": "unsure",
            "proposed": [],
            "trace": {},
            "status": "pending",
            "lease_owner": "ann",
            "lease_token": "token",
            "lease_expires_at": T0 + 10,
            "label": None,
            "labelled_by": None,
            "labelled_at": None,
        }
    )
    require_live_lease(item, "ann", "token", T0 + 9.9)
    for reviewer, token, now in (("bob", "token", T0), ("ann", "other", T0), ("ann", "token", T0 + 10)):
        with pytest.raises(Conflict):
            require_live_lease(item, reviewer, token, now)


def test_an_item_keeps_one_blob_when_its_original_is_the_image_shown():
    image = b"same bytes"
    sha = hashlib.sha256(image).hexdigest()
    assert len(blobs_to_store("acme", image, sha, image, sha)) == 1
    redacted = b"redacted"
    both = blobs_to_store("acme", redacted, hashlib.sha256(redacted).hexdigest(), image, sha)
    assert sorted(both.values()) == [redacted, image]
    assert {ref.scope for ref in both} == {"tenant:acme"}
    assert blobs_to_store("acme", None, None, None, sha) == {}
