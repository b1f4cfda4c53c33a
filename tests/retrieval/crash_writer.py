"""Child process for the kill -9 test: writes forever, printing BEGIN before and ACK after each.

``python -m tests.retrieval.crash_writer INDEX_DIR START`` . The vector of operation ``i`` is
``vector_for(i)``, so the parent can check what every acknowledged write stored.
"""

from __future__ import annotations

import sys

import numpy as np

from retrieval.config import IndexConfig
from retrieval.index import VectorIndex
from retrieval.schemas import ItemMetadata, SearchFilters

DIM = 16
# Snapshots every few writes, so kills land inside snapshots as well as inside commits.
CONFIG = IndexConfig(kind="hnsw", snapshot_every_ops=7, compact_tombstone_ratio=0.3)


def vector_for(i: int) -> np.ndarray:
    vector = np.random.default_rng(i).standard_normal(DIM).astype(np.float32)
    return vector / np.linalg.norm(vector)


def main(index_dir: str, start: int) -> None:
    index = VectorIndex(index_dir, DIM, "crash-test", CONFIG)
    live = index.find(SearchFilters())
    i = start
    while True:
        if i % 5 == 3 and live:
            op, target = "upsert", live[i % len(live)]
        elif i % 7 == 6 and live:
            op, target = "delete", live.pop(i % len(live))
        else:
            op, target = "add", None
        print(f"BEGIN {i} {op} {target}", flush=True)
        if op == "delete":
            index.delete(target)
        else:
            target = index.upsert(vector_for(i), ItemMetadata(tags=[f"op{i}"]), item_id=target)
            if op == "add":
                live.append(target)
        print(f"ACK {i} {op} {target}", flush=True)
        i += 1


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
