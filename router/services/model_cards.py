"""Model cards: what each deployed model and policy set is, where it came from, what it was
certified for and where it is known to fail, generated from what the project already records.

Nothing here is typed in by hand: a card is read from
- the ONNX file and its sidecar (``cascades/models.py``: version, sha256, source package,
  licence, labels, preprocessing), resolved exactly as the serving stage resolves them
  (``cascades.onnx_stage.resolve_settings``: config, else the file, else the sidecar);
- a VLM tier's ``VlmConfig`` and, for a local model directory, its ``visionroute_build.json``;
- calibration artefacts (``cascades.calibration``) with their risk certificate (alpha, delta,
  n, coverage, thresholds);
- the policy set in force (``policies.policy_set.PolicySet``, live from the PolicyRuntime when
  the service passes it);
- ``visionroute eval`` reports (``$VISIONROUTE_HOME/reports/*/report.json``) whose ``models``
  name this model's sha256: metrics by slice and the robustness section. When none does, the
  card says so; it never fills in figures.

Names (stable, URL-safe: characters outside ``[A-Za-z0-9._-]`` become ``-``):
- ``<task>.<model>``: the task's cheap tier; ``<model>`` is the model as configured (a
  prepared name, or the file's stem for a path or ``hf://`` name): ``classify.efficientnet_lite0``;
- ``<task>.candidate.<candidate>``: a rollout candidate tier (``cascades.<task>.candidates``);
- ``<task>.vlm.<served model>``: the task's VLM tier: ``digits.vlm.digits-llava``;
- ``policy-set.<version>``: the policy set in force: ``policy-set.policies-v1``.

A card is a pydantic ``ModelCard`` (JSON) and renders to Markdown (``to_markdown``). Cards are
built on request (a model file may be replaced under a running service); the file facts are
cached by path, size and modification time.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cascades.onnx_stage import OnnxStageConfig
from cascades.vlm.config import VlmConfig
from policies.policy_set import PolicySet
from policies.thresholds import ThresholdPolicy
from router.config import AppConfig, CascadeConfig
from router.services.model_card_facts import (
    calibration_section,
    cheap_tier_facts,
    cheap_tier_limitations,
    evaluation_section,
    vlm_facts,
    vlm_limitations,
)
from router.services.model_card_schema import (
    CardKind,
    EvaluationSection,
    LabelSet,
    ModelCard,
)
from router.services.results import ModelCardEntry
from visionroute import paths
from visionroute.errors import ConfigError, NotFound

__all__ = ["ModelCard", "ModelCards"]

POLICY_SET_PREFIX = "policy-set"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


# --------------------------------------------------------------------------- names


def safe_name(text: str) -> str:
    return _UNSAFE.sub("-", text).strip("-") or "unnamed"


def model_stem(model: str) -> str:
    """``efficientnet_lite0`` -> itself; ``/m/yolo11n.onnx`` and ``hf://o/r/yolo11n.onnx`` -> ``yolo11n``."""
    last = model.removeprefix("hf://").rstrip("/").rsplit("/", 1)[-1]
    return last.removesuffix(".onnx")


def cheap_card_name(task: str, cascade: CascadeConfig) -> str:
    return f"{safe_name(task)}.{safe_name(model_stem(cascade.tier.model))}"


def candidate_card_name(task: str, candidate: str) -> str:
    return f"{safe_name(task)}.candidate.{safe_name(candidate)}"


def vlm_card_name(task: str, vlm: VlmConfig) -> str:
    return f"{safe_name(task)}.vlm.{safe_name(vlm.model)}"


def policy_card_name(policy: PolicySet) -> str:
    return f"{POLICY_SET_PREFIX}.{safe_name(policy.version)}"


# --------------------------------------------------------------------------- the cards


@dataclass(frozen=True)
class _Entry:
    kind: CardKind
    task: str | None
    describes: str  # the model as configured, the served VLM, or the policy set's version
    build: Callable[[], ModelCard]


class ModelCards:
    """The cards of one deployment: built from its ``AppConfig`` (as ``parse_app_config``
    returns it, certified thresholds resolved) and the live policy set when given.

    ``reports_dir``: where ``visionroute eval`` reports are looked up (default
    ``$VISIONROUTE_HOME/reports``, where ``visionroute eval`` writes them).
    """

    def __init__(
        self,
        config: AppConfig,
        policy_provider: Callable[[], PolicySet] | None = None,
        *,
        reports_dir: Path | None = None,
    ) -> None:
        self.config = config
        self.policy_provider = policy_provider
        self.reports_dir = Path(reports_dir) if reports_dir is not None else paths.home() / "reports"

    def policy_set(self) -> PolicySet:
        return self.policy_provider() if self.policy_provider is not None else self.config.policies

    def _entries(self) -> dict[str, _Entry]:
        """Every card by name; names are unique (a clash is a ConfigError)."""
        entries: dict[str, _Entry] = {}

        def add(name: str, entry: _Entry) -> None:
            if name in entries:
                raise ConfigError(
                    f"two model cards would be named {name!r}; rename a task or model so names stay unique",
                    field="cascades",
                )
            entries[name] = entry

        policy = self.policy_set()
        partial = functools.partial
        for task, cascade in self.config.cascades.items():
            name = cheap_card_name(task, cascade)
            build = partial(self._cheap_card, name, task, cascade, policy)
            add(name, _Entry("cheap_tier", task, cascade.tier.model, build))
            for candidate_name, candidate in cascade.candidates.items():
                name = candidate_card_name(task, candidate_name)
                build = partial(self._candidate_card, name, task, cascade, candidate_name, policy)
                add(name, _Entry("candidate_tier", task, candidate.tier.model, build))
            if cascade.vlm is not None:
                name = vlm_card_name(task, cascade.vlm)
                build = partial(self._vlm_card, name, task, cascade.vlm)
                add(name, _Entry("vlm_tier", task, cascade.vlm.model, build))
        name = policy_card_name(policy)
        add(name, _Entry("policy_set", None, policy.version, partial(self._policy_card, name, policy)))
        return entries

    def names(self) -> list[str]:
        return list(self._entries())

    def list(self) -> list[ModelCardEntry]:
        """One line per card: its name, kind, task and what it describes (no file is read)."""
        return [
            ModelCardEntry(
                name=name,
                kind=entry.kind,
                task=entry.task,
                describes=entry.describes,
                card=f"/v1/models/{name}/card",
            )
            for name, entry in self._entries().items()
        ]

    def card(self, name: str) -> ModelCard:
        entries = self._entries()
        if name not in entries:
            raise NotFound(f"no model card named {name!r}; known cards: {list(entries)}", field="name")
        return entries[name].build()

    # -- cheap tier ---------------------------------------------------------------------------

    def _cheap_card(self, name: str, task: str, cascade: CascadeConfig, policy: PolicySet) -> ModelCard:
        thresholds = policy.threshold_policy(task, cascade.policy)
        if task in policy.thresholds:
            threshold_source = f"policy set {policy.version!r} (thresholds.{task})"
        elif cascade.thresholds_from_certificate:
            threshold_source = "the calibration artefact's certificate (thresholds_from_certificate)"
        else:
            threshold_source = f"cascades.{task}.policy"
        certified_in_force = cascade.thresholds_from_certificate and task not in policy.thresholds
        return self._tier_card(
            name,
            "cheap_tier",
            task,
            cascade,
            cascade.tier,
            policy,
            routing={
                "thresholds": thresholds.model_dump(mode="json"),
                "thresholds_source": threshold_source,
                "policy_set": policy.version,
                "placement": cascade.placement,
            },
            thresholds=thresholds,
            certified_in_force=certified_in_force,
            title=f"{model_stem(cascade.tier.model)}: cheap tier of task {task!r}",
        )

    def _candidate_card(
        self, name: str, task: str, cascade: CascadeConfig, candidate_name: str, policy: PolicySet
    ) -> ModelCard:
        candidate = cascade.candidates[candidate_name]
        thresholds = candidate.policy or cascade.policy  # parse_app_config sets it (default: the incumbent's)
        where = f"cascades.{task}.candidates.{candidate_name}"
        return self._tier_card(
            name,
            "candidate_tier",
            task,
            cascade,
            candidate.tier,
            policy,
            routing={
                "thresholds": thresholds.model_dump(mode="json"),
                "thresholds_source": "its calibration artefact's certificate (thresholds_from_certificate)"
                if candidate.thresholds_from_certificate
                else f"{where}.policy (default: the incumbent's cascades.{task}.policy)",
                "incumbent": cheap_card_name(task, cascade),
                "served": "only while a rollout sends it traffic (visionroute rollout; docs/rollouts.md)",
                "placement": candidate.placement,
            },
            thresholds=thresholds,
            certified_in_force=candidate.thresholds_from_certificate,
            title=f"{model_stem(candidate.tier.model)}: rollout candidate {candidate_name!r} of task {task!r}",
        )

    def _tier_card(
        self,
        name: str,
        kind: CardKind,
        task: str,
        cascade: CascadeConfig,
        tier: OnnxStageConfig,
        policy: PolicySet,
        *,
        routing: dict[str, Any],
        thresholds: ThresholdPolicy,
        certified_in_force: bool,
        title: str,
    ) -> ModelCard:
        """A card for one ONNX tier (the incumbent or a rollout candidate)."""
        facts = cheap_tier_facts(tier, Path(self.config.models_dir))
        calibration = calibration_section(tier.calibration) if tier.calibration else None
        routing = {
            **routing,
            "cost_units": tier.cost_units,
            "escalation": f"VLM tier {vlm_card_name(task, cascade.vlm)}"
            if cascade.vlm is not None
            else "no VLM: escalations go to human review",
        }
        evaluation = (
            evaluation_section(
                self.reports_dir, facts.provenance.sha256, calibration.artifact_id if calibration else None
            )
            if facts.provenance.sha256
            else EvaluationSection(status="no model file here to match evaluation reports against")
        )
        guarded = policy.shift_guard.enabled and (
            policy.shift_guard.tasks is None or task in policy.shift_guard.tasks
        )
        limitations = cheap_tier_limitations(
            facts, calibration, thresholds, certified_in_force, shift_guard_on=guarded
        )
        sources = [*facts.sources]
        if calibration is not None:
            sources.append(f"calibration artefact {calibration.path}")
        sources.append(
            f"policy set {policy.version} ({'live' if self.policy_provider else 'from the config'})"
        )
        if evaluation.report:
            sources.append(f"eval report {evaluation.report}")
        return ModelCard(
            name=name,
            kind=kind,
            task=task,
            title=title,
            model=facts.provenance,
            inputs=facts.inputs,
            labels=facts.labels,
            calibration=calibration,
            routing=routing,
            evaluation=evaluation,
            limitations=limitations,
            sources=sources,
        )

    # -- VLM tier -----------------------------------------------------------------------------

    def _vlm_card(self, name: str, task: str, vlm: VlmConfig) -> ModelCard:
        provenance, sources = vlm_facts(vlm)
        calibration = calibration_section(vlm.calibration) if vlm.calibration else None
        accept = vlm.accept_threshold
        accept_source = "vlm.accept_threshold"
        if vlm.accept_threshold_from_certificate and calibration and calibration.certificate:
            tiers = calibration.certificate.three_tier or {}
            accept, accept_source = tiers.get("vlm_accept_threshold", accept), "the certificate (three_tier)"
        routing = {
            "accept_threshold": accept,
            "accept_threshold_source": accept_source,
            "disagreement_margin": vlm.disagreement_margin,
            "policy_version": vlm.policy_version,
            "below_threshold": "human review",
            "cost": {
                "per_1k_prompt_tokens": vlm.cost_per_1k_prompt_tokens,
                "per_1k_completion_tokens": vlm.cost_per_1k_completion_tokens,
            },
        }
        inputs = {
            "task": vlm.task,
            "image_max_side": vlm.image_max_side,
            "image_format": vlm.image_format,
            "max_tokens": vlm.max_tokens,
            "temperature": vlm.temperature,
        }
        labels = (
            LabelSet(count=len(vlm.labels), names=list(vlm.labels), source="config (vlm.labels)")
            if vlm.labels
            else None
        )
        if calibration is not None:
            sources.append(f"calibration artefact {calibration.path}")
        return ModelCard(
            name=name,
            kind="vlm_tier",
            task=task,
            title=f"{vlm.model}: VLM tier of task {task!r}",
            model=provenance,
            inputs=inputs,
            labels=labels,
            calibration=calibration,
            routing=routing,
            evaluation=EvaluationSection(
                status="no evaluation report is linked to a VLM tier: reports name models by file sha256, "
                "which a served VLM has not; figures measured on it are the calibration's fit metrics above"
                if calibration
                else "no evaluation report is linked to a VLM tier, and it has no calibration artefact"
            ),
            limitations=vlm_limitations(vlm, provenance, calibration),
            sources=sources,
        )

    # -- policy set ---------------------------------------------------------------------------

    def _policy_card(self, name: str, policy: PolicySet) -> ModelCard:
        thresholds = {}
        for task, cascade in self.config.cascades.items():
            effective = policy.threshold_policy(task, cascade.policy)
            thresholds[task] = {
                **effective.model_dump(mode="json"),
                "source": "this set (override)" if task in policy.thresholds else f"cascades.{task}.policy",
                "certified": cascade.thresholds_from_certificate and task not in policy.thresholds,
            }
        limitations = [
            f"task {task!r}: thresholds not taken from a certificate; they promise no error rate"
            for task, row in thresholds.items()
            if not row["certified"]
        ]
        if policy.audit.fraction == 0:
            limitations.append(
                "audit sampling is off (audit.fraction 0): accepted answers are not spot-checked"
            )
        if not policy.shift_guard.enabled:
            limitations.append(
                "the shift guard is off: inputs unlike the calibration data are still auto-accepted"
            )
        if not policy.budgets:
            limitations.append("no budgets: spend is not capped")
        return ModelCard(
            name=name,
            kind="policy_set",
            title=f"policy set {policy.version}",
            routing={"thresholds": thresholds},
            policy=policy.model_dump(mode="json", exclude={"thresholds"}),
            limitations=limitations,
            sources=[
                f"policy set {policy.version} ({'live' if self.policy_provider else 'from the config'})"
            ],
        )
