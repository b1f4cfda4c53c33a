"""Review queue: value-of-review order, SLA, lease expiry, label sets, retention, export."""

from __future__ import annotations

import csv
import hashlib
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from policies.costs import review_value
from policies.review_queue import ReviewQueue
from visionroute.errors import Conflict, InputError, NotFound

LABELS = ("cat", "dog", "bird")


def png(seed: int) -> tuple[bytes, str]:
    pixels = (np.random.default_rng(seed).random((16, 16, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    data = buffer.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def add(queue: ReviewQueue, seed: int, *, score: float = 0.5, cost: float = 1.0, **kw):
    data, sha = png(seed)
    return queue.enqueue(
        request_id=f"r{seed}",
        image_bytes=data,
        image_sha256=sha,
        tenant="t",
        task="classify",
        reason="low score",
        proposed=[{"label": "cat", "confidence": score}],
        trace={"steps": []},
        priority=review_value(score, cost),
        label_set=LABELS,
        **kw,
    )


def test_priority_is_value_of_review_and_overdue_goes_first(tmp_path):
    queue = ReviewQueue(tmp_path)
    cheap_unsure = add(queue, 1, score=0.2, cost=1.0)  # value 0.8
    costly_sure = add(queue, 2, score=0.8, cost=10.0)  # value 2.0
    overdue = add(queue, 3, score=0.9, cost=1.0, sla_s=0.01)  # value 0.1 but past its SLA
    time.sleep(0.05)
    order = [queue.claim(f"r{i}").id for i in range(3)]
    assert order == [overdue.id, costly_sure.id, cheap_unsure.id]
    assert queue.get(overdue.id).public_dict()["is_overdue"] is True


def test_two_reviewers_claim_one_item(tmp_path):
    queue = ReviewQueue(tmp_path)
    item = add(queue, 1)
    results, errors = [], []
    barrier = threading.Barrier(2)

    def grab(name: str) -> None:
        barrier.wait()
        try:
            results.append(queue.claim(name, item_id=item.id))
        except Conflict as exc:
            errors.append(exc)

    threads = [threading.Thread(target=grab, args=(name,)) for name in ("ann", "bob")]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(results) == 1 and len(errors) == 1
    assert "is leased by" in errors[0].reason
    # the loser cannot label with a made-up token; the winner can
    loser = "bob" if results[0].lease_owner == "ann" else "ann"
    with pytest.raises(Conflict, match="lease token does not match"):
        queue.submit_label(item.id, reviewer=loser, lease_token="x", label={"verdict": "confirm"})
    queue.submit_label(
        item.id,
        reviewer=results[0].lease_owner,
        lease_token=results[0].lease_token,
        label={"verdict": "confirm"},
    )
    assert queue.stats()["depth"] == 0


def test_expired_lease_requeues_and_refuses_late_label(tmp_path):
    queue = ReviewQueue(tmp_path)
    item = add(queue, 1)
    stale = queue.claim("ann", lease_s=0.05)
    time.sleep(0.1)
    with pytest.raises(Conflict, match="expired"):
        queue.submit_label(
            item.id, reviewer="ann", lease_token=stale.lease_token, label={"verdict": "confirm"}
        )
    fresh = queue.claim("bob")
    assert fresh.id == item.id and fresh.lease_owner == "bob"
    assert [e["action"] for e in queue.audit_log(item.id)] == ["enqueue", "claim", "lease_expired", "claim"]
    with pytest.raises(Conflict, match="does not match"):  # ann's old token is dead for good
        queue.submit_label(
            item.id, reviewer="ann", lease_token=stale.lease_token, label={"verdict": "confirm"}
        )
    assert queue.get(item.id).status == "pending"


def test_label_outside_the_label_set(tmp_path):
    queue = ReviewQueue(tmp_path)
    item = add(queue, 1)
    lease = queue.claim("ann")
    with pytest.raises(InputError, match=r"labels \['zebra'\] are not in task 'classify'") as info:
        queue.submit_label(
            item.id,
            reviewer="ann",
            lease_token=lease.lease_token,
            label={"verdict": "correct", "label": "zebra"},
        )
    assert info.value.field == "label"
    assert queue.get(item.id).status == "pending" and queue.get(item.id).lease_owner == "ann"  # unchanged
    queue.submit_label(
        item.id, reviewer="ann", lease_token=lease.lease_token, label={"verdict": "correct", "label": "dog"}
    )
    assert queue.label_set("classify") == list(LABELS)


def test_retention_deletes_images_keeps_labels_and_audit(tmp_path):
    queue = ReviewQueue(tmp_path)
    labelled, pending = add(queue, 1), add(queue, 2)
    lease = queue.claim("ann", item_id=labelled.id)
    queue.submit_label(
        labelled.id,
        reviewer="ann",
        lease_token=lease.lease_token,
        label={"verdict": "correct", "label": "dog"},
    )
    result = queue.purge_images(ttl_s=1.0, now=time.time() + 10)
    assert result == {"items": 2, "images_deleted": 2}
    assert not queue.blobs.path(labelled.shown_ref).exists()
    after = queue.get(labelled.id)
    assert after.label["label"] == "dog" and after.image_deleted_at is not None
    assert queue.get(pending.id).status == "expired"
    assert queue.audit_log(labelled.id)[-1]["action"] == "image_purged"
    with pytest.raises(NotFound, match="retention"):
        queue.image(labelled.id)
    assert queue.purge_images(ttl_s=1.0, now=time.time() + 10) == {"items": 0, "images_deleted": 0}


def test_export_calibration_set(tmp_path):
    queue = ReviewQueue(tmp_path / "q")
    for seed, label in [
        (1, {"verdict": "confirm", "label": "cat"}),
        (2, {"verdict": "correct", "label": "dog"}),
        (3, {"verdict": "reject", "label": None}),
    ]:
        add(queue, seed)
        lease = queue.claim("ann")
        queue.submit_label(lease.id, reviewer="ann", lease_token=lease.lease_token, label=label)
    add(queue, 4)  # still pending: not exported
    summary = queue.export_calibration(tmp_path / "out")
    assert summary["written"] == 2 and summary["no_class_label"] == 1
    rows = list(csv.DictReader((tmp_path / "out" / "labels.csv").open()))
    assert sorted(r["label"] for r in rows) == ["cat", "dog"]
    assert all((tmp_path / "out" / "images" / r["image"]).is_file() for r in rows)
    assert len((tmp_path / "out" / "traces.jsonl").read_text().splitlines()) == 2


def test_audit_outcomes_count_errors(tmp_path):
    queue = ReviewQueue(tmp_path)
    for seed, verdict in [(1, "confirm"), (2, "correct"), (3, "confirm")]:
        add(queue, seed, kind="audit")
        lease = queue.claim("ann")
        label = {"verdict": verdict, "label": "cat" if verdict == "confirm" else "dog"}
        queue.submit_label(lease.id, reviewer="ann", lease_token=lease.lease_token, label=label)
    assert queue.audit_outcomes("classify", 100) == (1, 3)
    assert queue.audit_outcomes("classify", 1)[1] == 1
