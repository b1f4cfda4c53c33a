"""Every operation of the service, written once: its arguments, its ``Call`` (both faces'
requests and the parser of its answer) and its documentation.

``Operations`` is the interface both clients share (clients.py): a method builds its ``Call``
and hands it to ``_execute(call, request_id)``, which the blocking client runs and the asyncio
client returns awaitable; so one definition serves HTTP and gRPC, blocking and asyncio. A batch
of images is several calls (chunks): its method hands a ``BatchRun`` (batch.py) to
``_run_batch``, the one loop each client writes for itself.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from visionroute.client import grpc_replies as replies
from visionroute.client import results
from visionroute.client.batch import DEFAULT_BATCH_BYTES, DEFAULT_BATCH_SIZE, BatchProgress, BatchRun
from visionroute.client.calls import (
    FILTERS,
    METADATA_FIELDS,
    SEARCH_PARAMS,
    Call,
    GrpcRequest,
    HttpRequest,
    detection,
    given,
    image_bytes,
    image_part,
    known,
    review_item_path,
    search_filters,
)
from visionroute.errors import InputError


class Operations:
    """The service's operations. ``request_id``: the id of this logical call, sent with every
    attempt (``X-Request-Id`` / gRPC ``request_id``). Give your own to make a call idempotent
    across processes (resending an analyse after a crash never makes a second review item nor
    charges a budget twice); by default each call gets a new one."""

    def _execute(self, call: Call, request_id: str | None) -> Any:
        raise NotImplementedError

    def _run_batch(self, run: BatchRun) -> Any:
        raise NotImplementedError

    # -- analyse --------------------------------------------------------------------------------

    def analyze(
        self,
        image: bytes | str | Path | None = None,
        *,
        task: str | None = None,
        tenant: str | None = None,
        image_url: str | None = None,
        request_id: str | None = None,
    ):
        """One image (its bytes or a path; or ``image_url``) through the cascade -> ``AnalyzeResponse``
        (router/schemas.py: decision, answer, review_item_id, cost_units, trace, ...)."""
        if (image is None) == (image_url is None):
            raise InputError("give exactly one of image (bytes or a path) and image_url", field="image")
        data = image_bytes(image) if image is not None else None
        if data is not None:
            http = HttpRequest(
                "POST", "/v1/analyze", files=dict([image_part(data)]), data=given(task=task, tenant=tenant)
            )
        else:
            http = HttpRequest(
                "POST", "/v1/analyze", json=given(image_url=image_url, task=task, tenant=tenant)
            )
        grpc = GrpcRequest(
            "Analyze",
            lambda pb: pb.AnalyzeRequest(
                image=data or b"", image_url=image_url or "", task=task or "", tenant=tenant or ""
            ),
            replies.analysis,
        )
        return self._execute(Call("analyze", http, grpc, results.analysis), request_id)

    def analyze_batch(
        self,
        images: Sequence[bytes | str | Path] | None = None,
        *,
        image_urls: Sequence[str] | None = None,
        task: str | None = None,
        tenant: str | None = None,
        request_id: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_batch_bytes: int = DEFAULT_BATCH_BYTES,
        on_progress: Callable[[BatchProgress], None] | None = None,
    ):
        """Many images (bytes or paths; or ``image_urls``) -> ``AnalyzeBatchResult``: one
        ``BatchItemResult`` per image, in order, each its ``response`` (an ``AnalyzeResponse``)
        or its ``error`` (a ``ServiceError``: that image's, never the others').

        Sent in chunks of at most ``batch_size`` images (the service's
        ``limits.batch_max_images``: 32 as shipped) and ``max_batch_bytes``, one
        ``POST /v1/analyze/batch`` / ``AnalyzeBatch`` each; a file is read when its chunk is
        sent. ``on_progress(BatchProgress)`` after each chunk: images done, total, failed and
        the chunk's results. A chunk the service refuses as a whole raises (the chunks before
        it were reported); the same list again with the same ``request_id`` and ``batch_size``
        sends the same per-image request ids, so nothing is charged or queued twice."""
        run = BatchRun(
            images,
            image_urls,
            task=task,
            tenant=tenant,
            request_id=request_id,
            batch_size=batch_size,
            max_batch_bytes=max_batch_bytes,
            on_progress=on_progress,
        )
        return self._run_batch(run)

    # -- search ---------------------------------------------------------------------------------

    def search(
        self,
        text: str | None = None,
        *,
        image: bytes | str | Path | None = None,
        item_id: int | None = None,
        k: int = 10,
        filters: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        tenant: str | None = None,
        request_id: str | None = None,
    ):
        """Nearest neighbours of a text, an example image or an indexed item -> ``SearchResponse``
        (retrieval/schemas.py). ``filters``/``params`` as the HTTP body's (docs/search.md)."""
        named = [
            name for name, v in (("text", text), ("image", image), ("item_id", item_id)) if v is not None
        ]
        if len(named) != 1:
            raise InputError(
                f"give exactly one of text, image or item_id; got {named or 'none'}", field="query"
            )
        data = image_bytes(image) if image is not None else None
        known(filters, FILTERS, "filters")
        known(params, SEARCH_PARAMS, "params")
        body = given(
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
                **given(
                    filters=search_filters(pb, filters) if filters is not None else None,
                    params=pb.SearchParams(**params) if params is not None else None,
                ),
            )

        call = Call(
            "search",
            HttpRequest("POST", "/v1/search", json=body),
            GrpcRequest("Search", message, replies.search_response),
            results.search_response,
        )
        return self._execute(call, request_id)

    def index_item(
        self,
        image: bytes | str | Path,
        metadata: Mapping[str, Any] | None = None,
        *,
        request_id: str | None = None,
    ):
        """Make an image searchable -> ``IndexedSearchItem`` (its id). Not sent again after a
        lost answer: a second write would index the image twice."""
        data = image_bytes(image)
        known(metadata, METADATA_FIELDS, "metadata")

        def message(pb: Any) -> Any:
            if metadata is None:
                return pb.IndexSearchItemRequest(image=data)
            fields = dict(metadata)
            extra = fields.pop("extra", None)
            typed = pb.ItemMetadata(**fields)
            if extra:
                typed.extra.update(extra)
            return pb.IndexSearchItemRequest(image=data, metadata=typed)

        http = HttpRequest(
            "POST",
            "/v1/search/items",
            files=dict([image_part(data)]),
            data={"metadata": json.dumps(dict(metadata))} if metadata is not None else None,
        )
        call = Call(
            "index search item",
            http,
            GrpcRequest("IndexSearchItem", message, replies.indexed),
            results.indexed,
            idempotent=False,
        )
        return self._execute(call, request_id)

    def search_item(self, item_id: int, *, request_id: str | None = None):
        """An indexed item's metadata -> ``SearchItem``."""
        call = Call(
            "get search item",
            HttpRequest("GET", f"/v1/search/items/{int(item_id)}"),
            GrpcRequest(
                "GetSearchItem", lambda pb: pb.SearchItemRequest(item_id=item_id), replies.search_item
            ),
            results.search_item,
        )
        return self._execute(call, request_id)

    def delete_search_item(self, item_id: int, *, request_id: str | None = None):
        """-> ``DeletedSearchItem``. Not sent again after a lost answer (it would find the item
        gone: 404, not the deletion)."""
        call = Call(
            "delete search item",
            HttpRequest("DELETE", f"/v1/search/items/{int(item_id)}"),
            GrpcRequest(
                "DeleteSearchItem", lambda pb: pb.SearchItemRequest(item_id=item_id), replies.deleted
            ),
            results.deleted,
            idempotent=False,
        )
        return self._execute(call, request_id)

    def search_stats(self, *, request_id: str | None = None):
        """-> ``IndexStats`` (a tenant's key: its own entries; an admin: the operator report)."""
        call = Call(
            "search stats",
            HttpRequest("GET", "/v1/search/stats"),
            GrpcRequest("GetSearchStats", lambda pb: pb.Empty(), replies.search_stats),
            results.index_stats,
        )
        return self._execute(call, request_id)

    # -- review ---------------------------------------------------------------------------------

    def review_items(
        self, status: str = "pending", *, limit: int = 50, offset: int = 0, request_id: str | None = None
    ):
        """A page of the review queue -> ``ReviewPage`` (items and the queue's stats)."""
        call = Call(
            "list review items",
            HttpRequest(
                "GET", "/v1/review/items", params={"status": status, "limit": limit, "offset": offset}
            ),
            GrpcRequest(
                "ListReviewItems",
                lambda pb: pb.ListReviewItemsRequest(status=status, limit=limit, offset=offset),
                replies.review_page,
            ),
            results.review_page,
        )
        return self._execute(call, request_id)

    def review_item(self, item_id: str, *, request_id: str | None = None):
        """-> ``ReviewItemView``."""
        call = _item_read(
            "get review item", item_id, "", "GetReviewItem", replies.review_item, results.review_item
        )
        return self._execute(call, request_id)

    def review_image(self, item_id: str, *, request_id: str | None = None):
        """The item's stored image -> ``(bytes, media type)``."""
        call = _item_read(
            "get review image",
            item_id,
            "/image",
            "GetReviewImage",
            replies.review_image,
            results.review_image,
        )
        return self._execute(call, request_id)

    def review_audit(self, item_id: str, *, request_id: str | None = None):
        """Who did what to an item -> ``AuditLog``."""
        call = _item_read(
            "get review audit", item_id, "/audit", "GetReviewAudit", replies.review_audit, results.audit_log
        )
        return self._execute(call, request_id)

    def review_labels(self, task: str, *, request_id: str | None = None):
        """The labels a task's reviewers may use -> ``LabelSet``."""
        from urllib.parse import quote

        call = Call(
            "get review labels",
            HttpRequest("GET", f"/v1/review/labels/{quote(task, safe='')}"),
            GrpcRequest(
                "GetReviewLabels", lambda pb: pb.GetReviewLabelsRequest(task=task), replies.review_labels
            ),
            results.label_set,
        )
        return self._execute(call, request_id)

    def review_stats(self, *, request_id: str | None = None):
        """Queue depth, SLA, audit estimates -> ``ReviewStats``."""
        call = Call(
            "review stats",
            HttpRequest("GET", "/v1/review/stats"),
            GrpcRequest("GetReviewStats", lambda pb: pb.Empty(), replies.review_stats),
            results.review_stats,
        )
        return self._execute(call, request_id)

    def claim(
        self,
        reviewer: str | None = None,
        *,
        item_id: str | None = None,
        lease_s: float | None = None,
        request_id: str | None = None,
    ):
        """Lease the most valuable pending item (or ``item_id``) -> ``Claim`` (item and lease token;
        both None when nothing waits). ``reviewer``: needed only on a service without API keys.
        A claim of "the next item" is not sent again after a lost answer (it would lease a second)."""
        call = Call(
            "claim review item",
            HttpRequest(
                "POST", "/v1/review/claim", json=given(reviewer=reviewer, item_id=item_id, lease_s=lease_s)
            ),
            GrpcRequest(
                "ClaimReviewItem",
                lambda pb: pb.ClaimReviewItemRequest(
                    reviewer=reviewer or "", item_id=item_id or "", lease_s=lease_s or 0.0
                ),
                replies.claim,
            ),
            results.claim,
            idempotent=item_id is not None,
        )
        return self._execute(call, request_id)

    def label(
        self,
        item_id: str,
        *,
        lease_token: str,
        verdict: str,
        label: str | None = None,
        boxes: Sequence[Mapping[str, Any]] | None = None,
        note: str | None = None,
        reviewer: str | None = None,
        request_id: str | None = None,
    ):
        """A reviewer's verdict (confirm | correct | reject) on a claimed item -> ``ReviewItemView``.
        The service answers the same label twice as one, so it is sent again after a lost answer."""
        body = given(
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
                **given(
                    label=label,
                    note=note,
                    boxes=pb.DetectionList(detections=[detection(pb, b) for b in boxes])
                    if boxes is not None
                    else None,
                ),
            )

        call = Call(
            "label review item",
            HttpRequest("POST", review_item_path(item_id, "/label"), json=body),
            GrpcRequest("LabelReviewItem", message, replies.review_item),
            results.review_item,
        )
        return self._execute(call, request_id)

    def release(
        self, item_id: str, *, lease_token: str, reviewer: str | None = None, request_id: str | None = None
    ):
        """Give a claimed item back unlabelled -> ``ReviewItemView``. Not sent again after a lost
        answer (it would find the lease gone: 409)."""
        call = Call(
            "release review item",
            HttpRequest(
                "POST",
                review_item_path(item_id, "/release"),
                json=given(reviewer=reviewer, lease_token=lease_token),
            ),
            GrpcRequest(
                "ReleaseReviewItem",
                lambda pb: pb.ReleaseReviewItemRequest(
                    item_id=item_id, reviewer=reviewer or "", lease_token=lease_token
                ),
                replies.review_item,
            ),
            results.review_item,
            idempotent=False,
        )
        return self._execute(call, request_id)

    # -- operations -----------------------------------------------------------------------------

    def policy(self, *, request_id: str | None = None):
        """The policy set in force, budgets and history (admin) -> ``PolicyView``."""
        call = Call(
            "get policy",
            HttpRequest("GET", "/v1/policy"),
            GrpcRequest("GetPolicy", lambda pb: pb.Empty(), replies.policy_view),
            results.policy_view,
        )
        return self._execute(call, request_id)

    def call(self, method: str, path: str, *, request_id: str | None = None, **http: Any):
        """Any HTTP route (``json=``, ``params=``, ...) -> its JSON: the routes with no typed
        operation here (rollouts, drift). HTTP only."""
        call = Call(
            f"{method} {path}",
            HttpRequest(method.upper(), path, **http),
            None,
            results.as_json,
            idempotent=method.upper() in ("GET", "HEAD", "PUT", "DELETE"),
        )
        return self._execute(call, request_id)


def _item_read(name: str, item_id: str, suffix: str, rpc: str, reply: Callable, parse: Callable) -> Call:
    """A read of one review item: ``GET /v1/review/items/<id><suffix>``, or gRPC ``rpc`` with a
    ``GetReviewItemRequest``. The image (``/image``) is a file, not JSON."""
    return Call(
        name,
        HttpRequest("GET", review_item_path(item_id, suffix), binary=suffix == "/image"),
        GrpcRequest(rpc, lambda pb: pb.GetReviewItemRequest(item_id=item_id), reply),
        parse,
    )
