"""The soak's traffic: client threads sending the mix through the project's client, every
attempt recorded in a ``Ledger``."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from evals.benchmarks.soak_images import noise_png
from evals.benchmarks.soak_options import BATCH_IMAGES, METERED_TENANT, MIX, SoakOptions
from evals.benchmarks.soak_service import SoakService
from evals.benchmarks.soak_vlm import (
    VLM_MIX,
    VLM_TASK,
    vlm_outcome,
)

# -- traffic ---------------------------------------------------------------------------------------


@dataclass
class Attempt:
    op: str
    face: str
    status: int | str  # the HTTP status (gRPC: the same refusal's), or "no answer"
    started: float
    ended: float
    retry_after: bool
    reason: str = ""


@dataclass
class Ledger:
    """Everything the traffic saw and was promised (thread-safe appends)."""

    attempts: list[Attempt] = field(default_factory=list)
    review_items: dict[str, tuple[str, str]] = field(default_factory=dict)  # item id -> (tenant, request id)
    search_ids: set[int] = field(default_factory=set)
    labelled: set[str] = field(default_factory=set)
    metered_units: float = 0.0
    calls: Counter = field(default_factory=Counter)  # (op, face, outcome)
    vlm_outcomes: list[tuple[float, str]] = field(
        default_factory=list
    )  # (s after the start, soak_vlm outcome)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, attempt: Attempt) -> None:
        with self.lock:
            self.attempts.append(attempt)

    def analysed(self, body: Any, tenant: str) -> None:
        """An acknowledged analysis: its review item and its (durable) search entry."""
        with self.lock:
            if body.review_item_id:
                self.review_items[body.review_item_id] = (tenant, body.request_id)
            for step in body.trace.get("steps", []):
                if step.get("stage") == "retrieval:index" and (step.get("details") or {}).get("search_id"):
                    self.search_ids.add(int(step["details"]["search_id"]))
            if tenant == METERED_TENANT:  # what the budget meters: the cheap tier's calls
                steps = body.trace.get("steps", [])
                self.metered_units += sum(
                    float(s.get("cost_units") or 0) for s in steps if str(s.get("stage")).startswith("onnx")
                )


class Traffic:
    """``clients`` threads, each with an HTTP and a gRPC client, at ``rate_per_s`` calls in all."""

    def __init__(self, service: SoakService, options: SoakOptions, ledger: Ledger, started: float) -> None:
        self.service = service
        self.options = options
        self.ledger = ledger
        self.started = started
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.seeds = iter(range(options.seed * 10_000_000, (options.seed + 1) * 10_000_000))
        self.seed_lock = threading.Lock()

    def next_seed(self) -> int:
        with self.seed_lock:
            return next(self.seeds)

    def start(self) -> None:
        for n in range(self.options.clients):
            thread = threading.Thread(target=self._client, args=(n,), name=f"soak-client-{n}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)

    def _client(self, n: int) -> None:
        from visionroute.client import NO_RETRY, VisionRouteClient

        rng = random.Random(self.options.seed * 1000 + n)
        mix = MIX + VLM_MIX if self.options.vlm else MIX
        ops, weights = [(op, face) for op, face, _ in mix], [w for *_, w in mix]
        interval = self.options.clients / self.options.rate_per_s
        clients = {
            "http": VisionRouteClient(self.service.url, timeout_s=30, retry=NO_RETRY),
            "grpc": VisionRouteClient(self.service.grpc_url, timeout_s=30, retry=NO_RETRY),
        }
        next_at = time.monotonic() + rng.random() * interval
        try:
            while not self.stop.is_set():
                if self.stop.wait(max(0.0, next_at - time.monotonic())):
                    break
                next_at = max(next_at + interval, time.monotonic())  # never a burst to catch up
                op, face = rng.choices(ops, weights)[0]
                try:
                    getattr(self, f"_{op}")(clients[face], face, rng)
                except Exception as error:  # a bug in the soak itself: recorded, never silent
                    self.ledger.add(
                        Attempt(op, face, f"soak error {type(error).__name__}", 0, 0, False, str(error))
                    )
        finally:
            for client in clients.values():
                client.close()

    def _call(self, op: str, face: str, send, *, idempotent: bool = True, attempts: int = 6) -> Any:
        """One logical call: each attempt recorded; a 503 (or a short 429) is retried after its
        Retry-After, a lost answer only when ``idempotent`` (the same request id every time)."""
        from visionroute.client import ServiceError, ServiceUnreachable

        request_id = uuid.uuid4().hex
        outcome: Any = "gave up"
        for _ in range(attempts):
            started = time.monotonic()
            try:
                result = send(request_id)
            except ServiceUnreachable as error:
                self.ledger.add(
                    Attempt(op, face, "no answer", started, time.monotonic(), False, error.reason[:160])
                )
                if not idempotent or self.stop.is_set():
                    outcome = "no answer"
                    break
                time.sleep(1.0)
                continue
            except ServiceError as error:
                status = error.status if error.status is not None else f"error {error.error}"
                wait = error.retry_after_s
                self.ledger.add(
                    Attempt(op, face, status, started, time.monotonic(), wait is not None, error.reason[:160])
                )
                outcome = status
                if status in (503, 429) and wait is not None and wait <= 5 and not self.stop.is_set():
                    time.sleep(min(wait, 2.0))
                    continue
                break
            self.ledger.add(Attempt(op, face, 200, started, time.monotonic(), False))
            with self.ledger.lock:
                self.ledger.calls[(op, face, "200")] += 1
            return result
        with self.ledger.lock:
            self.ledger.calls[(op, face, str(outcome))] += 1
        return None

    def _analyze(self, client, face: str, rng: random.Random) -> None:
        tenant = METERED_TENANT if rng.random() < 0.15 else f"soak-{rng.randrange(4)}"
        image = noise_png(self.next_seed())
        body = self._call("analyze", face, lambda rid: client.analyze(image, tenant=tenant, request_id=rid))
        if body is not None:
            self.ledger.analysed(body, tenant)

    def _analyze_vlm(self, client, face: str, rng: random.Random) -> None:
        """An analysis on the VLM task: a VLM answer, or (VLM down) a recorded review item."""
        tenant = f"soak-{rng.randrange(4)}"
        image = noise_png(self.next_seed())
        body = self._call(
            "analyze_vlm",
            face,
            lambda rid: client.analyze(image, task=VLM_TASK, tenant=tenant, request_id=rid),
        )
        if body is not None:
            self.ledger.analysed(body, tenant)
            with self.ledger.lock:
                self.ledger.vlm_outcomes.append((time.monotonic() - self.started, vlm_outcome(body)))

    def _batch(self, client, face: str, rng: random.Random) -> None:
        from router.schemas import AnalyzeResponse

        tenant = f"soak-{rng.randrange(4)}"
        files = [
            ("image", (f"{i}.png", noise_png(self.next_seed()), "image/png")) for i in range(BATCH_IMAGES)
        ]
        body = self._call(
            "batch",
            face,
            lambda rid: client.call(
                "POST", "/v1/analyze/batch", files=files, data={"tenant": tenant}, request_id=rid
            ),
        )
        if body is None:
            return
        for result in body["results"]:  # each image's own outcome (a 503 image is not retried here)
            if result["status"] == 200:
                self.ledger.analysed(AnalyzeResponse.model_validate(result["response"]), tenant)
            with self.ledger.lock:
                self.ledger.calls[("batch image", face, str(result["status"]))] += 1

    def _search(self, client, face: str, rng: random.Random) -> None:
        if rng.random() < 0.5:
            self._call("search", face, lambda rid: client.search("a photo of noise", k=5, request_id=rid))
        else:
            image = noise_png(self.next_seed())
            self._call("search", face, lambda rid: client.search(image=image, k=5, request_id=rid))

    def _index(self, client, face: str, rng: random.Random) -> None:
        image = noise_png(self.next_seed())
        metadata = {"tenant": f"soak-{rng.randrange(4)}", "tags": ["soak"]}
        added = self._call(
            "index", face, lambda rid: client.index_item(image, metadata, request_id=rid), idempotent=False
        )
        if added is not None:
            with self.ledger.lock:
                self.ledger.search_ids.add(int(added.id))

    def _review(self, client, face: str, rng: random.Random) -> None:
        reviewer = f"soak-reviewer-{rng.randrange(3)}"
        claim = self._call(
            "claim", face, lambda rid: client.claim(reviewer, request_id=rid), idempotent=False
        )
        if claim is None or claim.item is None:
            return
        item_id, token = claim.item.id, claim.lease_token
        labelled = self._call(
            "label",
            face,
            lambda rid: client.label(
                item_id, lease_token=token, verdict="confirm", reviewer=reviewer, request_id=rid
            ),
        )
        if labelled is not None:
            with self.ledger.lock:
                self.ledger.labelled.add(item_id)
