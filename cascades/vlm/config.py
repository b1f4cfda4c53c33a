"""``VlmConfig``: everything the VLM tier reads from ``serve_config.yaml``, validated once."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

# The prompt/schema kinds the VLM tier knows (cascades.vlm.prompts.TASKS is keyed by these).
VlmTask = Literal["classify", "verify", "read_text"]


class InProcessEngineConfig(BaseModel):
    """vLLM's engine inside the serving process (GPU deployments; needs the ``vlm-server`` extra)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_path: str = Field(..., min_length=1, description="local dir or hub id of the VLM")
    max_model_len: int = Field(4096, ge=256)
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0)
    max_num_seqs: int = Field(16, ge=1)
    tensor_parallel_size: int = Field(1, ge=1)
    limit_images_per_prompt: int = Field(1, ge=1)
    enforce_eager: bool = False


class VlmConfig(BaseModel):
    """The VLM tier of one cascade: where the model is, how to ask it, and when to trust it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # -- where ------------------------------------------------------------------------------
    backend: Literal["openai", "in_process"] = Field(
        "openai", description="openai: an OpenAI-compatible server (vllm serve); in_process: vLLM engine here"
    )
    endpoint: str = Field("http://127.0.0.1:8100/v1", pattern=r"^https?://", description="base URL incl. /v1")
    model: str = Field("tiny-llava", min_length=1, description="the served model name")
    model_version: str | None = Field(None, description="stamped on each step, e.g. a weights checksum")
    api_key_env: str | None = Field(
        "VISIONROUTE_VLM_API_KEY",
        description="environment variable holding the API key (never the key itself)",
    )
    in_process: InProcessEngineConfig | None = None

    # -- what to ask --------------------------------------------------------------------------
    task: VlmTask = "classify"
    labels: tuple[str, ...] = Field((), description="the label set a classify answer must come from")
    max_tokens: int = Field(64, ge=8, le=4096)
    max_text_chars: int = Field(256, ge=1, description="read_text: longest text the schema allows")
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    image_max_side: int = Field(448, ge=16, description="longer side after downscaling, pixels")
    image_format: Literal["jpeg", "png"] = "jpeg"
    crop_padding: float = Field(0.1, ge=0.0, le=1.0, description="verify: box padding, fraction of box size")

    # -- how hard to try ------------------------------------------------------------------------
    connect_timeout_s: float = Field(2.0, gt=0.0)
    request_timeout_s: float = Field(30.0, gt=0.0, description="one attempt")
    total_timeout_s: float = Field(60.0, gt=0.0, description="all attempts and back-off together")
    max_attempts: int = Field(3, ge=1, le=10)
    backoff_initial_s: float = Field(0.2, gt=0.0)
    backoff_max_s: float = Field(5.0, gt=0.0)
    max_concurrency: int = Field(8, ge=1, description="requests in flight from this process")
    queue_timeout_s: float = Field(10.0, ge=0.0, description="wait for a free slot, then give up")
    breaker_failure_threshold: int = Field(5, ge=1, description="consecutive failed requests that open it")
    breaker_recovery_s: float = Field(30.0, gt=0.0, description="how long it stays open")

    # -- what it costs, when to trust it ------------------------------------------------------
    cost_per_1k_prompt_tokens: float = Field(0.0, ge=0.0)
    cost_per_1k_completion_tokens: float = Field(0.0, ge=0.0)
    policy_version: str = Field("vlm-decision-v1", min_length=1)
    accept_threshold: float = Field(0.5, ge=0.0, le=1.0, description="least answer confidence that accepts")
    calibration: str | None = Field(
        None,
        description="path to a calibration artefact (Platt or isotonic, cascades.calibration.fit_detector, "
        "class names = the answers) applied to the logprob confidence before accept_threshold",
    )
    accept_threshold_from_certificate: bool = Field(
        False,
        description="take the accept threshold from the calibration artefact's three-tier certificate "
        "(three_tier.vlm_accept_threshold) instead of accept_threshold",
    )
    disagreement_margin: float = Field(
        0.3, ge=0.0, le=1.0, description="most the cheap tier may prefer its own answer over the VLM's"
    )

    @field_validator("calibration")
    @classmethod
    def _loadable_calibration(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        from cascades.vlm.calibration import load_vlm_calibrator
        from visionroute.errors import ConfigError

        try:
            load_vlm_calibrator(
                value, task=info.data.get("task", "classify"), labels=info.data.get("labels", ())
            )
        except ConfigError as exc:
            raise ValueError(exc.reason.removeprefix("calibration: ")) from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> VlmConfig:
        if self.accept_threshold_from_certificate:
            if self.calibration is None:
                raise ValueError(
                    "accept_threshold_from_certificate needs calibration (an artefact with a certificate)"
                )
            from cascades.vlm.calibration import certified_accept_threshold, load_vlm_calibrator
            from visionroute.errors import ConfigError

            try:
                calibrator = load_vlm_calibrator(self.calibration, task=self.task, labels=self.labels)
                certified_accept_threshold(calibrator, self.calibration)
            except ConfigError as exc:
                raise ValueError(exc.reason) from None
        if self.task == "classify":
            if len(self.labels) < 2:
                raise ValueError(f"task 'classify' needs at least 2 labels, got {list(self.labels)}")
            if len(set(self.labels)) != len(self.labels) or any(not label.strip() for label in self.labels):
                raise ValueError(f"labels must be unique and non-empty, got {list(self.labels)}")
        if self.total_timeout_s < self.request_timeout_s:
            raise ValueError(
                f"total_timeout_s ({self.total_timeout_s}) must be >= request_timeout_s ({self.request_timeout_s})"
            )
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(
                f"backoff_max_s ({self.backoff_max_s}) must be >= backoff_initial_s ({self.backoff_initial_s})"
            )
        if self.backend == "in_process" and self.in_process is None:
            raise ValueError("backend 'in_process' needs an 'in_process' section (model_path, ...)")
        return self
