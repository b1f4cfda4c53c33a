"""The human-review operations: list, read, claim, release, label, label sets, stats, reviewers.

Every storage call runs in a worker thread (the SQLite queue blocks); every read is scoped
to the caller's tenant, so another tenant's item answers exactly like a missing one, and the
counts (queue depth, leases, audit estimates) are the caller's tenant's (an admin's: all).

Who acts: with API keys the acting reviewer IS the key (``reviewer_identity``): its ``name``,
or ``key:<first 12 hex of its sha256>`` when the name is empty. A ``reviewer`` field that
names anyone else is refused (403, ``field: reviewer``), for admins too: nobody acts under
someone else's name, so the audit log and the lease checks always name the key that acted
(a stuck lease simply runs out). With auth off (local development) the field names the
reviewer, as before, and is required.

Double labels (policies/review/double_labels.py): an admin (or anyone with auth off) is an
adjudicator, who may claim and decide an item whose two labels disagree. ``reviewers`` (admin
only) is each reviewer's estimated error rate and flag (policies/reviewer_quality.py).
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
from dataclasses import dataclass
from typing import Any

from PIL import Image

from policies.audit_sampling import estimate
from policies.review_queue import ReviewQueue
from policies.reviewer_quality import ReviewerQuality, reviewer_quality
from policies.runtime import PolicyRuntime
from router.auth.principal import Principal, tenant_scope
from router.config import AppConfig
from router.services.backends import SearchBackend
from router.services.results import (
    AuditEvent,
    AuditLog,
    Claim,
    LabelSet,
    QueueStats,
    Result,
    ReviewItemView,
    ReviewPage,
    ReviewStats,
)
from router.services.review_requests import ClaimRequest, DetectionOut, LabelRequest, ReleaseRequest
from visionroute.errors import InputError, NotFound, PermissionDenied
from visionroute.redaction import shown

log = logging.getLogger("visionroute.service.review")


def reviewer_identity(caller: Principal) -> str:
    """Who a key is in the review queue and its audit log: its name, else its key id."""
    return caller.name or f"key:{caller.key_id}"


def acting_reviewer(caller: Principal | None, requested: str | None) -> str:
    """The reviewer a claim, release or label acts as (see the module docstring)."""
    if caller is None:
        if not requested:
            raise InputError(
                "reviewer is required when authentication is off (with API keys the key names the reviewer)",
                field="reviewer",
            )
        return requested
    identity = reviewer_identity(caller)
    if requested and requested != identity:
        raise PermissionDenied(
            f"this key acts as reviewer {identity!r}; it cannot act as {requested!r}"
            " (leave 'reviewer' out, or send the key's own name)",
            field="reviewer",
        )
    return identity


def is_adjudicator(caller: Principal | None) -> bool:
    """Who may decide an item whose two labels disagree: an admin (anyone with auth off)."""
    return caller is None or caller.role == "admin"


@dataclass(frozen=True)
class ReviewerReport(Result):
    """``GET /v1/review/reviewers``: each reviewer's labels, estimated error rate and flag."""

    limit: float
    double_label_fraction: float
    reviewers: list[ReviewerQuality]

    def to_json(self) -> dict[str, Any]:
        return {
            "limit": self.limit,
            "double_label_fraction": self.double_label_fraction,
            "flagged": [row.reviewer for row in self.reviewers if row.flagged],
            "reviewers": [row.to_dict() for row in self.reviewers],
        }


MAX_LABEL_BOXES = 1000  # far above any detector's answer; a label is stored and echoed whole
CLASS_ID_RANGE = (-1, 2**31 - 1)  # -1: no class id (label_import); the gRPC Detection is int32


def checked_boxes(boxes: list[DetectionOut]) -> None:
    """A reviewer's boxes as every reader can take them back (JSON, gRPC, exports): at most
    MAX_LABEL_BOXES, each with four finite coordinates, a confidence in [0, 1] and a class id
    in CLASS_ID_RANGE; else an InputError naming the box's field."""
    if len(boxes) > MAX_LABEL_BOXES:
        raise InputError(f"at most {MAX_LABEL_BOXES} boxes per label, got {len(boxes)}", field="boxes")
    low, high = CLASS_ID_RANGE
    for n, box in enumerate(boxes):
        if not low <= box.class_id <= high:
            raise InputError(
                f"class_id must be in [{low}, {high}], got {shown(box.class_id)}", field=f"boxes.{n}.class_id"
            )
        if not (math.isfinite(box.confidence) and 0.0 <= box.confidence <= 1.0):
            raise InputError(
                f"confidence must be a number in [0, 1], got {box.confidence}", field=f"boxes.{n}.confidence"
            )
        if len(box.xyxy) != 4 or not all(math.isfinite(v) for v in box.xyxy):
            raise InputError(
                f"xyxy must be four finite numbers (x1, y1, x2, y2), got {shown(box.xyxy)}",
                field=f"boxes.{n}.xyxy",
            )


def label_from(request: LabelRequest, proposed: list[dict[str, Any]]) -> dict[str, Any]:
    """The stored label for a verdict: confirm takes the proposed answer, correct needs one."""
    if request.verdict == "confirm":
        label = {"verdict": "confirm", "label": proposed[0]["label"] if proposed else None, "boxes": proposed}
    elif request.verdict == "correct":
        if request.label is None and request.boxes is None:
            raise InputError("a 'correct' verdict needs 'label' or 'boxes'", field="label")
        checked_boxes(request.boxes or [])
        label = {
            "verdict": "correct",
            "label": request.label,
            "boxes": [b.model_dump() for b in request.boxes] if request.boxes is not None else None,
        }
    else:
        label = {"verdict": "reject", "label": None, "boxes": None}
    if request.note:
        label["note"] = request.note
    return label


class ReviewService:
    def __init__(
        self,
        config: AppConfig,
        *,
        queue: ReviewQueue,
        policies: PolicyRuntime,
        search: SearchBackend | None,
        rollouts: Any = None,  # router.services.rollouts.RolloutService: labels are its evidence
        drift: Any = None,  # router.drift.service.DriftService: verdicts feed its verdict monitor
    ) -> None:
        self.drift = drift
        self.config = config
        self.queue = queue
        self.policies = policies
        self.search = search
        self.rollouts = rollouts

    async def list_items(
        self, caller: Principal | None, status: str | None = "pending", limit: int = 50, offset: int = 0
    ) -> ReviewPage:
        status = None if status == "all" else status

        def read() -> ReviewPage:
            items = self.queue.list_items(
                status=status, tenant=tenant_scope(caller), limit=limit, offset=offset
            )
            stats = QueueStats(**self.queue.stats(tenant=tenant_scope(caller)))
            return ReviewPage([ReviewItemView.from_item(item) for item in items], stats)

        return await asyncio.to_thread(read)

    async def get(self, caller: Principal | None, item_id: str) -> ReviewItemView:
        item = await asyncio.to_thread(self.queue.get, item_id, tenant=tenant_scope(caller))
        return ReviewItemView.from_item(item)

    async def image(self, caller: Principal | None, item_id: str) -> tuple[bytes, str]:
        """(the stored image, its media type); 404 naming the retention policy once purged."""

        def read() -> bytes:
            self.queue.get(item_id, tenant=tenant_scope(caller))  # other tenants' items do not exist
            return self.queue.image(item_id)

        data = await asyncio.to_thread(read)
        image_format = Image.open(io.BytesIO(data)).format or "octet-stream"
        return data, Image.MIME.get(image_format, "application/octet-stream")

    async def audit_log(self, caller: Principal | None, item_id: str) -> AuditLog:
        def read() -> list[dict[str, Any]]:
            self.queue.get(item_id, tenant=tenant_scope(caller))
            return self.queue.audit_log(item_id)

        events = await asyncio.to_thread(read)
        return AuditLog(item_id, [AuditEvent(**event) for event in events])

    async def claim(self, caller: Principal | None, request: ClaimRequest) -> Claim:
        reviewer = acting_reviewer(caller, request.reviewer)
        item = await asyncio.to_thread(
            self.queue.claim,
            reviewer,
            item_id=request.item_id,
            tenant=tenant_scope(caller),
            lease_s=request.lease_s,
            adjudicator=is_adjudicator(caller),
        )
        if item is None:
            return Claim(item=None, lease_token=None)
        return Claim(item=ReviewItemView.from_item(item), lease_token=item.lease_token)

    async def release(
        self, caller: Principal | None, item_id: str, request: ReleaseRequest
    ) -> ReviewItemView:
        reviewer = acting_reviewer(caller, request.reviewer)

        def write() -> ReviewItemView:
            self.queue.get(item_id, tenant=tenant_scope(caller))  # another tenant's item does not exist here
            item = self.queue.release(item_id, reviewer=reviewer, lease_token=request.lease_token)
            return ReviewItemView.from_item(item)

        return await asyncio.to_thread(write)

    async def label(self, caller: Principal | None, item_id: str, request: LabelRequest) -> ReviewItemView:
        reviewer = acting_reviewer(caller, request.reviewer)

        def write():
            item = self.queue.get(item_id, tenant=tenant_scope(caller))
            item = self.queue.submit_label(
                item_id,
                reviewer=reviewer,
                lease_token=request.lease_token,
                label=label_from(request, item.proposed),
                adjudicator=is_adjudicator(caller),
            )
            if (
                item.kind == "audit" and item.status == "labelled"
            ):  # a new audited outcome: refresh the estimate
                self.policies.audit_estimate(self.queue, item.task)
            return item

        item = await asyncio.to_thread(write)
        if (
            self.drift is not None and item.kind != "audit" and item.label and item.status == "labelled"
        ):  # audits: a separate mix
            self.drift.observe_verdict(item.task, item.label["verdict"])
        if self.rollouts is not None:
            try:  # the label is stored either way; a rollout item's label is also the test's evidence
                await self.rollouts.observe_label(item)
            except Exception as exc:
                log.error("label of %s not added to its rollout's evidence: %s", item.id, exc)
        if self.search is not None and self.config.retrieval.index_analysed and item.label:
            try:  # the label is stored either way; the search tags follow when they can
                await asyncio.wait_for(
                    self.search.call("apply_review_label", item.id, item.label, tenant=item.tenant), 30
                )
            except Exception as exc:
                log.warning("review label of %s not copied to the search index: %s", item.id, exc)
        return ReviewItemView.from_item(item)

    async def label_set(self, task: str) -> LabelSet:
        if task not in self.config.cascades:
            raise NotFound(
                f"unknown task {task!r}; expected one of {sorted(self.config.cascades)}", field="task"
            )
        return LabelSet(task, await asyncio.to_thread(self.queue.label_set, task))

    async def stats(self, caller: Principal | None) -> ReviewStats:
        """Depth, leases, SLA and audit estimates: the caller's tenant's (admins and auth off: all)."""
        scope = tenant_scope(caller)

        def read() -> ReviewStats:
            if scope is None:  # the service-wide estimate, which also feeds the audit alerts
                audits = {
                    task: self.policies.audit_estimate(self.queue, task) for task in self.config.cascades
                }
            else:
                config = self.policies.current.audit
                audits = {
                    task: estimate(
                        task, *self.queue.audit_outcomes(task, config.window_items, tenant=scope), config
                    )
                    for task in self.config.cascades
                }
            stats = QueueStats(**self.queue.stats(tenant=scope))
            return ReviewStats(stats, self.policies.current.review.sla_s, audits)

        return await asyncio.to_thread(read)

    async def reviewers(self, caller: Principal | None) -> ReviewerReport:
        """Each reviewer's estimated error rate (admins only: it judges people)."""
        if caller is not None and caller.role != "admin":
            raise PermissionDenied("reviewer error rates are for admins", field="role")
        policy = self.policies.current
        labels = await asyncio.to_thread(self.queue.judged_labels)
        rows = reviewer_quality(
            labels,
            limit=policy.review.reviewer_error_limit,
            alpha=policy.audit.alpha,
            confidence=policy.audit.confidence,
        )
        for row in rows:
            if row.flagged:
                log.warning("reviewer %s flagged: %s", row.reviewer, row.reason)
        return ReviewerReport(policy.review.reviewer_error_limit, policy.review.double_label_fraction, rows)
