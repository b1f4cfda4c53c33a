"""The review queue's contract, the same on both state backends: a SQLite file (one node) and a
PostgreSQL schema (a cluster). Every test runs on both; the last ones are PostgreSQL's own
(another node sees everything; an outage refuses requests and loses nothing)."""

from __future__ import annotations

import hashlib
import io
import threading
import time
from collections import Counter

import pytest

from policies.review_queue import ReviewQueue
from tests.support.pg_outage import (
    OUTAGE_CONNECT_TIMEOUT_S,
    quick_reconnect,  # noqa: F401 (a fixture)
)
from visionroute.errors import Conflict, InputError, NotFound
from visionroute.state import StateConfig, StateUnavailable

LABELS = ["cat", "dog"]


@pytest.fixture
def open_queue(tmp_path, state):
    """Opens queues on the test's backend (each its own connections, like separate processes)
    and closes them at the end."""
    opened: list[ReviewQueue] = []

    def open_one(**kwargs) -> ReviewQueue:
        queue = ReviewQueue(tmp_path / "review", state=state, **kwargs)
        opened.append(queue)
        return queue

    yield open_one
    for queue in opened:
        queue.close()


@pytest.fixture
def queue(open_queue) -> ReviewQueue:
    return open_queue()


def enqueue(queue: ReviewQueue, request_id: str, image: bytes | None = None, **extra):
    image = image if image is not None else f"image of {request_id}".encode()
    fields = {
        "tenant": "acme",
        "task": "classify",
        "reason": "unsure",
        "proposed": [{"label": "cat"}],
        "trace": {"request_id": request_id, "steps": []},
        "label_set": LABELS,
        **extra,
    }
    return queue.enqueue(
        request_id=request_id, image_bytes=image, image_sha256=hashlib.sha256(image).hexdigest(), **fields
    )


def actions(queue: ReviewQueue, item_id: str) -> list[str]:
    return [event["action"] for event in queue.audit_log(item_id)]


def test_enqueue_is_idempotent_and_the_same_id_with_another_image_conflicts(queue):
    item = enqueue(queue, "r1", b"first image")
    retry = enqueue(queue, "r1", b"first image")
    assert retry.id == item.id and retry.created_at == item.created_at
    with pytest.raises(Conflict) as error:
        enqueue(queue, "r1", b"another image")
    assert error.value.field == "request_id"
    assert [i.id for i in queue.list_items()] == [item.id]
    assert actions(queue, item.id) == ["enqueue"]
    assert queue.image(item.id) == b"first image"
    assert queue.label_set("classify") == LABELS


def test_claim_takes_the_most_valuable_item_and_a_leased_item_is_nobody_elses(queue):
    low = enqueue(queue, "low", priority=0.1)
    high = enqueue(queue, "high", priority=0.9)
    assert queue.claim("ann").id == high.id
    with pytest.raises(Conflict, match="leased by ann"):
        queue.claim("bob", item_id=high.id)
    mine = queue.claim("bob", item_id=low.id)
    assert mine.lease_owner == "bob" and mine.lease_token
    assert queue.claim("cy") is None  # both are leased
    stats = queue.stats()
    assert (stats["depth"], stats["leased"], stats["overdue"]) == (2, 2, 0)
    with pytest.raises(NotFound):
        queue.claim("cy", item_id="no-such-item")


def test_an_expired_lease_puts_the_item_back_in_the_queue(queue):
    item = enqueue(queue, "r1")
    first = queue.claim("ann", lease_s=0.2)
    time.sleep(0.5)  # the lease runs out
    second = queue.claim("bob")
    assert second.id == item.id and second.lease_owner == "bob"
    assert actions(queue, item.id) == ["enqueue", "claim", "lease_expired", "claim"]
    with pytest.raises(Conflict, match="lease token"):
        queue.submit_label(item.id, reviewer="ann", lease_token=first.lease_token, label={"label": "cat"})


def test_label_and_release_need_the_current_lease(queue):
    item = enqueue(queue, "r1")
    claimed = queue.claim("ann")
    with pytest.raises(Conflict):
        queue.release(item.id, reviewer="ann", lease_token="not-the-token")
    released = queue.release(item.id, reviewer="ann", lease_token=claimed.lease_token)
    assert released.lease_token is None and not released.is_leased(time.time())
    again = queue.claim("bob")
    with pytest.raises(InputError, match="label set"):
        queue.submit_label(item.id, reviewer="bob", lease_token=again.lease_token, label={"label": "horse"})
    labelled = queue.submit_label(
        item.id, reviewer="bob", lease_token=again.lease_token, label={"label": "dog"}
    )
    assert (labelled.status, labelled.label, labelled.labelled_by) == ("labelled", {"label": "dog"}, "bob")
    # The same label again is the same label; another one is refused.
    assert (
        queue.submit_label(item.id, reviewer="bob", lease_token=again.lease_token, label={"label": "dog"})
        == labelled
    )
    with pytest.raises(Conflict, match="already labelled"):
        queue.submit_label(item.id, reviewer="bob", lease_token=again.lease_token, label={"label": "cat"})
    assert actions(queue, item.id) == ["enqueue", "claim", "release", "claim", "label"]
    assert [i.id for i in queue.list_items(status="labelled")] == [item.id]
    assert queue.list_items() == []


def test_purge_deletes_old_images_once_no_item_needs_them(queue):
    shared = b"an image two requests sent"
    old_a = enqueue(queue, "a", shared)
    old_b = enqueue(queue, "b", shared)
    claimed = queue.claim("ann", item_id=old_b.id)
    queue.submit_label(old_b.id, reviewer="ann", lease_token=claimed.lease_token, label={"label": "cat"})
    fresh = enqueue(queue, "c")
    assert fresh.created_at > old_b.created_at
    ttl_s = 60.0
    now = old_b.created_at + ttl_s + (fresh.created_at - old_b.created_at) / 2  # a and b are old, c is not
    assert queue.purge_images(ttl_s, now=now) == {"items": 2, "images_deleted": 1}
    with pytest.raises(NotFound, match="retention"):
        queue.image(old_a.id)
    with pytest.raises(NotFound):
        queue.blobs.get(old_a.shown_ref)
    assert queue.get(old_a.id).status == "expired"  # pending without an image: nobody can review it
    assert queue.get(old_b.id).label == {"label": "cat"}  # labels stay
    assert queue.image(fresh.id) == b"image of c"
    assert actions(queue, old_a.id)[-1] == "image_purged"
    assert queue.purge_images(ttl_s, now=now) == {"items": 0, "images_deleted": 0}


def test_stats_list_and_audit_put_overdue_items_first(queue):
    relaxed = enqueue(queue, "relaxed", priority=0.9)
    overdue = enqueue(queue, "overdue", priority=0.1, sla_s=0.05)
    other = enqueue(queue, "other", tenant="globex")
    time.sleep(0.2)
    assert [i.id for i in queue.list_items()] == [overdue.id, relaxed.id, other.id]
    assert [i.id for i in queue.list_items(tenant="globex")] == [other.id]
    assert [i.id for i in queue.list_items(limit=1, offset=1)] == [relaxed.id]
    assert queue.claim("ann").id == overdue.id
    acme, everyone = queue.stats(tenant="acme"), queue.stats()
    assert (acme["depth"], acme["overdue"], acme["leased"]) == (2, 1, 1)
    assert (everyone["depth"], everyone["leased"]) == (3, 1)
    assert acme["oldest_age_s"] >= 0.2
    event = queue.audit_log(overdue.id)[-1]
    assert (event["actor"], event["action"], event["previous_json"]) == ("ann", "claim", "null")
    assert [i.id for i in queue.iter_all()] == [relaxed.id, overdue.id, other.id]


def test_export_calibration_writes_the_stored_images(queue, tmp_path):
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, format="PNG")
    item = enqueue(queue, "r1", buffer.getvalue())
    claimed = queue.claim("ann")
    queue.submit_label(item.id, reviewer="ann", lease_token=claimed.lease_token, label={"label": "dog"})
    result = queue.export_calibration(tmp_path / "export")
    assert (result["labelled"], result["written"]) == (1, 1)
    assert (tmp_path / "export" / "images" / f"{item.id}.png").read_bytes() == buffer.getvalue()


def run_together(count: int, work) -> list:
    """``work(i)`` in ``count`` threads released at once; each one's result or exception."""
    barrier = threading.Barrier(count)
    results: list = [None] * count

    def run(index: int) -> None:
        barrier.wait()
        try:
            results[index] = work(index)
        except Exception as error:  # compared by the caller
            results[index] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return results


def test_twenty_claimers_with_their_own_queues_never_share_an_item(queue, open_queue):
    items = {enqueue(queue, f"r{i}").id for i in range(5)}
    claimers = [open_queue() for _ in range(20)]
    results = run_together(20, lambda i: claimers[i].claim(f"reviewer-{i}"))
    errors = [r for r in results if isinstance(r, Exception)]
    assert not errors
    claimed = [r for r in results if r is not None]
    assert sorted(r.id for r in claimed) == sorted(items)  # every item once, none twice
    assert results.count(None) == 15
    for result in claimed:  # what each winner was told is what the queue holds
        stored = queue.get(result.id)
        assert (stored.lease_owner, stored.lease_token) == (result.lease_owner, result.lease_token)
        assert Counter(actions(queue, result.id)) == Counter({"enqueue": 1, "claim": 1})


def test_two_reviewers_claiming_the_same_item_at_once_one_wins(queue, open_queue):
    reviewers = [open_queue(), open_queue()]
    for round_number in range(3):
        item = enqueue(queue, f"r{round_number}")
        results = run_together(
            2, lambda i, item_id=item.id: reviewers[i].claim(f"reviewer-{i}", item_id=item_id)
        )
        winners = [r for r in results if not isinstance(r, Exception)]
        assert len(winners) == 1 and winners[0].id == item.id
        losers = [r for r in results if isinstance(r, Exception)]
        assert len(losers) == 1 and isinstance(losers[0], Conflict)
        assert queue.get(item.id).lease_owner == winners[0].lease_owner


def test_concurrent_retries_of_one_request_make_one_item(queue, open_queue):
    nodes = [open_queue() for _ in range(4)]
    results = run_together(4, lambda i: enqueue(nodes[i], "retried"))
    assert not [r for r in results if isinstance(r, Exception)]
    assert len({r.id for r in results}) == 1
    assert [i.id for i in queue.list_items()] == [results[0].id]
    assert actions(queue, results[0].id) == ["enqueue"]


# -- PostgreSQL only ------------------------------------------------------------------------------


@pytest.fixture
def postgres(postgres_dsn) -> StateConfig:
    return StateConfig(backend="postgres", connect_timeout_s=2)


def test_another_node_sees_every_item_and_image(tmp_path, postgres):
    node_a = ReviewQueue(tmp_path / "node-a", state=postgres)
    node_b = ReviewQueue(tmp_path / "node-b", state=postgres)  # another machine: nothing on disk shared
    try:
        item = enqueue(node_a, "r1", b"seen everywhere")
        assert node_b.image(item.id) == b"seen everywhere"
        assert node_b.claim("bob").id == item.id
        with pytest.raises(Conflict, match="leased by bob"):
            node_a.claim("ann", item_id=item.id)
        assert not any(path.is_file() for path in tmp_path.rglob("*"))  # no image files, no SQLite
    finally:
        node_a.close()
        node_b.close()


@pytest.mark.usefixtures("quick_reconnect")
def test_a_database_outage_refuses_requests_and_loses_nothing_acknowledged(
    tmp_path, postgres, postgres_server
):
    queue = ReviewQueue(
        tmp_path, state=postgres.model_copy(update={"connect_timeout_s": OUTAGE_CONNECT_TIMEOUT_S})
    )
    try:
        kept = enqueue(queue, "before")
        claimed = queue.claim("ann")
        queue.submit_label(kept.id, reviewer="ann", lease_token=claimed.lease_token, label={"label": "cat"})
        pending = enqueue(queue, "pending too")
        postgres_server.stop_server()
        try:
            with pytest.raises(StateUnavailable) as error:
                enqueue(queue, "during")
            assert error.value.retry_after_s > 0
        finally:
            postgres_server.start_server()
        after = enqueue_when_back(queue, "after")
        assert queue.get(kept.id).label == {"label": "cat"}
        assert (
            queue.image(kept.id) == b"image of before" and queue.image(pending.id) == b"image of pending too"
        )
        assert {i.id for i in queue.iter_all()} == {kept.id, pending.id, after.id}  # "during" never happened
    finally:
        queue.close()


def enqueue_when_back(queue: ReviewQueue, request_id: str, wait_s: float = 60.0):
    """The pool reconnects on its own once the server is back; give it a bounded while."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return enqueue(queue, request_id)
        except StateUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
