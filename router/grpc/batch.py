"""The gRPC face of the batch API (``AnalyzeBatch``): each ``BatchImage`` read as ``Analyze``
reads its image, and the ``BatchResult`` as ``AnalyzeBatchResponse`` (the same per-image
statuses and error bodies as HTTP's, router/http/batch.py ``item_status``)."""

from __future__ import annotations

from router.errors import grpc_code_name, unexpected_error
from router.grpc import messages
from router.grpc.build import ensure_generated
from router.http.batch import item_status
from router.services import response_body
from router.services.batch import BatchImage, BatchResult
from router.url_fetch import UrlFetchConfig, fetch_image_url
from visionroute.errors import InputError, RouterError

ensure_generated()
from router.grpc.proto import visionroute_pb2 as pb  # noqa: E402  (generated just above)


async def batch_image(image: pb.BatchImage, max_bytes: int, url_fetch: UrlFetchConfig) -> BatchImage:
    """One image's bytes, or its error (both or neither of ``image`` and ``image_url``, a URL
    that cannot be fetched): the image's, never the call's."""
    try:
        if image.image_url:
            if image.image:
                raise InputError("send either image or image_url, not both", field="image_url")
            return BatchImage(await fetch_image_url(image.image_url, url_fetch, max_bytes))
        return BatchImage(image.image)  # empty: the pipeline's decode names it
    except RouterError as error:
        return BatchImage(error=error)


def batch_response(result: BatchResult) -> pb.AnalyzeBatchResponse:
    reply = pb.AnalyzeBatchResponse(
        request_id=result.request_id, succeeded=result.succeeded, failed=result.failed
    )
    for item in result.items:
        out = reply.results.add(index=item.index, request_id=item.request_id)
        if item.analysis is not None:
            out.response.CopyFrom(messages.analyze_response(response_body(item.analysis)))
            continue
        status, body = item_status(item)
        out.error.CopyFrom(
            pb.BatchItemError(
                error=body["error"],
                field=body["field"] or "",
                reason=body["reason"],
                http_status=status,
                code=grpc_code_name(unexpected_error(item.error)),
                retry_after_s=body["retry_after_s"] or 0,
            )
        )
    return reply
