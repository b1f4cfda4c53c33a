"""What one call of the API is on the wire: ``Call``, with both faces' requests and its parser.

A ``Call`` holds the HTTP request and the gRPC request of one operation (router/http/ and
router/proto/visionroute.proto serve the same operations) and the parser of
visionroute/client/results.py that types the answer; a transport sends whichever it speaks.
gRPC messages are built on use (``message(pb)``), so an HTTP client never generates or imports
the gRPC code. Each operation builds its ``Call`` once, in visionroute/client/operations.py.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import quote

from visionroute.client import results
from visionroute.errors import InputError

T = TypeVar("T")
LIST_FILTERS = ("tenant", "source", "tags_any", "tags_all", "review_item_ids", "ids", "image_sha256")
FILTERS = (*LIST_FILTERS, "created_after", "created_before", "in_review")  # retrieval SearchFilters
SEARCH_PARAMS = ("ef_search", "nprobe", "refine_k_factor", "exact")  # retrieval/schemas.py SearchParams
METADATA_FIELDS = ("tenant", "tags", "source", "created_at", "image_sha256", "review_item_id", "extra")
REQUEST_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")  # what the service accepts (router/services/common.py)


@dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str
    json: Any = None
    files: Any = None  # httpx's ``files``: a dict, or a list of (name, file) for repeated parts
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
    effect of sending it once, so it may be sent again when an attempt may have reached the
    service without an answer (a timeout, a dropped connection, a replica that died under it)."""

    name: str
    http: HttpRequest | None
    grpc: GrpcRequest | None
    parse: Callable[[Any], T] = field(default=results.as_json)  # type: ignore[assignment]
    idempotent: bool = True


def request_id_for(value: str | None) -> str:
    """The caller's request id, checked as the service checks it, or a new one."""
    if value is None:
        return uuid.uuid4().hex
    if not isinstance(value, str) or not REQUEST_ID.fullmatch(value):
        raise InputError(
            f"request_id must be 1-128 characters from [A-Za-z0-9_.:-], got {value!r}", field="request_id"
        )
    return value


def given(**values: Any) -> dict[str, Any]:
    """The values that are not None (what an HTTP body sends; gRPC's unset fields)."""
    return {name: value for name, value in values.items() if value is not None}


def image_bytes(image: bytes | str | Any, field: str = "image") -> bytes:
    """Bytes as given, or a path's file."""
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    return checked_path(image, field).read_bytes()


def checked_path(image: str | Path | Any, field: str) -> Path:
    """An image given as a path: the file must exist (bytes are checked by ``image_bytes``)."""
    if not isinstance(image, str | Path):
        raise InputError(
            f"{field} must be the image's bytes or a path, got {type(image).__name__}", field=field
        )
    path = Path(image)
    if not path.is_file():
        raise InputError(f"{field}: {str(path)!r} is not a file", field=field)
    return path


def image_part(data: bytes) -> tuple[str, tuple[str, bytes, str]]:
    """One ``image`` file part of a multipart body."""
    return ("image", ("image", data, "application/octet-stream"))


def known(values: Mapping[str, Any] | None, names: tuple[str, ...], field: str) -> None:
    """Refuse a name the service does not know before anything is sent (gRPC's typed messages
    could not carry it), naming it and the valid ones."""
    unknown = sorted(set(values or ()) - set(names))
    if unknown:
        raise InputError(f"unknown {field} name {unknown[0]!r}; expected one of {sorted(names)}", field=field)


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


def detection(pb: Any, box: Mapping[str, Any]) -> Any:
    return pb.Detection(
        label=box.get("label") or "",
        class_id=int(box.get("class_id") or 0),
        confidence=float(box.get("confidence") or 0.0),
        xyxy=[float(v) for v in box.get("xyxy") or ()],
    )


def review_item_path(item_id: str, suffix: str = "") -> str:
    return f"/v1/review/items/{quote(str(item_id), safe='')}{suffix}"
