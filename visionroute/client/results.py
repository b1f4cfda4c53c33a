"""The service's answers as its own typed results, from the JSON both transports give.

HTTP answers each operation's ``to_json()`` (router/services/results.py); the gRPC transport turns
the typed reply into the same JSON shape (visionroute/client/grpc_replies.py). One parser per
result builds the service's own model from it: ``AnalyzeResponse`` (router/schemas.py),
retrieval's ``SearchResponse``, the ``ReviewItemView``, ``ReviewPage``, ``Claim``, ... dataclasses.
A field the service added after this client was written is ignored; one it no longer sends is None.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from visionroute.client.errors import ServiceError, service_error

if TYPE_CHECKING:
    from router.schemas import AnalyzeResponse
    from router.services.results import (
        AuditLog,
        Claim,
        DeletedSearchItem,
        IndexedSearchItem,
        IndexStats,
        LabelSet,
        PolicyView,
        ReviewItemView,
        ReviewPage,
        ReviewStats,
        SearchItem,
        SearchResponse,
    )

T = TypeVar("T")


def known_fields(kind: type[T], body: dict[str, Any]) -> T:
    """A dataclass of ``kind`` from ``body``'s keys that are its fields (absent ones: None)."""
    return kind(**{f.name: body.get(f.name) for f in dataclasses.fields(kind)})  # type: ignore[arg-type]


def analysis(body: dict[str, Any]) -> AnalyzeResponse:
    from router.schemas import AnalyzeResponse

    return AnalyzeResponse.model_validate(body)


@dataclass(frozen=True)
class BatchItemResult:
    """One image of a batch: its ``response`` when ``status`` is 200, else its ``error`` (the
    ``ServiceError`` ``analyze`` would have raised for it). ``request_id``: the image's own id;
    ``analyze(image, request_id=item.request_id)`` resends it alone as the same request."""

    index: int  # its position in the list given
    request_id: str
    status: int
    response: AnalyzeResponse | None
    error: ServiceError | None

    @property
    def ok(self) -> bool:
        return self.error is None

    def unwrap(self) -> AnalyzeResponse:
        """The response, or its error raised."""
        if self.error is not None:
            raise self.error
        return self.response  # type: ignore[return-value]


@dataclass(frozen=True)
class AnalyzeBatchResult:
    """Every image's ``BatchItemResult``, in the order given (``items``; also iterable, indexable)."""

    request_id: str
    items: tuple[BatchItemResult, ...]

    @property
    def succeeded(self) -> int:
        return sum(item.ok for item in self.items)

    @property
    def failed(self) -> int:
        return len(self.items) - self.succeeded

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    def __getitem__(self, index: int) -> BatchItemResult:
        return self.items[index]


def batch_items(body: dict[str, Any], first_index: int = 0) -> list[BatchItemResult]:
    """A batch answer's results (router/http/batch.py ``batch_json``), numbered from
    ``first_index``: a chunk's images as they stand in the caller's list."""
    return [batch_item(result, first_index) for result in body["results"]]


def batch_item(body: dict[str, Any], first_index: int = 0) -> BatchItemResult:
    error = body.get("error")
    response = body.get("response")
    index = first_index + body["index"]
    return BatchItemResult(
        index=index,
        request_id=body["request_id"],
        status=body["status"],
        response=analysis(response) if response is not None else None,
        error=service_error(
            operation="analyze (batch image)",
            status=body["status"],
            error=str(error.get("error")),
            field=_renumbered(error.get("field"), body["index"], index),
            reason=str(error.get("reason")),
            request_id=error.get("request_id") or body["request_id"],
            retry_after_s=error.get("retry_after_s"),
        )
        if error is not None
        else None,
    )


def _renumbered(field: str | None, sent_index: int, index: int) -> str | None:
    """The service names an image's field by its place in the request (``images[0]``,
    ``images[0].image_url``); the caller's list has it at ``index``."""
    sent = f"images[{sent_index}]"
    if field is not None and field.startswith(sent):
        return f"images[{index}]{field[len(sent) :]}"
    return field


def search_response(body: dict[str, Any]) -> SearchResponse:
    from router.services.results import SearchResponse

    return SearchResponse.model_validate(body)


def review_item(body: dict[str, Any]) -> ReviewItemView:
    from router.services.results import ReviewItemView

    return known_fields(ReviewItemView, body)


def review_page(body: dict[str, Any]) -> ReviewPage:
    from router.services.results import QueueStats, ReviewPage

    return ReviewPage(items=[review_item(i) for i in body["items"]], stats=known_fields(QueueStats, body))


def claim(body: dict[str, Any]) -> Claim:
    from router.services.results import Claim

    item = body.get("item")
    return Claim(item=review_item(item) if item else None, lease_token=body.get("lease_token"))


def audit_log(body: dict[str, Any]) -> AuditLog:
    from router.services.results import AuditEvent, AuditLog

    return AuditLog(item_id=body["item_id"], events=[known_fields(AuditEvent, e) for e in body["events"]])


def label_set(body: dict[str, Any]) -> LabelSet:
    from router.services.results import LabelSet

    return LabelSet(task=body["task"], labels=body.get("labels"))


def review_stats(body: dict[str, Any]) -> ReviewStats:
    from policies.audit_sampling import AuditEstimate
    from router.services.results import QueueStats, ReviewStats

    return ReviewStats(
        stats=known_fields(QueueStats, body),
        sla_s=body["sla_s"],
        audit={task: known_fields(AuditEstimate, e) for task, e in (body.get("audit") or {}).items()},
    )


def indexed(body: dict[str, Any]) -> IndexedSearchItem:
    from router.services.results import IndexedSearchItem

    return IndexedSearchItem(id=body["id"])


def search_item(body: dict[str, Any]) -> SearchItem:
    from router.services.results import SearchItem

    return SearchItem.model_validate(body)


def deleted(body: dict[str, Any]) -> DeletedSearchItem:
    from router.services.results import DeletedSearchItem

    return DeletedSearchItem(id=body["id"], deleted=body.get("deleted", True))


def index_stats(body: dict[str, Any]) -> IndexStats:
    from router.services.results import IndexStats

    return IndexStats.from_report(body)


def policy_view(body: dict[str, Any]) -> PolicyView:
    from router.services.results import PolicyView

    return known_fields(PolicyView, body)


def review_image(body: tuple[bytes, str]) -> tuple[bytes, str]:
    """(the stored image's bytes, its media type)."""
    return body


def as_json(body: Any) -> Any:
    """An answer no typed result describes (``call``): the JSON as sent."""
    return body
