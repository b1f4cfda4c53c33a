"""Golden responses: a fixed set of requests to the real service, on both faces.

Recorded before a refactor of the service core and compared after it, so a change of
behaviour shows up as a diff of ``golden_responses.json`` that someone has to accept:

    python -m tests.integration.golden record     # starts the service, rewrites the file

The exchange runs in a fixed order on a fresh service (serve_config.yaml, no API keys), so
review-item ids and search ids are stable once renamed by order of first appearance. Request
ids, timings, lease tokens and wall-clock times are volatile and replaced; floats are rounded.
"""

from __future__ import annotations

import base64
import io
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import grpc
import httpx
from PIL import Image

GOLDEN_FILE = Path(__file__).with_name("golden_responses.json")
VOLATILE_KEYS = {
    "request_id",
    "latency_ms",
    "took_ms",
    "at",
    "at_unix",
    "lease_token",
    "replica_pid",
    "age_s",
    "oldest_age_s",
    # Redaction: a face box (and so the blurred image's bytes) can move by a pixel with the
    # CPU's float rounding in the face detector; the count, mode and rule stay compared.
    "boxes_xyxy",
    "stored_sha256",
}
UUID_HEX = re.compile(r"^[0-9a-f]{32}$")


class Normaliser:
    """Replaces what changes from run to run; names review items by first appearance."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}

    def _name(self, value: str) -> str:
        return self.names.setdefault(value, f"<item-{len(self.names) + 1}>")

    def __call__(self, value: Any, key: str = "") -> Any:
        if key in VOLATILE_KEYS or key.endswith("_at") or key.endswith("_expires_at"):
            return "<volatile>" if value is not None else None
        if isinstance(value, dict):
            return {k: self(v, k) for k, v in sorted(value.items())}
        if isinstance(value, list):
            return [self(v) for v in value]
        if isinstance(value, float):
            return round(value, 3)
        if isinstance(value, str):
            if UUID_HEX.match(value):
                return self._name(value)
            for raw in set(re.findall(r"\b[0-9a-f]{32}\b", value)):
                value = value.replace(raw, self._name(raw))
            return value
        return value


def _png(name: str) -> bytes:
    from tests.conftest import photo_png

    return photo_png(name)


def _bomb_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, format="PNG")
    return buffer.getvalue()


def _http(client: httpx.Client, name: str, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
    response = client.request(method, path, **kwargs)
    try:
        body = response.json()
    except ValueError:
        content_type = response.headers.get("content-type")
        # a stored review image is the redacted one: its size follows the detector's boxes
        size = "<volatile>" if (content_type or "").startswith("image/") else len(response.content)
        body = {"content_type": content_type, "bytes": size}
    return {"name": name, "face": "http", "status": response.status_code, "body": body}


def _grpc(name: str, call, request) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    try:
        reply = call(request, timeout=120)
    except grpc.RpcError as error:
        try:
            details = json.loads(error.details())
        except (TypeError, ValueError):
            details = error.details()
        return {"name": name, "face": "grpc", "status": error.code().name, "body": details}
    body = MessageToDict(reply, preserving_proto_field_name=True)
    for key in ("trace_json", "item_json", "stats_json", "result_json"):
        if key in body:
            body[key] = json.loads(body[key])
    for item in body.get("items", []):
        item["item_json"] = json.loads(item["item_json"])
    if isinstance(body.get("item"), dict) and "item_json" in body["item"]:
        body["item"]["item_json"] = json.loads(body["item"]["item_json"])
    return {"name": name, "face": "grpc", "status": "OK", "body": body}


def exchange(url: str, grpc_target: str) -> list[dict[str, Any]]:
    """The fixed request set, in order, with raw (not yet normalised) results."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from router.grpc_ingress import pb, visionroute_pb2_grpc

    photos = {name: _png(name) for name in ("coffee", "chelsea", "astronaut", "camera", "page")}
    out: list[dict[str, Any]] = []
    client = httpx.Client(base_url=url, timeout=120)

    def analyze(name: str, image: bytes, **data: str) -> dict[str, Any]:
        result = _http(
            client, name, "POST", "/v1/analyze", files={"image": ("x.png", image, "image/png")}, data=data
        )
        out.append(result)
        return result

    analyze("analyze coffee", photos["coffee"])
    out.append(
        _http(
            client,
            "analyze chelsea as JSON",
            "POST",
            "/v1/analyze",
            json={"image_base64": base64.b64encode(photos["chelsea"]).decode()},
        )
    )
    review = analyze("analyze astronaut (review)", photos["astronaut"])
    analyze("analyze camera", photos["camera"])
    analyze("analyze page, text task", photos["page"], task="text")
    # bad input, each naming its field
    analyze("not an image", b"plain text, not an image")
    analyze("truncated png", photos["coffee"][:2000])
    out.append(
        _http(
            client,
            "empty body",
            "POST",
            "/v1/analyze",
            content=b"",
            headers={"content-type": "application/json"},
        )
    )
    out.append(
        _http(
            client,
            "wrong content type",
            "POST",
            "/v1/analyze",
            content=photos["coffee"],
            headers={"content-type": "image/png"},
        )
    )
    analyze("decompression bomb", _bomb_png())
    analyze("unknown task", photos["coffee"], task="ocr")
    out.append(_http(client, "bad base64", "POST", "/v1/analyze", json={"image_base64": "%%%"}))
    out.append(
        _http(client, "unknown json field", "POST", "/v1/analyze", json={"image_base64": "aGk=", "colour": 1})
    )
    out.append(
        _http(
            client,
            "bad request id",
            "POST",
            "/v1/analyze",
            files={"image": ("x.png", photos["coffee"], "image/png")},
            headers={"x-request-id": "has spaces"},
        )
    )
    # the review flow
    item_id = review["body"]["review_item_id"]
    out.append(_http(client, "review list", "GET", "/v1/review/items"))
    out.append(_http(client, "review item", "GET", f"/v1/review/items/{item_id}"))
    out.append(_http(client, "review image", "GET", f"/v1/review/items/{item_id}/image"))
    out.append(_http(client, "review item unknown", "GET", "/v1/review/items/" + "0" * 32))
    claim = _http(client, "claim", "POST", "/v1/review/claim", json={"reviewer": "ann", "item_id": item_id})
    out.append(claim)
    out.append(
        _http(client, "rival claim", "POST", "/v1/review/claim", json={"reviewer": "bob", "item_id": item_id})
    )
    token = claim["body"].get("lease_token")
    label = {"reviewer": "ann", "lease_token": token, "verdict": "correct", "label": "space shuttle"}
    out.append(_http(client, "label", "POST", f"/v1/review/items/{item_id}/label", json=label))
    out.append(_http(client, "label again", "POST", f"/v1/review/items/{item_id}/label", json=label))
    out.append(
        _http(
            client,
            "label outside the label set",
            "POST",
            f"/v1/review/items/{item_id}/label",
            json={**label, "label": "not a class"},
        )
    )
    out.append(_http(client, "audit log", "GET", f"/v1/review/items/{item_id}/audit"))
    out.append(_http(client, "label set", "GET", "/v1/review/labels/classify"))
    second = analyze("analyze astronaut again", photos["astronaut"])
    second_id = second["body"]["review_item_id"]
    claim2 = _http(client, "claim next", "POST", "/v1/review/claim", json={"reviewer": "ann"})
    out.append(claim2)
    out.append(
        _http(
            client,
            "release with a wrong token",
            "POST",
            f"/v1/review/items/{second_id}/release",
            json={"reviewer": "ann", "lease_token": "nope"},
        )
    )
    out.append(
        _http(
            client,
            "release",
            "POST",
            f"/v1/review/items/{second_id}/release",
            json={"reviewer": "ann", "lease_token": claim2["body"].get("lease_token") or "none"},
        )
    )
    # search
    out.append(_http(client, "search text", "POST", "/v1/search", json={"text": "a cup of coffee", "k": 3}))
    out.append(_http(client, "search by id", "POST", "/v1/search", json={"id": 1, "k": 2}))
    out.append(_http(client, "search bad k", "POST", "/v1/search", json={"text": "cat", "k": 0}))
    out.append(_http(client, "search no query", "POST", "/v1/search", json={"k": 3}))
    out.append(_http(client, "search item", "GET", "/v1/search/items/1"))
    out.append(_http(client, "search item unknown", "GET", "/v1/search/items/999999"))
    # gRPC, same service
    with grpc.insecure_channel(grpc_target) as channel:
        grpc.channel_ready_future(channel).result(timeout=60)
        stub = visionroute_pb2_grpc.VisionRouteStub(channel)
        out.append(_grpc("grpc analyze coffee", stub.Analyze, pb.AnalyzeRequest(image=photos["coffee"])))
        out.append(
            _grpc("grpc analyze astronaut", stub.Analyze, pb.AnalyzeRequest(image=photos["astronaut"]))
        )
        out.append(_grpc("grpc not an image", stub.Analyze, pb.AnalyzeRequest(image=b"not an image")))
        out.append(
            _grpc("grpc unknown task", stub.Analyze, pb.AnalyzeRequest(image=photos["coffee"], task="ocr"))
        )
        out.append(
            _grpc("grpc review list", stub.ListReviewItems, pb.ListReviewItemsRequest(status="pending"))
        )
        out.append(_grpc("grpc review item", stub.GetReviewItem, pb.GetReviewItemRequest(item_id=second_id)))
        out.append(
            _grpc(
                "grpc claim",
                stub.ClaimReviewItem,
                pb.ClaimReviewItemRequest(reviewer="cy", item_id=second_id),
            )
        )
        out.append(_grpc("grpc search text", stub.Search, pb.SearchRequest(query_text="a cat", k=2)))
        out.append(
            _grpc(
                "grpc health",
                health_pb2_grpc.HealthStub(channel).Check,
                health_pb2.HealthCheckRequest(service=""),
            )
        )
    client.close()
    return out


def normalised(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return Normaliser()(results)


def record(path: Path = GOLDEN_FILE) -> None:
    from cascades.models import prepare_models
    from tests.integration.serve_process import ServeProcess

    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        prepare_models(models)
        service = ServeProcess(Path(tmp), models).start()
        try:
            results = normalised(exchange(service.url, service.grpc_target))
        finally:
            service.stop()
    path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(results)} responses to {path}")


if __name__ == "__main__":
    if sys.argv[1:2] != ["record"]:
        sys.exit("usage: python -m tests.integration.golden record [PATH]")
    record(Path(sys.argv[2]) if len(sys.argv) > 2 else GOLDEN_FILE)
