"""The review requests the core takes from both faces: claim, release and label an item.

They live beside the review service (router/services/review.py), as the rollout and
recalibration requests live beside theirs; the HTTP face reads them as bodies, the gRPC face
builds them from its messages. ``DetectionOut`` is here because a label's corrected boxes are
one; the HTTP analyse response (router/schemas.py) uses it too. Pydantic only."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class DetectionOut(BaseModel):
    label: str | None
    class_id: int
    confidence: float
    xyxy: list[float]


REVIEWER_DESCRIPTION = (
    "who acts. With API keys the key is the reviewer (its name, or key:<key id> when it has none):"
    " leave this out or send that name; another name is 403. Without keys (local development) it"
    " is required and names the reviewer."
)


class ReviewerField(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reviewer: str | None = Field(None, min_length=1, max_length=128, description=REVIEWER_DESCRIPTION)

    @field_validator("reviewer", mode="before")
    @classmethod
    def _empty_is_absent(cls, value: object) -> object:
        return None if value == "" else value  # proto3 sends "" for a field left out


class ClaimRequest(ReviewerField):
    item_id: str | None = None
    lease_s: float | None = Field(None, gt=0, le=86400)


class ReleaseRequest(ReviewerField):
    lease_token: str = Field(..., min_length=1)


class LabelRequest(ReviewerField):
    lease_token: str = Field(..., min_length=1)
    verdict: Literal["confirm", "correct", "reject"] = Field(
        ..., description="confirm the proposed answer, correct it, or reject the image"
    )
    label: str | None = Field(None, description="the right class (required for 'correct' on classify tasks)")
    boxes: list[DetectionOut] | None = Field(None, description="corrected boxes for detection tasks")
    note: str | None = Field(None, max_length=2000)
