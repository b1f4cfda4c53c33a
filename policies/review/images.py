"""The items' images: reading the one a reviewer sees, and retention (``purge``).

Images are keyed by the sha256 of the bytes actually stored (the privacy-redacted image:
cascades/image_redaction.py) within the tenant's scope (``blobs``); ``image_sha256`` names the
request's file. A blob shared by several items (the same bytes in one tenant's scope) goes
when no item with a live image needs it any more; the blob's lock (``BlobRef.lock_key``)
serialises that decision with enqueues of the same blob.
"""

from __future__ import annotations

import time

from policies.review.blobs import BlobRef, BlobStore, DatabaseBlobs, blob_scope
from policies.review.items import ReviewItem, audit
from policies.review.queries import ReviewReads
from visionroute.errors import InputError, NotFound
from visionroute.state import Connection, Database


def drop_image(db: Connection, item: ReviewItem, now: float, status: str) -> None:
    """Mark the item's image gone (its lease too): it can no longer be reviewed."""
    db.execute(
        "UPDATE items SET image_deleted_at = ?, status = ?, lease_owner = NULL, lease_token = NULL,"
        " lease_expires_at = NULL WHERE id = ?",
        (now, status, item.id),
    )


class Images:
    def __init__(self, database: Database, blobs: BlobStore | DatabaseBlobs, reads: ReviewReads) -> None:
        self.database = database
        self.blobs = blobs
        self.reads = reads

    def image(self, item_id: str) -> bytes:
        """The image a reviewer sees: the stored (redacted) one."""
        item = self.reads.get(item_id)
        if item.image_deleted_at is not None:
            raise NotFound(
                f"the image of item {item_id} was deleted by the retention policy at {item.image_deleted_at:.0f}; "
                "its label and audit log remain",
                field="image",
            )
        if item.image_withheld is not None:
            raise NotFound(
                f"the image of item {item_id} was not stored: {item.image_withheld}", field="image"
            )
        return self.blobs.get(item.shown_ref)

    def original_image(self, item_id: str) -> bytes:
        """The unredacted file, stored only under the privacy policy's ``keep_original: true``."""
        item = self.reads.get(item_id)
        if not item.original_kept or item.image_deleted_at is not None:
            raise NotFound(f"item {item_id} has no stored original image", field="image")
        return self.blobs.get(BlobRef(blob_scope(item.tenant), item.image_sha256))

    def live_blob_refs(self) -> list[BlobRef]:
        """Every blob an item with a live image refers to (``visionroute db copy`` moves these)."""
        return sorted(
            {ref for item in self.reads.iter_all() if item.image_deleted_at is None for ref in item.blob_refs}
        )

    def purge(self, ttl_s: float, *, now: float | None = None) -> dict[str, int]:
        """Delete stored images of items older than ``ttl_s``; rows, labels and audit stay.

        A pending item whose image is gone can no longer be reviewed: it becomes ``expired``.
        A blob shared by several items goes when no remaining item needs it. The images go in
        the same transaction (serialised with enqueues of the same blob), so a concurrent
        enqueue never ends up with an item whose image was just deleted. On PostgreSQL an item
        being claimed or labelled right now is left for the next purge.
        """
        if not ttl_s > 0:
            raise InputError(f"ttl_s must be > 0, got {ttl_s}", field="image_ttl_s")
        now = time.time() if now is None else now
        with self.database.write() as db:
            rows = db.execute(
                "SELECT * FROM items WHERE image_deleted_at IS NULL AND created_at < ?"
                " ORDER BY id" + db.dialect.skip_locked,
                (now - ttl_s,),
            ).fetchall()
            purged = [ReviewItem.from_row(row) for row in rows]
            for item in purged:
                status = "expired" if item.status == "pending" else item.status
                drop_image(db, item, now, status)
                audit(
                    db,
                    item.id,
                    "service",
                    "image_purged",
                    {"status": item.status},
                    {"status": status, "ttl_s": ttl_s},
                )
            deleted = self._delete_unneeded_blobs(db, {ref for item in purged for ref in item.blob_refs})
        return {"items": len(rows), "images_deleted": deleted}

    def _delete_unneeded_blobs(self, db: Connection, candidates: set[BlobRef]) -> int:
        """Delete the candidate blobs that no item with a live image refers to (locked first)."""
        for ref in sorted(candidates):  # sorted: two purges never deadlock
            db.dialect.lock(db, ref.lock_key())
        still_needed = {
            ref
            for row in db.execute("SELECT * FROM items WHERE image_deleted_at IS NULL")
            for ref in ReviewItem.from_row(row).blob_refs
            if ref in candidates
        }
        return sum(self.blobs.delete(ref, db) for ref in sorted(candidates - still_needed))
