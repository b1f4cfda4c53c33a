"""Open-vocabulary visual search: embedders (one normalised image/text space) and a FAISS index.

- ``retrieval.embedders``: the ``Embedder`` protocol, ConSE (offline default, from the packaged
  EfficientNet-Lite0 classifier and MiniLM sentence model) and open_clip.
- ``retrieval.index``: ``VectorIndex``: FAISS (exact / HNSW / IVF-PQ + exact refine) over
  external labels, metadata and an operation log in SQLite, atomic snapshots.
- ``retrieval.service``: ``SearchService``, the plain class the router wraps.
"""
