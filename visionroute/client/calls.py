"""Each operation of the API once: its HTTP request, its gRPC request, how its answer is typed.

A ``Call`` holds both faces' requests for one operation (router/http/ and router/proto/
visionroute.proto serve the same operations) and the parser of visionroute/client/results.py
that types the answer; a transport sends whichever it speaks. gRPC messages are built on use
(``message(pb)``), so an HTTP client never generates or imports the gRPC code.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from visionroute.client import grpc_replies as replies
from visionroute.client import results
from visionroute.errors import InputError

T = TypeVar("T")
LIST_FILTERS = ("tenant", "source", "tags_any", "tags_all", "review_item_ids", "ids", "image_sha256")
FILTERS = (*LIST_FILTERS, "created_after", "created_before", "in_review")  # retrieval SearchFilters
SEARCH_PARAMS = ("ef_search", "nprobe", "refine_k_factor", "exact")  # retrieval/schemas.py SearchParams
METADATA_FIELDS = ("tenant", "tags", "source", "created_at", "image_sha256", "review_item_id", "extra")


@dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str
    json: Any = None
    files: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    params: dict[str, Any] | None = None
    binary: bool = False  # the answer is a file: (bytes, media type), not JSON


@dataclass(frozen=True)
class GrpcRequest:
    method: str  # the RPC's name in router/proto/visionroute.proto
    message: Callable[[Any], Any]  # the generated module (visionroute_pb2) -> the request message
    reply: Callable[[Any], Any]  # the reply message -> the JSON HTTP sends (grpc_replies.py)


@dataclass(frozen=True)
class Call(Generic[T]):
    """One logical call. ``idempotent``: sending it twice (with the same request id) has the
    effect of sending it once, so it may be retried after a lost answer."""

    name: str
    http: HttpRequest | None
    grpc: GrpcRequest | None
    parse: Callable[[Any], T] = field(default=results.as_json)  # type: ignore[assignment]
    idempotent: bool = True


def _given(**values: Any) -> dict[str, Any]:
    return {name: value for name, value in values.items() if value is not None}


def _image_bytes(image: bytes | str | Any, field: str = "image") -> bytes:
    """Bytes as given, or a path's file."""
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    if isinstance(image, str | Path):
        path = Path(image)
        if not path.is_file():
            raise InputError(f"{field}: {str(path)!r} is not a file", field=field)
        return path.read_bytes()
    raise InputError(f"{field} must be the image's bytes or a path, got {type(image).__name__}", field=field)


# -- analyse and search ---------------------------------------------------------------------------


def analyze(
    image: bytes | str | None, *, task: str | None, tenant: str | None, image_url: str | None
) -> Call:
    if (image is None) == (image_url is None):
        raise InputError("give exactly one of image (bytes or a path) and image_url", field="image")
    data = _image_bytes(image) if image is not None else None
    if data is not None:
        http = HttpRequest(
            "POST",
            "/v1/analyze",
            files={"image": ("image", data, "application/octet-stream")},
            data=_given(task=task, tenant=tenant),
        )
    else:
        http = HttpRequest("POST", "/v1/analyze", json=_given(image_url=image_url, task=task, tenant=tenant))
    grpc = GrpcRequest(
        "Analyze",
        lambda pb: pb.AnalyzeRequest(
            image=data or b"", image_url=image_url or "", task=task or "", tenant=tenant or ""
        ),
        replies.analysis,
    )
    return Call("analyze", http, grpc, results.analysis)


def search(
    *,
    text: str | None,
    image: bytes | str | None,
    item_id: int | None,
    k: int,
    filters: Mapping[str, Any] | None,
    params: Mapping[str, Any] | None,
    tenant: str | None,
) -> Call:
    given = [name for name, v in (("text", text), ("image", image), ("item_id", item_id)) if v is not None]
    if len(given) != 1:
        raise InputError(f"give exactly one of text, image or item_id; got {given or 'none'}", field="query")
    data = _image_bytes(image) if image is not None else None
    _known(filters, FILTERS, "filters")
    _known(params, SEARCH_PARAMS, "params")
    body = _given(
        text=text,
        image_base64=base64.b64encode(data).decode() if data is not None else None,
        id=item_id,
        k=k,
        filters=dict(filters) if filters is not None else None,
        params=dict(params) if params is not None else None,
        tenant=tenant,
    )

    def message(pb: Any) -> Any:
        return pb.SearchRequest(
            query_text=text or "",
            image=data or b"",
            item_id=item_id or 0,
            k=k,
            tenant=tenant or "",
            **_given(
                filters=search_filters(pb, filters) if filters is not None else None,
                params=pb.SearchParams(**params) if params is not None else None,
            ),
        )

    return Call(
        "search",
        HttpRequest("POST", "/v1/search", json=body),
        GrpcRequest("Search", message, replies.search_response),
        results.search_response,
    )


def search_filters(pb: Any, filters: Mapping[str, Any]) -> Any:
    """HTTP's ``filters`` object as the typed message: a single value where a list is allowed
    becomes a one-element list."""
    values = {}
    for name, value in filters.items():
        if value is None:
            continue
        if name in LIST_FILTERS and isinstance(value, str | int):
            value = [value]
        values[name] = value
    return pb.SearchFilters(**values)


def _known(values: Mapping[str, Any] | None, names: tuple[str, ...], field: str) -> None:
    """Refuse a name the service does not know before anything is sent (gRPC's typed messages
    could not carry it), naming it and the valid ones."""
    unknown = sorted(set(values or ()) - set(names))
    if unknown:
        raise InputError(f"unknown {field} name {unknown[0]!r}; expected one of {sorted(names)}", field=field)


def index_item(image: bytes | str, metadata: Mapping[str, Any] | None) -> Call:
    data = _image_bytes(image)
    _known(metadata, METADATA_FIELDS, "metadata")

    def message(pb: Any) -> Any:
        if metadata is None:
            return pb.IndexSearchItemRequest(image=data)
        fields = dict(metadata)
        extra = fields.pop("extra", None)
        typed = pb.ItemMetadata(**fields)
        if extra:
            typed.extra.update(extra)
        return pb.IndexSearchItemRequest(image=data, metadata=typed)

    return Call(
        "index search item",
        HttpRequest(
            "POST",
            "/v1/search/items",
            files={"image": ("image", data, "application/octet-stream")},
            data={"metadata": json.dumps(dict(metadata))} if metadata is not None else None,
        ),
        GrpcRequest("IndexSearchItem", message, replies.indexed),
        results.indexed,
        idempotent=False,  # a second write would index the image twice
    )


def search_item(item_id: int) -> Call:
    return Call(
        "get search item",
        HttpRequest("GET", f"/v1/search/items/{int(item_id)}"),
        GrpcRequest("GetSearchItem", lambda pb: pb.SearchItemRequest(item_id=item_id), replies.search_item),
        results.search_item,
    )


def delete_search_item(item_id: int) -> Call:
    return Call(
        "delete search item",
        HttpRequest("DELETE", f"/v1/search/items/{int(item_id)}"),
        GrpcRequest("DeleteSearchItem", lambda pb: pb.SearchItemRequest(item_id=item_id), replies.deleted),
        results.deleted,
        idempotent=False,  # a retry after a lost answer finds it gone: 404, not the deletion
    )


def search_stats() -> Call:
    return Call(
        "search stats",
        HttpRequest("GET", "/v1/search/stats"),
        GrpcRequest("GetSearchStats", lambda pb: pb.Empty(), replies.search_stats),
        results.index_stats,
    )


# -- review ---------------------------------------------------------------------------------------


def review_items(status: str, limit: int, offset: int) -> Call:
    return Call(
        "list review items",
        HttpRequest("GET", "/v1/review/items", params={"status": status, "limit": limit, "offset": offset}),
        GrpcRequest(
            "ListReviewItems",
            lambda pb: pb.ListReviewItemsRequest(status=status, limit=limit, offset=offset),
            replies.review_page,
        ),
        results.review_page,
    )


def _item_path(item_id: str, suffix: str = "") -> str:
    from urllib.parse import quote

    return f"/v1/review/items/{quote(str(item_id), safe='')}{suffix}"


def review_item(item_id: str) -> Call:
    return Call(
        "get review item",
        HttpRequest("GET", _item_path(item_id)),
        GrpcRequest(
            "GetReviewItem", lambda pb: pb.GetReviewItemRequest(item_id=item_id), replies.review_item
        ),
        results.review_item,
    )


def review_image(item_id: str) -> Call:
    return Call(
        "get review image",
        HttpRequest("GET", _item_path(item_id, "/image"), binary=True),
        GrpcRequest(
            "GetReviewImage", lambda pb: pb.GetReviewItemRequest(item_id=item_id), replies.review_image
        ),
        results.review_image,
    )


def review_audit(item_id: str) -> Call:
    return Call(
        "get review audit",
        HttpRequest("GET", _item_path(item_id, "/audit")),
        GrpcRequest(
            "GetReviewAudit", lambda pb: pb.GetReviewItemRequest(item_id=item_id), replies.review_audit
        ),
        results.audit_log,
    )


def review_labels(task: str) -> Call:
    from urllib.parse import quote

    return Call(
        "get review labels",
        HttpRequest("GET", f"/v1/review/labels/{quote(task, safe='')}"),
        GrpcRequest(
            "GetReviewLabels", lambda pb: pb.GetReviewLabelsRequest(task=task), replies.review_labels
        ),
        results.label_set,
    )


def review_stats() -> Call:
    return Call(
        "review stats",
        HttpRequest("GET", "/v1/review/stats"),
        GrpcRequest("GetReviewStats", lambda pb: pb.Empty(), replies.review_stats),
        results.review_stats,
    )


def claim(reviewer: str | None, item_id: str | None, lease_s: float | None) -> Call:
    return Call(
        "claim review item",
        HttpRequest(
            "POST", "/v1/review/claim", json=_given(reviewer=reviewer, item_id=item_id, lease_s=lease_s)
        ),
        GrpcRequest(
            "ClaimReviewItem",
            lambda pb: pb.ClaimReviewItemRequest(
                reviewer=reviewer or "", item_id=item_id or "", lease_s=lease_s or 0.0
            ),
            replies.claim,
        ),
        results.claim,
        # the next item: a second claim after a lost answer would lease a second one
        idempotent=item_id is not None,
    )


def label(
    item_id: str,
    *,
    lease_token: str,
    verdict: str,
    label: str | None,
    boxes: Sequence[Mapping[str, Any]] | None,
    note: str | None,
    reviewer: str | None,
) -> Call:
    body = _given(
        reviewer=reviewer,
        lease_token=lease_token,
        verdict=verdict,
        label=label,
        boxes=[dict(b) for b in boxes] if boxes is not None else None,
        note=note,
    )

    def message(pb: Any) -> Any:
        return pb.LabelReviewItemRequest(
            item_id=item_id,
            reviewer=reviewer or "",
            lease_token=lease_token,
            verdict=verdict,
            **_given(
                label=label,
                note=note,
                boxes=pb.DetectionList(detections=[detection(pb, b) for b in boxes])
                if boxes is not None
                else None,
            ),
        )

    return Call(
        "label review item",
        HttpRequest("POST", _item_path(item_id, "/label"), json=body),
        GrpcRequest("LabelReviewItem", message, replies.review_item),
        results.review_item,  # the service answers the same label twice as one (idempotent)
    )


def detection(pb: Any, box: Mapping[str, Any]) -> Any:
    return pb.Detection(
        label=box.get("label") or "",
        class_id=int(box.get("class_id") or 0),
        confidence=float(box.get("confidence") or 0.0),
        xyxy=[float(v) for v in box.get("xyxy") or ()],
    )


def release(item_id: str, *, lease_token: str, reviewer: str | None) -> Call:
    return Call(
        "release review item",
        HttpRequest(
            "POST", _item_path(item_id, "/release"), json=_given(reviewer=reviewer, lease_token=lease_token)
        ),
        GrpcRequest(
            "ReleaseReviewItem",
            lambda pb: pb.ReleaseReviewItemRequest(
                item_id=item_id, reviewer=reviewer or "", lease_token=lease_token
            ),
            replies.review_item,
        ),
        results.review_item,
        idempotent=False,  # a retry after a lost answer finds the lease gone: 409
    )


def policy() -> Call:
    return Call(
        "get policy",
        HttpRequest("GET", "/v1/policy"),
        GrpcRequest("GetPolicy", lambda pb: pb.Empty(), replies.policy_view),
        results.policy_view,
    )


def raw(method: str, path: str, **http: Any) -> Call:
    """Any HTTP route, answered as JSON (the routes with no typed call here: rollouts, drift)."""
    return Call(
        f"{method} {path}",
        HttpRequest(method.upper(), path, **http),
        None,
        results.as_json,
        idempotent=method.upper() in ("GET", "HEAD", "PUT", "DELETE"),
    )
