"""A replica's own directory: its lock, its FAISS snapshot files and the manifest naming one.

A snapshot is written atomically (temp file, fsync, rename, fsync of the directory), then a
manifest names it, renamed the same way: a crash leaves the old manifest and its file, or the
new ones, never a manifest naming a half-written file. The manifest records the last log entry
the file contains (``applied_seq``) and what it was made from (store id, shard, embedder), so
a snapshot of another store, another shard or ahead of the store's log is never loaded.

Files: ``snapshot.json`` (the manifest), ``index-<seq>.faiss`` (snapshots),
``rebuild-<seq>.faiss`` (a background rebuild's, named by the manifest once swapped in),
``*.tmp`` (a write a crash interrupted), ``writer.lock`` (one process per directory).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from retrieval.index.faiss_index import FaissIndex
from visionroute.errors import Conflict

log = logging.getLogger(__name__)

MANIFEST = "snapshot.json"
FORMAT_VERSION = 1


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)``, fsync it, rename it to ``path``, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@dataclass(frozen=True)
class Origin:
    """What a replica's snapshots are made from; a manifest of another origin is not loaded."""

    dim: int
    space: str
    store_id: str
    shard: tuple[int, int]


class SnapshotDir:
    """``index_dir``, locked by this process until ``release()``; Conflict if another holds it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock_file = open(self.path / "writer.lock", "a+")
        try:
            fcntl.flock(self.lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.lock_file.close()
            raise Conflict(
                f"index_dir {str(self.path)!r} is open in another process; each replica needs its own index_dir",
                field="index_dir",
            ) from None

    def release(self) -> None:
        if not self.lock_file.closed:
            fcntl.flock(self.lock_file, fcntl.LOCK_UN)
            self.lock_file.close()

    # reading ---------------------------------------------------------------------------------
    def remove_interrupted(self) -> None:
        for leftover in self.path.glob("*.tmp"):
            leftover.unlink()  # a snapshot interrupted by a crash; the manifest never named it

    def usable_manifest(self, origin: Origin, last_seq: Callable[[], int]) -> dict | None:
        """The manifest, unless there is none, it belongs to another store or shard, or it is
        ahead of the store's log (``last_seq``)."""
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            return None
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("store_id", origin.store_id) != origin.store_id:
            log.warning("snapshot in %s was made from another store; rebuilding from this one", self.path)
            return None
        if tuple(manifest.get("shard", (0, 1))) != origin.shard:
            log.warning(
                "snapshot in %s holds shard %s, this replica is shard %s; rebuilding from the store",
                self.path,
                manifest.get("shard", [0, 1]),
                list(origin.shard),
            )
            return None
        if int(manifest["applied_seq"]) > last_seq():
            log.warning("snapshot in %s is ahead of the store's log; rebuilding from the store", self.path)
            return None
        return manifest

    def read_index(self, manifest: dict, config) -> FaissIndex:
        """The FAISS file ``manifest`` names (FAISS's ``RuntimeError`` if unreadable); rebuild
        files it does not name are dropped first (rebuilds that never swapped in)."""
        index_path = self.path / manifest["index_file"]
        for stale in self.path.glob("rebuild-*.faiss"):
            if stale.name != index_path.name:
                stale.unlink(missing_ok=True)
        return FaissIndex.read(index_path, config, tuning=manifest.get("tuning"))

    # writing ---------------------------------------------------------------------------------
    @staticmethod
    def snapshot_name(seq: int) -> str:
        return f"index-{seq:012d}.faiss"

    @staticmethod
    def rebuild_name(seq: int) -> str:
        return f"rebuild-{seq:012d}.faiss"

    def write_index(self, index: FaissIndex, name: str) -> Path:
        path = self.path / name
        write_atomic(path, index.write)
        return path

    def write_manifest(self, origin: Origin, index: FaissIndex, seq: int, index_file: str) -> None:
        """Name ``index_file`` (``index``, holding every log entry through ``seq``)."""
        manifest = {
            "format_version": FORMAT_VERSION,
            "applied_seq": seq,
            "index_file": index_file,
            "kind": index.kind,
            "dim": origin.dim,
            "space": origin.space,
            "store_id": origin.store_id,
            "shard": list(origin.shard),
            "stored_vectors": index.ntotal,
            "tuning": index.tuning,
            "saved_at": time.time(),
        }
        write_atomic(self.path / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))

    def remove_unnamed(self, index_file: str, *, keep_rebuilds: bool) -> None:
        """Delete the FAISS files the manifest no longer names (``keep_rebuilds``: a running
        rebuild may still write its own, so only old snapshots go)."""
        for old in [*self.path.glob("index-*.faiss"), *self.path.glob("rebuild-*.faiss")]:
            if old.name != index_file and (not keep_rebuilds or old.name.startswith("index-")):
                old.unlink(missing_ok=True)
