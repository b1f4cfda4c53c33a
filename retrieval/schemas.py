"""What goes in and out of search: item metadata, filters, per-request parameters, results."""

from __future__ import annotations

import time
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, ValidationError

from visionroute.errors import InputError
from visionroute.redaction import shown

# Ids are SQLite rowids and FAISS labels: signed 64-bit. Lists in filters become SQL
# parameters (SQLite allows 32766 per statement), so they are bounded well below that.
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
MAX_FILTER_VALUES = 1000
Scalar = str | int | FiniteFloat | bool


class ItemMetadata(BaseModel):
    """Stored with each indexed image; every field but ``extra`` can be filtered on."""

    model_config = ConfigDict(extra="forbid")

    tenant: str = "default"
    tags: list[str] = Field(default_factory=list)
    source: str | None = None  # where the image came from: "upload", "cascade:classify", a path
    created_at: FiniteFloat = Field(default_factory=time.time)  # unix seconds
    image_sha256: str | None = None
    review_item_id: str | None = None  # set while the image is (or was) in the review queue
    extra: dict[str, Scalar | None] = Field(default_factory=dict)  # returned, not filterable


class SearchFilters(BaseModel):
    """All given conditions must hold (AND); list values inside one condition are OR."""

    model_config = ConfigDict(extra="forbid")

    tenant: str | Annotated[list[str], Field(max_length=MAX_FILTER_VALUES)] | None = None
    source: str | Annotated[list[str], Field(max_length=MAX_FILTER_VALUES)] | None = None
    tags_any: list[str] | None = Field(None, max_length=MAX_FILTER_VALUES)
    tags_all: list[str] | None = Field(None, max_length=MAX_FILTER_VALUES)
    created_after: FiniteFloat | None = None  # inclusive, unix seconds
    created_before: FiniteFloat | None = None  # exclusive
    in_review: bool | None = None  # has (True) / has no (False) review_item_id
    review_item_ids: list[str] | None = Field(None, max_length=MAX_FILTER_VALUES)
    ids: list[Int64] | None = Field(None, max_length=MAX_FILTER_VALUES)
    image_sha256: str | Annotated[list[str], Field(max_length=MAX_FILTER_VALUES)] | None = None

    def is_empty(self) -> bool:
        return not self.model_dump(exclude_none=True)


class SearchParams(BaseModel):
    """Per-request ANN knobs; they apply to this request only and never change the index."""

    model_config = ConfigDict(extra="forbid")

    ef_search: int | None = Field(None, ge=1, le=32768)  # HNSW
    nprobe: int | None = Field(None, ge=1, le=65536)  # IVF
    refine_k_factor: float | None = Field(None, ge=1.0, le=1000.0)  # IVF-PQ re-ranking depth
    exact: bool = False  # brute force over the stored vectors, whatever the index kind


class Hit(BaseModel):
    id: int
    score: float  # cosine similarity (inner product of unit vectors), higher is closer
    metadata: ItemMetadata


class SearchResponse(BaseModel):
    hits: list[Hit]
    k: int
    index_kind: str
    exact: bool  # answered by an exact scan (small filtered set, or asked for)
    took_ms: float
    query: str | None = None  # the text of a text query
    query_id: int | None = None  # the item of a search by id


def parse_model(model: type[BaseModel], value: Any, field: str) -> Any:
    """Validate edge input into ``model``; errors name the field, the reason and valid options."""
    if value is None:
        return model()
    if isinstance(value, model):
        return value
    if not isinstance(value, dict):
        raise InputError(f"{field} must be an object, got {type(value).__name__}", field=field)
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        if error["type"] == "extra_forbidden":
            raise InputError(
                f"unknown {field} field {shown(where)}; expected one of {sorted(model.model_fields)}",
                field=f"{field}.{where}",
            ) from None
        raise InputError(
            f"{field}.{where}: {error['msg']} (got {shown(error.get('input'))})", field=f"{field}.{where}"
        ) from None
