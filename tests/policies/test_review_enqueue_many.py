"""Many review items in one write (``ReviewQueue.enqueue_many``) and the service's grouping of
concurrent enqueues (router/services/analyze/grouped_writes.py): each item is what ``enqueue``
alone would have made, and one item's failure stays its own."""

import asyncio
import hashlib

from policies.review_queue import ReviewQueue
from router.services.analyze.grouped_writes import review_writes
from visionroute.errors import Conflict, InputError


def fields(request_id: str, image: bytes = b"img", **overrides):
    item = {
        "request_id": request_id,
        "image_bytes": image,
        "image_sha256": hashlib.sha256(image).hexdigest(),
        "tenant": "t",
        "task": "classify",
        "reason": "unsure",
        "proposed": [{"label": "cat"}],
        "trace": {"steps": [{"stage": "input"}]},
        "priority": 0.5,
    }
    return item | overrides


def test_many_items_in_one_write_are_each_what_enqueue_makes(tmp_path):
    queue = ReviewQueue(tmp_path)
    earlier = queue.enqueue(**fields("retry", b"old"))
    results = queue.enqueue_many(
        [
            fields("a", b"one"),
            fields("b", b"two", kind="audit", audit_source="policy", inclusion_probability=0.1),
            fields("retry", b"old"),  # a retry: the existing item, not a second one
            fields("retry", b"other image"),  # the same id for another image: 409, its own
            fields("bad", kind="nonsense"),  # a bad argument: its own error, naming the field
            fields("c", b"three"),
        ]
    )
    a, b, retried, conflict, bad, c = results
    assert retried.id == earlier.id
    assert isinstance(conflict, Conflict) and conflict.field == "request_id"
    assert isinstance(bad, InputError) and bad.field == "kind"
    assert [item.request_id for item in (a, b, c)] == ["a", "b", "c"]
    assert b.kind == "audit" and b.inclusion_probability == 0.1
    reopened = ReviewQueue(tmp_path)  # committed and durable, images included
    assert sorted(i.request_id for i in reopened.list_items()) == ["a", "b", "c", "retry"]
    assert reopened.image(a.id) == b"one" and reopened.image(c.id) == b"three"
    assert [e["action"] for e in reopened.audit_log(c.id)] == ["enqueue"]
    assert reopened.get(a.id).trace == {"steps": [{"stage": "input"}]}


def test_a_failing_item_does_not_fail_the_others_in_its_write(tmp_path):
    queue = ReviewQueue(tmp_path)
    unstorable = fields("x", b"x", trace={"steps": [object()]})  # not JSON: fails inside the write
    results = queue.enqueue_many([fields("a", b"a"), unstorable, fields("b", b"b")])
    assert isinstance(results[1], TypeError)
    assert sorted(i.request_id for i in queue.list_items()) == ["a", "b"]
    assert {results[0].id, results[2].id} == {i.id for i in queue.list_items()}


def test_concurrent_enqueues_share_writes_and_each_gets_its_own_item(tmp_path):
    queue = ReviewQueue(tmp_path)
    writes = review_writes(queue)

    async def many():
        requests = [fields(f"r{i}", f"img{i}".encode()) for i in range(12)]
        requests[5] = fields("r5", kind="nonsense")
        return await asyncio.gather(*(writes.write(r) for r in requests), return_exceptions=True)

    results = asyncio.run(many())
    assert isinstance(results[5], InputError)
    written = [r for i, r in enumerate(results) if i != 5]
    assert [item.request_id for item in written] == [f"r{i}" for i in range(12) if i != 5]
    assert len({item.id for item in written}) == 11 == queue.stats()["depth"]
    # the first goes alone at once; the others arrived while it was written and go together
    assert writes.transactions < 12
    again = asyncio.run(writes.write(fields("r0", b"img0")))  # a retry, in another event loop
    assert again.id == written[0].id and queue.stats()["depth"] == 11
