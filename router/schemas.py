"""The HTTP edge's request bodies and documented responses (router/http/). Pydantic only.

The review requests the core takes from both faces (claim, release, label) live in the core,
router/services/review_requests.py."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from router.services.review_requests import DetectionOut


class Edge(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AnalyzeJson(Edge):
    image_base64: str | None = Field(None, min_length=1, description="the image file's bytes, base64")
    image_url: str | None = Field(
        None, min_length=1, max_length=2048, description="fetch the image (if limits.url_fetch.enabled)"
    )
    task: str | None = Field(None, description="a configured cascade; default: the config's default_task")
    tenant: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="default: the API key's tenant",
    )

    @model_validator(mode="after")
    def _one_image(self) -> AnalyzeJson:
        if (self.image_base64 is None) == (self.image_url is None):
            raise ValueError("send exactly one of image_base64 and image_url")
        return self


class AnalyzeResponse(BaseModel):
    request_id: str
    task: str
    decision: Literal["accept", "escalate", "review", "reject"]
    answer: list[DetectionOut]
    image: dict[str, Any]
    text: str | None = Field(None, description="a text answer (the VLM's read_text), when the task gives one")
    review_item_id: str | None
    cost_units: float
    trace: dict[str, Any]
    policy_version: str = Field(..., description="the policy set that decided this request")
    degraded: bool = Field(..., description="answered in a degraded mode (an exhausted budget)")


class SearchRequest(Edge):
    text: str | None = Field(None, description="open-vocabulary text query")
    image_base64: str | None = Field(None, description="query by example image (base64 file bytes)")
    id: int | None = Field(None, description="query by an indexed item's id (it is left out of the hits)")
    k: int = Field(10, description="number of hits")
    filters: dict[str, Any] | None = Field(
        None,
        description="tenant, source, tags_any, tags_all, created_after, created_before, in_review, "
        "review_item_ids, ids",
    )
    params: dict[str, Any] | None = Field(
        None, description="this request only: ef_search, nprobe, refine_k_factor, exact"
    )
    tenant: str | None = Field(
        None,
        description="search this tenant's entries only ([A-Za-z0-9_.-], 1-128 characters): an admin may "
        "name any tenant; a tenant's key only its own (its entries are all it ever sees)",
    )

    @model_validator(mode="after")
    def _one_query(self) -> SearchRequest:
        given = [name for name in ("text", "image_base64", "id") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of text, image_base64 or id; got {given or 'none'}")
        return self


class IndexRequest(Edge):
    image_base64: str
    metadata: dict[str, Any] | None = None
