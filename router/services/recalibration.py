"""Recalibration from production labels: a new certified calibration artefact, proposed as a rollout.

One job (``Recalibration.run``; ``visionroute calibrate --from-production``, ``POST
/v1/admin/recalibrations``) for one task, optionally one tenant:

1. takes the job lock (policies/artefact_store.py: a session-level advisory lock on PostgreSQL
   held for the whole job, a lease row on SQLite), so one node runs it;
2. reads the review queue's items of the task (and tenant): audit-sampled accepts with their
   inclusion probabilities and reviewed escalations (``policies.production_certify.
   sample_from_items``). Erased subjects never enter: ``privacy erase`` deletes their items, and
   an item that lost its image because it shared the erased subject's file (``image_erased``
   in its audit log) is left out too;
3. certifies the thresholds on that sample (Horvitz-Thompson betting test, docs/
   recertification.md): one accept threshold, or the three-tier plan when the task has a VLM.
   Too few labels is a refusal saying how many more are needed (``TooFewLabels``); labels that
   show no threshold is safe are a refusal too: never a weaker certificate, never a candidate
   that accepts nothing;
4. checks again that no item it used was erased meanwhile, then writes the artefact to the
   shared store under its sha256, and proposes it as a shadow rollout (``artefact: <sha256>``),
   which the existing sequential test promotes or rolls back.

Every outcome is the job's status (running, succeeded, refused with the reason, failed with the
reason). A database outage fails the job and leaves the running version in place: nothing is
served from an artefact until a rollout names it, and a rollout only starts after the artefact
is stored.

The incumbent is what serves the task now: the configured thresholds, or the artefact a
promoted rollout made the task's incumbent (``incumbent_artefact``; policies/artefact_store.py
``adopt``), which stands in for the configured thresholds it descends from (the same version
root: ``<configured version>+prod-<digest>``) while the tier's model and calibration are the
ones it was certified on. A new job certifies against that incumbent (``parent_version``,
``parent_artefact``).

The calibrator that serves is the incumbent's (its calibrated score is what the traces record and
what the thresholds act on; a monotone refit would not change which items a threshold accepts).
The job refits it from the same labels, weighted by 1 / inclusion probability, and reports the
refit in the artefact and the job's details (``calibrator_report``: weighted ECE and Brier of the
incumbent's score and of the cross-fitted refit, and the accept threshold as P(right)). Asked to
serve it (``serve_calibrator``), the job fits the map on a share of the items chosen by item id
and certifies the thresholds after the map on the rest; the artefact's ``calibrator.served``
chain is then what every arm serving it maps the cheap tier's confidences through
(cascades/served_calibration.py), and the next job reads the items on that chain's scale
(``on_served_scale``). docs/recertification.md, "Serving the refit calibrator".

A task with a learned router gets its router refit from the same labels
(``build_router_artefact``, cascades/router_refit.py: logged features at the router's
feature version, the reference index extended with the fit share, both plans certified on the
certification share). That artefact is proposed like any other: a rollout arm of it scores with
the refit router (router/services/rollouts.py ``router_for``, cascades/arm_router.py), and its
promotion makes the refit router the incumbent's (docs/recertification.md).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import math
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cascades.rollout_router import rollout_router
from cascades.router_refit import RefitRefused, in_fit_share, refit_router
from cascades.served_calibration import ServedCalibration
from policies.artefact_store import ArtefactStore
from policies.production_calibration import MIN_LABELS, refit_calibration
from policies.production_certify import (
    TooFewLabels,
    certify_production,
    certify_production_plan,
    sample_from_items,
)
from policies.reviewer_quality import distrusted_reviewers
from policies.risk_control import TierCosts
from policies.rollout_store import RolloutStore
from policies.sequential import RolloutConfig
from policies.thresholds import ThresholdPolicy, answer_score
from router.config import served_router
from router.services.common import TENANT_PATTERN
from visionroute.errors import BackendUnavailable, ConfigError, Conflict, InputError

log = logging.getLogger("visionroute.recalibration")

ARTEFACT_KIND = "production-recalibration"
PRODUCTION_VERSION = "+prod-"  # <configured thresholds version>+prod-<digest>
ERASURE_ACTIONS = ("erased", "image_erased")
CALIBRATOR_FIT_SHARE = 0.3  # of the window's items, with serve_calibrator: the map; the rest certify


class RecalibrationRequest(BaseModel):
    """``POST /v1/admin/recalibrations`` and ``visionroute calibrate --from-production``."""

    model_config = ConfigDict(extra="forbid")

    task: str
    tenant: str | None = Field(
        None, pattern=TENANT_PATTERN.pattern, description="recertify on this tenant's items only"
    )
    alpha: float = Field(0.05, gt=0.0, lt=1.0, description="accepted-error risk to certify")
    delta: float = Field(0.05, gt=0.0, lt=1.0, description="the certificate's error level")
    propose: bool = Field(True, description="start a shadow rollout of the new artefact")
    shadow_fraction: float = Field(0.1, gt=0.0, le=1.0, description="the rollout's shadow share")
    audit_fraction: float = Field(0.1, gt=0.0, le=1.0, description="the rollout's audit share")
    min_cost_observations: int = Field(30, ge=1, le=1_000_000, description="per arm, before promotion")
    costs: TierCosts = Field(default_factory=TierCosts, description="the three-tier plan's prices")
    serve_calibrator: bool = Field(
        False,
        description="serve the calibrator refit from these labels: fitted on one share of the items, the "
        "thresholds certified after it on the rest (docs/recertification.md); not for a routed task",
    )
    reason: str = Field("", max_length=500)

    @field_validator("costs")
    @classmethod
    def _finite_costs(cls, costs: TierCosts) -> TierCosts:
        # the plan compares expected costs: an infinite price makes every plan equally infinite
        for tier, value in costs.model_dump().items():
            if not math.isfinite(value):
                raise ValueError(f"costs.{tier} must be a finite number, got {value}")
        return costs


def recalibration_request(body: Any) -> RecalibrationRequest:
    if not isinstance(body, dict):
        raise InputError("the body must be a JSON object", field="body")
    try:
        return RecalibrationRequest.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or "body"
        message = f"unknown field {where!r}" if error["type"] == "extra_forbidden" else error["msg"]
        raise InputError(f"{where}: {message}", field=where) from None


class Refused(Exception):
    """The job ends without an artefact; the running version stays. ``reason`` says why."""

    def __init__(self, reason: str, **details: Any) -> None:
        super().__init__(reason)
        self.reason = reason
        self.details = details


@dataclass(frozen=True)
class Built:
    artefact: dict[str, Any]
    item_ids: tuple[str, ...]


def erased_item_ids(queue: Any) -> set[str]:
    """Items an erasure removed or took the image of (the review queue's audit log keeps who did
    what, and when, after the rows are gone)."""
    marks = ", ".join("?" for _ in ERASURE_ACTIONS)
    with queue.database.read() as conn:
        rows = conn.execute(
            f"SELECT DISTINCT item_id FROM audit WHERE action IN ({marks})", ERASURE_ACTIONS
        ).fetchall()
    return {row["item_id"] for row in rows}


def build_artefact(
    items: Iterable[Any],
    *,
    request: RecalibrationRequest,
    incumbent: ThresholdPolicy,
    has_vlm: bool,
    erased: set[str],
    calibration: str | None = None,
    distrusted_reviewers: frozenset[str] = frozenset(),
    model: str | None = None,
    parent_artefact: str | None = None,
    served: ServedCalibration | None = None,
) -> Built:
    """The artefact certified on the task's production items (``ReviewItem``s), or Refused /
    TooFewLabels. Pure: no store is touched. ``served``: the calibration chain the incumbent
    serves (the items' scores are on its scale: ``on_served_scale``); the artefact serves it too,
    followed by the refit when ``request.serve_calibrator``."""
    task, tenant = request.task, request.tenant
    chosen, erased_left_out = _window(items, request, erased)
    served = served or ServedCalibration()
    certified_on, served_refit = chosen, None
    if request.serve_calibrator:
        certified_on, served_refit = _served_refit(chosen, request, incumbent, distrusted_reviewers)
        served = served.then(served_refit[0].scores, served_refit[0].p_correct)
    # a flagged reviewer's label counts as no label (non-response: an error wherever accepted)
    queued = sample_from_items(certified_on, task=task, distrusted_reviewers=distrusted_reviewers)
    sample = queued.sample
    if has_vlm:
        plan = certify_production_plan(sample, costs=request.costs, alpha=request.alpha, delta=request.delta)
        certificate = plan.certificate
        accept, review = plan.accept_threshold, plan.review_threshold
        plan_view = {
            "accept_threshold": accept,
            "review_threshold": review,
            "vlm_accept_threshold": plan.vlm_accept_threshold,
            "expected_cost_units": plan.expected_cost_units,
            "rates": plan.rates,
            "costs": request.costs.model_dump(),
        }
    else:
        certificate = certify_production(sample, alpha=request.alpha, delta=request.delta)
        accept, review, plan_view = certificate.threshold, None, None
    if not certificate.is_feasible:
        raise Refused(
            f"the labels show no threshold keeps the accepted error <= {request.alpha:g} at "
            f"delta={request.delta:g} ({certificate.n} test items): nothing to propose; the running version stays",
            certificate=certificate.to_dict(),
        )
    clip = lambda value: min(1.0, max(0.0, float(value)))  # noqa: E731  (+-inf: the certificate's ends)
    accept_threshold = clip(accept)
    escalate = incumbent.escalate_threshold if review is None else clip(review)
    labels = {
        "sampled_items": len(sample),
        "unlabelled_items": sample.n_unlabelled,
        "left_out": {**queued.left_out, "erased": erased_left_out},
        "distrusted_reviewers": len(distrusted_reviewers),
        "item_ids_sha256": hashlib.sha256("\n".join(sorted(i.id for i in chosen)).encode()).hexdigest(),
        "window": [min(i.created_at for i in chosen), max(i.created_at for i in chosen)],
    }
    body: dict[str, Any] = {
        "kind": ARTEFACT_KIND,
        "task": task,
        "tenant": tenant,
        "created_at": time.time(),
        "alpha": request.alpha,
        "delta": request.delta,
        "parent_version": incumbent.version,
        "parent_artefact": parent_artefact,
        "calibrator": (
            calibrator_report(sample, accept_threshold, calibration=calibration, model=model)
            if served_refit is None
            else served_calibrator_report(
                *served_refit, accept_threshold, calibration=calibration, model=model
            )
        ),
        "certificate": certificate.to_dict(),
        "plan": plan_view,
        "labels": labels,
    }
    if served.maps:  # the scale the thresholds act on: every arm serving the artefact maps to it
        body["calibrator"]["served"] = served.to_document()
    body = _finish_body(
        body,
        incumbent,
        {"accept_threshold": accept_threshold, "escalate_threshold": min(escalate, accept_threshold)},
    )
    return Built(body, tuple(sorted(i.id for i in chosen)))


def _served_refit(
    chosen: list[Any], request: RecalibrationRequest, incumbent: ThresholdPolicy, distrusted: frozenset[str]
) -> tuple[list[Any], tuple[Any, int]]:
    """``serve_calibrator``: the map fitted on the fit share (a coin per item id, independent of
    its label), and the other items rescored through it, on which the thresholds are certified.
    The coin makes the certification items a Bernoulli subsample whatever their labels, and the
    map is fixed before any of their labels is read: the certificate is on a fixed score, as
    served (docs/recertification.md)."""
    salt = f"calibrator:{request.task}"
    fit = [i for i in chosen if in_fit_share(i.id, salt, CALIBRATOR_FIT_SHARE)]
    refit = refit_calibration(
        sample_from_items(fit, task=request.task, distrusted_reviewers=distrusted).sample
    )
    if refit is None:
        more = math.ceil(MIN_LABELS / CALIBRATOR_FIT_SHARE)
        raise TooFewLabels(
            f"serve_calibrator: the calibrator's refit needs at least {MIN_LABELS} labelled cheap answers in "
            f"its fit share ({CALIBRATOR_FIT_SHARE:.0%} of the items, by item id); it has fewer. About {more} "
            "labelled items in all are needed; or recertify without serve_calibrator",
            field="serve_calibrator",
            needed_more=more,
        )
    new_map = ServedCalibration().then(refit.scores, refit.p_correct)
    rest = [
        rescored(i, new_map, incumbent.score)
        for i in chosen
        if not in_fit_share(i.id, salt, CALIBRATOR_FIT_SHARE)
    ]
    return rest, (refit, len(fit))


def served_calibrator_report(
    refit: Any, fit_items: int, accept_threshold: float, *, calibration: str | None, model: str | None
) -> dict[str, Any]:
    """The artefact's ``calibrator`` when it serves the production refit."""
    return {
        "kind": "production_refit",
        "calibration": calibration,
        "model": model,
        "why": "served: the thresholds are certified on the refit's score, on items it was not fitted on",
        "production_refit": {**refit.to_dict(), "served": True, "fit_items": fit_items},
        "statement": (
            f"{refit.statement()}; served (fitted on {fit_items} items, {CALIBRATOR_FIT_SHARE:.0%} by item id): "
            f"the accept threshold {accept_threshold:.4g} is on its score, certified on the other items"
        ),
    }


def rescored(item: Any, maps: ServedCalibration, rule: str) -> Any:
    """``item`` with its ``policy:thresholds`` score as ``maps`` would have served it: the recorded
    confidences (the cheap tier's step, float32 exactly) through the maps, then the score rule."""
    if not maps.maps or not isinstance(item.trace, dict):
        return item
    steps = item.trace.get("steps", [])
    cheap = next(
        (
            s
            for s in steps
            if str(s.get("stage", "")).startswith("onnx:")
            and (s.get("details") or {}).get("confidences") is not None
        ),
        None,
    )
    if cheap is None:
        return item
    score = answer_score(maps.apply(cheap["details"]["confidences"]), rule)
    steps = [{**s, "score": score} if s.get("stage") == "policy:thresholds" else s for s in steps]
    return dataclasses.replace(item, trace={**item.trace, "steps": steps})


def on_served_scale(
    items: Iterable[Any],
    served: ServedCalibration,
    chain_of: Callable[[str], ServedCalibration | None],
    rule: str,
) -> tuple[list[Any], int]:
    """The items with their scores on the scale ``served`` gives (the incumbent's chain): an item
    scored under a prefix of it (the tier's own score, or an earlier artefact's chain) is mapped
    on through the rest, exactly as served; one scored under another chain (a rolled-back
    candidate's canary, ``chain_of(version)`` None: unknown) is left out and counted. Which chain
    scored an item depends on when it came and on its request's arm, never on its label."""
    kept, other = [], 0
    for item in items:
        steps = item.trace.get("steps", []) if isinstance(item.trace, dict) else []
        decided = next((s for s in steps if s.get("stage") == "policy:thresholds"), None)
        if decided is None:
            kept.append(item)  # no score: left out by the sample, counted there
            continue
        chain = chain_of(str(decided.get("policy_version") or ""))
        rest = None if chain is None else served.after(chain)
        if rest is None:
            other += 1
            continue
        kept.append(rescored(item, rest, rule))
    return kept, other


def _window(items: Iterable[Any], request: RecalibrationRequest, erased: set[str]) -> tuple[list[Any], int]:
    """The task's (and tenant's) items, erased ones left out (and counted); Refused when none."""
    task, tenant = request.task, request.tenant
    chosen, erased_left_out = [], 0
    for item in items:
        if item.task != task or (tenant is not None and item.tenant != tenant):
            continue
        if item.id in erased:
            erased_left_out += 1
            continue
        chosen.append(item)
    if not chosen:
        where = f"task {task!r}" + (f", tenant {tenant!r}" if tenant else "")
        raise Refused(f"no review items of {where}: nothing to recertify on; the running version stays")
    return chosen, erased_left_out


def _finish_body(body: dict[str, Any], incumbent: ThresholdPolicy, updates: dict[str, Any]) -> dict[str, Any]:
    """The artefact's version (from the digest of its body) and its thresholds."""
    digest = hashlib.sha256(repr(sorted((k, repr(v)) for k, v in body.items())).encode()).hexdigest()
    version = f"{configured_version(incumbent.version)}{PRODUCTION_VERSION}{digest[:12]}"
    body["thresholds"] = incumbent.model_copy(update={**updates, "version": version}).model_dump(mode="json")
    body["version"] = version
    return body


def build_router_artefact(
    items: Iterable[Any],
    *,
    request: RecalibrationRequest,
    incumbent: ThresholdPolicy,
    router: Any,
    has_vlm: bool,
    erased: set[str],
    embed: Callable[[Any], np.ndarray | None] | None,
    known_versions: Iterable[str] = (),
    distrusted_reviewers: frozenset[str] = frozenset(),
    parent_artefact: str | None = None,
    calibration: str | None = None,
    model: str | None = None,
) -> Built:
    """The artefact of a task served by a learned router (``router``: its ``RouterArtefact``):
    the router refit from the production items and both its plans certified on items the
    refit never saw (cascades/router_refit.py). Refused / TooFewLabels otherwise. Pure:
    no store is touched; ``embed(item)``: the embedding of the image the item was served on."""
    chosen, erased_left_out = _window(items, request, erased)
    try:
        refit = refit_router(
            chosen,
            task=request.task,
            incumbent=router,
            known_versions=known_versions,
            embed=embed,
            alpha=request.alpha,
            delta=request.delta,
            costs=request.costs,
            salt=router.sha256[:16],  # fixed before any label is read
            has_vlm=has_vlm,
            distrusted_reviewers=distrusted_reviewers,
        )
    except RefitRefused as exc:
        raise Refused(exc.reason, **exc.details) from None
    learned = refit.artefact.plans.learned
    labels = {
        **{k: refit.report[k] for k in ("items", "fit_items", "certification_items", "left_out")},
        "left_out": {**refit.report["left_out"], "erased": erased_left_out},
        "distrusted_reviewers": len(distrusted_reviewers),
        "item_ids_sha256": hashlib.sha256("\n".join(sorted(i.id for i in chosen)).encode()).hexdigest(),
        "certification_item_ids_sha256": hashlib.sha256(
            "\n".join(sorted(refit.certification_item_ids)).encode()
        ).hexdigest(),
        "window": [min(i.created_at for i in chosen), max(i.created_at for i in chosen)],
    }
    body: dict[str, Any] = {
        "kind": ARTEFACT_KIND,
        "task": request.task,
        "tenant": request.tenant,
        "created_at": time.time(),
        "alpha": request.alpha,
        "delta": request.delta,
        "parent_version": incumbent.version,
        "parent_artefact": parent_artefact,
        "calibrator": {
            "kind": "incumbent",
            "production_refit": None,
            "statement": "calibrator not refit: the task decides on the learned router's score, refit here",
            # the tier it was certified on: an adopted artefact stands in only while the tier is this
            # one (``why_not_incumbent``), and a calibrated tier's artefact must say so to be adopted
            "calibration": calibration,
            **({"model": model} if model is not None else {}),
        },
        "certificate": learned.document["certificate"],
        "plan": {
            k: learned.document.get(k)
            for k in ("accept_threshold", "review_threshold", "vlm_accept_threshold", "rates")
        },
        "labels": labels,
        "router": {**refit.artefact.to_document(), "sha256": refit.artefact.sha256},
        "router_refit": refit.report,
    }
    # the thresholds stay the incumbent's: they decide only when the router is off
    body = _finish_body(body, incumbent, {})
    used = tuple(sorted(refit.fit_item_ids + refit.certification_item_ids))
    return Built(body, used)


def configured_version(version: str) -> str:
    """The configured thresholds version an artefact's (or any) version descends from."""
    return version.split(PRODUCTION_VERSION, 1)[0]


def why_not_incumbent(body: dict[str, Any], cascade: Any, configured: ThresholdPolicy) -> str | None:
    """Why a stored incumbent artefact no longer stands in for the task's configured thresholds
    (a redeploy changed them, or the tier's model or calibration: its thresholds act on another
    score), or None when it does."""
    version = body.get("version", "")
    if configured_version(version) != configured.version:
        return (
            f"it descends from thresholds {configured_version(version)!r}, but {configured.version!r} are "
            "configured now (a config or policy set naming other thresholds replaces it)"
        )
    calibrator = body.get("calibrator") or {}
    calibration = str(cascade.tier.calibration) if cascade.tier.calibration else None
    if calibrator.get("calibration") != calibration:
        return f"it was certified on calibration {calibrator.get('calibration')!r}, the tier now has {calibration!r}"
    if "model" in calibrator and calibrator["model"] != str(cascade.tier.model):
        return f"it was certified on model {calibrator['model']!r}, the tier now runs {cascade.tier.model!r}"
    return None


def incumbent_artefact(
    artefacts: ArtefactStore, task: str, cascade: Any, configured: ThresholdPolicy
) -> tuple[ThresholdPolicy, str | None]:
    """The thresholds serving ``task`` and the sha256 of the incumbent artefact they come from
    (None: the configured thresholds serve)."""
    row = artefacts.incumbents().get(task)
    if row is None:
        return configured, None
    body = artefacts.get(row["sha256"])
    problem = why_not_incumbent(body, cascade, configured)
    if problem is not None:
        log.warning("incumbent artefact %s of %s is not served: %s", row["sha256"][:12], task, problem)
        return configured, None
    return ThresholdPolicy.model_validate(body["thresholds"]), row["sha256"]


def calibrator_report(
    sample: Any, accept_threshold: float, *, calibration: str | None, model: str | None
) -> dict[str, Any]:
    """The artefact's ``calibrator``: the incumbent's, which serves (its calibrated score is what
    the traces record and what the thresholds act on), and its refit from the same production
    labels weighted by 1 / inclusion probability (policies/production_calibration.py), which
    says how far that score is from a probability in production and what the accept threshold
    means as one. The refit is monotone, so it would accept the same items: it is reported, not
    served (serving it would change the confidences answers carry, a change of the tier)."""
    refit = refit_calibration(sample)
    report: dict[str, Any] = {
        "kind": "incumbent",
        "calibration": calibration,
        "model": model,
        "why": "the thresholds act on the incumbent's calibrated score, as the traces record it",
    }
    if refit is None:
        labelled = int((~np.isnan(sample.cheap_error)).sum())
        report["production_refit"] = None
        report["statement"] = (
            f"calibrator not refit: {labelled} production labels of the cheap tier's answer, "
            f"fewer than {MIN_LABELS}"
        )
        return report
    report["production_refit"] = {
        **refit.to_dict(),
        "accept_threshold_p_correct": refit.p_correct_at(accept_threshold),
        "served": False,
    }
    report["statement"] = (
        f"{refit.statement()}; the accept threshold {accept_threshold:.4g} is P(right) "
        f"{refit.p_correct_at(accept_threshold):.3f} under the refit (reported, not served)"
    )
    return report


class Recalibration:
    """The job, over the stores every replica shares (usable from the service and the CLI)."""

    def __init__(
        self,
        *,
        queue: Any,
        artefacts: ArtefactStore,
        rollouts: RolloutStore,
        cascades: dict[str, Any],
        incumbent_thresholds: Callable[[str], ThresholdPolicy],
        on_proposed: Callable[[], None] | None = None,
        distrusted_reviewers: Callable[[str | None], frozenset[str]] | None = None,
    ) -> None:
        self.queue = queue
        self.artefacts = artefacts
        self.rollouts = rollouts
        self.cascades = cascades
        self.incumbent_thresholds = incumbent_thresholds
        self.on_proposed = on_proposed
        self.distrusted_reviewers = distrusted_reviewers  # tenant -> the flagged reviewers

    def check(self, request: RecalibrationRequest) -> None:
        cascade = self.cascades.get(request.task)
        if cascade is None:
            raise InputError(
                f"unknown task {request.task!r}; expected one of {sorted(self.cascades)}", field="task"
            )
        if request.serve_calibrator and getattr(cascade, "router", None) is not None:
            raise InputError(
                f"serve_calibrator: task {request.task!r} decides on its learned router's score, which the "
                "recalibration refits instead (the router's features read the tier's own confidences)",
                field="serve_calibrator",
            )

    def open_job(self, request: RecalibrationRequest, actor: str) -> str:
        """The job's status row ('running'); StateUnavailable when the database is down."""
        self.check(request)
        return self.artefacts.create_job(task=request.task, tenant=request.tenant, actor=actor)

    def run(self, request: RecalibrationRequest, actor: str, job_id: str | None = None) -> dict[str, Any]:
        """Run the job to its end; returns its status row (never raises for a refusal or an outage
        once the job row exists)."""
        job_id = job_id or self.open_job(request, actor)
        try:
            with self.artefacts.job_lock(self.lock_name(request)):
                outcome = self._outcome(request, actor, job_id)
        except Conflict as exc:
            outcome = ("refused", str(exc), {})
        except Exception as exc:
            outcome = self._failure(job_id, exc)
        return self._finish(request, job_id, *outcome)

    def run_if_due(self, request: RecalibrationRequest, every_s: float) -> dict[str, Any] | None:
        """The scheduled run on one replica: None (nothing done) when another node holds the job's
        lock, when a job of this task and tenant started less than ``every_s`` ago, or while a
        rollout is in effect for the task; else the finished job. A database outage is logged
        and nothing else changes (the running version stays)."""
        try:
            with self.artefacts.job_lock(self.lock_name(request)):
                latest = [
                    j for j in self.artefacts.jobs(request.task, limit=20) if j["tenant"] == request.tenant
                ]
                if latest and time.time() - latest[0]["created_at"] < every_s:
                    return None
                if any(r.task == request.task for r in self.rollouts.in_effect()):
                    log.info("scheduled recalibration of %s waits: a rollout is in effect", request.task)
                    return None
                job_id = self.open_job(request, "scheduler")
                try:
                    outcome = self._outcome(request, "scheduler", job_id)
                except Exception as exc:
                    outcome = self._failure(job_id, exc)
                return self._finish(request, job_id, *outcome)
        except Conflict:
            return None  # another node runs it now
        except (BackendUnavailable, sqlite3.Error) as exc:
            log.warning(
                "scheduled recalibration of %s skipped: the state database failed (%s)", request.task, exc
            )
            return None

    def served_chain(self, sha256: str | None) -> ServedCalibration:
        """The calibration chain artefact ``sha256`` serves (none, or no artefact: the identity)."""
        if sha256 is None:
            return ServedCalibration()
        served = (self.artefacts.get(sha256).get("calibrator") or {}).get("served")
        return ServedCalibration.from_document(served, field="artefact.calibrator.served")

    def chains(self, task: str) -> Callable[[str], ServedCalibration | None]:
        """thresholds version -> the chain that scored a request decided under it: the identity for
        a configured version, the artefact's chain for a production one (None: no such artefact)."""
        versions: dict[str, str] | None = None
        found: dict[str, ServedCalibration | None] = {}

        def chain_of(version: str) -> ServedCalibration | None:
            nonlocal versions
            if PRODUCTION_VERSION not in version:
                return ServedCalibration()
            if version not in found:
                if versions is None:
                    versions = {
                        row["version"]: row["sha256"] for row in self.artefacts.list(task, limit=100_000)
                    }
                sha = versions.get(version)
                found[version] = None if sha is None else self.served_chain(sha)
            return found[version]

        return chain_of

    def _embedder(self, served: Any) -> Callable[[Any], np.ndarray | None] | None:
        """item -> the served embedding of its stored image (None: no image, or not decodable);
        the refit checks it against the logged neighbours before it trusts it."""
        if served.embed is None:
            return None
        from cascades.images import decode_image

        def embed(item: Any) -> np.ndarray | None:
            try:
                return served.embed(decode_image(self.queue.image(item.id)).rgb)
            except Exception as exc:  # gone, withheld, or unreadable: the item has no router score
                log.info("recalibration: no embedding for item %s (%s)", item.id, exc)
                return None

        return embed

    @staticmethod
    def lock_name(request: RecalibrationRequest) -> str:
        return f"{request.task}:{request.tenant or '*'}"

    def _outcome(self, request: RecalibrationRequest, actor: str, job_id: str) -> tuple[str, str, dict]:
        try:
            return self._run_locked(request, actor, job_id)
        except TooFewLabels as exc:
            return "refused", exc.reason, {"needed_more": exc.needed_more}
        except Refused as exc:
            return "refused", exc.reason, exc.details

    @staticmethod
    def _failure(job_id: str, exc: Exception) -> tuple[str, str, dict]:
        if isinstance(exc, (BackendUnavailable, sqlite3.Error)):
            return (
                "failed",
                f"the state database failed during the job ({exc}); the running version stays",
                {},
            )
        log.exception("recalibration job %s failed", job_id)  # a bug must not leave the job 'running'
        return "failed", f"{type(exc).__name__}: {exc}; the running version stays", {}

    def _finish(self, request: RecalibrationRequest, job_id: str, status: str, reason: str, extra: dict):
        log.log(
            logging.INFO if status == "succeeded" else logging.WARNING,
            "recalibration %s of %s: %s (%s)",
            job_id,
            request.task,
            status,
            reason,
        )
        try:
            self.artefacts.finish_job(
                job_id,
                status,
                reason,
                artefact_sha256=extra.pop("artefact_sha256", None),
                rollout_id=extra.pop("rollout_id", None),
                details=extra,
            )
        except Exception as exc:  # the database is still down: the log holds the outcome
            log.error(
                "recalibration job %s ended %s but its status could not be written: %s", job_id, status, exc
            )
            return {"id": job_id, "task": request.task, "status": status, "reason": reason, "details": extra}
        return self.artefacts.job(job_id)

    def _run_locked(self, request: RecalibrationRequest, actor: str, job_id: str):
        cascade = self.cascades[request.task]
        items = list(self.queue.iter_all())
        incumbent, parent_artefact = incumbent_artefact(
            self.artefacts, request.task, cascade, self.incumbent_thresholds(request.task)
        )
        distrusted = (
            frozenset(self.distrusted_reviewers(request.tenant)) if self.distrusted_reviewers else frozenset()
        )
        has_vlm = getattr(cascade, "vlm", None) is not None
        if getattr(cascade, "router", None) is not None:
            served = served_router(request.task, cascade)
            router, known = served.artefact, ()
            parent_router = self.artefacts.get(parent_artefact).get("router") if parent_artefact else None
            if parent_router is not None:  # a promoted refit router serves: refit it, reading both traces
                router, known = rollout_router(parent_router, served).artefact, (served.sha256,)
            built = build_router_artefact(
                items,
                request=request,
                incumbent=incumbent,
                router=router,
                known_versions=known,
                calibration=str(cascade.tier.calibration) if cascade.tier.calibration else None,
                model=str(cascade.tier.model),
                has_vlm=has_vlm,
                erased=erased_item_ids(self.queue),
                embed=self._embedder(served),
                distrusted_reviewers=distrusted,
                parent_artefact=parent_artefact,
            )
        else:
            served = self.served_chain(parent_artefact)
            mine = [i for i in items if i.task == request.task]
            items, other_scale = on_served_scale(mine, served, self.chains(request.task), incumbent.score)
            built = build_artefact(
                items,
                request=request,
                incumbent=incumbent,
                has_vlm=has_vlm,
                erased=erased_item_ids(self.queue),
                calibration=str(cascade.tier.calibration) if cascade.tier.calibration else None,
                model=str(cascade.tier.model),
                parent_artefact=parent_artefact,
                distrusted_reviewers=distrusted,
                served=served,
            )
            built.artefact["labels"]["left_out"]["other_calibration"] = other_scale
        # an erasure may have landed while the job certified: no artefact is built from its items
        late = erased_item_ids(self.queue).intersection(built.item_ids)
        if late:
            raise Refused(
                f"{len(late)} item(s) the job used were erased while it ran; run it again "
                "(they will be left out); the running version stays"
            )
        sha = self.artefacts.put(built.artefact, actor=f"recalibration {job_id} ({actor})")
        extra: dict[str, Any] = {
            "artefact_sha256": sha,
            "version": built.artefact["version"],
            "thresholds": built.artefact["thresholds"],
            "certificate": built.artefact["certificate"]["statement"],
            "calibrator": built.artefact["calibrator"]["statement"],
            "labels": built.artefact["labels"],
        }
        if "router" in built.artefact:
            extra["router"] = built.artefact["router"]["sha256"]
            extra["router_refit"] = built.artefact["router_refit"]
        if not request.propose:
            return "succeeded", f"artefact {sha[:12]} stored (not proposed)", extra
        if request.tenant is not None:  # a rollout acts on every tenant of the task
            return (
                "succeeded",
                f"artefact {sha[:12]} stored; not proposed: it is certified on tenant {request.tenant!r}'s "
                "labels only, and a rollout acts on the whole task",
                extra,
            )
        try:
            rollout = self.rollouts.start(
                task=request.task,
                candidate=None,
                policy=None,
                mode="shadow",
                fraction=request.shadow_fraction,
                sticky_by="request",
                audit_fraction=request.audit_fraction,
                config=RolloutConfig(
                    alpha=request.alpha,
                    delta=request.delta,
                    min_cost_observations=request.min_cost_observations,
                ),
                actor=f"recalibration {job_id} ({actor})",
                reason=request.reason or f"recertified from production labels: artefact {sha[:12]}",
                artefact=sha,
            )
        except Conflict as exc:
            raise Refused(
                f"artefact {sha[:12]} stored, but not proposed: {exc}; start it later with "
                f'POST /v1/rollouts {{"task": "{request.task}", "artefact": "{sha}"}}',
                **extra,
            ) from None
        extra["rollout_id"] = rollout.id
        if self.on_proposed is not None:
            self.on_proposed()
        router = f" (refit router {extra['router'][:12]})" if "router" in extra else ""
        return "succeeded", f"artefact {sha[:12]}{router} proposed as shadow rollout {rollout.id}", extra


class RecalibrationService:
    """The admin API over one replica's stores: start a job (it runs off the request), read it."""

    def __init__(self, job: Recalibration) -> None:
        self.job = job
        self._running: set[asyncio.Task] = set()
        self._schedule: asyncio.Task | None = None

    @classmethod
    def of(cls, service: Any) -> RecalibrationService:
        """The service's recalibration (built on first use from its queue and rollout stores)."""
        existing = getattr(service.rollouts, "recalibration", None)
        if existing is None:
            rollouts = service.rollouts
            policies = rollouts.policies
            existing = cls(
                Recalibration(
                    queue=service.review.queue,
                    artefacts=rollouts.artefacts,
                    rollouts=rollouts.store,
                    cascades=service.config.cascades,
                    incumbent_thresholds=lambda task: policies.thresholds(policies.current, task),
                    on_proposed=lambda: setattr(rollouts, "_read_at", 0.0),
                    distrusted_reviewers=lambda tenant: distrusted_reviewers(
                        service.review.queue, policies.current, tenant=tenant
                    ),
                )
            )
            rollouts.recalibration = existing
        return existing

    async def start(self, actor: str, body: Any) -> dict[str, Any]:
        request = recalibration_request(body)
        job_id = await asyncio.to_thread(self.job.open_job, request, actor)
        task = asyncio.get_running_loop().create_task(asyncio.to_thread(self.job.run, request, actor, job_id))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return await asyncio.to_thread(self.job.artefacts.job, job_id)

    async def status(self, job_id: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.job.artefacts.job, job_id)

    async def list(self, task: str | None = None) -> dict[str, Any]:
        jobs = await asyncio.to_thread(self.job.artefacts.jobs, task)
        return {"jobs": jobs}

    async def drain(self) -> None:
        while self._running:
            await asyncio.gather(*list(self._running), return_exceptions=True)

    # -- the schedule (``recalibration`` in the app config) ----------------------------------

    def start_schedule(self, schedule: Any, cascades: dict[str, Any]) -> bool:
        """Run ``run_if_due`` for each scheduled task every ``schedule.every_s`` on this replica's
        event loop (every replica tries; the lock and the last job's time make one node run
        each due job). False when off or outside an event loop."""
        if schedule is None or schedule.every_s is None:
            return False
        unknown = sorted(set(schedule.tasks) - set(cascades))
        if unknown:
            raise ConfigError(
                f"unknown tasks {unknown}; expected some of {sorted(cascades)}",
                field="rollouts.recalibrate.tasks",
            )
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        tasks = schedule.tasks or list(cascades)  # a routed task's rollout serves its refit router
        requests = [
            RecalibrationRequest(
                task=task,
                alpha=schedule.alpha,
                delta=schedule.delta,
                shadow_fraction=schedule.shadow_fraction,
                audit_fraction=schedule.audit_fraction,
                reason="scheduled recertification from production labels",
            )
            for task in tasks
        ]
        task = loop.create_task(self._scheduled(requests, schedule.every_s), name="visionroute-recalibration")
        # kept (asyncio holds tasks weakly); not drained: it runs until the replica stops
        self._schedule = task
        return True

    async def _scheduled(self, requests: list[RecalibrationRequest], every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            for request in requests:
                try:
                    await asyncio.to_thread(self.job.run_if_due, request, every_s)
                except Exception:  # the schedule outlives any one run
                    log.exception("scheduled recalibration of %s", request.task)
