"""Erasure: finding a data subject's items and removing them with everything stored for them.

``find_items`` names a tenant's items of one subject (by request key or request file);
``erase`` removes them in one transaction: their images wherever stored, their rows, and the
payloads of their earlier audit events, leaving an ``erased`` event each (who did what, and
when, stays). router/services/erasure.py drives it across the stores.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from policies.review.blobs import BlobStore, DatabaseBlobs, check_sha256
from policies.review.images import drop_image
from policies.review.items import ReviewItem, audit, locked_row
from visionroute.errors import InputError
from visionroute.state import Database


class Erasure:
    def __init__(self, database: Database, blobs: BlobStore | DatabaseBlobs) -> None:
        self.database = database
        self.blobs = blobs

    def record_event(self, item_id: str, actor: str, action: str, new: Any) -> None:
        """An audit event of the service's own (e.g. an erasure's summary under ``erasure:<id>``)."""
        with self.database.write() as db:
            audit(db, item_id, actor, action, None, new)

    def find_items(
        self, tenant: str, *, request_key: str | None = None, image_sha256: str | None = None
    ) -> list[ReviewItem]:
        """A tenant's items of one subject: those whose request id is ``request_key`` or starts
        with ``request_key + ":"``, or whose request file is ``image_sha256``."""
        if (request_key is None) == (image_sha256 is None):
            raise InputError("give exactly one of request_key and image_sha256", field="subject")
        if image_sha256 is not None:
            check_sha256(image_sha256)
            query, params = "image_sha256 = ?", [image_sha256]
        else:
            # A range, not LIKE: '_' in a key is no wildcard, and the unique index serves it.
            query, params = (
                "(request_id = ? OR (request_id >= ? AND request_id < ?))",
                [
                    request_key,
                    request_key + ":",
                    request_key + ";",  # ';' sorts right after ':'
                ],
            )
        with self.database.read() as db:
            rows = db.execute(
                f"SELECT * FROM items WHERE tenant = ? AND {query} ORDER BY created_at", [tenant, *params]
            ).fetchall()
        return [ReviewItem.from_row(row) for row in rows]

    def erase(self, item_ids: Iterable[str], *, actor: str, reason: str) -> dict[str, Any]:
        """Remove items and everything stored for them; an ``erased`` audit event each remains.

        Gone: their images (the shown and any kept original), their rows (trace, proposed
        answer, label) and the payloads of their earlier audit events (who did what, and when,
        stays). An image is erased wherever it is stored: another item of the tenant holding
        the same blob loses its image too (``image_erased`` in its audit log; pending becomes
        expired). One transaction: all of it happens or none.
        """
        ids = sorted(set(item_ids))
        now = time.time()
        with self.database.write() as db:
            items = [ReviewItem.from_row(row) for i in ids if (row := locked_row(db, i)) is not None]
            refs = {ref for item in items for ref in item.blob_refs if item.image_deleted_at is None}
            for ref in sorted(refs):
                db.dialect.lock(db, ref.lock_key())
            erased = {item.id for item in items}
            shas = sorted({ref.sha256 for ref in refs})
            marks = ", ".join("?" for _ in shas)
            candidates = (
                db.execute(
                    f"SELECT * FROM items WHERE image_deleted_at IS NULL AND (image_sha256 IN ({marks})"
                    f" OR stored_sha256 IN ({marks})) ORDER BY id" + db.dialect.for_update,
                    [*shas, *shas],
                ).fetchall()
                if shas
                else []
            )
            sharing = [
                other
                for row in candidates
                if (other := ReviewItem.from_row(row)).id not in erased and refs & set(other.blob_refs)
            ]
            for other in sharing:
                status = "expired" if other.status == "pending" else other.status
                drop_image(db, other, now, status)
                audit(db, other.id, actor, "image_erased", {"status": other.status}, {"status": status})
            deleted = sum(self.blobs.delete(ref, db) for ref in sorted(refs))
            for item in items:
                db.execute("DELETE FROM items WHERE id = ?", (item.id,))
                db.execute("DELETE FROM item_labels WHERE item_id = ?", (item.id,))  # its reviewers' labels
                db.execute(
                    "UPDATE audit SET previous_json = NULL, new_json = NULL WHERE item_id = ?", (item.id,)
                )
                audit(db, item.id, actor, "erased", None, {"reason": reason, "kind": item.kind})
        return {
            "items": [item.id for item in items],
            "not_found": sorted(set(ids) - erased),
            "images_deleted": deleted,
            "other_items_lost_image": [other.id for other in sharing],
            "tenants": sorted({item.tenant for item in items}),
            "request_ids": sorted({item.request_id for item in items}),
            "image_sha256": sorted({item.image_sha256 for item in items}),
        }
