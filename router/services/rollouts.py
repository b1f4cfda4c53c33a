"""Rollouts at run time: which arm serves a request, the shadow runs, the evidence, the admin API.

The durable state (policies/rollout_store.py) is shared by every replica; each replica re-reads
the rollouts in effect at most every ``rollouts.refresh_s`` seconds, so a start, promotion or
rollback made through any replica (or by the sequential test after a label) reaches every
replica that quickly, with no restart and no redeploy.

- **canary**: a sticky share of traffic is *served* by the candidate: the first ``fraction`` of
  hash(rollout id, tenant or request id) space. The trace names the arm.
- **shadow**: the incumbent serves; on a sampled ``fraction`` of requests the candidate also
  runs (after the response is made, off the request's path), its decision, score and cost are
  recorded beside the incumbent's and never served. The shadow runs the candidate's cheap tier
  (through its artefact's served calibration if it carries one), its artefact's refit router if
  it carries one, and its thresholds (no VLM call: an escalation
  is recorded as one, costed at the VLM's reserve units).
- **promoted**: the candidate serves every request of the task until the operator deploys it
  as the incumbent and finishes the rollout. A calibration artefact needs no deploy: at its
  promotion it becomes the task's incumbent in the shared store (``adopt_artefact``) and the
  rollout finishes itself; every replica then serves the artefact's thresholds (and its refit
  router, if it carries one) as the incumbent's, across restarts, and the next recalibration
  certifies against it.

Labels: both arms' accepts are audit-sampled at the rollout's ``audit_fraction`` (a hash of the
request id, so each arm's labelled accepts are a uniform sample of its accepts); a shadow accept
is queued as a ``shadow`` item carrying the candidate's answer. A reviewer's label on such an item
is one observation for its arm (``observe_label``; each item counts once). Each served request's
cost (audits excluded) is one cost observation, flushed in batches every ``cost_flush_s``.

The analyse path meets a rollout twice: at its start, where ``RolloutService.arm`` chooses the
``Arm`` that serves the request (router/services/analyze ``ArmStage``), and after the response,
where the request's evidence is gathered (router/services/analyze/rollout.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import secrets
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cascades.served_calibration import CalibratedTier, ServedCalibration
from policies.artefact_store import ArtefactCorrupted, ArtefactStore
from policies.audit_sampling import is_error, is_sampled
from policies.costs import review_value
from policies.policy_set import PolicySet
from policies.rollout_store import Rollout, RolloutStore
from policies.runtime import PolicyRuntime
from policies.sequential import RolloutConfig
from policies.thresholds import ThresholdPolicy
from router.auth.principal import Principal
from router.config import AppConfig
from router.services.backends import CheapTierClient
from router.services.recalibration import configured_version, why_not_incumbent
from router.services.results import RolloutList, RolloutView
from visionroute.errors import ConfigError, Conflict, InputError, NotFound
from visionroute.records import Analysis, Decision, Step
from visionroute.redaction import shown

log = logging.getLogger("visionroute.rollouts")

ROLLOUT_STAGE = "rollout"


class RolloutRequest(BaseModel):
    """``POST /v1/rollouts`` and ``visionroute rollout start``."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(description="the task whose incumbent the candidate runs beside")
    candidate: str | None = Field(
        None,
        description="a candidate tier declared under cascades.<task>.candidates (a model or calibration)",
    )
    policy: dict[str, Any] | None = Field(
        None, description="a candidate policy set (same schema as /v1/policy)"
    )
    artefact: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="the sha256 of a stored calibration artefact (a recalibration job's, "
        "docs/recertification.md): its certified thresholds, loaded by every replica at run time",
    )
    mode: Literal["shadow", "canary"] = Field(
        "shadow", description="shadow: recorded, never served; canary: served to a share"
    )
    fraction: float = Field(
        0.1, gt=0.0, le=1.0, description="share of requests (shadow) or of tenants/requests (canary)"
    )
    sticky_by: Literal["tenant", "request"] = Field(
        "tenant", description="canary: keep a tenant (or each request id) on one arm"
    )
    audit_fraction: float = Field(
        0.1, gt=0.0, le=1.0, description="share of each arm's accepts sent for audit labels"
    )
    alpha: float = Field(0.05, description="the accepted-error risk the candidate must be shown below")
    delta: float = Field(0.05, description="error level of the sequential test")
    cost_tolerance: float = Field(0.0, ge=0.0, description="promote if mean cost <= incumbent's x (1 + this)")
    min_cost_observations: int = Field(
        30, ge=1, le=1_000_000, description="served requests per arm before promotion"
    )
    reason: str = Field("", max_length=500, description="why (kept in the audit log)")

    @model_validator(mode="after")
    def _something_to_try(self) -> RolloutRequest:
        if self.candidate is None and self.policy is None and self.artefact is None:
            raise ValueError(
                "name a candidate (cascades.<task>.candidates), a candidate policy set or a stored "
                "calibration artefact (its sha256), or several"
            )
        return self


def rollout_request(body: Any) -> RolloutRequest:
    """The parsed body, or an InputError naming the first bad field and why."""
    if not isinstance(body, dict):
        raise InputError("the body must be a JSON object", field="body")
    try:
        return RolloutRequest.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = (
            ".".join(str(part) for part in error["loc"]) or "candidate"
        )  # the model-level check: no candidate, no policy
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = f"unknown field {where!r}"
        raise InputError(f"{where}: {message}", field=where) from None


def _draw(*parts: str) -> float:
    """A uniform [0, 1) draw keyed by the parts: the same everywhere, every time."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


@dataclass(frozen=True)
class ArmChoice:
    """How one request meets the task's rollout (None outside a rollout)."""

    rollout: Rollout
    arm: str  # who serves: incumbent | candidate
    shadow: bool  # the candidate also runs, unserved

    def step(self, policy_version: str | None) -> Step:
        rollout = self.rollout
        reason = (
            "served by the candidate (rollout promoted)"
            if rollout.status == "promoted"
            else f"canary: served by the {self.arm} ({rollout.fraction:.0%} of {rollout.sticky_by}s to the candidate)"
            if rollout.mode == "canary"
            else "shadow: the incumbent serves; the candidate also runs, unserved"
            if self.shadow
            else "shadow: the incumbent serves (this request not sampled for the candidate)"
        )
        return Step(
            stage=ROLLOUT_STAGE,
            reason=reason,
            policy_version=policy_version,
            details={
                "rollout_id": rollout.id,
                "arm": self.arm,
                "mode": rollout.mode,
                "status": rollout.status,
                "candidate": rollout.candidate,
                "candidate_artefact": rollout.artefact,
                "candidate_policy_version": (rollout.policy or {}).get("version"),
                "shadow": self.shadow,
            },
        )


@dataclass(frozen=True)
class Arm:
    """What serves one request: the policy set in force, the cheap tier, its thresholds and its
    price. ``choice`` is the rollout arm (None outside a rollout), chosen once at the start of
    the request (``RolloutService.arm``); the rest of the request reads it from here."""

    policy: PolicySet
    cheap_tier: CheapTierClient
    thresholds: ThresholdPolicy
    cost_units: float  # what one cheap-tier call reserves on the budgets
    choice: ArmChoice | None = None
    # the learned router this arm scores with (cascades.router_stage.ServedRouter): a rollout
    # artefact's refit router, or the adopted incumbent artefact's; None: the configured one
    # (a candidate arm without one is left to its thresholds: cascades/arm_router.py)
    router: Any = None

    def step(self) -> Step | None:
        """The ``rollout`` step naming the rollout and the arm, or None outside a rollout."""
        return self.choice.step(self.policy.version) if self.choice is not None else None

    @property
    def counts_for_drift(self) -> bool:
        """Whether the answer's score is the incumbent's normal (a candidate's is not, until
        it is promoted)."""
        choice = self.choice
        return choice is None or choice.arm != "candidate" or choice.rollout.status == "promoted"

    def audit_sample_reason(self, analysis: Analysis) -> str | None:
        """The rollout's audit sampling of its arm's accepts (on top of the policy's own): the
        review item's reason when this answer is sampled, else None."""
        choice = self.choice
        if not is_arm_audit_sampled(choice, analysis):
            return None
        return f"rollout audit sample ({choice.rollout.audit_fraction:.1%} of the {choice.arm}'s accepts)"


def is_arm_audit_sampled(choice: ArmChoice | None, analysis: Analysis) -> bool:
    """The rollout's audit sampling of an arm's accepts (on top of the policy's own)."""
    return (
        choice is not None
        and choice.rollout.status == "running"
        and analysis.decision is Decision.ACCEPT
        and is_sampled(f"{choice.rollout.id}:{analysis.trace.request_id}", choice.rollout.audit_fraction)
    )


EVIDENCE_KINDS = ("audit", "shadow")  # the queue items whose labels feed a rollout's test


def _uniform_key() -> float:
    """A uniform [0, 1) key from the OS's randomness: independent of the image and its answer."""
    return secrets.randbits(53) / 2.0**53


def queue_priority(
    choice: ArmChoice | None,
    kind: str,
    score: float | None,
    error_cost_units: float,
    *,
    draw: Callable[[], float] = _uniform_key,
) -> float:
    """The review queue's claim priority of a new item (claimed highest first).

    An item that will be a running rollout's evidence (an audit or shadow item of one of its arms)
    gets ``draw() * error_cost_units``: a random key drawn at enqueue, in the range every item's
    value lies in. Any other item gets its value (``policies.costs.review_value``: the least
    confident answer first). Ordered by value, an arm's audits would be labelled worst first, and
    the sequential test, whose confidence sequences assume labels that come in no order related
    to their error, would see a run of errors before the rest (one run rolled back a candidate
    that met alpha after its first 9 labels). Under the random key the order in which an arm's
    labels arrive depends on when items came and on the key alone (docs/rollouts.md)."""
    if kind in EVIDENCE_KINDS and choice is not None and choice.rollout.status == "running":
        return draw() * error_cost_units
    return review_value(score, error_cost_units)


def rollout_step(trace: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The rollout step's details in a stored trace (a review item's), or None."""
    for step in (trace or {}).get("steps", []):
        if step.get("stage") == ROLLOUT_STAGE:
            return step.get("details") or None
    return None


def _artefact_only(rollout: Rollout) -> bool:
    """A rollout of a calibration artefact alone: its promotion needs no deploy."""
    return rollout.artefact is not None and rollout.candidate is None and rollout.policy is None


def rollout_evidence(item: Any) -> tuple[str, str, bool] | None:
    """(rollout id, arm, is the answer wrong) when a labelled item is one observation for a
    rollout arm (an audit or shadow item of a rollout), else None. The queue's labels
    (``RolloutService.observe_label``) and Label Studio imports (``visionroute review
    import-label-studio``) both feed the test through it."""
    if item.kind not in ("audit", "shadow") or not item.label or item.status != "labelled":
        return None
    details = rollout_step(item.trace)
    if details is None:
        return None
    arm = "candidate" if item.kind == "shadow" else details["arm"]
    return details["rollout_id"], arm, is_error(item.label, item.proposed)


class RolloutService:
    def __init__(
        self,
        config: AppConfig,
        store: RolloutStore,
        policies: PolicyRuntime,
        candidate_tiers: Mapping[str, Mapping[str, CheapTierClient]],
    ) -> None:
        self.config = config
        self.store = store
        self.policies = policies
        self.candidate_tiers = {task: dict(tiers) for task, tiers in candidate_tiers.items()}
        self._in_effect: dict[str, Rollout] = {}
        self._read_at = 0.0
        # one lock per event loop: a service core shared by several loops (the gRPC and HTTP test
        # clients each run their own) must not hand one loop's lock to another
        self._refresh_locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._candidate_policies: dict[str, PolicySet] = {}
        self._costs: dict[tuple[str, str], list[float]] = {}
        self._flushed_at = time.monotonic()
        self._background: set[asyncio.Task] = set()
        # Called with the task when this replica first sees its rollout promoted (the drift
        # monitors restart their confidence reference: the candidate's scores are the new normal).
        self.on_promotion: Callable[[str], None] | None = None
        # Calibration artefacts a rollout names (policies/artefact_store.py), opened on first use;
        # their thresholds are loaded (sha256-checked) when the rollout is read, never on a request.
        self._artefacts: ArtefactStore | None = None
        self._artefact_thresholds: dict[str, ThresholdPolicy] = {}
        # sha256 -> the artefact's refit router, loaded and checked against the task's configured
        # router beside its thresholds (absent: the artefact carries no router)
        self._artefact_routers: dict[str, Any] = {}
        # sha256 -> the artefact's served calibration chain (cascades/served_calibration.py), when it
        # carries one; the cheap tier of every arm serving the artefact maps its confidences through it
        self._artefact_calibrations: dict[str, Any] = {}
        self._calibrated_tiers: dict[tuple[int, str], Any] = {}
        self._configured_routers: dict[str, Any] = {}
        # task -> (sha256, thresholds) of the artefact a promoted rollout made its incumbent
        # (read with the rollouts; None before the first read)
        self._incumbents: dict[str, tuple[str, ThresholdPolicy]] | None = None
        self._incumbent_bodies: dict[str, dict[str, Any]] = {}
        self._incumbents_refused: set[str] = set()

    @property
    def artefacts(self) -> ArtefactStore:
        if self._artefacts is None:
            self._artefacts = ArtefactStore(
                self.config.review.path / "artefacts.sqlite3", state=self.config.state
            )
        return self._artefacts

    def artefact_thresholds(self, sha256: str, task: str) -> ThresholdPolicy:
        """The thresholds of a stored artefact of ``task`` (sha256-checked; cached: it never changes)."""
        cached = self._artefact_thresholds.get(sha256)
        if cached is None:
            body = self.artefacts.get(sha256)
            if body.get("task") != task:
                raise InputError(
                    f"calibration artefact {sha256[:12]} is for task {body.get('task')!r}, not {task!r}",
                    field="artefact",
                )
            if body.get("tenant") is not None:  # certified on one tenant's labels: not for the whole task
                raise InputError(
                    f"calibration artefact {sha256[:12]} is certified on tenant {body['tenant']!r}'s labels "
                    "only; a rollout acts on every tenant of the task",
                    field="artefact",
                )
            if body.get("router") is not None:
                try:
                    self._artefact_routers[sha256] = self.artefact_router(body, task)
                except ConfigError as exc:
                    raise InputError(
                        f"calibration artefact {sha256[:12]}: {exc.reason}",
                        field=exc.field or "artefact.router",
                    ) from None
            self._load_calibration(sha256, body)
            cached = self._artefact_thresholds[sha256] = ThresholdPolicy.model_validate(body["thresholds"])
        return cached

    def _load_calibration(self, sha256: str, body: dict[str, Any]) -> None:
        """The artefact's served calibration chain, checked (InputError naming the field)."""
        served = (body.get("calibrator") or {}).get("served")
        if served is None:
            return
        try:
            self._artefact_calibrations[sha256] = ServedCalibration.from_document(
                served, field="artefact.calibrator.served"
            )
        except ConfigError as exc:
            raise InputError(f"calibration artefact {sha256[:12]}: {exc.reason}", field=exc.field) from None

    def calibrated_tier(self, tier: CheapTierClient, sha256: str | None) -> CheapTierClient:
        """``tier`` (the configured one, never an already calibrated one) as an arm serving artefact
        ``sha256`` runs it: through the artefact's served calibration when it carries one. One
        wrapper per tier and artefact, so a batch's calls to it still group into one."""
        base = tier.inner if isinstance(tier, CalibratedTier) else tier
        chain = self._artefact_calibrations.get(sha256) if sha256 is not None else None
        if chain is None:
            return base
        key = (id(base), sha256)
        wrapped = self._calibrated_tiers.get(key)
        if wrapped is None:
            wrapped = self._calibrated_tiers[key] = CalibratedTier(base, chain)
        return wrapped

    def artefact_router(self, body: dict[str, Any], task: str) -> Any:
        """An artefact's refit router (``body["router"]``), checked against the task's configured
        router (labels, feature names and definitions) and loaded for serving; ConfigError
        naming ``artefact.router.<field>`` when it does not fit."""
        from cascades.rollout_router import rollout_router
        from router.config import served_router

        if task not in self._configured_routers:
            self._configured_routers[task] = served_router(task, self.config.cascades[task])
        configured = self._configured_routers[task]
        if configured is None:
            raise ConfigError(
                f"it carries a learned router, but task {task!r} serves none (cascades.{task}.router)",
                field="artefact.router",
            )
        return rollout_router(body["router"], configured, field="artefact.router")

    # -- the incumbent artefacts ----------------------------------------------------------------

    def read_incumbents(self) -> dict[str, tuple[str, ThresholdPolicy]]:
        """task -> (sha256, thresholds) of each task's incumbent artefact that still stands in
        for its configured thresholds (router/services/recalibration.py ``incumbent_artefact``)."""
        found = {}
        for task, row in self.artefacts.incumbents().items():
            cascade, sha = self.config.cascades.get(task), row["sha256"]
            if cascade is None:
                continue
            body = self._incumbent_bodies.get(sha)
            if body is None:
                body = self._incumbent_bodies[sha] = self.artefacts.get(sha)  # sha256-checked, once
            problem = why_not_incumbent(body, cascade, self.policies.thresholds(self.policies.current, task))
            if problem is None and sha not in self._artefact_calibrations:
                try:
                    self._load_calibration(sha, body)
                except InputError as exc:  # never a guess: the configured thresholds serve
                    problem = f"its served calibration is unreadable: {exc.reason}"
            if problem is None and body.get("router") is not None and sha not in self._artefact_routers:
                try:
                    self._artefact_routers[sha] = self.artefact_router(body, task)
                except ConfigError as exc:  # the configured router changed under it: never a guess
                    problem = f"its router does not fit the configured one: {exc.reason}"
            if problem is None:
                found[task] = (sha, ThresholdPolicy.model_validate(body["thresholds"]))
            elif sha not in self._incumbents_refused:
                self._incumbents_refused.add(sha)
                log.error("incumbent artefact %s of %s is not served: %s", sha[:12], task, problem)
        return found

    def incumbent_thresholds(self, policy: PolicySet, task: str) -> ThresholdPolicy:
        """The incumbent's thresholds under ``policy``: its incumbent artefact's where one stands in
        for the thresholds this policy set configures, else the configured ones."""
        configured = self.policies.thresholds(policy, task)
        adopted = (self._incumbents or {}).get(task)
        if adopted is not None and configured_version(adopted[1].version) == configured.version:
            return adopted[1]
        return configured

    def incumbent_artefact(self, task: str, thresholds: ThresholdPolicy) -> str | None:
        """The sha256 of the incumbent artefact that serves (``thresholds`` are its), else None."""
        adopted = (self._incumbents or {}).get(task)
        return adopted[0] if adopted is not None and thresholds is adopted[1] else None

    def incumbent_router(self, task: str, thresholds: ThresholdPolicy) -> Any:
        """The incumbent artefact's refit router where that artefact serves (``thresholds``: what
        ``incumbent_thresholds`` gave), else None (the configured router scores)."""
        adopted = (self._incumbents or {}).get(task)
        if adopted is None or thresholds is not adopted[1]:
            return None
        return self._artefact_routers.get(adopted[0])

    def router_for(self, choice: ArmChoice | None, incumbent: Any, *, candidate: bool = False) -> Any:
        """The router an arm scores with: the rollout artefact's refit router on its candidate arm
        (None there without one: that arm's thresholds decide), else the incumbent's."""
        rollout = choice.rollout if choice is not None else None
        if rollout is None or not (candidate or choice.arm == "candidate"):
            return incumbent
        return self._artefact_routers.get(rollout.artefact) if rollout.artefact is not None else None

    def adopt_artefact(self, rollout: Rollout, actor: str) -> Rollout:
        """A promoted rollout of an artefact alone makes it the task's incumbent in the shared store
        and finishes (nothing to deploy), audited; an artefact beside a model or a policy set
        becomes the incumbent when the operator finishes the rollout after their deploy (until
        then it may still be rolled back). Every replica may call it for the same promotion: the
        second call changes nothing."""
        if rollout.artefact is None:
            return rollout
        if not (rollout.status == "finished" or (rollout.status == "promoted" and _artefact_only(rollout))):
            return rollout
        self.artefacts.adopt(
            rollout.task, rollout.artefact, rollout_id=rollout.id, started_at=rollout.created_at, actor=actor
        )
        self._read_at = 0.0
        log.warning(
            "rollout %s: calibration artefact %s is now the incumbent of %s",
            rollout.id,
            rollout.artefact[:12],
            rollout.task,
        )
        if rollout.status != "promoted":
            return rollout
        try:
            return self.store.decide(
                rollout.id,
                "finish",
                actor=actor,
                reason=f"calibration artefact {rollout.artefact[:12]} is now the task's incumbent "
                "(stored, served by every replica across restarts; nothing to deploy)",
            )
        except Conflict:  # another replica finished it first
            return self.store.get(rollout.id)

    # -- which rollouts are in effect --------------------------------------------------------

    def may_change_arm(self, task: str) -> bool:
        """Whether ``task`` has a rollout in effect or an adopted incumbent artefact, as last
        read (no store read): its arm may serve another model, router or calibration than the
        configured ones (the decode stage then keeps the whole image)."""
        return task in self._in_effect or task in (self._incumbents or {}) or not self._read_at

    async def in_effect(self, task: str) -> Rollout | None:
        if time.monotonic() - self._read_at >= self.config.rollouts.refresh_s:
            loop = asyncio.get_running_loop()
            async with self._refresh_locks.setdefault(loop, asyncio.Lock()):
                if time.monotonic() - self._read_at >= self.config.rollouts.refresh_s:
                    await self.refresh()
        return self._in_effect.get(task)

    async def refresh(self) -> None:
        try:
            rollouts = await asyncio.to_thread(self.store.in_effect)
            unadopted = [r for r in rollouts if r.status == "promoted" and _artefact_only(r)]
            for rollout in unadopted:  # a promotion whose adoption did not happen (the replica stopped)
                await asyncio.to_thread(self.adopt_artefact, rollout, "artefact-adoption")
            if unadopted:
                rollouts = await asyncio.to_thread(self.store.in_effect)
            incumbents = await asyncio.to_thread(self.read_incumbents)
        except Exception as exc:  # the state database is down: keep the last view, retry next time
            log.warning("rollout state could not be read, keeping the last view: %s", exc)
            self._read_at = time.monotonic()
            return
        changed = [
            task
            for task, (sha, _) in incumbents.items()
            if self._incumbents is not None and (self._incumbents.get(task) or ("",))[0] != sha
        ]
        self._incumbents = incumbents
        usable = {}
        for rollout in rollouts:
            if rollout.candidate is not None and rollout.candidate not in self.candidate_tiers.get(
                rollout.task, {}
            ):
                log.error(
                    "rollout %s names candidate %r, which this deployment no longer has: the incumbent serves",
                    rollout.id,
                    rollout.candidate,
                )
                continue
            if rollout.artefact is not None:
                try:
                    await asyncio.to_thread(self.artefact_thresholds, rollout.artefact, rollout.task)
                except Exception as exc:  # gone, corrupted or unreadable: never serve a guess
                    log.error(
                        "rollout %s names calibration artefact %s, which could not be loaded (%s): "
                        "the incumbent serves",
                        rollout.id,
                        rollout.artefact,
                        exc,
                    )
                    continue
            usable[rollout.task] = rollout
        newly_promoted = [
            task
            for task, rollout in usable.items()
            if rollout.status == "promoted"
            and not (
                task in self._in_effect
                and self._in_effect[task].id == rollout.id
                and self._in_effect[task].status == "promoted"
            )
        ]
        self._in_effect, self._read_at = usable, time.monotonic()
        for task in sorted(set(newly_promoted) | set(changed)):
            if self.on_promotion is not None:
                try:
                    self.on_promotion(task)
                except Exception as exc:
                    log.warning("after the promotion on task %s: %s", task, exc)

    def choose(self, rollout: Rollout | None, request_id: str, tenant: str) -> ArmChoice | None:
        if rollout is None:
            return None
        if rollout.status == "promoted":
            return ArmChoice(rollout, "candidate", shadow=False)
        if rollout.mode == "canary":
            key = tenant if rollout.sticky_by == "tenant" else request_id
            arm = "candidate" if _draw(rollout.id, "arm", key) < rollout.fraction else "incumbent"
            return ArmChoice(rollout, arm, shadow=False)
        return ArmChoice(
            rollout, "incumbent", shadow=_draw(rollout.id, "shadow", request_id) < rollout.fraction
        )

    # -- what an arm runs ----------------------------------------------------------------------

    async def arm(self, task: str, incumbent: Arm, request_id: str, tenant: str) -> Arm:
        """The arm that serves this request: the incumbent outside a rollout, else the arm the
        task's rollout chooses (its policy, cheap tier, thresholds and price)."""
        choice = self.choose(await self.in_effect(task), request_id, tenant)
        thresholds = self.incumbent_thresholds(incumbent.policy, task)
        router = self.incumbent_router(task, thresholds)
        tier = self.calibrated_tier(incumbent.cheap_tier, self.incumbent_artefact(task, thresholds))
        if (
            thresholds is not incumbent.thresholds
            or router is not incumbent.router
            or tier is not incumbent.cheap_tier
        ):
            incumbent = dataclasses.replace(incumbent, thresholds=thresholds, router=router, cheap_tier=tier)
        if choice is None:
            return incumbent
        policy = self.policy_for(choice, incumbent.policy)
        cost_units = incumbent.cost_units
        if choice.arm == "candidate" and choice.rollout.candidate is not None:
            cost_units = self.config.cascades[task].candidates[choice.rollout.candidate].tier.cost_units
        return Arm(
            policy,
            self.tier_for(choice, incumbent.cheap_tier),
            self.thresholds_for(choice, policy, task),
            cost_units,
            choice,
            self.router_for(choice, incumbent.router),
        )

    def shadow_arm(self, served: Arm, task: str) -> Arm:
        """The candidate as a shadow-sampled request runs it beside the served incumbent: its
        policy, cheap tier and thresholds (never served, never paid for)."""
        choice = served.choice
        if choice is None:
            raise ValueError("a shadow arm needs the served request's rollout arm; this request has none")
        candidate = ArmChoice(choice.rollout, "candidate", True)
        policy = self.policy_for(candidate, served.policy)
        cost_units = served.cost_units
        if choice.rollout.candidate is not None:
            cost_units = self.config.cascades[task].candidates[choice.rollout.candidate].tier.cost_units
        return Arm(
            policy,
            self.tier_for(choice, served.cheap_tier, candidate=True),
            self.thresholds_for(choice, policy, task, candidate=True),
            cost_units,
            candidate,
            self.router_for(choice, None, candidate=True),
        )

    def policy_for(self, choice: ArmChoice | None, incumbent: PolicySet) -> PolicySet:
        if choice is None or choice.arm == "incumbent" or choice.rollout.policy is None:
            return incumbent
        return self.candidate_policy(choice.rollout)

    def candidate_policy(self, rollout: Rollout) -> PolicySet:
        if rollout.policy is None:
            return self.policies.current
        cached = self._candidate_policies.get(rollout.id)
        if cached is None:
            cached = self._candidate_policies[rollout.id] = self.policies.checked(rollout.policy)
        return cached

    def tier_for(self, choice: ArmChoice | None, incumbent: CheapTierClient, *, candidate: bool = False):
        """The cheap tier an arm runs: the candidate tier on a rollout's candidate arm, and the
        configured one through the rollout artefact's served calibration when it carries one
        (never beside a candidate tier: ``start`` refuses it); else the incumbent's."""
        rollout = choice.rollout if choice is not None else None
        if rollout is None or not (candidate or choice.arm == "candidate"):
            return incumbent
        if rollout.candidate is not None:
            return self.candidate_tiers[rollout.task][rollout.candidate]
        if rollout.artefact is not None:  # its thresholds act on the scale it carries (none: the tier's)
            return self.calibrated_tier(incumbent, rollout.artefact)
        return incumbent

    def thresholds_for(
        self, choice: ArmChoice | None, policy: PolicySet, task: str, *, candidate: bool = False
    ) -> ThresholdPolicy:
        rollout = choice.rollout if choice is not None else None
        if rollout is not None and rollout.artefact is not None and (candidate or choice.arm == "candidate"):
            return self._artefact_thresholds[rollout.artefact]  # loaded by refresh() before it is in effect
        if rollout is None or rollout.candidate is None or not (candidate or choice.arm == "candidate"):
            return self.incumbent_thresholds(policy, task)
        base = self.config.cascades[task].candidates[rollout.candidate].policy
        return policy.threshold_policy(task, base or self.policies.base_thresholds[task])

    # -- evidence ------------------------------------------------------------------------------

    def note_cost(self, choice: ArmChoice | None, arm: str, cost: float) -> None:
        """One served request's cost for an arm; flushed to the shared test in batches."""
        if choice is None or choice.rollout.status != "running":
            return
        total = self._costs.setdefault((choice.rollout.id, arm), [0.0, 0])
        total[0] += float(cost)
        total[1] += 1
        if time.monotonic() - self._flushed_at >= self.config.rollouts.cost_flush_s:
            self.spawn(self.flush_costs())

    async def flush_costs(self) -> None:
        self._flushed_at = time.monotonic()
        pending, self._costs = self._costs, {}
        for (rollout_id, arm), (total, count) in pending.items():
            try:
                rollout = await asyncio.to_thread(
                    self.store.observe, rollout_id, arm, cost_total=total, cost_count=int(count)
                )
                await asyncio.to_thread(self.adopt_artefact, rollout, "sequential-test")
            except NotFound:
                continue
            except Exception as exc:  # costs are point estimates: a lost batch only delays the test
                log.warning("rollout %s: %d cost observations not recorded: %s", rollout_id, count, exc)
        self._read_at = 0.0  # a flush may have decided the rollout: re-read before the next request

    async def observe_label(self, item: Any) -> None:
        """A reviewer's label on an audit or shadow item of a rollout arm: one observation."""
        evidence = rollout_evidence(item)
        if evidence is None:
            return
        rollout_id, arm, wrong = evidence
        rollout = await asyncio.to_thread(
            self.store.observe, rollout_id, arm, is_error=wrong, item_id=item.id
        )
        if rollout.status in ("promoted", "rolled_back"):
            self._read_at = 0.0
            rollout = await asyncio.to_thread(self.adopt_artefact, rollout, "sequential-test")
        log.info(
            "rollout %s: label on %s item %s (%s): %s",
            rollout.id,
            arm,
            item.id,
            "wrong" if wrong else "right",
            rollout.monitor.reason,
        )

    def spawn(self, coroutine) -> None:
        """Background work that must not be garbage-collected half-way (asyncio keeps weak refs)."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Wait for the shadow runs and flushes started so far (tests, shutdown)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
        await self.flush_costs()

    # -- metrics -------------------------------------------------------------------------------

    def collect(self):
        """Prometheus families for the rollouts this replica serves (registered on /metrics):
        which rollout is in effect, and each arm's labels, errors and risk bounds."""
        from prometheus_client.core import GaugeMetricFamily

        info = GaugeMetricFamily(
            "visionroute_rollout_in_effect",
            "1 for each rollout in effect (running or promoted) as this replica last read it",
            labels=["task", "rollout", "mode", "status", "candidate"],
        )
        labelled = GaugeMetricFamily(
            "visionroute_rollout_labels", "audit labels of each arm so far", labels=["task", "rollout", "arm"]
        )
        errors = GaugeMetricFamily(
            "visionroute_rollout_errors",
            "labelled accepts that were wrong",
            labels=["task", "rollout", "arm"],
        )
        bounds = GaugeMetricFamily(
            "visionroute_rollout_risk_bound",
            "the anytime-valid confidence sequence of each arm's accepted-error risk",
            labels=["task", "rollout", "arm", "side"],
        )
        for task, rollout in sorted(self._in_effect.items()):
            info.add_metric([task, rollout.id, rollout.mode, rollout.status, rollout.candidate or ""], 1.0)
            for arm, state in rollout.monitor.arms.items():
                labelled.add_metric([task, rollout.id, arm], float(state.cs.labelled))
                errors.add_metric([task, rollout.id, arm], float(state.cs.errors))
                bounds.add_metric([task, rollout.id, arm, "lower"], float(state.cs.lower))
                bounds.add_metric([task, rollout.id, arm, "upper"], float(state.cs.upper))
        return [info, labelled, errors, bounds]

    # -- the admin API -------------------------------------------------------------------------

    async def start(self, caller: Principal | None, body: Any) -> RolloutView:
        request = rollout_request(body)
        cascade = self.config.cascades.get(request.task)
        if cascade is None:
            raise InputError(
                f"unknown task {shown(request.task)}; expected one of {sorted(self.config.cascades)}",
                field="task",
            )
        if request.candidate is not None and request.candidate not in cascade.candidates:
            declared = sorted(cascade.candidates) or "none"
            raise InputError(
                f"task {request.task!r} has no candidate {shown(request.candidate)} (declared under "
                f"cascades.{request.task}.candidates: {declared}); add it to the config and `serve deploy` first",
                field="candidate",
            )
        if request.candidate is not None and request.candidate not in self.candidate_tiers.get(
            request.task, {}
        ):
            raise InputError(
                f"candidate {request.candidate!r} is declared but not deployed in this replica",
                field="candidate",
            )
        if request.artefact is not None:
            try:
                await asyncio.to_thread(self.artefact_thresholds, request.artefact, request.task)
            except NotFound:
                raise InputError(
                    f"no stored calibration artefact {request.artefact[:12]}... (see GET /v1/admin/recalibrations)",
                    field="artefact",
                ) from None
            except ArtefactCorrupted as exc:
                raise InputError(str(exc), field="artefact") from None
            if request.candidate is not None and request.artefact in self._artefact_calibrations:
                raise InputError(
                    f"calibration artefact {request.artefact[:12]} serves a calibrator refit on the task's tier; "
                    f"it cannot serve beside candidate tier {request.candidate!r} (roll it out alone)",
                    field="artefact",
                )
            if request.candidate is not None and request.artefact in self._artefact_routers:
                raise InputError(
                    f"calibration artefact {request.artefact[:12]} carries a router refit on the task's tier; "
                    f"it cannot serve beside candidate tier {request.candidate!r} (roll it out alone)",
                    field="artefact",
                )
        policy = None
        if request.policy is not None:
            try:
                policy = self.policies.checked(request.policy)
            except ConfigError as exc:
                raise InputError(
                    f"policy: {exc.reason}", field=f"policy.{exc.field}" if exc.field else "policy"
                ) from None
            if policy.version == self.policies.current.version:
                raise InputError(
                    f"the candidate policy set has the running set's version {policy.version!r}; give it its own",
                    field="policy.version",
                )
        try:
            config = RolloutConfig(
                alpha=request.alpha,
                delta=request.delta,
                cost_tolerance=request.cost_tolerance,
                min_cost_observations=request.min_cost_observations,
            )
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"])
            raise InputError(f"{where}: {error['msg']}", field=where) from None
        rollout = await asyncio.to_thread(
            self.store.start,
            task=request.task,
            candidate=request.candidate,
            policy=policy.model_dump(mode="json") if policy is not None else None,
            mode=request.mode,
            fraction=request.fraction,
            sticky_by=request.sticky_by,
            audit_fraction=request.audit_fraction,
            config=config,
            actor=actor_of(caller),
            reason=request.reason or "started",
            artefact=request.artefact,
        )
        self._read_at = 0.0
        log.info("rollout %s started by %s: %s", rollout.id, actor_of(caller), rollout.to_dict()["serving"])
        return await self.status(rollout.id)

    async def status(self, rollout_id: str) -> RolloutView:
        rollout = await asyncio.to_thread(self.store.get, rollout_id)
        events = await asyncio.to_thread(self.store.events, rollout_id)
        shadow = None
        if rollout.mode == "shadow":
            shadow = await asyncio.to_thread(self.store.shadow_summary, rollout_id)
        return RolloutView(rollout, events, shadow)

    async def list(self, task: str | None = None) -> RolloutList:
        if task is not None and task not in self.config.cascades:
            raise InputError(
                f"unknown task {shown(task)}; expected one of {sorted(self.config.cascades)}", field="task"
            )
        rollouts = await asyncio.to_thread(self.store.list, task)
        return RolloutList(tuple(rollouts))

    async def decide(self, caller: Principal | None, rollout_id: str, action: str, body: Any) -> RolloutView:
        reason = ""
        if body is not None:
            if not isinstance(body, dict) or set(body) - {"reason"}:
                raise InputError('the body must be {"reason": "..."} or empty', field="body")
            reason = body.get("reason") or ""
            if not isinstance(reason, str) or len(reason) > 500:
                raise InputError("reason must be text of at most 500 characters", field="reason")
        await self.flush_costs()
        rollout = await asyncio.to_thread(
            self.store.decide,
            rollout_id,
            action,
            actor=actor_of(caller),
            reason=reason or f"{action} by an operator",
        )
        self._read_at = 0.0
        log.warning(
            "rollout %s: %s by %s (%s)", rollout.id, action, actor_of(caller), reason or "no reason given"
        )
        rollout = await asyncio.to_thread(self.adopt_artefact, rollout, actor_of(caller))
        return await self.status(rollout.id)


def actor_of(caller: Principal | None) -> str:
    """Who acts, for the audit log: the key's name and tenant (auth off: the local operator)."""
    if caller is None:
        return "local-operator (auth off)"
    return f"{caller.name or caller.key_id}@{caller.tenant}"
