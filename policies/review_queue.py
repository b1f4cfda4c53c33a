"""The human-review queue: items, label sets and audit in a state database, images by sha256.

Where it lives (``visionroute.state``): a SQLite file (WAL) under ``root`` with images as fsynced
files under ``root/images`` (one node), or the PostgreSQL schema ``<prefix>_review`` with images
in its ``images`` table, so every node reads every image (a cluster). Images are keyed by the
sha256 of the bytes actually stored (the privacy-redacted image: cascades/image_redaction.py)
within the tenant's scope (policies/review/blobs.py); ``image_sha256`` names the request's file.

``ReviewQueue`` is the facade; each part of ``policies/review/`` has one job:
- ``schema``: the tables and their versions (``MIGRATIONS``, applied at open);
- ``items``: ``ReviewItem`` (one row) and the row helpers (audit, locked reads);
- ``intake``: ``enqueue``, durable and idempotent on (tenant, request id, kind);
- ``leases``: claim, release and lease expiry (no item is ever held by two reviewers);
- ``labels``: label sets and labelling under a live lease;
- ``double_labels``: items labelled by two reviewers, and adjudication when they disagree;
- ``images``: the image a reviewer sees, and retention (``purge_images``);
- ``erasure``: a data subject's items, found and erased;
- ``export``: reviewed items as a labelled set (``export_calibration``);
- ``queries``: reading items, audit logs and queue depth;
- ``blobs``: the image store (files, or the ``images`` table).
"""

from __future__ import annotations

import functools
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from policies.review.blobs import BlobRef, BlobStore, DatabaseBlobs
from policies.review.double_labels import JudgedLabel, judged_labels
from policies.review.erasure import Erasure
from policies.review.export import Export
from policies.review.images import Images
from policies.review.intake import Intake
from policies.review.items import KINDS, STATUSES, ReviewItem
from policies.review.labels import Labels
from policies.review.leases import Leases
from policies.review.queries import ReviewReads
from policies.review.schema import ITEM_COLUMNS, MIGRATIONS, STORE, UNVERSIONED_COLUMNS, adopt_unversioned
from visionroute.migrations import migrate
from visionroute.state import StateConfig, StateUnavailable, open_database

__all__ = [
    "ITEM_COLUMNS",
    "KINDS",
    "MIGRATIONS",
    "STATUSES",
    "STORE",
    "UNVERSIONED_COLUMNS",
    "ReviewItem",
    "ReviewQueue",
]


class ReviewQueue:
    """Thread-safe and multi-process safe; on PostgreSQL, safe across nodes too.

    ``state`` chooses the backend (None: the SQLite file ``root/review.sqlite3``).
    """

    def __init__(
        self, root: str | Path, *, default_lease_s: float = 300.0, state: StateConfig | None = None
    ) -> None:
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "review.sqlite3"
        self.default_lease_s = default_lease_s
        self.database = open_database(state, "review", self.db_path)
        self.blobs: BlobStore | DatabaseBlobs = (
            BlobStore(self.root / "images")
            if self.database.dialect.name == "sqlite"
            else DatabaseBlobs(self.database)
        )
        try:
            self.schema = migrate(self.database, STORE, MIGRATIONS, adopt_unversioned=adopt_unversioned)
        except BaseException:
            self.database.close()
            raise
        self._reads = ReviewReads(self.database)
        self._intake = Intake(self.database, self.blobs)
        self._leases = Leases(self.database)
        self._labels = Labels(self.database)
        self._images = Images(self.database, self.blobs, self._reads)
        self._erasure = Erasure(self.database, self.blobs)
        self._export = Export(self.database, self.blobs)

    def close(self) -> None:
        self.database.close()

    def is_writable(self) -> bool:
        try:
            with self.database.write() as db:
                db.execute("SELECT 1")
            return True
        except (sqlite3.Error, StateUnavailable):
            return False

    # -- writers (intake, leases, labels) -----------------------------------------------------

    # Intake's own signature and docstring (functools.wraps), so the facade cannot drift from it.
    @functools.wraps(Intake.enqueue)
    def enqueue(self, **item: Any) -> ReviewItem:
        return self._intake.enqueue(**item)

    @functools.wraps(Intake.enqueue_many)
    def enqueue_many(self, items: Sequence[Mapping[str, Any]]) -> list[ReviewItem | Exception]:
        return self._intake.enqueue_many(items)

    def claim(
        self,
        reviewer: str,
        *,
        item_id: str | None = None,
        tenant: str | None = None,
        lease_s: float | None = None,
        adjudicator: bool = False,
    ) -> ReviewItem | None:
        """Lease the given item, or the most valuable unleased pending one; None if none waits.
        ``adjudicator`` (an admin) may also take an item whose two labels disagree."""
        lease_s = self.default_lease_s if lease_s is None else lease_s
        return self._leases.claim(
            reviewer,
            lease_s=lease_s,
            now=time.time(),
            item_id=item_id,
            tenant=tenant,
            adjudicator=adjudicator,
        )

    def release(self, item_id: str, *, reviewer: str, lease_token: str) -> ReviewItem:
        """Give a leased item back unlabelled (a reviewer skips it)."""
        return self._leases.release(item_id, reviewer=reviewer, lease_token=lease_token)

    def submit_label(
        self,
        item_id: str,
        *,
        reviewer: str,
        lease_token: str,
        label: dict[str, Any],
        tenant: str | None = None,
        adjudicator: bool = False,
    ) -> ReviewItem:
        """Record a label under a live lease. Repeating the same label is a no-op success; the
        first of two labels leaves the item pending (``policies/review/double_labels.py``)."""
        return self._labels.submit(
            item_id,
            reviewer=reviewer,
            lease_token=lease_token,
            label=label,
            now=time.time(),
            tenant=tenant,
            adjudicator=adjudicator,
        )

    def label_set(self, task: str) -> list[str] | None:
        return self._labels.label_set(task)

    # -- images and retention -------------------------------------------------------------------

    def image(self, item_id: str) -> bytes:
        """The image a reviewer sees: the stored (redacted) one."""
        return self._images.image(item_id)

    def original_image(self, item_id: str) -> bytes:
        """The unredacted file, stored only under the privacy policy's ``keep_original: true``."""
        return self._images.original_image(item_id)

    def live_blob_refs(self) -> list[BlobRef]:
        """Every blob an item with a live image refers to (``visionroute db copy`` moves these)."""
        return self._images.live_blob_refs()

    def purge_images(self, ttl_s: float, *, now: float | None = None) -> dict[str, int]:
        """Delete stored images of items older than ``ttl_s``; rows, labels and audit stay
        (``images.Images.purge``)."""
        return self._images.purge(ttl_s, now=now)

    # -- erasure --------------------------------------------------------------------------------

    def record_event(self, item_id: str, actor: str, action: str, new: Any) -> None:
        """An audit event of the service's own (e.g. an erasure's summary under ``erasure:<id>``)."""
        self._erasure.record_event(item_id, actor, action, new)

    def find_items(
        self, tenant: str, *, request_key: str | None = None, image_sha256: str | None = None
    ) -> list[ReviewItem]:
        """A tenant's items of one subject (router/services/erasure.py)."""
        return self._erasure.find_items(tenant, request_key=request_key, image_sha256=image_sha256)

    def erase(self, item_ids: Iterable[str], *, actor: str, reason: str) -> dict[str, Any]:
        """Remove items and everything stored for them, in one transaction (``erasure.Erasure.erase``)."""
        return self._erasure.erase(item_ids, actor=actor, reason=reason)

    # -- readers --------------------------------------------------------------------------------

    def get(self, item_id: str, *, tenant: str | None = None) -> ReviewItem:
        return self._reads.get(item_id, tenant=tenant)

    def list_items(
        self, *, status: str | None = "pending", tenant: str | None = None, limit: int = 50, offset: int = 0
    ) -> list[ReviewItem]:
        return self._reads.list_items(status=status, tenant=tenant, limit=limit, offset=offset)

    def iter_all(self) -> Iterator[ReviewItem]:
        return self._reads.iter_all()

    def audit_log(self, item_id: str) -> list[dict[str, Any]]:
        return self._reads.audit_log(item_id)

    def stats(self, *, tenant: str | None = None) -> dict[str, float]:
        """Pending depth, oldest age, overdue and leased counts: of one tenant, or of all (None)."""
        return self._reads.stats(tenant=tenant)

    def judged_labels(self, *, tenant: str | None = None) -> list[JudgedLabel]:
        """Every label with what decided its item (``policies.reviewer_quality`` reads them)."""
        with self.database.read() as db:
            return judged_labels(db, tenant)

    def audit_outcomes(self, task: str, window_items: int, *, tenant: str | None = None) -> tuple[int, int]:
        """(errors, labelled) over the latest ``window_items`` labelled audit samples of a task."""
        return self._reads.audit_outcomes(task, window_items, tenant=tenant)

    def export_calibration(
        self, out_dir: str | Path, *, task: str | None = None, tenant: str | None = None
    ) -> dict[str, Any]:
        """Write reviewed items as a labelled set (``export.Export.export_calibration``)."""
        return self._export.export_calibration(out_dir, task=task, tenant=tenant)
