"""Golden responses: a fixed set of requests to the real service, on both faces.

Recorded before a refactor of the service core and compared after it, so a change of
behaviour shows up as a diff of ``golden_responses.json`` that someone has to accept:

    python -m tests.integration.golden record     # starts the service, rewrites the file

The exchange runs in a fixed order on a fresh service (serve_config.yaml, no API keys), so
review-item ids and search ids are stable once renamed by order of first appearance. Request
ids, timings, lease tokens and wall-clock times are volatile and replaced; floats are rounded.

Model digests are replaced too (``sha256:<model-sha256>``): an exported model's bytes differ
across package versions and CPUs, so the file pins none. ``model_version_mismatches`` checks
them instead: every ``<version>;sha256:<hex>`` a response names must be the sha256 of the file
the service actually served (the prepared ONNX file and its sidecar, MTCNN's weight files), so
a user can reproduce a trace's model version from the file.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import io
import json
import os
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
ROLLOUT_ID = re.compile(r"\bro_[0-9a-f]{16}\b")
MODEL_SHA256 = "<model-sha256>"
# "<version>;sha256:<hex>" (ONNX tiers, MTCNN) or "<build>@sha256:<hex>" (a VLM), optionally
# behind "<detector>=" ("mtcnn=facenet-pytorch==2.6.0;sha256:...").
VERSION_DIGEST = re.compile(r"^(?:[\w.-]+=(?!=))?(?P<version>.+?)[;@]sha256:(?P<hex>[0-9a-f]{16,64})$")
DIGEST_IN_TEXT = re.compile(r"sha256:[0-9a-f]{16,64}")
HEX_RUN = re.compile(r"\b[0-9a-f]{16,64}\b")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def mtcnn_weights_sha256() -> tuple[str, str]:
    """(version, sha256) of the MTCNN face detector: the package and its three weight files, in
    the order cascades/detectors_privacy.py hashes them."""
    import facenet_pytorch

    data = Path(facenet_pytorch.__file__).parent / "data"
    digest = hashlib.sha256()
    for name in ("pnet.pt", "rnet.pt", "onet.pt"):
        digest.update((data / name).read_bytes())
    return f"facenet-pytorch=={importlib.metadata.version('facenet-pytorch')}", digest.hexdigest()


def served_model_digests(models_dir: Path) -> dict[str, str]:
    """Model version -> the sha256 of the file served under it: each prepared ONNX file in
    ``models_dir`` (its sidecar names the version and records the sha256, which must agree with
    the file) and MTCNN's weights."""
    digests = {}
    for onnx_path in sorted(Path(models_dir).glob("*.onnx")):
        sidecar = json.loads(onnx_path.with_suffix(".json").read_text())
        actual = file_sha256(onnx_path)
        if sidecar.get("sha256") != actual:
            raise AssertionError(
                f"{onnx_path.name}: its sidecar records {sidecar.get('sha256')}, the file is {actual}"
            )
        digests[sidecar["version"]] = actual
    version, digest = mtcnn_weights_sha256()
    digests[version] = digest
    return digests


def model_version_mismatches(results: Any, models_dir: Path) -> tuple[list[str], set[str]]:
    """Every ``<version>;sha256:<hex>`` in the raw results (and every model card's sha256, in
    JSON and Markdown) checked against the file served under that version. Returns (the
    mismatches, the versions seen)."""
    digests = served_model_digests(models_dir)
    problems: list[str] = []
    seen: set[str] = set()

    def check_card(version: Any, sha256s: dict[str, Any], where: str) -> None:
        # a model card's model section: the digest computed now and the one its sidecar recorded
        if not isinstance(version, str):
            return
        seen.add(version)
        served = digests.get(version)
        for key, sha256 in sha256s.items():
            if served is None or sha256 != served:
                problems.append(f"{where}.{key}: {sha256!r}, but the file served as {version} has {served}")

    def walk(value: Any, where: str) -> None:
        if isinstance(value, dict):
            if "sha256_recorded" in value and "version" in value:
                check_card(value["version"], {k: value.get(k) for k in ("sha256", "sha256_recorded")}, where)
            if isinstance(value.get("text"), list):  # a Markdown card: its "| field | value |" rows
                rows = dict(
                    (cells[1].strip(), cells[2].strip())
                    for cells in (line.split("|") for line in value["text"] if isinstance(line, str))
                    if len(cells) == 4
                )
                if "sha256_recorded" in rows and "version" in rows:
                    check_card(
                        rows["version"], {k: rows.get(k) for k in ("sha256", "sha256_recorded")}, where
                    )
            for key, item in value.items():
                walk(item, f"{where}.{key}")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, f"{where}[{i}]")
        elif isinstance(value, str) and "sha256:" in value:
            match = VERSION_DIGEST.match(value)
            if match is None:
                return
            version, hex_digest = match["version"], match["hex"]
            seen.add(version)
            served = digests.get(version)
            if served is None:
                problems.append(f"{where}: {value!r} names no served model (served: {sorted(digests)})")
            elif not served.startswith(hex_digest):
                problems.append(f"{where}: {value!r}, but the file served as {version} has sha256 {served}")

    for result in results:
        walk(result, result["name"])
    return problems, seen


RANDOM_KEY = "<random-key>"


def _rollout_evidence_step(step: dict[str, Any]) -> bool:
    """A trace step that queued a running rollout's audit or shadow item."""
    details = step.get("details")
    return (
        str(step.get("reason", "")).startswith("rollout ")
        and isinstance(details, dict)
        and details.get("kind") in ("audit", "shadow")
        and "priority" in details
    )


class Normaliser:
    """Replaces what changes from run to run; names review items by first appearance.

    ``model_digests``: the sha256 of each served model file, replaced wherever it appears (a model
    card names the full digest); ``paths``: directories of this run, replaced by a placeholder.
    """

    def __init__(self, model_digests: list[str] = (), paths: dict[str, str] | None = None) -> None:
        self.names: dict[str, str] = {}
        self.rollouts: dict[str, str] = {}
        self.model_digests = list(model_digests)
        self.paths = dict(paths or {})

    def _model_digest(self, hex_run: str) -> bool:
        return any(digest.startswith(hex_run) for digest in self.model_digests)

    def _text(self, value: str) -> str:
        for path, placeholder in self.paths.items():
            value = value.replace(path, placeholder)
        value = DIGEST_IN_TEXT.sub("sha256:" + MODEL_SHA256, value)
        value = ROLLOUT_ID.sub(lambda m: self._rollout(m.group()), value)
        return HEX_RUN.sub(lambda m: MODEL_SHA256 if self._model_digest(m.group()) else m.group(), value)

    def _name(self, value: str) -> str:
        return self.names.setdefault(value, f"<item-{len(self.names) + 1}>")

    def _rollout(self, value: str) -> str:
        return self.rollouts.setdefault(value, f"<rollout-{len(self.rollouts) + 1}>")

    def __call__(self, value: Any, key: str = "") -> Any:
        if key in VOLATILE_KEYS or key.endswith("_at") or key.endswith("_expires_at"):
            return "<volatile>" if value is not None else None
        if isinstance(value, dict) and _rollout_evidence_step(value):
            # a running rollout's evidence is claimed by a key drawn at random at enqueue
            # (router/services/rollouts.py queue_priority): its value is not behaviour
            value = {**value, "details": {**value["details"], "priority": RANDOM_KEY}}
        if isinstance(value, dict):
            return {k: self(v, k) for k, v in sorted(value.items())}
        if isinstance(value, list):
            return [self(v) for v in value]
        if isinstance(value, float):
            return round(value, 3)
        if isinstance(value, str):
            value = self._text(value)
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
    content_type = response.headers.get("content-type") or ""
    if content_type.startswith("text/markdown"):  # a model card: the text itself is compared
        return {
            "name": name,
            "face": "http",
            "status": response.status_code,
            "body": {"content_type": content_type, "text": response.text.splitlines()},
        }
    try:
        body = response.json()
    except ValueError:
        # a stored review image is the redacted one: its size follows the detector's boxes
        size = "<volatile>" if content_type.startswith("image/") else len(response.content)
        body = {"content_type": content_type or None, "bytes": size}
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

    from router.grpc.ingress import pb, visionroute_pb2_grpc

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
    # model cards (docs/rollouts.md, "Model cards"): the list, cards as JSON and as Markdown (JSON
    # for the text detector: the classifier's JSON card lists all its 1000 labels)
    models = _http(client, "model cards", "GET", "/v1/models")
    out.append(models)
    out.append(_http(client, "model card", "GET", "/v1/models/text.ppocr_det/card"))
    card = "classify.efficientnet_lite0"
    out.append(
        _http(client, "model card markdown", "GET", f"/v1/models/{card}/card", params={"format": "md"})
    )
    policy_cards = [
        m["name"] for m in models["body"].get("models", []) if m["name"].startswith("policy-set.")
    ]
    for name in policy_cards[:1]:
        out.append(_http(client, "policy set card", "GET", f"/v1/models/{name}/card"))
        out.append(
            _http(
                client,
                "policy set card markdown by accept",
                "GET",
                f"/v1/models/{name}/card",
                headers={"accept": "text/markdown"},
            )
        )
    out.append(_http(client, "model card unknown", "GET", "/v1/models/classify.nope/card"))
    out.append(
        _http(client, "model card bad format", "GET", f"/v1/models/{card}/card", params={"format": "xml"})
    )
    # a rollout: serve_config.yaml declares no model candidate, so a policy-set candidate (no
    # deploy needed; docs/rollouts.md). A canary for every tenant (fraction 1) with every accept
    # audited (audit_fraction 1) makes each request's arm and audit the same on every run.
    candidate = {
        "version": "golden-candidate-v1",
        "thresholds": {
            "classify": {
                "version": "classify-thresholds-v2",
                "accept_threshold": 0.6,
                "escalate_threshold": 0.3,
            }
        },
    }
    rollout = {
        "task": "classify",
        "policy": candidate,
        "mode": "canary",
        "fraction": 1.0,
        "sticky_by": "tenant",
        "audit_fraction": 1.0,
        "alpha": 0.05,
        "delta": 0.05,
        "reason": "golden: a looser accept threshold",
    }
    started = _http(client, "rollout start", "POST", "/v1/rollouts", json=rollout)
    out.append(started)
    rollout_id = started["body"].get("id") or "none"
    out.append(_http(client, "rollout status", "GET", f"/v1/rollouts/{rollout_id}"))
    out.append(_http(client, "rollout second for the task", "POST", "/v1/rollouts", json=rollout))
    out.append(
        _http(
            client,
            "rollout unknown candidate",
            "POST",
            "/v1/rollouts",
            json={"task": "classify", "candidate": "v9", "mode": "shadow"},
        )
    )
    out.append(_http(client, "rollout bad fraction", "POST", "/v1/rollouts", json={**rollout, "fraction": 0}))
    out.append(_http(client, "rollouts of the task", "GET", "/v1/rollouts", params={"task": "classify"}))
    # served by the candidate's thresholds, each accept audited; the rollback flushes the
    # replica's cost sums first, so its answer counts both requests (a status read in between
    # would race the periodic flush)
    analyze("analyze coffee in the canary", photos["coffee"])
    analyze("analyze chelsea in the canary", photos["chelsea"])
    out.append(
        _http(
            client,
            "rollout rollback",
            "POST",
            f"/v1/rollouts/{rollout_id}/rollback",
            json={"reason": "golden: end of the exchange"},
        )
    )
    out.append(_http(client, "rollout unknown", "GET", "/v1/rollouts/" + "0" * 32))
    client.close()
    return out


def roll_back_running_rollouts(url: str) -> None:
    """Roll back the exchange's rollout if it is still running (an exchange that failed half-way):
    the service is shared, and a canary for every tenant would serve the next tests."""
    with httpx.Client(base_url=url, timeout=120) as client:
        for rollout in client.get("/v1/rollouts", params={"task": "classify"}).json().get("rollouts", []):
            if rollout.get("status") == "running" and rollout.get("reason", "").startswith("golden:"):
                client.post(f"/v1/rollouts/{rollout['id']}/rollback", json={"reason": "golden: test ended"})


def normalised(
    results: list[dict[str, Any]], models_dir: Path | None = None, workdir: Path | None = None
) -> list[dict[str, Any]]:
    """``models_dir``: the prepared models the service served (their digests and path are
    replaced); ``workdir``: the service's working directory (its path is replaced)."""
    digests = list(served_model_digests(models_dir).values()) if models_dir is not None else []
    paths = {}
    if models_dir is not None:
        paths[str(models_dir)] = "<models_dir>"
    if workdir is not None:
        paths[str(workdir)] = "<workdir>"
    return Normaliser(digests, paths)(results)


def record(path: Path = GOLDEN_FILE) -> None:
    from cascades.models import prepare_models
    from tests.integration.serve_process import ServeProcess

    # a fresh local Ray, never a cluster another process left in /tmp/ray/ray_current_cluster
    os.environ.setdefault("RAY_ADDRESS", "local")
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        prepare_models(models)
        service = ServeProcess(Path(tmp), models).start(timeout_s=600)
        try:
            raw = exchange(service.url, service.grpc_target)
        finally:
            service.stop()
        problems, _ = model_version_mismatches(raw, models)
        if problems:
            sys.exit("model versions that name no served file:\n" + "\n".join(problems))
        results = normalised(raw, models, Path(tmp))
    path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(results)} responses to {path}")


if __name__ == "__main__":
    if sys.argv[1:2] != ["record"]:
        sys.exit("usage: python -m tests.integration.golden record [PATH]")
    record(Path(sys.argv[2]) if len(sys.argv) > 2 else GOLDEN_FILE)
