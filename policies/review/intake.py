"""Queueing an item: its image made durable, then its row, once per request.

Durability rule: ``enqueue`` returns only after the image is durable (the file fsynced, or the
``images`` row written in the item's own transaction) and the row is committed, so an
acknowledged item survives a crash and always has its image. Enqueue is idempotent on
(``tenant``, ``request_id``, ``kind``): a client retry after a lost response never makes a
second item, and another tenant's request that happens to reuse the id gets an item of its own.
The same id with another image (or task) within a tenant is not a retry: 409, never an item
answered for an image it does not hold.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from policies.audit_sampling import AUDIT_SOURCES
from policies.review.blobs import BlobRef, BlobStore, DatabaseBlobs, blob_scope, check_sha256
from policies.review.double_labels import wants_two_labels
from policies.review.items import KINDS, ReviewItem, audit, read_item
from policies.review.labels import register_label_set
from visionroute.errors import Conflict, InputError
from visionroute.state import Database, Row

LOOKUP = "SELECT * FROM items WHERE tenant = ? AND request_id = ? AND kind = ?"
INSERT = (
    "INSERT INTO items (id, request_id, tenant, task, image_sha256, created_at, priority, reason,"
    " proposed_json, trace_json, kind, sla_due_at, stored_sha256, image_withheld, original_kept,"
    " audit_source, inclusion_probability, labels_wanted)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (tenant, request_id, kind) DO NOTHING RETURNING id"
)

log = logging.getLogger("visionroute.review")


class Intake:
    def __init__(self, database: Database, blobs: BlobStore | DatabaseBlobs) -> None:
        self.database = database
        self.blobs = blobs

    def enqueue(
        self,
        *,
        request_id: str,
        image_bytes: bytes | None,
        image_sha256: str,
        tenant: str,
        task: str,
        reason: str,
        proposed: list[dict[str, Any]],
        trace: dict[str, Any],
        priority: float = 0.0,
        kind: str = "review",
        sla_s: float | None = None,
        label_set: tuple[str, ...] | list[str] | None = None,
        original_bytes: bytes | None = None,
        image_withheld: str | None = None,
        audit_source: str | None = None,
        inclusion_probability: float | None = None,
        double_label_fraction: float = 0.0,
    ) -> ReviewItem:
        """Store the image, then the row; returns the existing item on a retry (the same tenant,
        request id and kind, with the same image and task); Conflict when those differ.

        ``image_bytes`` is what is stored and shown for the item: the request's file, or its
        redaction (cascades/image_redaction.py). It is keyed by its own sha256 in the tenant's
        scope; ``image_sha256`` names the request's file (the retry check compares it).
        ``original_bytes`` (privacy ``keep_original``) stores the unredacted file too.
        ``image_bytes=None`` queues the item with no image; ``image_withheld`` says why.
        ``label_set`` (the model's class names) registers what labels the task accepts.
        ``audit_source`` / ``inclusion_probability``: who sampled the item and its chance of
        being queued (``policies.audit_sampling.inclusion_probability``); None: unknown.
        ``double_label_fraction`` (``review.double_label_fraction``): the share of items drawn
        for two reviewers' labels (``policies/review/double_labels.py``).
        """
        return self._enqueue(_Pending.checked(**_arguments(locals())))

    def enqueue_many(self, items: Sequence[Mapping[str, Any]]) -> list[ReviewItem | Exception]:
        """``enqueue`` for each of ``items`` (its keyword arguments) with one write transaction
        for the new ones: one commit (one fsync of SQLite's log) instead of one per item, which
        is most of what an enqueue costs. Each result is the item, or the exception ``enqueue``
        would have raised for it alone (a bad argument, a 409). Durability is ``enqueue``'s:
        every image durable and every row committed before this returns. If the shared
        transaction fails, each item is written on its own, so one item's failure stays its own."""
        results: list[ReviewItem | Exception | None] = [None] * len(items)
        fresh: dict[int, _Pending] = {}
        for index, item in enumerate(items):
            try:
                fresh[index] = _Pending.checked(**item)
            except Exception as exc:  # this item's own error (an InputError naming the field)
                results[index] = exc
        if fresh:
            with self.database.read() as db:
                for index, pending in list(fresh.items()):
                    existing = db.execute(LOOKUP, pending.key).fetchone()
                    if existing is not None:  # a retry: nothing to write
                        results[index] = _outcome(retried, existing, pending.image_sha256, pending.task)
                        del fresh[index]
        if len(fresh) > 1:
            try:
                for pending in fresh.values():
                    self._files_first(pending)
                with self.database.write() as db:
                    _lock(db, [ref for pending in fresh.values() for ref in pending.blobs])
                    written = {index: self._write(db, pending) for index, pending in fresh.items()}
            except Exception as exc:  # rolled back: each item on its own below
                log.info(
                    "one transaction for %d review items failed (%s); writing each alone", len(fresh), exc
                )
            else:
                for index, item in written.items():
                    results[index] = item
                fresh = {}
        for index, pending in fresh.items():
            results[index] = _outcome(self._enqueue, pending)
        return [result if result is not None else RuntimeError("not enqueued") for result in results]

    def _enqueue(self, pending: _Pending) -> ReviewItem:
        with self.database.read() as db:
            existing = db.execute(LOOKUP, pending.key).fetchone()
        if existing is not None:  # a retry: nothing to write
            return retried(existing, pending.image_sha256, pending.task)
        self._files_first(pending)
        with self.database.write() as db:
            _lock(db, pending.blobs)
            return self._write(db, pending)

    def _files_first(self, pending: _Pending) -> None:
        """The file's fsync outside SQLite's one write lock, so enqueues do not queue behind
        each other's disk flushes; the put inside the transaction then only finds it there (or
        rewrites it, if a purge removed it in between)."""
        if isinstance(self.blobs, BlobStore):
            for ref, data in pending.blobs.items():
                self.blobs.put(ref, data)

    def _write(self, db: Any, pending: _Pending) -> ReviewItem:
        """The item's row, blobs, label set and audit event inside ``db``'s write transaction
        (the caller has locked the blobs' keys); the existing item if a concurrent retry won."""
        tenant, request_id, kind = pending.key
        item_id = uuid.uuid4().hex
        now = time.time()
        # ON CONFLICT, not a check first: on PostgreSQL a concurrent retry on another node
        # may insert between a check and this insert.
        inserted = db.execute(
            INSERT,
            (
                item_id,
                request_id,
                tenant,
                pending.task,
                pending.image_sha256,
                now,
                pending.priority,
                pending.reason,
                json.dumps(pending.proposed),
                json.dumps(pending.trace),
                kind,
                now + pending.sla_s if pending.sla_s else None,
                pending.stored_sha256,
                pending.image_withheld,
                int(pending.original_kept),
                pending.audit_source,
                pending.inclusion_probability,
                pending.labels_wanted,
            ),
        ).fetchone()
        if inserted is None:  # a concurrent retry won the race
            return retried(db.execute(LOOKUP, pending.key).fetchone(), pending.image_sha256, pending.task)
        for ref, data in pending.blobs.items():
            self.blobs.put(ref, data, db)  # durable before the row commits
        if pending.label_set:
            register_label_set(db, pending.task, list(pending.label_set), now)
        audit(
            db,
            item_id,
            "service",
            "enqueue",
            None,
            {"reason": pending.reason, "kind": kind, "priority": pending.priority},
        )
        return read_item(db, item_id)


def _arguments(scope: dict[str, Any]) -> dict[str, Any]:
    """``enqueue``'s keyword arguments from its ``locals()`` (taken first thing: only them)."""
    return {name: value for name, value in scope.items() if name != "self"}


def _lock(db: Any, refs: Iterable[BlobRef]) -> None:
    """The blobs' keys, sorted (no deadlock between transactions taking several)."""
    for ref in sorted(set(refs)):
        db.dialect.lock(db, ref.lock_key())


def _outcome(function: Callable[..., ReviewItem], *args: Any) -> ReviewItem | Exception:
    try:
        return function(*args)
    except Exception as exc:
        return exc


@dataclass(frozen=True)
class _Pending:
    """One item checked and ready to write: ``enqueue``'s arguments as its row needs them."""

    key: tuple[str, str, str]  # (tenant, request_id, kind): what makes a retry
    image_sha256: str
    task: str
    blobs: dict[BlobRef, bytes]
    stored_sha256: str | None
    reason: str
    proposed: list[dict[str, Any]]
    trace: dict[str, Any]
    priority: float
    sla_s: float | None
    label_set: tuple[str, ...] | list[str] | None
    image_withheld: str | None
    original_kept: bool
    audit_source: str | None
    inclusion_probability: float | None
    labels_wanted: int

    @classmethod
    def checked(
        cls,
        *,
        request_id: str,
        image_bytes: bytes | None,
        image_sha256: str,
        tenant: str,
        task: str,
        reason: str,
        proposed: list[dict[str, Any]],
        trace: dict[str, Any],
        priority: float = 0.0,
        kind: str = "review",
        sla_s: float | None = None,
        label_set: tuple[str, ...] | list[str] | None = None,
        original_bytes: bytes | None = None,
        image_withheld: str | None = None,
        audit_source: str | None = None,
        inclusion_probability: float | None = None,
        double_label_fraction: float = 0.0,
    ) -> _Pending:
        check_request(kind, image_sha256, image_bytes, original_bytes, image_withheld)
        check_provenance(audit_source, inclusion_probability)
        stored_sha256 = None if image_bytes is None else hashlib.sha256(image_bytes).hexdigest()
        return cls(
            key=(tenant, request_id, kind),
            image_sha256=image_sha256,
            task=task,
            blobs=blobs_to_store(tenant, image_bytes, stored_sha256, original_bytes, image_sha256),
            stored_sha256=stored_sha256,
            reason=reason,
            proposed=proposed,
            trace=trace,
            priority=priority,
            sla_s=sla_s,
            label_set=label_set,
            image_withheld=image_withheld if image_bytes is None else None,
            original_kept=original_bytes is not None,
            audit_source=audit_source,
            inclusion_probability=inclusion_probability,
            labels_wanted=2 if wants_two_labels(request_id, double_label_fraction) else 1,
        )


def check_request(
    kind: str,
    image_sha256: str,
    image_bytes: bytes | None,
    original_bytes: bytes | None,
    image_withheld: str | None,
) -> None:
    if kind not in KINDS:
        raise InputError(f"kind must be one of {list(KINDS)}, got {kind!r}", field="kind")
    check_sha256(image_sha256)
    if image_bytes is None and not image_withheld:
        raise InputError("an item without an image needs image_withheld (the reason)", field="image")
    if original_bytes is not None and hashlib.sha256(original_bytes).hexdigest() != image_sha256:
        raise InputError("original_bytes do not hash to image_sha256", field="image_sha256")


def check_provenance(audit_source: str | None, inclusion_probability: float | None) -> None:
    if audit_source is not None and audit_source not in AUDIT_SOURCES:
        raise InputError(
            f"audit_source must be one of {list(AUDIT_SOURCES)}, got {audit_source!r}", field="audit_source"
        )
    if inclusion_probability is not None and not 0.0 < inclusion_probability <= 1.0:
        raise InputError(
            f"inclusion_probability must be in (0, 1], got {inclusion_probability!r}",
            field="inclusion_probability",
        )


def blobs_to_store(
    tenant: str,
    image_bytes: bytes | None,
    stored_sha256: str | None,
    original_bytes: bytes | None,
    image_sha256: str,
) -> dict[BlobRef, bytes]:
    """The blobs an item keeps in its tenant's scope: the image shown, and the unredacted
    original when kept (one blob when they are the same bytes)."""
    blobs: dict[BlobRef, bytes] = {}
    if image_bytes is not None:
        blobs[BlobRef(blob_scope(tenant), stored_sha256)] = image_bytes
    if original_bytes is not None:
        blobs.setdefault(BlobRef(blob_scope(tenant), image_sha256), original_bytes)
    return blobs


def retried(row: Row, image_sha256: str, task: str) -> ReviewItem:
    """The item a retry names; Conflict when the request differs (another image or task)."""
    item = ReviewItem.from_row(row)
    if item.image_sha256 != image_sha256 or item.task != task:
        raise Conflict(
            f"request id {item.request_id!r} already queued item {item.id} for tenant {item.tenant!r}"
            f" (task {item.task!r}, image sha256 {item.image_sha256[:12]}...); this request has task"
            f" {task!r} and image sha256 {image_sha256[:12]}...: a retry must resend the same"
            " request, anything else needs a new request id",
            field="request_id",
        )
    return item
