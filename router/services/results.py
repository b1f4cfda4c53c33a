"""What the service core's operations return: typed results, never bare dicts.

Each operation of router/services/ returns one of these frozen dataclasses, or a pydantic model
where the domain already has one (retrieval's ``SearchResponse`` and ``ItemMetadata``, a
``ModelCard``). The faces translate them, the core never serialises for a protocol:

- HTTP answers ``result.to_json()``: the JSON object the API has always answered, key for key
  and in the same order (tests/integration/golden_responses.json holds it);
- gRPC fills the typed messages of router/grpc/proto/visionroute.proto from the fields
  (router/grpc/messages.py) and, for one release, the deprecated ``*_json`` fields from
  ``to_json()``.

Some values are reports that another layer owns and documents (a trace, a review item's
proposed answer and label, an index's operator statistics, a budget's status, a readiness
check's description): they stay JSON values inside a typed result.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from policies.audit_sampling import AuditEstimate
from policies.review.items import ReviewItem
from policies.rollout_store import Rollout
from retrieval.schemas import ItemMetadata, SearchResponse

__all__ = [
    "AuditEvent",
    "AuditLog",
    "Claim",
    "DeletedSearchItem",
    "ErasureSummary",
    "IndexStats",
    "IndexedSearchItem",
    "LabelSet",
    "ModelCardEntry",
    "PolicyView",
    "QueueStats",
    "Readiness",
    "Result",
    "RetentionRun",
    "RolloutList",
    "RolloutView",
    "ReviewItemView",
    "ReviewPage",
    "ReviewStats",
    "SearchItem",
    "SearchResponse",
]


class Result:
    """A typed result's JSON form (``to_json``): its fields in order, nested results included."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]  (every subclass is a dataclass)


# -- review -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReviewItemView(Result):
    """A review item as a reviewer sees it: every stored field but the lease token (which only
    the claiming reviewer gets, in ``Claim``), and what it is now (age, leased, overdue)."""

    id: str
    request_id: str
    tenant: str
    task: str
    image_sha256: str
    created_at: float
    priority: float
    reason: str
    proposed: list[dict[str, Any]]  # the answer put to the reviewer: detections as the API shows them
    trace: dict[str, Any]  # the request's Trace (visionroute.records), as the analyze answer has it
    status: str
    lease_owner: str | None
    lease_expires_at: float | None
    label: dict[str, Any] | None  # verdict, label, boxes (and a note): router/services/review.label_from
    labelled_by: str | None
    labelled_at: float | None
    kind: str
    sla_due_at: float | None
    image_deleted_at: float | None
    stored_sha256: str | None
    image_withheld: str | None
    original_kept: bool
    audit_source: str | None  # policy | rollout | none (not an audit); None: queued before it was kept
    inclusion_probability: float | None  # the chance the item was queued (1 for a review)
    labels_wanted: int  # 2: labelled by two reviewers (policies/review/double_labels.py)
    needs_adjudication: bool  # its two labels disagree: an admin's label decides
    age_s: float
    is_leased: bool
    is_overdue: bool
    image_available: bool

    @classmethod
    def from_item(cls, item: ReviewItem, now: float | None = None) -> ReviewItemView:
        return cls(**item.public_dict(now))


@dataclass(frozen=True)
class QueueStats(Result):
    """Pending items of the caller's tenant (an admin's: all): depth, oldest age, overdue, leased."""

    depth: int
    oldest_age_s: float
    overdue: int
    leased: int


@dataclass(frozen=True)
class ReviewPage(Result):
    items: list[ReviewItemView]
    stats: QueueStats

    def to_json(self) -> dict[str, Any]:
        return {"items": [item.to_json() for item in self.items], **self.stats.to_json()}


@dataclass(frozen=True)
class AuditEvent(Result):
    """One row of an item's audit log; ``previous_json`` / ``new_json`` as stored (JSON text)."""

    id: int
    item_id: str
    at: float
    actor: str
    action: str
    previous_json: str | None
    new_json: str | None


@dataclass(frozen=True)
class AuditLog(Result):
    item_id: str
    events: list[AuditEvent]


@dataclass(frozen=True)
class Claim(Result):
    """The leased item and its lease token; both None when nothing waits."""

    item: ReviewItemView | None
    lease_token: str | None


@dataclass(frozen=True)
class LabelSet(Result):
    """The labels a task's reviewers may use; None: no fixed set (any label)."""

    task: str
    labels: list[str] | None


@dataclass(frozen=True)
class ReviewStats(Result):
    stats: QueueStats
    sla_s: float
    audit: dict[str, AuditEstimate]  # by task: the accepted-error estimate from audited accepts

    def to_json(self) -> dict[str, Any]:
        return {
            **self.stats.to_json(),
            "sla_s": self.sla_s,
            "audit": {task: estimate.to_dict() for task, estimate in self.audit.items()},
        }


# -- search -------------------------------------------------------------------------------------
# The search index answers across a Ray hop with JSON values (router/services/backends.py); these
# are pydantic so that answer is validated into them, as retrieval's own SearchResponse is.


class SearchItem(BaseModel):
    """One indexed item: its id and metadata."""

    id: int
    metadata: ItemMetadata

    def to_json(self) -> dict[str, Any]:
        return self.model_dump()


@dataclass(frozen=True)
class IndexedSearchItem(Result):
    id: int


@dataclass(frozen=True)
class DeletedSearchItem(Result):
    id: int
    deleted: bool = True


@dataclass(frozen=True)
class IndexStats(Result):
    """The index's figures. For a tenant's key only its own: ``tenant``, ``items``, ``dim``,
    ``space``; for an admin the index's whole operator report (kind, shard, vectors, lag,
    tuning, rebuild, directory; per shard behind several), which retrieval/ owns and documents."""

    items: int
    tenant: str | None
    dim: int | None
    space: str | None
    report: dict[str, Any]  # the index's answer, as sent

    @classmethod
    def from_report(cls, report: dict[str, Any]) -> IndexStats:
        return cls(
            items=int(report.get("items", 0)),
            tenant=report.get("tenant"),
            dim=report.get("dim"),
            space=report.get("space"),
            report=report,
        )

    def to_json(self) -> dict[str, Any]:
        return dict(self.report)


# -- operations ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyView(Result):
    """The policy set in force, its budgets' status and the latest changes."""

    version: str
    policy: dict[str, Any]  # PolicySet.model_dump(mode="json")
    budgets: list[dict[str, Any]]  # policies.budgets.BudgetLedger.status: each rule and its use
    history: list[dict[str, Any]]  # the latest 20 changes (policies.runtime.PolicyRuntime.history)
    replica_pid: int  # lets a test or operator see that a change needed no restart


@dataclass(frozen=True)
class Readiness(Result):
    """Whether the replica can serve, and each check (a tier's description, the index's
    figures, the queue's and the ledger's flags; only ok/not for a caller who is no admin)."""

    ready: bool
    checks: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class RetentionRun(Result):
    """One retention purge: items whose image was deleted, blobs removed, the TTL applied."""

    items: int
    images_deleted: int
    ttl_s: float


@dataclass(frozen=True)
class ErasureSummary(Result):
    """What an erasure removed (router/services/erasure.py). ``selector`` is ``item`` (with
    ``item_id``) or ``subject`` (with ``kind`` and ``subject_sha256``: never the key itself).
    Counts are None for a store that is not deployed."""

    erasure_id: str
    selector: str
    tenant: str
    review_items_erased: int
    images_deleted: int
    other_items_lost_image: int
    search_entries_erased: int | None
    search_log_vectors_zeroed: int | None
    ledger_request_ids_cleared: int | None
    review_item_ids: list[str]
    item_id: str | None = None
    kind: str | None = None
    subject_sha256: str | None = None

    def selector_json(self) -> dict[str, Any]:
        if self.selector == "item":
            return {"selector": "item", "item_id": self.item_id}
        return {"selector": "subject", "kind": self.kind, "subject_sha256": self.subject_sha256}

    def event_json(self, reason: str) -> dict[str, Any]:
        """The ``erasure`` audit event's payload: the selector, the counts and the reason."""
        return {
            **self.selector_json(),
            "tenant": self.tenant,
            "review_items_erased": self.review_items_erased,
            "images_deleted": self.images_deleted,
            "other_items_lost_image": self.other_items_lost_image,
            "search_entries_erased": self.search_entries_erased,
            "search_log_vectors_zeroed": self.search_log_vectors_zeroed,
            "ledger_request_ids_cleared": self.ledger_request_ids_cleared,
            "reason": reason,
        }

    def to_json(self) -> dict[str, Any]:
        counts = self.event_json("")
        del counts["reason"]
        return {"erasure_id": self.erasure_id, **counts, "review_item_ids": list(self.review_item_ids)}


# -- model cards --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelCardEntry(Result):
    """One line of ``GET /v1/models``: a card's name, kind, task, what it describes, its path."""

    name: str
    kind: str
    task: str | None
    describes: str
    card: str


# -- rollouts -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutView(Result):
    """A rollout's status (``start``, ``status``, ``promote|rollback|finish`` answer it): the
    stored rollout (arms, bounds, evidence: policies.rollout_store owns that report), its audit
    log and, for a shadow rollout, the paired shadow summary."""

    rollout: Rollout
    events: list[dict[str, Any]]
    shadow: dict[str, Any] | None = None

    @property
    def id(self) -> str:
        return self.rollout.id

    @property
    def status(self) -> str:
        return self.rollout.status

    def to_json(self) -> dict[str, Any]:
        body = {**self.rollout.to_dict(), "events": self.events}
        if self.shadow is not None:
            body["shadow"] = self.shadow
        return body


@dataclass(frozen=True)
class RolloutList(Result):
    """``GET /v1/rollouts``: the rollouts, newest first."""

    rollouts: tuple[Rollout, ...]

    def to_json(self) -> dict[str, Any]:
        return {"rollouts": [rollout.to_dict() for rollout in self.rollouts]}
