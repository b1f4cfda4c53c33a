"""``SearchService``: index images with metadata, search by text, image or item id.

A plain class (no Ray): the router wraps it in a deployment. Any number of instances may
serve one index: each is a replica (its own FAISS copy in its own folder) following the shared
store (retrieval/store.py: a SQLite file, or PostgreSQL across nodes), and any of them takes
writes. ``shard=(s, n)`` makes an instance hold only shard ``s`` of ``n`` (by FAISS label);
router/services/sharded_search.py scatters queries over the shards and merges them.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cascades.images import decode_image
from retrieval.analysed import AnalysedImage
from retrieval.config import RetrievalConfig
from retrieval.embedders import Embedder, build_embedder
from retrieval.index import SearchResult, VectorIndex
from retrieval.schemas import Hit, ItemMetadata, SearchFilters, SearchParams, SearchResponse, parse_model
from visionroute.errors import InputError
from visionroute.records import Analysis
from visionroute.redaction import shown
from visionroute.state import StateConfig

log = logging.getLogger(__name__)

ImageInput = np.ndarray | bytes
_SURROGATE = re.compile("[\ud800-\udfff]")


class SearchService:
    def __init__(
        self,
        config: RetrievalConfig | dict | None = None,
        *,
        embedder: Embedder | None = None,
        state: StateConfig | None = None,
        replica_dir: Path | None = None,
        replica_id: str | None = None,
        shard: tuple[int, int] | None = None,
    ) -> None:
        """Build the embedder from config (or take ``embedder``) and open the index.

        The store is ``index_dir/items.sqlite`` or, with ``state`` on PostgreSQL, the schema
        ``<prefix>_search``; this replica's FAISS copy lives in ``replica_dir`` (default
        ``index_dir``: one replica). Raises ``ConfigError`` when the saved index was made by an
        embedder of another dimension or space (the message names both).
        """
        if isinstance(config, dict):
            config = RetrievalConfig.model_validate(config)
        self.config = config or RetrievalConfig()
        self.embedder = embedder or build_embedder(self.config.embedder)
        sharding = {"shard": shard} if shard is not None and shard[1] > 1 else {}
        self.index = VectorIndex(
            replica_dir or self.config.index_dir,
            self.embedder.dim,
            self.embedder.space,
            self.config.index,
            state,
            store_path=self.config.index_dir / "items.sqlite",
            replica_id=replica_id,
            **sharding,
        )
        self.reused_embeddings = 0  # analysed images embedded from the cheap tier's probabilities
        log.info("search service on %s: %s", replica_dir or self.config.index_dir, self.index.stats())

    # inputs -----------------------------------------------------------------------------------
    def _image(self, image: ImageInput, field: str) -> tuple[np.ndarray, str | None]:
        if isinstance(image, (bytes, bytearray, memoryview)):
            decoded = decode_image(bytes(image), field=field, max_bytes=self.config.max_image_bytes)
            return decoded.rgb, decoded.sha256
        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or min(image.shape[:2]) < 1:
                raise InputError(
                    f"image array must be (h, w, 3) uint8 RGB, got shape {image.shape} dtype {image.dtype}",
                    field=field,
                )
            return image, None
        raise InputError(
            f"image must be encoded bytes or an RGB array, got {type(image).__name__}", field=field
        )

    @staticmethod
    def _id(item_id: Any, field: str = "id") -> int:
        # Ids are SQLite rowids and FAISS labels: a value outside int64 is bad input, not a crash.
        if isinstance(item_id, bool) or not isinstance(item_id, (int, np.integer)):
            raise InputError(f"{field} must be an integer, got {type(item_id).__name__}", field=field)
        if not -(2**63) <= int(item_id) <= 2**63 - 1:
            raise InputError(f"{field} must be in [-2^63, 2^63-1], got {shown(int(item_id))}", field=field)
        return int(item_id)

    def _text(self, query: Any) -> str:
        if not isinstance(query, str) or not query.strip():
            raise InputError(f"query must be a non-empty string, got {shown(query)}", field="query")
        if len(query) > self.config.max_query_chars:
            raise InputError(
                f"query is {len(query)} characters; the limit is {self.config.max_query_chars}", field="query"
            )
        if _SURROGATE.search(query):
            raise InputError("query contains a lone surrogate: not valid Unicode text", field="query")
        return query.strip()

    # writes -----------------------------------------------------------------------------------
    def index_image(
        self, image: ImageInput, metadata: ItemMetadata | dict | None = None, *, item_id: int | None = None
    ) -> int:
        """Embed and store one image; returns its id once the write is durable.

        With ``item_id`` the existing item is replaced (upsert)."""
        return self.index_images([image], [metadata], item_ids=[item_id])[0]

    def index_images(
        self,
        images: Sequence[ImageInput],
        metadatas: Sequence[ItemMetadata | dict | None] | None = None,
        *,
        item_ids: Sequence[int | None] | None = None,
    ) -> list[int]:
        """Embed a batch in one forward pass, then store them all in one durable write."""
        metadatas = list(metadatas) if metadatas is not None else [None] * len(images)
        item_ids = list(item_ids) if item_ids is not None else [None] * len(images)
        item_ids = [None if i is None else self._id(i) for i in item_ids]
        if not (len(images) == len(metadatas) == len(item_ids)):
            raise InputError(
                f"got {len(images)} images, {len(metadatas)} metadata and {len(item_ids)} ids; they must match",
                field="metadata",
            )
        pixels, parsed = [], []
        for i, (image, metadata) in enumerate(zip(images, metadatas)):
            rgb, sha = self._image(image, f"images[{i}]" if len(images) > 1 else "image")
            metadata = parse_model(ItemMetadata, metadata, "metadata")
            if sha and metadata.image_sha256 is None:
                metadata = metadata.model_copy(update={"image_sha256": sha})
            pixels.append(rgb)
            parsed.append(metadata)
        if not pixels:
            return []
        return self.index.upsert_many(self.embedder.embed_images(pixels), parsed, item_ids)

    def delete(self, item_id: int) -> None:
        """Delete an item; ``NotFound`` (index intact) when there is no such id."""
        item_id = self._id(item_id)
        self.index.delete(item_id)

    def index_analysis(self, analysis: Analysis) -> int | None:
        """Cascade integration: index an analysed image when ``index_analysed`` is on.

        The cascade's outcome becomes filterable tags (``task:…``, ``decision:…``, ``label:…``)
        and a review-queue item id; the same image for the same tenant is replaced, not doubled.
        """
        return self.index_analyses([analysis])[0]

    def index_analyses(self, analyses: Sequence[Analysis]) -> list[int | None]:
        """``index_analysis`` for many: one embedding pass and one durable write for them all;
        their ids in order (None each when ``index_analysed`` is off). The same image of the
        same tenant twice in one batch is one entry (the later analysis's metadata wins)."""
        return self.index_analysed([AnalysedImage.from_analysis(a) for a in analyses])["ids"]

    def index_analysed(self, images: Sequence[AnalysedImage]) -> dict[str, Any]:
        """``index_analyses`` for what the ingress sends (retrieval/analysed.py: the outcome and
        the class probabilities, pixels only where they are needed). Answers ``{"ids": [...],
        "vectors": (n, dim) float32}``: each image's id and stored embedding, in order (None and
        None when ``index_analysed`` is off); or, when an image without pixels has probabilities
        this embedder cannot reuse, ``{"pixels_needed": [positions]}`` and nothing is written:
        the caller sends the batch again with those images' pixels."""
        if not self.config.index_analysed or not images:
            return {"ids": [None] * len(images), "vectors": None}
        reuses = getattr(self.embedder, "reuses", None)
        reusable = [reuses is not None and reuses(image.probabilities) for image in images]
        missing = [i for i, image in enumerate(images) if not reusable[i] and image.image_rgb is None]
        if missing:
            return {"pixels_needed": missing}
        row_of: dict[tuple[str, str], int] = {}  # (tenant, image) -> its position in ``written``
        last_of: dict[tuple[str, str], int] = {}
        for position, image in enumerate(images):
            last_of[(image.tenant, image.image_sha256)] = position
        written = sorted(last_of.values())
        for row, position in enumerate(written):
            row_of[(images[position].tenant, images[position].image_sha256)] = row
        # One lookup for the batch: the same image of the same tenant is replaced, not doubled.
        existing = self.index.find_images([(images[p].tenant, images[p].image_sha256) for p in written])
        item_ids = [existing.get((images[p].tenant, images[p].image_sha256)) for p in written]
        metadatas = [_analysis_metadata(images[p]) for p in written]
        vectors = self._analysis_vectors([images[p] for p in written], [reusable[p] for p in written])
        ids = self.index.upsert_many(vectors, metadatas, item_ids)
        rows = [row_of[(image.tenant, image.image_sha256)] for image in images]
        return {"ids": [ids[row] for row in rows], "vectors": vectors[rows]}

    def _analysis_vectors(self, images: Sequence[AnalysedImage], reusable: Sequence[bool]) -> np.ndarray:
        """One embedding per analysed image, in order: from the cheap tier's class probabilities
        where the embedder would compute exactly those (ConSE over the same classifier file,
        preprocessed the same way: no second classifier run), from the pixels otherwise."""
        reused = [i for i, ok in enumerate(reusable) if ok]
        embedded = [i for i, ok in enumerate(reusable) if not ok]
        vectors = np.zeros((len(images), self.embedder.dim), np.float32)
        if reused:
            vectors[reused] = self.embedder.embed_probabilities(
                np.stack([images[i].probabilities.values for i in reused])
            )
        if embedded:
            pixels = [self._image(images[i].image_rgb, "image")[0] for i in embedded]
            vectors[embedded] = self.embedder.embed_images(pixels)
        self.reused_embeddings += len(reused)
        return vectors

    def apply_review_label(self, review_item_id: str, label: dict, *, tenant: str | None) -> list[int]:
        """Labels flow back: tag the indexed images of a reviewed item with the human's verdict
        (``reviewed:<verdict>``, ``reviewed_label:<label>``); vectors stay as they are.

        ``tenant`` is the review item's tenant: only that tenant's entries are touched, whatever
        review item id another tenant's entry carries (None: every tenant's, for tools)."""
        updated = []
        for item_id in self.index.find(SearchFilters(review_item_ids=[review_item_id], tenant=tenant)):
            item, vector = self.index.get(item_id)
            tags = [t for t in item.metadata.tags if not t.startswith(("reviewed:", "reviewed_label:"))]
            tags.append(f"reviewed:{label.get('verdict')}")
            if label.get("label"):
                tags.append(f"reviewed_label:{label['label']}")
            self.index.upsert(vector, item.metadata.model_copy(update={"tags": tags}), item_id)
            updated.append(item_id)
        return updated

    # reads ------------------------------------------------------------------------------------
    def get(self, item_id: int) -> dict:
        item_id = self._id(item_id)
        item, _ = self.index.get(item_id)
        return {"id": item.id, "metadata": item.metadata.model_dump()}

    def _respond(self, result: SearchResult, k: int, started: float, **query: Any) -> SearchResponse:
        return SearchResponse(
            hits=[Hit(id=h.item.id, score=h.score, metadata=h.item.metadata) for h in result.hits],
            k=k,
            index_kind=self.index.kind,
            exact=result.exact,
            took_ms=round((time.perf_counter() - started) * 1000, 3),
            **query,
        )

    def _search(
        self, vector: np.ndarray, k: int, filters: Any, params: Any, exclude=frozenset()
    ) -> SearchResult:
        return self.index.search(
            vector,
            k,
            parse_model(SearchFilters, filters, "filters"),
            parse_model(SearchParams, params, "params"),
            exclude_labels=exclude,
        )

    def _validate(self, k: int, filters: Any, params: Any) -> None:
        # Checked before any embedding work, so bad input costs nothing.
        self.index.check_k(k)
        parse_model(SearchFilters, filters, "filters")
        parse_model(SearchParams, params, "params")

    def search_text(
        self,
        query: str,
        k: int = 10,
        filters: SearchFilters | dict | None = None,
        params: SearchParams | dict | None = None,
    ) -> SearchResponse:
        started = time.perf_counter()
        query = self._text(query)
        self._validate(k, filters, params)
        vector = self.embedder.embed_texts([query])[0]
        return self._respond(self._search(vector, k, filters, params), k, started, query=query)

    def search_image(
        self,
        image: ImageInput,
        k: int = 10,
        filters: SearchFilters | dict | None = None,
        params: SearchParams | dict | None = None,
    ) -> SearchResponse:
        started = time.perf_counter()
        rgb, _ = self._image(image, "image")
        self._validate(k, filters, params)
        vector = self.embedder.embed_images([rgb])[0]
        return self._respond(self._search(vector, k, filters, params), k, started)

    def search_by_id(
        self,
        item_id: int,
        k: int = 10,
        filters: SearchFilters | dict | None = None,
        params: SearchParams | dict | None = None,
    ) -> SearchResponse:
        """Items most like a stored one (the item itself excluded); ``NotFound`` for unknown ids."""
        started = time.perf_counter()
        self._validate(k, filters, params)
        item, vector = self.index.get(self._id(item_id))
        result = self._search(vector, k, filters, params, exclude=frozenset({item.label}))
        return self._respond(result, k, started, query_id=item.id)

    # shards: the query embedded once, searched on every shard ---------------------------------
    def query_vector(
        self, method: str, query: Any, k: int = 10, filters: Any = None, params: Any = None
    ) -> dict:
        """What a ``search_text`` / ``search_image`` / ``search_by_id`` call would search with:
        the vector, the labels to leave out and the echo fields, after the same validation."""
        self._validate(k, filters, params)
        if method == "search_text":
            text = self._text(query)
            return {
                "vector": self.embedder.embed_texts([text])[0].tolist(),
                "exclude": [],
                "echo": {"query": text},
            }
        if method == "search_image":
            rgb, _ = self._image(query, "image")
            return {"vector": self.embedder.embed_images([rgb])[0].tolist(), "exclude": [], "echo": {}}
        if method == "search_by_id":
            item, vector = self.index.get(self._id(query))
            return {"vector": vector.tolist(), "exclude": [item.label], "echo": {"query_id": item.id}}
        raise InputError(f"not a search method: {shown(method)}", field="method")

    def search_vector(
        self,
        vector: list[float],
        k: int = 10,
        filters: Any = None,
        params: Any = None,
        exclude: Sequence[int] = (),
    ) -> SearchResponse:
        """This replica's (shard's) top ``k`` for an already embedded query."""
        started = time.perf_counter()
        result = self._search(np.asarray(vector, np.float32), k, filters, params, exclude=frozenset(exclude))
        return self._respond(result, k, started)

    # maintenance ------------------------------------------------------------------------------
    def stats(self, tenant: str | None = None) -> dict:
        """The whole index (for operators: size, kind, storage, its directory), or with
        ``tenant`` only what a tenant may know: its own item count and the embedding space."""
        if tenant is None:
            return {**self.index.stats(), "index_dir": str(self.config.index_dir)}
        count = len(self.index.find(SearchFilters(tenant=tenant)))
        return {"tenant": tenant, "items": count, "dim": self.embedder.dim, "space": self.embedder.space}

    def snapshot(self) -> None:
        self.index.snapshot()

    def compact(self) -> dict:
        return self.index.compact()

    def reload(self) -> None:
        self.index.reload()

    def close(self) -> None:
        self.index.close()

    def __enter__(self) -> SearchService:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _analysis_metadata(image: AnalysedImage) -> ItemMetadata:
    """An analysed image's search metadata: its outcome as tags, its tenant, review item and request."""
    tags = [f"task:{image.task}"]
    if image.decision is not None:
        tags.append(f"decision:{image.decision}")
    tags.extend(sorted({f"label:{label}" for label in image.labels if label}))
    return ItemMetadata(
        tenant=image.tenant,
        tags=tags,
        source=f"cascade:{image.task}",
        image_sha256=image.image_sha256,
        review_item_id=image.review_item_id,
        extra={"request_id": image.request_id},
    )
