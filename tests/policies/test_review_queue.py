import hashlib
import threading
import time

import pytest

from policies.review_queue import ReviewQueue
from visionroute.errors import Conflict, InputError, NotFound


def enqueue(queue: ReviewQueue, request_id: str, image: bytes = b"img", priority: float = 0.0):
    return queue.enqueue(
        request_id=request_id,
        image_bytes=image,
        image_sha256=hashlib.sha256(image).hexdigest(),
        tenant="t",
        task="classify",
        reason="unsure",
        proposed=[{"label": "cat"}],
        trace={"steps": []},
        priority=priority,
    )


def test_items_and_images_survive_reopening(tmp_path):
    item = enqueue(ReviewQueue(tmp_path), "r1", b"\x89PNG...")
    reopened = ReviewQueue(tmp_path)
    assert [i.id for i in reopened.list_items()] == [item.id]
    assert reopened.blobs.get(item.shown_ref) == b"\x89PNG..."


def test_enqueue_is_idempotent_on_request_id(tmp_path):
    queue = ReviewQueue(tmp_path)
    first, second = enqueue(queue, "same"), enqueue(queue, "same")
    assert first.id == second.id and queue.stats()["depth"] == 1


def test_claim_takes_the_most_valuable_item_and_leases_it(tmp_path):
    queue = ReviewQueue(tmp_path)
    enqueue(queue, "low", priority=0.1)
    high = enqueue(queue, "high", priority=0.9)
    claimed = queue.claim("ann")
    assert claimed.id == high.id and claimed.lease_owner == "ann" and claimed.lease_token
    with pytest.raises(Conflict, match="leased by ann"):
        queue.claim("bob", item_id=high.id)
    assert queue.claim("bob").request_id == "low"  # leased items are skipped
    assert queue.claim("cid") is None


def test_expired_lease_returns_item_and_old_token_is_refused(tmp_path):
    queue = ReviewQueue(tmp_path)
    item = enqueue(queue, "r")
    first = queue.claim("ann", lease_s=0.05)
    time.sleep(0.1)
    with pytest.raises(Conflict, match="expired"):
        queue.submit_label(item.id, reviewer="ann", lease_token=first.lease_token, label={"label": "cat"})
    second = queue.claim("bob")
    assert second.id == item.id
    with pytest.raises(Conflict, match="does not match"):
        queue.submit_label(item.id, reviewer="ann", lease_token=first.lease_token, label={"label": "cat"})


def test_label_is_idempotent_and_a_different_label_conflicts(tmp_path):
    queue = ReviewQueue(tmp_path)
    item = enqueue(queue, "r")
    lease = queue.claim("ann")
    done = queue.submit_label(item.id, reviewer="ann", lease_token=lease.lease_token, label={"label": "dog"})
    again = queue.submit_label(item.id, reviewer="ann", lease_token=lease.lease_token, label={"label": "dog"})
    assert done.status == again.status == "labelled" and again.label == {"label": "dog"}
    with pytest.raises(Conflict, match="already labelled"):
        queue.submit_label(item.id, reviewer="ann", lease_token=lease.lease_token, label={"label": "cat"})
    assert queue.stats()["depth"] == 0
    actions = [event["action"] for event in queue.audit_log(item.id)]
    assert actions == ["enqueue", "claim", "label"]


def test_concurrent_reviewers_never_get_the_same_item(tmp_path):
    queue = ReviewQueue(tmp_path)
    for n in range(20):
        enqueue(queue, f"r{n}")
    claimed, lock = [], threading.Lock()

    def reviewer(name: str) -> None:
        while (item := queue.claim(name)) is not None:
            with lock:
                claimed.append(item.id)

    threads = [threading.Thread(target=reviewer, args=(f"rev{k}",)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(claimed) == 20 and len(set(claimed)) == 20


def test_bad_arguments_are_named(tmp_path):
    queue = ReviewQueue(tmp_path)
    with pytest.raises(InputError, match="status must be one of"):
        queue.list_items(status="done")
    with pytest.raises(InputError) as caught:
        queue.claim("")
    assert caught.value.field == "reviewer"
    with pytest.raises(NotFound):
        queue.get("missing")
