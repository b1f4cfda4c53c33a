"""The review queue's image store: blobs keyed by (scope, sha256 of the bytes stored).

The scope is the tenant (``blob_scope``): two tenants that store the same bytes get two blobs,
so one tenant's item can never point at, keep alive or erase another tenant's image, and a
tenant's redacted item can never resolve to another tenant's unredacted copy of the same file.
Items queued before the store was scoped (review schema < 4) keep their blobs in the legacy
scope ``""``, keyed by the request file's sha256, where they always were.

Two backends with one interface:
- ``BlobStore``: fsynced files under ``root`` (one node, SQLite state);
- ``DatabaseBlobs``: the ``images`` table of the review schema (PostgreSQL: every node reads them,
  and a blob written with the item's connection commits or rolls back with the item).
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import NamedTuple

from visionroute.errors import InputError, NotFound
from visionroute.state import Connection, Database

LEGACY_SCOPE = ""


def blob_scope(tenant: str) -> str:
    """The scope a tenant's images are stored in (never the legacy ``""``)."""
    return f"tenant:{tenant}"


def check_sha256(sha256: str) -> None:
    if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
        raise InputError(f"not a sha256 hex digest: {sha256!r}", field="image_sha256")


class BlobRef(NamedTuple):
    """One stored image: its scope and the sha256 of its bytes."""

    scope: str
    sha256: str

    def lock_key(self) -> str:
        """Enqueue, purge and erase all take this lock for a blob (PostgreSQL): a purge deciding
        that no item needs the blob never races an enqueue about to need it again."""
        return f"review-image:{self.scope}:{self.sha256}"


class BlobStore:
    """Images as files: written to a temp file, fsynced, renamed; never overwritten.

    Legacy blobs live at ``root/<sha[:2]>/<sha>``; a tenant's at
    ``root/tenants/<sha256(scope)[:32]>/<sha[:2]>/<sha>`` (hashed: a tenant name is no path).
    ``conn`` (the caller's transaction) is accepted for the same interface as ``DatabaseBlobs``
    and not used: the file is durable before the transaction that names it commits.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, ref: BlobRef) -> Path:
        check_sha256(ref.sha256)
        folder = self.root
        if ref.scope != LEGACY_SCOPE:
            folder = self.root / "tenants" / hashlib.sha256(ref.scope.encode()).hexdigest()[:32]
        return folder / ref.sha256[:2] / ref.sha256

    def put(self, ref: BlobRef, data: bytes, conn: Connection | None = None) -> None:
        target = self.path(ref)
        if target.exists():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{ref.sha256}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        directory = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def get(self, ref: BlobRef, conn: Connection | None = None) -> bytes:
        path = self.path(ref)
        if not path.is_file():
            raise NotFound(f"no stored image {ref.sha256}", field="image_sha256")
        return path.read_bytes()

    def delete(self, ref: BlobRef, conn: Connection | None = None) -> bool:
        try:
            self.path(ref).unlink()
            return True
        except FileNotFoundError:
            return False


class DatabaseBlobs:
    """Images in the review schema's ``images`` table, primary key (scope, sha256)."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def _using(self, conn: Connection | None, *, write: bool) -> AbstractContextManager[Connection]:
        if conn is not None:
            return nullcontext(conn)
        return self.database.write() if write else self.database.read()

    def put(self, ref: BlobRef, data: bytes, conn: Connection | None = None) -> None:
        check_sha256(ref.sha256)
        with self._using(conn, write=True) as db:
            db.execute(
                "INSERT INTO images (scope, sha256, data, created_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (scope, sha256) DO NOTHING",
                (ref.scope, ref.sha256, data, time.time()),
            )

    def get(self, ref: BlobRef, conn: Connection | None = None) -> bytes:
        check_sha256(ref.sha256)
        with self._using(conn, write=False) as db:
            row = db.execute(
                "SELECT data FROM images WHERE scope = ? AND sha256 = ?", (ref.scope, ref.sha256)
            ).fetchone()
        if row is None:
            raise NotFound(f"no stored image {ref.sha256}", field="image_sha256")
        return bytes(row["data"])

    def delete(self, ref: BlobRef, conn: Connection | None = None) -> bool:
        check_sha256(ref.sha256)
        with self._using(conn, write=True) as db:
            return (
                db.execute(
                    "DELETE FROM images WHERE scope = ? AND sha256 = ?", (ref.scope, ref.sha256)
                ).rowcount
                > 0
            )
