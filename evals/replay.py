"""Score a routing policy on production traces before shipping it.

Input: a JSONL file, one ``Trace.to_dict()`` per line, with the ground truth either inline
(``"ground_truth": "cat"``) or in a labels file mapping request ids to labels (CSV with columns
``request_id,label`` or a JSON object). Optional ``"metadata": {...}`` on a line feeds slices.

From each trace we take the cheap tier's step (stage ``onnx:*``): its answer, its per-row
confidences (``details.confidences``) and whether it failed; the policy step
(``policy:thresholds``): its decision and whether a VLM was available (``details.vlm_available``);
and, when the item was escalated then, the VLM's step (stage ``vlm*``) and its answer. An answer
is read from ``step.details["label"]`` (or the first of ``details["labels"]`` /
``details["detections"]`` when those are lists of labels or detection dicts).

The candidate policy is replayed through ``policies.thresholds.decide``, the rule production
runs, so replaying the live policy on its own traces reproduces every live decision: the score
is recomputed from the recorded confidences under the candidate's score rule (top1, min_box,
mean_box), an answer with no boxes follows the candidate's ``empty_result``, an escalation
becomes review where no VLM was available, and a failed cheap tier is reviewed.

Traces written before the confidences were recorded are replayed on the recorded score (the
live score rule's), counted in ``recorded_score_only``; an unknown VLM availability counts as
available. An item the candidate would escalate but that never reached the VLM in production
has no recorded VLM answer: it is counted in ``unscorable`` rather than guessed.

``replay_router`` scores a new learned router on the same traces: the ``router`` step logs the
served router's feature vector (names and values), so the candidate's learner rescores it and
the candidate's certified plans decide (``policies.thresholds.decide`` again; after an
escalation, the plan's VLM accept threshold against the logged VLM confidence). An item whose
features were not logged (no router, or the served one fell back) or lack a feature the
candidate uses is decided as the service would then decide: the candidate's fallback plan on
the calibrated top-1 confidence (counted in ``router.fallback``). Neighbour features are only
the candidate's own when it keeps the logged reference index (same sha256); otherwise the
logged ones stand in for them and the items are counted in ``router.other_reference_index``.
The report puts the new decisions beside the logged ones (``router.transitions``).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from evals.slicing import MISSING
from policies.thresholds import ThresholdPolicy, answer_score, decide
from visionroute.errors import InputError
from visionroute.records import Decision, Step, Trace


@dataclass(frozen=True)
class ReplayItem:
    request_id: str
    cheap_score: float | None  # as recorded, under the live score rule
    cheap_label: str | None
    vlm_label: str | None
    recorded_decision: str | None  # the trace's final decision
    recorded_cost_units: float
    ground_truth: str | None
    metadata: dict[str, Any]
    # What re-deciding needs (absent from traces written before they were recorded):
    cheap_confidences: tuple[float, ...] | None = None  # every row's confidence; () for no rows
    cheap_detections: int | None = None  # the number of rows the cheap tier answered with
    cheap_failed: bool = False  # no cheap step, or it failed: nothing to accept
    cheap_calibrated: bool = False  # words the reason only
    vlm_available: bool | None = None  # None: the trace does not say
    recorded_policy_decision: str | None = None  # what the live rule decided (before any VLM)
    recorded_policy: dict[str, Any] = field(default_factory=dict)  # score_rule, empty_result
    # The learned router's step, where one ran (cascades/router_stage.py):
    router_features: dict[str, float] | None = None  # None: no router, or it fell back
    router_version: str | None = None
    router_index_sha256: str | None = None
    vlm_score: float | None = None  # the logged VLM step's confidence (None: no valid answer)


def _answer(details: dict[str, Any]) -> str | None:
    if details.get("label") is not None:
        return str(details["label"])
    for key in ("labels", "detections"):
        value = details.get(key)
        if isinstance(value, list) and value:
            first = value[0]
            return str(first.get("label")) if isinstance(first, dict) else str(first)
    return None


def load_labels(path: Path) -> dict[str, str]:
    path = Path(path)
    if path.suffix == ".json":
        return {str(k): str(v) for k, v in json.loads(path.read_text()).items()}
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"request_id", "label"} <= set(reader.fieldnames):
            raise InputError(
                f"labels file {str(path)!r} needs columns request_id,label; found {reader.fieldnames}",
                field="labels",
            )
        return {row["request_id"]: row["label"] for row in reader}


def _vlm_available(policy: Step | None, steps: tuple[Step, ...]) -> bool | None:
    """Recorded since the policy step carries it; inferred for older traces where possible."""
    if policy is not None and isinstance(policy.details.get("vlm_available"), bool):
        return policy.details["vlm_available"]
    if any(s.stage.startswith("vlm") for s in steps):
        return True
    if policy is not None and policy.decision is Decision.ESCALATE:
        return True
    if policy is not None and "no VLM is configured" in policy.reason:
        return False
    return None


def _item(trace: Trace, data: dict[str, Any], labels: dict[str, str] | None) -> ReplayItem:
    steps = trace.steps
    cheap = next((s for s in steps if s.stage.startswith("onnx")), None)
    policy = next((s for s in steps if s.stage == "policy:thresholds"), None)
    vlm = next((s for s in steps if s.stage.startswith("vlm") and s.error is None), None)
    router = next((s for s in steps if s.stage == "router"), None)
    router_details = router.details if router is not None else {}
    router_features = router_details.get("features") if router is not None and router.error is None else None
    truth = data.get("ground_truth")
    if truth is None and labels is not None:
        truth = labels.get(trace.request_id)
    failed = cheap is None or cheap.error is not None
    details = cheap.details if cheap is not None else {}
    confidences = details.get("confidences")
    count = details.get("detections")
    if policy is not None:
        recorded_policy = policy.decision
    elif cheap is not None and cheap.error is not None:
        recorded_policy = cheap.decision  # the failed cheap step decided (review)
    else:
        recorded_policy = None
    return ReplayItem(
        request_id=trace.request_id,
        cheap_score=None if failed else cheap.score,
        cheap_label=_answer(details),
        vlm_label=_answer(vlm.details) if vlm is not None else None,
        recorded_decision=trace.decision.value if trace.decision else None,
        recorded_cost_units=trace.cost_units,
        ground_truth=None if truth is None else str(truth),
        metadata=dict(data.get("metadata") or {}),
        cheap_confidences=None if failed or confidences is None else tuple(float(c) for c in confidences),
        cheap_detections=count if isinstance(count, int) else None,
        cheap_failed=failed,
        cheap_calibrated=bool(details.get("is_calibrated", details.get("calibration") is not None)),
        vlm_available=_vlm_available(policy, steps),
        recorded_policy_decision=recorded_policy.value if recorded_policy is not None else None,
        recorded_policy={
            k: policy.details[k]
            for k in ("score_rule", "empty_result")
            if policy is not None and k in policy.details
        },
        router_features=dict(router_features) if isinstance(router_features, dict) else None,
        router_version=router_details.get("version"),
        router_index_sha256=router_details.get("reference_index_sha256"),
        vlm_score=vlm.score if vlm is not None else None,
    )


def read_traces(path: Path, labels: dict[str, str] | None = None) -> list[ReplayItem]:
    items = []
    with Path(path).open() as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                items.append(_item(Trace.from_dict(data), data, labels))
            except (ValueError, TypeError, AttributeError) as exc:
                raise InputError(
                    f"{path}:{line_no} is not a Trace.to_dict() JSON line: {exc}", field="traces"
                ) from exc
    return items


def replay_decision(
    item: ReplayItem, policy: ThresholdPolicy, *, vlm_available: bool | None = None
) -> tuple[Decision, str]:
    """What ``policy`` decides for this recorded item: production's rule on the recorded facts.

    ``vlm_available``: None reads it from the trace (unknown counts as available).
    """
    if vlm_available is None:
        vlm_available = item.vlm_available is not False
    if item.cheap_failed:
        return decide(None, policy, vlm_available=vlm_available, cheap_tier_failed=True)
    if item.cheap_confidences is not None:
        score = answer_score(item.cheap_confidences, policy.score)
    elif item.cheap_score is None and item.cheap_detections != 0:
        # an older item with no score that is not known to be an empty answer: nothing to accept
        return decide(None, policy, vlm_available=vlm_available, cheap_tier_failed=True)
    else:
        score = item.cheap_score  # older trace: the live rule's score (None: no detections)
    return decide(score, policy, vlm_available=vlm_available, is_calibrated=item.cheap_calibrated)


def _checked(fields: dict[str, Any]) -> ThresholdPolicy:
    try:
        return ThresholdPolicy(**fields)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'policy'}: {e['msg']}" for e in exc.errors())
        raise InputError(f"not a valid candidate policy: {problems}", field="policy") from exc


def _candidate(
    policy: ThresholdPolicy | None, accept_threshold: float | None, escalate_threshold: float | None
) -> tuple[dict[str, Any], Callable[[ReplayItem], ThresholdPolicy]]:
    """How the candidate is reported, and the policy to replay each item under.

    The keyword form means these thresholds with the score and empty-result rules each trace
    records (the ``ThresholdPolicy`` defaults where it records none)."""
    keywords = (accept_threshold, escalate_threshold)
    if policy is not None:
        if keywords != (None, None):
            raise InputError(
                "give either a policy or accept_threshold/escalate_threshold, not both", field="policy"
            )
        return policy.model_dump(), lambda _item: policy
    if None in keywords:
        raise InputError(
            "replay needs a ThresholdPolicy or both accept_threshold and escalate_threshold", field="policy"
        )
    base = _checked(
        {
            "version": "replay-candidate",
            "accept_threshold": accept_threshold,
            "escalate_threshold": escalate_threshold,
        }
    ).model_dump()
    cache: dict[tuple[Any, Any], ThresholdPolicy] = {}

    def for_item(item: ReplayItem) -> ThresholdPolicy:
        key = (item.recorded_policy.get("score_rule"), item.recorded_policy.get("empty_result"))
        if key not in cache:
            rules = {k: v for k, v in zip(("score", "empty_result"), key) if v is not None}
            cache[key] = _checked(base | rules)
        return cache[key]

    described = {
        "accept_threshold": accept_threshold,
        "escalate_threshold": escalate_threshold,
        "score": "as recorded",
        "empty_result": "as recorded",
    }
    return described, for_item


def replay(
    items: Iterable[ReplayItem],
    policy: ThresholdPolicy | None = None,
    *,
    accept_threshold: float | None = None,
    escalate_threshold: float | None = None,
    vlm_available: bool | None = None,
    cheap_cost: float = 1.0,
    vlm_cost: float = 10.0,
    review_cost: float = 100.0,
    slice_keys: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The candidate policy's decisions, accepted error, coverage and cost, overall and per slice.

    The candidate is a ``ThresholdPolicy`` (thresholds, score rule, empty-result rule), or just
    ``accept_threshold``/``escalate_threshold`` with the other rules as each trace recorded them.
    ``vlm_available``: None reads it from each trace; True / False replays as if a VLM were
    (not) configured. ``changed_decisions`` counts items whose candidate decision differs from
    the live policy's recorded one (0 when replaying the live policy).
    """
    described, policy_for = _candidate(policy, accept_threshold, escalate_threshold)
    described["vlm_available"] = "as recorded" if vlm_available is None else vlm_available

    rows = []
    for item in items:
        decision = replay_decision(item, policy_for(item), vlm_available=vlm_available)[0].value
        rows.append(_row(item, decision, None, cheap_cost, vlm_cost, review_cost))
    return {"policy": described, "slices": _slices(rows, slice_keys)}


@dataclass(frozen=True)
class _Row:
    item: ReplayItem
    decision: str  # the routing decision after the cheap tier: accept / escalate / review
    scorable: bool
    auto: bool  # answered without a human (the cheap answer, or an accepted VLM answer)
    wrong: bool
    cost: float


def _row(
    item: ReplayItem,
    decision: str,
    vlm_accept: float | None,
    cheap_cost: float,
    vlm_cost: float,
    review_cost: float,
) -> _Row:
    """One item under a decision; ``vlm_accept``: the VLM accept threshold an escalation's
    logged confidence must reach (None: every VLM answer is accepted, as ``replay`` counts)."""
    vlm_rejected = (
        decision == "escalate"
        and vlm_accept is not None
        and item.vlm_label is not None
        and (item.vlm_score is None or item.vlm_score < vlm_accept)
    )
    answer = item.cheap_label if decision == "accept" else item.vlm_label if decision == "escalate" else None
    auto = decision != "review" and not vlm_rejected
    scorable = item.ground_truth is not None and (not auto or answer is not None)
    wrong = auto and scorable and answer != item.ground_truth
    cost = (
        cheap_cost
        + (vlm_cost if decision == "escalate" else 0.0)
        + (review_cost if decision == "review" or vlm_rejected else 0.0)
    )
    return _Row(item, decision, scorable, auto, wrong, cost)


def _slices(rows: list[_Row], slice_keys: tuple[str, ...]) -> dict[str, Any]:
    def summarise(selected: list[_Row]) -> dict[str, Any]:
        n = len(selected)
        auto = [r for r in selected if r.auto and r.scorable]
        recorded = [
            r for r in selected if r.item.ground_truth is not None and r.item.recorded_decision == "accept"
        ]
        return {
            "n": n,
            "rates": {
                d: sum(r.decision == d for r in selected) / n if n else 0.0
                for d in ("accept", "escalate", "review")
            },
            "unscorable": sum(not r.scorable for r in selected),
            "auto_accepted_scored": len(auto),
            "accepted_error": sum(r.wrong for r in auto) / len(auto) if auto else 0.0,
            "accuracy": 1.0
            - (sum(r.wrong for r in selected if r.scorable) / max(1, sum(r.scorable for r in selected))),
            "cost_units_per_item": float(np.mean([r.cost for r in selected])) if n else 0.0,
            "recorded_cost_units_per_item": float(np.mean([r.item.recorded_cost_units for r in selected]))
            if n
            else 0.0,
            "recorded_accepted": len(recorded),
            "changed_decisions": sum(
                r.item.recorded_policy_decision is not None and r.decision != r.item.recorded_policy_decision
                for r in selected
            ),
            "recorded_score_only": sum(
                not r.item.cheap_failed and r.item.cheap_confidences is None for r in selected
            ),
        }

    out = {"all": summarise(rows)}
    for key in slice_keys:
        values = sorted({str(r.item.metadata.get(key, MISSING)) for r in rows})
        for value in values:
            out[f"{key}={value}"] = summarise(
                [r for r in rows if str(r.item.metadata.get(key, MISSING)) == value]
            )
    return out


def router_decision(
    item: ReplayItem, artefact: Any, *, vlm_available: bool | None = None
) -> tuple[Decision, str, str]:
    """What the candidate router (``cascades.learned_router.RouterArtefact`` with plans) decides
    for this logged item, and how: ``learned`` (its score on the logged features), ``fallback``
    (its fallback plan on the calibrated top-1 confidence), or ``failed`` (no cheap answer)."""
    if vlm_available is None:
        vlm_available = item.vlm_available is not False
    plans = artefact.plans
    if item.cheap_failed:
        decision, reason = decide(None, plans.fallback, vlm_available=vlm_available, cheap_tier_failed=True)
        return decision, reason, "failed"
    names = artefact.spec.names
    features = item.router_features
    if features is not None and all(name in features for name in names):
        score = float(artefact.learner.score(np.array([[float(features[name]) for name in names]]))[0])
        decision, reason = decide(score, plans.learned, vlm_available=vlm_available, is_calibrated=True)
        return decision, f"router {reason}", "learned"
    if item.cheap_confidences is not None:
        score = answer_score(item.cheap_confidences, "top1")
    else:
        score = item.cheap_score
    decision, reason = decide(
        score, plans.fallback, vlm_available=vlm_available, is_calibrated=item.cheap_calibrated
    )
    return decision, reason, "fallback"


def replay_router(
    items: Iterable[ReplayItem],
    artefact: Any,
    *,
    vlm_available: bool | None = None,
    cheap_cost: float = 1.0,
    vlm_cost: float = 10.0,
    review_cost: float = 100.0,
    slice_keys: tuple[str, ...] = (),
) -> dict[str, Any]:
    """A candidate learned router (its artefact, with certified plans) on logged traces: its
    decisions, accepted error, coverage and cost as ``replay`` reports them, and beside the
    logged decisions (module docstring)."""
    from cascades.router_stage import vlm_accept_threshold

    if getattr(artefact, "plans", None) is None:
        raise InputError("the candidate router has no certified plans (certify_router_plans)", field="router")
    items = list(items)
    index_sha = None if artefact.index is None else artefact.index.sha256
    rows, how_counts, transitions = [], {"learned": 0, "fallback": 0, "failed": 0}, {}
    other_index, missing = 0, set()
    for item in items:
        decision, _, how = router_decision(item, artefact, vlm_available=vlm_available)
        how_counts[how] += 1
        if how == "learned" and artefact.spec.neighbours_k > 0 and item.router_index_sha256 != index_sha:
            other_index += 1
        if how == "fallback" and item.router_features is not None:
            missing |= set(artefact.spec.names) - set(item.router_features)
        plan = artefact.plans.learned if how == "learned" else artefact.plans.fallback
        rows.append(_row(item, decision.value, vlm_accept_threshold(plan), cheap_cost, vlm_cost, review_cost))
        old = item.recorded_policy_decision or "none"
        key = f"{old}->{decision.value}"
        transitions[key] = transitions.get(key, 0) + 1
    logged = sorted({item.router_version for item in items if item.router_version})
    return {
        "router": {
            "candidate": artefact.sha256,
            "logged_versions": logged,
            "decided_by": how_counts,
            "missing_features": sorted(missing),
            "other_reference_index": other_index,
            "transitions": dict(sorted(transitions.items())),
            "changed_decisions": sum(
                n for key, n in transitions.items() if key.split("->")[0] != key.split("->")[1]
            ),
        },
        "slices": _slices(rows, slice_keys),
    }
