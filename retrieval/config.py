"""The ``retrieval`` section of the service config (pydantic, ``extra="forbid"``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from visionroute import paths


def _resolve(path: Path | None) -> Path | None:
    # Resolved at parse time, in the process that builds the app, so every replica agrees.
    return None if path is None else Path(path).expanduser().resolve()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ConseConfig(_Strict):
    """Offline default: ConSE zero-shot embeddings (Norouzi et al. 2014).

    An image is the probability-weighted mean of the text embeddings of its top-k ImageNet
    class names; a text query is embedded by the same sentence model, so both share a space.
    """

    kind: Literal["conse"] = "conse"
    # The classifier prepared by ``visionroute models prepare``; its sidecar holds the labels.
    classifier_path: Path = Field(default_factory=lambda: paths.models_dir() / "efficientnet_lite0.onnx")
    # A sentence-transformers model directory; None means the packaged all-MiniLM-L6-v2.
    text_model_path: Path | None = None
    top_k: int = Field(10, ge=1, le=1000)
    label_template: str = "a photo of a {}."
    device: str = "cpu"
    # Label embeddings are cached here (encoding 1,000 names takes seconds on a CPU).
    cache_dir: Path = Field(default_factory=lambda: paths.home() / "cache" / "retrieval")

    _resolve_paths = field_validator("classifier_path", "text_model_path", "cache_dir")(_resolve)

    @field_validator("label_template")
    @classmethod
    def _template_has_slot(cls, value: str) -> str:
        if value.count("{}") != 1:
            raise ValueError(f"label_template must contain exactly one '{{}}', got {value!r}")
        return value


class OpenClipConfig(_Strict):
    """Any open_clip model; weights from a local checkpoint path or a hub tag."""

    kind: Literal["open_clip"] = "open_clip"
    model_name: str = "ViT-B-32"
    # A local checkpoint file, a pretrained tag (e.g. "laion2b_s34b_b79k", needs the hub) or None
    # for random weights (tests only).
    pretrained: str | None = None
    device: str = "auto"  # "auto": cuda when available
    precision: Literal["auto", "fp32", "fp16"] = "auto"  # "auto": fp16 on GPU, fp32 on CPU
    batch_size: int = Field(32, ge=1, le=4096)
    # When set, images are embedded by this ONNX export of the image tower (the CPU path).
    image_onnx_path: Path | None = None

    _resolve_paths = field_validator("image_onnx_path")(_resolve)


EmbedderConfig = Annotated[ConseConfig | OpenClipConfig, Field(discriminator="kind")]


class IndexConfig(_Strict):
    # "auto" picks by collection size: exact below exact_max_items, HNSW up to hnsw_max_items,
    # IVF-PQ with re-ranking above; the choice is remade on rebuild/compaction (in the background).
    kind: Literal["auto", "exact", "hnsw", "ivfpq"] = "auto"
    exact_max_items: int = Field(50_000, ge=0)
    hnsw_max_items: int = Field(2_000_000, ge=0)
    hnsw_m: int = Field(32, ge=4, le=256)
    hnsw_ef_construction: int = Field(80, ge=8, le=4096)
    # efSearch / nprobe / refine_k_factor: the starting values. With target_recall set, every
    # build tunes the ones not set explicitly here (ann.tune); an explicitly set one is pinned.
    hnsw_ef_search: int = Field(64, ge=1, le=32768)
    ivf_nlist: int | None = Field(None, ge=1)  # None: ~4*sqrt(n), a power of two
    ivf_nprobe: int | None = Field(None, ge=1)  # None: max(16, nlist/64), recall held as nlist grows
    pq_m: int | None = Field(None, ge=1)  # sub-quantisers; None: dim/8; must divide dim
    refine_k_factor: float = Field(4.0, ge=1.0, le=1000.0)
    # IVF-PQ re-ranks its candidates from 8-bit scalar-quantized vectors ("sq8", a quarter of
    # the float32 size) or from the full vectors ("flat": as much memory as the exact index).
    refine_store: Literal["sq8", "flat"] = "sq8"
    # Recall@10 the tuner aims for on held-out vectors (None: no tuning, the values above).
    target_recall: float | None = Field(0.95, gt=0.0, le=1.0)
    # Aim this much above the target: the held-out sample's estimate has sampling error.
    tune_margin: float = Field(0.01, ge=0.0, le=0.5)
    # Held-out vectors (at most a tenth of the collection) left out of the build as queries.
    tune_queries: int = Field(500, ge=10, le=100_000)
    # OpenMP threads of a background rebuild (None: all cores but one, at least one), so that
    # searches and writes keep a core while an index is built.
    rebuild_threads: int | None = Field(None, ge=1)
    # How much a background rebuild lowers its OS priority (Linux nice, that thread only):
    # the writes and searches beside it come first on a small machine. 0: unchanged.
    rebuild_nice: int = Field(10, ge=0, le=19)
    # IVF-PQ is trained on the collection; below this many items an explicit "ivfpq" runs exact.
    ivf_min_items: int = Field(10_000, ge=1000)  # PQ codebooks need >= 256 points each
    # Filters matching at most this many items are answered by an exact scan over just them.
    exact_filter_max_items: int = Field(20_000, ge=0)
    snapshot_every_ops: int = Field(1000, ge=1)
    # HNSW and IVF-PQ cannot delete in place: deletes are tombstones until compaction, which
    # runs at a snapshot once tombstones exceed this share of the stored vectors.
    compact_tombstone_ratio: float = Field(0.2, gt=0.0, le=1.0)
    max_k: int = Field(1000, ge=1, le=100_000)
    # Replicas following the shared log (retrieval/index.py). A search on a replica whose last
    # catch-up is older than this catches up first (0: before every search).
    max_staleness_s: float = Field(1.0, ge=0.0, le=3600.0)
    # The catch-up timer of each replica (None: only searches, writes and maintain() catch up).
    follow_interval_s: float | None = Field(1.0, gt=0.0, le=3600.0)
    # Log truncation waits for replicas whose heartbeat is younger than this; one away longer
    # rebuilds from the items when it comes back.
    replica_timeout_s: float = Field(60.0, gt=0.0, le=86_400.0)

    @model_validator(mode="after")
    def _sizes_ordered(self) -> IndexConfig:
        if self.hnsw_max_items < self.exact_max_items:
            raise ValueError(
                f"hnsw_max_items ({self.hnsw_max_items}) must be >= exact_max_items ({self.exact_max_items})"
            )
        return self

    @model_validator(mode="after")
    def _heartbeats_within_timeout(self) -> IndexConfig:
        # Heartbeats ride on catch-ups: a timer slower than half the timeout would let a live,
        # idle replica time out and rebuild for nothing.
        if self.follow_interval_s is not None and self.follow_interval_s > self.replica_timeout_s / 2:
            raise ValueError(
                f"follow_interval_s ({self.follow_interval_s}) must be at most half of "
                f"replica_timeout_s ({self.replica_timeout_s})"
            )
        return self


class IndexQueueConfig(_Strict):
    """How the service indexes analysed images (``index_analysed``): after the response, in
    batches (one embedding pass and one durable write each), through a bounded queue.

    ``durable`` (the default): the response waits for its batch's durable write and carries the
    search id. ``eventual`` (the shipped serve_config.yaml): the response never waits; an image
    is searchable once its batch is written (milliseconds on an idle replica; searches through
    the same ingress replica wait for what it acknowledged before them). Either way a full queue
    sheds the indexing, never the request: the trace says so and
    ``visionroute_after_response_shed_total`` counts it."""

    mode: Literal["eventual", "durable"] = "durable"
    max_pending: int = Field(1024, ge=1, le=1_000_000)  # images waiting on one ingress replica
    max_batch: int = Field(32, ge=1, le=1024)  # images per embedding pass and durable write
    # ``eventual`` only: a batch waits this long for more images before its write (a full batch,
    # a read through the same ingress replica or the replica's stop write at once). Each write
    # costs a hop to the search tier and a commit whatever its size: fewer, larger batches
    # (8 CPU ms a hop on 2 cores, evals/benchmarks/index_cpu.py; the search replica's own work
    # is ~0.3 ms an image, the rest of its CPU is Ray Serve's per call). 300 ms, not 100: the
    # search replica's CPU per request 4.2 -> 2.4 ms at 8 clients (serve_cpu --linger-ms 100
    # 300, docs/operations.md); an image is searchable from other ingress replicas up to ~0.2 s
    # later. Other search replicas see a write within their follow_interval_s (1 s) anyway.
    linger_ms: float = Field(300.0, ge=0.0, le=5000.0)


class RetrievalConfig(_Strict):
    enabled: bool = True
    index_dir: Path = Field(default_factory=lambda: paths.data_dir() / "retrieval")
    embedder: EmbedderConfig = Field(default_factory=ConseConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    # Cascade integration: analysed images are indexed automatically (SearchService.index_analysis).
    index_analysed: bool = False
    index_queue: IndexQueueConfig = Field(default_factory=IndexQueueConfig)
    max_image_bytes: int = Field(20 << 20, ge=1)
    max_query_chars: int = Field(1000, ge=1)

    _resolve_paths = field_validator("index_dir")(_resolve)
