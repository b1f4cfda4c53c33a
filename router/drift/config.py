"""``drift:`` in the app config (``DriftConfig``): pydantic only, so router/config.py imports it
without the monitors' numpy, Pillow and prometheus_client (``check-config`` starts light)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class DriftConfig(BaseModel):
    """``drift:`` in the app config: the per-replica drift monitors (docs/rollouts.md)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="watch confidence, inputs, embeddings and verdicts per task")
    reference_size: int = Field(
        200,
        ge=20,
        le=100_000,
        description="observations in a reference taken from live traffic (the first after start)",
    )
    window_size: int = Field(
        100, ge=20, le=100_000, description="the latest observations each test compares with the reference"
    )
    every: int = Field(25, ge=1, le=100_000, description="test a monitor every this many new observations")
    level: float = Field(
        0.01,
        gt=0.0,
        lt=0.5,
        description="alarm when a window's p-value is below this (false alarms per window)",
    )
    tasks: list[str] | None = Field(None, description="tasks to watch (default: every task)")
    input_fraction: float = Field(
        0.25,
        gt=0.0,
        le=1.0,
        description="share of analysed requests whose image statistics feed the inputs monitor (a random "
        "sample keyed by the request id; its reference and window count sampled requests, so a window spans "
        "about window_size / input_fraction requests); the confidence monitor sees every request",
    )
    embedding_fraction: float = Field(
        0.2,
        ge=0.0,
        le=1.0,
        description="share of requests indexed for search whose embedding feeds the embeddings monitor "
        "(read back from the search tier after the response; 0: off)",
    )
