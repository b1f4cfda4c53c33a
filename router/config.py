"""The one config model: ``serve_config.yaml`` -> ``applications[].args`` -> ``AppConfig``.

Every section forbids unknown keys, so a typo fails at deploy time with the key's name
instead of silently falling back to a default. ``AppConfig()`` with no args is the embedded
default: the packaged classifier and text detector, a local review queue.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cascades.decode_budget import DecodeBudgetConfig
from cascades.images import DEFAULT_FORMATS
from cascades.onnx_stage import OnnxStageConfig
from cascades.vlm.config import VlmConfig
from policies.policy_set import PolicySet
from policies.thresholds import ThresholdPolicy
from retrieval.config import RetrievalConfig
from router.auth.keys import SecurityConfig
from router.drift.config import DriftConfig
from router.url_fetch import UrlFetchConfig
from visionroute import paths
from visionroute.errors import ConfigError
from visionroute.state import StateConfig


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LimitsConfig(Strict):
    max_body_bytes: int = Field(20 << 20, gt=0, description="largest request body accepted")
    max_pixels: int = Field(40_000_000, gt=0, description="largest width*height decoded")
    allowed_formats: list[str] = Field(default_factory=lambda: list(DEFAULT_FORMATS))
    url_fetch: UrlFetchConfig = Field(
        default_factory=UrlFetchConfig, description="image_url: off by default, SSRF-safe"
    )
    decode: DecodeBudgetConfig = Field(
        default_factory=DecodeBudgetConfig,
        description="decoded pixels in flight per replica, and decoding large images at the size the model needs",
    )
    batch_max_images: int = Field(
        32, ge=1, le=1024, description="images per batch request (POST /v1/analyze/batch)"
    )
    batch_max_body_bytes: int = Field(64 << 20, gt=0, description="largest batch request body")
    batch_concurrency: int = Field(8, ge=1, le=256, description="images of one batch analysed at once")
    after_response_max_tasks: int = Field(
        256,
        ge=1,
        description="work spawned after responses (shadow runs...) in flight per replica; more is shed",
    )

    @field_validator("allowed_formats")
    @classmethod
    def _known_formats(cls, value: list[str]) -> list[str]:
        value = [v.upper() for v in value]
        unknown = sorted(set(value) - set(DEFAULT_FORMATS))
        if unknown:
            raise ValueError(f"unknown formats {unknown}; expected some of {list(DEFAULT_FORMATS)}")
        return value


class CandidateConfig(Strict):
    """A candidate cheap tier for ``visionroute rollout``: another model version and/or calibration
    artefact for the task, deployed beside the incumbent (``serve deploy`` adds it in place) and
    served only while a rollout sends it traffic."""

    tier: OnnxStageConfig
    policy: ThresholdPolicy | None = Field(
        None, description="the candidate's thresholds; default: the incumbent's (cascades.<task>.policy)"
    )
    thresholds_from_certificate: bool = Field(
        False, description="take the candidate's thresholds from its own calibration artefact's certificate"
    )
    placement: Literal["deployment", "ingress"] = "deployment"
    replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.25, gt=0)
    max_batch_size: int = Field(8, ge=1, le=256)
    batch_wait_timeout_ms: float = Field(2.0, ge=0, le=1000)

    @model_validator(mode="after")
    def _certified_thresholds(self) -> CandidateConfig:
        if self.thresholds_from_certificate and not self.tier.calibration:
            raise ValueError("thresholds_from_certificate needs tier.calibration")
        return self


class RouterConfig(Strict):
    """A learned router for the task (docs/learned_router.md): its artefact, with the plans
    certified on its score and the confidence-only fallback plan."""

    path: Path = Field(description="a router artefact (cascades.learned_router.RouterArtefact, JSON)")
    cost_units: float | None = Field(
        None,
        ge=0,
        description="the features' price per request, counted in the cheap tier's cost (none: their "
        "measured time over the cheap tier's, times its price; docs/learned_router.md)",
    )
    timeout_ms: float | None = Field(
        None,
        ge=0,
        description="the most the features may take; beyond it the request takes the certified "
        "confidence-only fallback plan (0: every request does; none: no limit)",
    )


class CascadeConfig(Strict):
    """One task: the cheap ONNX tier and the thresholds that route its answers."""

    tier: OnnxStageConfig
    policy: ThresholdPolicy = Field(default_factory=ThresholdPolicy)
    placement: Literal["deployment", "ingress"] = Field(
        "deployment",
        description="deployment: the tier scales on its own (one more hop); ingress: it runs inside each ingress replica",
    )
    replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.25, gt=0)
    max_batch_size: int = Field(8, ge=1, le=256)
    batch_wait_timeout_ms: float = Field(2.0, ge=0, le=1000)
    thresholds_from_certificate: bool = Field(
        False,
        description="take accept (and escalate) thresholds from the calibration artefact's risk certificate",
    )
    vlm: VlmConfig | None = Field(
        None, description="the escalation tier; without it, escalations go to review"
    )
    vlm_replicas: int = Field(1, ge=1)
    vlm_num_cpus: float = Field(0.25, gt=0)
    candidates: dict[str, CandidateConfig] = Field(
        default_factory=dict,
        description="candidate tiers a rollout may send traffic to (docs/rollouts.md); names [a-z0-9_-]",
    )
    router: RouterConfig | None = Field(
        None,
        description="a learned router scoring the cheap answer (none: the thresholds decide on its confidence)",
    )

    @field_validator("candidates")
    @classmethod
    def _candidate_names(cls, value: dict[str, CandidateConfig]) -> dict[str, CandidateConfig]:
        for name in value:
            if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,47}", name):
                raise ValueError(f"candidate name {name!r} must be 1-48 characters from [a-z0-9_-]")
        return value

    @model_validator(mode="after")
    def _certified_thresholds(self) -> CascadeConfig:
        if not self.thresholds_from_certificate:
            return self
        if not self.tier.calibration:
            raise ValueError(
                "thresholds_from_certificate needs tier.calibration (an artefact from `visionroute calibrate`)"
            )
        return self  # the thresholds themselves are resolved once, by resolve_certificates()


def certified_policy(policy: ThresholdPolicy, artefact_path: Path) -> ThresholdPolicy:
    """The policy with the certificate's thresholds; an infeasible certificate accepts nothing."""
    from cascades.calibration import load_calibration

    calibrator = load_calibration(artefact_path)
    certificate = calibrator.certificate
    if certificate is None:
        raise ValueError(f"calibration artefact {str(artefact_path)!r} has no risk certificate")

    def clipped(value: Any) -> float:  # the certificate writes +-inf as strings
        return min(1.0, max(0.0, float(value)))

    three_tier = certificate.get("three_tier") or {}
    if not certificate.get("feasible", True) or certificate.get("threshold") is None:
        accept, escalate = 1.0, min(policy.escalate_threshold, 1.0)
    elif three_tier:
        accept = clipped(three_tier["accept_threshold"])
        escalate = min(clipped(three_tier["review_threshold"]), accept)
    else:
        accept = clipped(certificate["threshold"])
        escalate = min(policy.escalate_threshold, accept)
    return policy.model_copy(
        update={
            "accept_threshold": accept,
            "escalate_threshold": escalate,
            "version": f"{policy.version}+{calibrator.artifact_id}",
        }
    )


class ReviewConfig(Strict):
    path: Path = Field(default_factory=lambda: paths.data_dir() / "review")
    lease_s: float = Field(300.0, gt=0, le=86400)
    retention_interval_s: float = Field(
        3600.0,
        ge=0,
        description="purge review images past policies.review.image_ttl_s this often, inside the service "
        "(router/services/retention.py); 0: never (run `visionroute review purge` yourself)",
    )


def default_cascades() -> dict[str, CascadeConfig]:
    return {
        "classify": CascadeConfig(tier=OnnxStageConfig(model="efficientnet_lite0", cost_units=1.0)),
        "text": CascadeConfig(
            tier=OnnxStageConfig(model="ppocr_det", cost_units=2.0),
            policy=ThresholdPolicy(
                version="text-thresholds-v1", score="min_box", accept_threshold=0.6, escalate_threshold=0.4
            ),
            max_batch_size=1,
        ),
    }


class RecalibrationSchedule(Strict):
    """Recertify from production labels on a schedule and propose the artefact as a shadow rollout
    (router/services/recalibration.py; docs/recertification.md). Off unless ``every_s`` is set."""

    every_s: float | None = Field(None, gt=0, description="how often; every replica tries, one node runs it")
    tasks: list[str] = Field(default_factory=list, description="default: every task without a learned router")
    alpha: float = Field(0.05, gt=0, lt=1)
    delta: float = Field(0.05, gt=0, lt=1)
    shadow_fraction: float = Field(0.1, gt=0, le=1)
    audit_fraction: float = Field(0.1, gt=0, le=1)


class RolloutSettings(Strict):
    """How replicas follow the shared rollout state (policies/rollout_store.py)."""

    refresh_s: float = Field(
        1.0, gt=0, le=60, description="each replica re-reads the rollouts in effect at most this often"
    )
    cost_flush_s: float = Field(
        2.0, gt=0, le=300, description="each replica adds its served requests' costs to the test this often"
    )
    recalibrate: RecalibrationSchedule = Field(default_factory=RecalibrationSchedule)


class AppConfig(Strict):
    models_dir: Path = Field(default_factory=paths.models_dir)
    default_task: str = "classify"
    cascades: dict[str, CascadeConfig] = Field(default_factory=default_cascades)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    review: ReviewConfig = Field(default_factory=ReviewConfig)
    state: StateConfig = Field(
        default_factory=StateConfig,
        description="where the durable stores live: SQLite files (one node) or PostgreSQL (a cluster)",
    )
    policies: PolicySet = Field(
        default_factory=PolicySet,
        description="initial policy set; runtime changes via the Ingress user_config",
    )
    retrieval: RetrievalConfig = Field(
        default_factory=RetrievalConfig, description="visual search (docs/retrieval.md)"
    )
    search_num_cpus: float = Field(0.25, gt=0)
    search_replicas: int = Field(
        1,
        ge=1,
        le=64,
        description="replicas of each search shard (each its own FAISS copy following the store)",
    )
    search_shards: int = Field(
        1, ge=1, le=64, description="shards of the index (each a deployment holding 1/N of the vectors)"
    )
    rollouts: RolloutSettings = Field(default_factory=RolloutSettings)
    drift: DriftConfig = Field(
        default_factory=DriftConfig, description="per-replica drift monitors (docs/rollouts.md)"
    )
    ingress_replicas: int = Field(1, ge=1)
    ingress_num_cpus: float = Field(0.5, gt=0)
    security: SecurityConfig = Field(
        default_factory=SecurityConfig,
        description="API keys, roles, bind policy, review-page sessions, rate limits, lockout",
    )

    @field_validator("models_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        # Resolved in the process that builds the app, so every replica sees the same path.
        return value.expanduser().resolve()

    @model_validator(mode="after")
    def _default_task_exists(self) -> AppConfig:
        if not self.cascades:
            raise ValueError("cascades must name at least one task")
        if self.default_task not in self.cascades:
            raise ValueError(
                f"default_task {self.default_task!r} is not one of the cascades {sorted(self.cascades)}"
            )
        self.review.path = self.review.path.expanduser().resolve()
        self.retrieval.index_dir = self.retrieval.index_dir.expanduser().resolve()
        embedder = self.retrieval.embedder
        if embedder.kind == "conse" and "classifier_path" not in embedder.model_fields_set:
            # The offline embedder uses the prepared classifier wherever models_dir points.
            embedder.classifier_path = self.models_dir / "efficientnet_lite0.onnx"
        return self


def _describe(error: dict[str, Any]) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "args"
    if error["type"] == "extra_forbidden":
        return f"unknown config key {where!r}"
    return f"{where}: {error['msg']}"


def resolve_certificates(config: AppConfig) -> AppConfig:
    """A copy whose certified cascades carry the certificate's thresholds and versions.

    Runs once, in the process that builds the app; replicas receive the resolved object and
    never validate it again, so the version a trace names is the one `check-config` printed.
    """
    cascades = {}
    for task, cascade in config.cascades.items():
        if cascade.thresholds_from_certificate:
            try:
                policy = certified_policy(cascade.policy, Path(cascade.tier.calibration))
            except ValueError as exc:
                raise ConfigError(str(exc), field=f"cascades.{task}.tier.calibration") from None
            cascade = cascade.model_copy(update={"policy": policy})
        candidates = {}
        for name, candidate in cascade.candidates.items():
            base = candidate.policy or cascade.policy
            if candidate.thresholds_from_certificate:
                try:
                    base = certified_policy(base, Path(candidate.tier.calibration))
                except ValueError as exc:
                    raise ConfigError(
                        str(exc), field=f"cascades.{task}.candidates.{name}.tier.calibration"
                    ) from None
            candidates[name] = candidate.model_copy(update={"policy": base})
        cascades[task] = cascade.model_copy(update={"candidates": candidates})
    return config.model_copy(update={"cascades": cascades})


def served_router(task: str, cascade: CascadeConfig) -> Any:
    """The task's learned router, loaded and checked (``cascades.router_stage.ServedRouter``), or
    None without one. A missing or mismatched artefact (labels against the tier's configured
    labels, feature names, the reference index's sha256, the plans) is a ConfigError naming
    ``cascades.<task>.router.<field>``."""
    if cascade.router is None:
        return None
    from cascades.learned_router import RouterArtefact
    from cascades.onnx_stage import read_labels_file
    from cascades.router_stage import ServedRouter

    field = f"cascades.{task}"
    try:
        tier = cascade.tier
        labels = tier.labels
        if labels is None and tier.labels_file is not None:
            labels = read_labels_file(tier.labels_file)
        artefact = RouterArtefact.load(cascade.router.path.expanduser(), class_names=labels)
        timeout_ms = cascade.router.timeout_ms
        return ServedRouter.from_artefact(
            artefact,
            cost_units=cascade.router.cost_units,
            timeout_s=None if timeout_ms is None else timeout_ms / 1000.0,
        )
    except ConfigError as exc:
        where = f"{field}.{exc.field}" if exc.field else f"{field}.router"
        raise ConfigError(f"{field}.{exc.reason}", field=where) from None


def served_routers(config: AppConfig) -> dict[str, Any]:
    """Every task's learned router (tasks without one are absent)."""
    routers = {task: served_router(task, cascade) for task, cascade in config.cascades.items()}
    return {task: router for task, router in routers.items() if router is not None}


def parse_app_config(args: dict[str, Any] | None) -> AppConfig:
    """Validate serve_config args and resolve certified thresholds; errors name every bad key."""
    try:
        config = AppConfig.model_validate(args or {})
    except ValidationError as exc:
        problems = [_describe(e) for e in exc.errors()]
        first_field = ".".join(str(p) for p in exc.errors()[0]["loc"]) or None
        raise ConfigError("invalid VisionRoute config: " + "; ".join(problems), field=first_field) from None
    config = resolve_certificates(config)
    served_routers(config)  # a bad router artefact fails here, at start-up, naming its field
    return config


def resolved_versions(config: AppConfig) -> dict[str, Any]:
    """The versions a deploy of ``config`` stamps on its traces (printed by check-config)."""
    return {
        "policy_set": config.policies.version,
        "thresholds": {
            task: config.policies.threshold_policy(task, cascade.policy).version
            for task, cascade in config.cascades.items()
        },
    }
