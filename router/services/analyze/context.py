"""One analyse request as its stages see it: the request, who asks, and what each stage adds.

``RequestContext`` is the one record the stages of router/services/analyze/pipeline.py read
and write, in their declared order; ``Stage`` is the contract each of them keeps. The context
is also a ``cascades.pipeline.CascadeState``, so the cascade's own stages run over it unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from policies.runtime import PolicyRuntime

if TYPE_CHECKING:
    from cascades.decode_budget import BudgetSession
    from cascades.image_redaction import StoredImage
    from cascades.images import DecodedImage
    from cascades.pipeline import CheapTier, VlmTier
    from cascades.router_stage import Route
    from policies.policy_set import PolicySet
    from policies.shift_guard import ShiftGuard
    from policies.thresholds import ThresholdPolicy
    from router.auth.principal import Principal
    from router.services.analyze.tier_calls import Lane
    from router.services.rollouts import Arm
    from visionroute.records import Analysis


@dataclass(frozen=True)
class ImageRequest:
    """One analyse request as both faces hand it in."""

    image_bytes: bytes
    request_id: str
    task: str | None = None
    tenant: str | None = None


@dataclass(frozen=True)
class QueueTicket:
    """What goes to the review queue for this request, if anything (``QueueSelectStage``):
    ``review`` (the cascade asks a human), ``budget`` (a budget's degrade mode does), ``audit``
    (a sampled accept, for labels) or ``shadow`` (a rollout's shadow accept). ``reason`` None:
    the kind's own wording."""

    kind: str
    reason: str | None = None
    audit_source: str = "none"  # policy | rollout for a sample (stored with the item)
    inclusion_probability: float = 1.0  # P(queued): the cascade queues every review

    @property
    def is_audit(self) -> bool:
        """Samples for labels: they never change the answer and no budget refuses them."""
        return self.kind in ("audit", "shadow")


@dataclass(eq=False)
class RequestContext:
    """One request, filled in by the stages in their declared order.

    The fields without a default are set by the stage named beside them, and read only by the
    stages after it; ``analysis`` is the shared record the response and the review queue get.
    """

    request: ImageRequest
    caller: Principal | None
    decode_session: BudgetSession | None = None  # this replica's decode budget, held to the answer
    lane: Lane | None = None  # a batch request's image: its cheap-tier call joins the others' (tier_calls.py)
    tenant: str = field(init=False)  # DecodeStage: the tenant the request acts for
    task: str = field(init=False)  # DecodeStage
    decoded: DecodedImage = field(init=False)  # DecodeStage: the pixels, maybe decoded smaller
    analysis: Analysis = field(init=False)  # DecodeStage creates it; every stage after appends
    arm: Arm = field(init=False)  # ArmStage: policy version, cheap tier, thresholds, rollout arm
    vlm: VlmTier | None = None  # ArmStage: the task's VLM (behind the budget guard when called)
    cheap_tier_failed: bool = False  # CheapTierStage
    route: Route | None = None  # RouterScoreStage (a task with a learned router): DecideStage's score
    ticket: QueueTicket | None = None  # QueueSelectStage
    stored: StoredImage | None = None  # PrivacyStage: what the queue may store
    search_id: int | None = None  # SearchIndexStage (durable indexing)
    search_indexed: Any = None  # SearchIndexStage (eventual): a future of after_response.Indexed

    # -- what the request runs under (the arm) --------------------------------------------------

    @property
    def policy(self) -> PolicySet:
        """The policy set in force, one version from start to end of the request."""
        return self.arm.policy

    # -- the cascade's view (cascades.pipeline.CascadeState) ------------------------------------

    @property
    def cheap_tier(self) -> CheapTier:
        tier = self.arm.cheap_tier
        return self.lane.bound(tier) if self.lane is not None else tier.predict

    @property
    def thresholds(self) -> ThresholdPolicy:
        return self.arm.thresholds

    @property
    def shift_guard(self) -> ShiftGuard | None:
        return PolicyRuntime.shift_guard(self.arm.policy, self.task)

    def derived(self, analysis: Analysis, arm: Arm, ticket: QueueTicket | None = None) -> RequestContext:
        """Another analysis of the same request (a rollout's shadow run): same bytes, caller,
        tenant and task; its own record, arm and queue ticket."""
        other = RequestContext(self.request, self.caller, ticket=ticket)
        other.tenant, other.task, other.decoded = self.tenant, self.task, self.decoded
        other.analysis, other.arm = analysis, arm
        return other


class Stage(Protocol):
    """One step of the analyse path: one job, run in the declared order over the context.
    A stage that decides or records something appends its own trace step(s)."""

    name: str

    async def run(self, ctx: RequestContext) -> None: ...


class AfterResponseStage(Stage, Protocol):
    """Work that runs after the response is made, off the request's path (spawned): the
    response never waits for it. ``wants`` says, cheaply, whether this request has any."""

    def wants(self, ctx: RequestContext) -> bool: ...


Spawn = Callable[[Coroutine[Any, Any, None]], None]  # schedules background work (RolloutService.spawn)
