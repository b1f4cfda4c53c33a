"""The review queue is tenant-scoped: request ids, counts and audit outcomes belong to a tenant."""

from __future__ import annotations

import hashlib

import pytest

from policies.review.blobs import BlobRef, blob_scope
from policies.review_queue import ReviewQueue
from visionroute.errors import Conflict


def enqueue(
    queue: ReviewQueue, tenant: str, image: bytes, request_id: str = "R", kind: str = "review", **extra
):
    return queue.enqueue(
        request_id=request_id,
        image_bytes=image,
        image_sha256=hashlib.sha256(image).hexdigest(),
        tenant=tenant,
        task=extra.pop("task", "classify"),
        reason="unsure",
        proposed=[{"label": "cat"}],
        trace={"steps": []},
        kind=kind,
        **extra,
    )


def test_two_tenants_reusing_a_request_id_get_an_item_each(tmp_path):
    queue = ReviewQueue(tmp_path)
    a = enqueue(queue, "acme", b"acme's image")
    b = enqueue(queue, "globex", b"globex's image")
    assert a.id != b.id and (a.tenant, b.tenant) == ("acme", "globex")
    assert queue.image(b.id) == b"globex's image"  # B's image is queued, not A's answered
    assert enqueue(queue, "acme", b"acme's image").id == a.id  # retries stay idempotent
    assert enqueue(queue, "globex", b"globex's image").id == b.id
    assert queue.stats()["depth"] == 2


def test_kinds_are_separate_items_for_one_request_id(tmp_path):
    queue = ReviewQueue(tmp_path)
    review = enqueue(queue, "acme", b"img", kind="review")
    audit = enqueue(queue, "acme", b"img", kind="audit")
    assert review.id != audit.id and {review.kind, audit.kind} == {"review", "audit"}


@pytest.mark.parametrize("change", [{"image": b"another image"}, {"task": "text"}])
def test_a_request_id_reused_for_other_work_is_a_conflict_and_stores_nothing(tmp_path, change):
    queue = ReviewQueue(tmp_path)
    first = enqueue(queue, "acme", b"img")
    image = change.get("image", b"img")
    with pytest.raises(Conflict) as error:
        enqueue(queue, "acme", image, task=change.get("task", "classify"))
    assert error.value.field == "request_id" and first.id in error.value.reason
    assert [item.id for item in queue.iter_all()] == [first.id]
    if "image" in change:  # the refused image was never written
        assert not queue.blobs.path(BlobRef(blob_scope("acme"), hashlib.sha256(image).hexdigest())).exists()


def test_stats_and_audit_outcomes_of_one_tenant(tmp_path):
    queue = ReviewQueue(tmp_path)
    for n in range(3):
        enqueue(queue, "acme", f"a{n}".encode(), request_id=f"a{n}", sla_s=0.000001)
    enqueue(queue, "globex", b"g", request_id="g")
    queue.claim("gus", tenant="globex")
    for tenant in ("acme", "globex"):
        item = enqueue(queue, tenant, f"{tenant}-audit".encode(), request_id=f"{tenant}-audit", kind="audit")
        lease = queue.claim("rev", item_id=item.id)
        queue.submit_label(item.id, reviewer="rev", lease_token=lease.lease_token, label={"label": "dog"})
    everyone, acme, globex = queue.stats(), queue.stats(tenant="acme"), queue.stats(tenant="globex")
    assert (everyone["depth"], acme["depth"], globex["depth"]) == (4, 3, 1)
    assert (everyone["leased"], acme["leased"], globex["leased"]) == (1, 0, 1)
    assert (acme["overdue"], globex["overdue"]) == (3, 0)
    assert queue.stats(tenant="nobody") == {"depth": 0, "oldest_age_s": 0.0, "overdue": 0, "leased": 0}
    # proposed "cat", labelled "dog": one error per tenant's audit
    assert queue.audit_outcomes("classify", 10) == (2, 2)
    assert queue.audit_outcomes("classify", 10, tenant="acme") == (1, 1)
    assert queue.audit_outcomes("classify", 10, tenant="nobody") == (0, 0)
