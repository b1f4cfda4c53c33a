"""The model card record (JSON through pydantic; ``to_markdown`` for people). Built by
``router.services.model_cards.ModelCards``; schema ``visionroute-model-card/1``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

CARD_SCHEMA = "visionroute-model-card/1"
CardKind = Literal["cheap_tier", "candidate_tier", "vlm_tier", "policy_set"]


class Provenance(BaseModel):
    """What the model is and where it came from."""

    configured: str = Field(description="the model as config names it")
    location: str | None = Field(None, description="file, directory or endpoint")
    status: str = Field(description="present and intact, or what is missing or changed")
    version: str | None = None
    sha256: str | None = Field(None, description="of the model file as it is now")
    sha256_recorded: str | None = Field(None, description="what its sidecar or build manifest recorded")
    source_package: str | None = Field(None, description="the package (==version) the weights come from")
    licence: str | None = None
    description: str | None = None
    details: dict[str, Any] = Field(default_factory=dict, description="build manifest facts, file metadata")


class LabelSet(BaseModel):
    count: int
    names: list[str]
    source: str | None = Field(None, description="config, onnx metadata, sidecar")


class CertificateSummary(BaseModel):
    """The risk certificate of a calibration artefact (policies.risk_control.RiskCertificate)."""

    feasible: bool
    statement: str | None = None
    alpha: float | None = None
    delta: float | None = None
    n: int | None = Field(None, description="calibration items the certificate was computed on")
    coverage: float | None = None
    threshold: float | str | None = Field(None, description='accept threshold; "inf"/"-inf" as written')
    risk_upper_bound: float | None = None
    n_accepted: int | None = None
    n_errors: int | None = None
    method: str | None = None
    p_value_method: str | None = None
    three_tier: dict[str, Any] | None = Field(None, description="accept / review / VLM thresholds, rates")
    split: dict[str, Any] | None = None
    created_at: str | None = None


class CalibrationSection(BaseModel):
    path: str
    error: str | None = Field(None, description="why the artefact could not be read")
    artifact_id: str | None = None
    method: str | None = None
    kind: str | None = None
    created_at: str | None = None
    data_sha256: str | None = None
    n_samples: int | None = None
    fitted_on_model: dict[str, str] = Field(default_factory=dict)
    fit_metrics: dict[str, float] = Field(default_factory=dict)
    has_input_reference: bool = False
    certificate: CertificateSummary | None = None


class EvaluationSection(BaseModel):
    status: str
    report: str | None = None
    created_at: str | None = None
    dataset: dict[str, Any] | None = None
    suite: str | None = Field(None, description="the report's metrics suite for this model")
    calibration_artifact_id: str | None = Field(None, description="the calibration the report used")
    same_calibration: bool | None = Field(
        None,
        description="whether that is the deployed calibration artefact (None: nothing deployed to compare)",
    )
    slices: dict[str, dict[str, float | int | None]] = Field(default_factory=dict)
    certified_risk_check: dict[str, Any] | None = None
    robustness: list[dict[str, Any]] | None = None
    bound_breaks: dict[str, Any] | None = None


class ModelCard(BaseModel):
    schema_: str = Field(CARD_SCHEMA, alias="schema")
    name: str
    kind: CardKind
    task: str | None = None
    title: str
    model: Provenance | None = None
    inputs: dict[str, Any] = Field(default_factory=dict)
    labels: LabelSet | None = None
    calibration: CalibrationSection | None = None
    routing: dict[str, Any] = Field(default_factory=dict)
    policy: dict[str, Any] | None = Field(None, description="policy_set cards: the set's settings")
    evaluation: EvaluationSection | None = None
    limitations: list[str] = Field(default_factory=list)
    sources: list[str] = Field(default_factory=list, description="what the card was read from")

    model_config = ConfigDict(populate_by_name=True)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def to_markdown(self) -> str:
        from router.services.model_card_markdown import render

        return render(self)
