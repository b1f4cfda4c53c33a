"""The privacy policy: what is redacted from an image before it is stored, per tenant.

Part of the versioned policy set (``policies.policy_set.PolicySet.privacy``)::

    privacy:
      faces: blur            # blur | pixelate | box | keep
      text: keep             # blur | box | keep
      keep_original: false   # true: the unredacted file is kept too (never shown to reviewers)
      face_detector: mtcnn
      text_detector: ppocr_det
      tenants:               # per-tenant overrides of faces / text / keep_original
        acme: {text: box}

Redaction applies only to images that will be stored (review and audit items, and so their
exports); the accept path never runs a detector. ``cascades.image_redaction`` does the work, with
the detectors of cascades/detectors_privacy.py that the tables below name.

Default ``faces: blur, text: keep, keep_original: false``: a face is personal data that no
review label needs to read, and a blurred face still shows that there is a person; text stays
because the ``text`` task's reviewers label exactly those regions (a tenant whose images carry
names or addresses sets ``text: blur`` or ``box``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# The detectors a policy may name: name -> what it is. The policy is validated against these
# names without importing a detector (nor torch); cascades/detectors_privacy.py builds them.
FACE_DETECTORS: dict[str, str] = {
    "mtcnn": "MTCNN (Zhang et al. 2016) from facenet-pytorch, weights inside the package",
}
TEXT_DETECTORS: dict[str, str] = {
    "ppocr_det": "PP-OCRv4 DBNet text detector (Liao et al. 2020), prepared from rapidocr-onnxruntime",
}
FaceMode = Literal["blur", "pixelate", "box", "keep"]
TextMode = Literal["blur", "box", "keep"]


class PrivacyRule(BaseModel):
    """What one tenant's stored images get."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    faces: FaceMode = Field("blur", description="what detected faces get in the stored image")
    text: TextMode = Field("keep", description="what detected text regions get in the stored image")
    keep_original: bool = Field(
        False, description="also store the unredacted file (false: the original bytes never reach disk)"
    )

    @property
    def redacts(self) -> bool:
        return self.faces != "keep" or self.text != "keep"


class TenantPrivacy(BaseModel):
    """One tenant's overrides; a field left out takes the policy's own value."""

    model_config = ConfigDict(extra="forbid")

    faces: FaceMode | None = None
    text: TextMode | None = None
    keep_original: bool | None = None


class PrivacyPolicy(PrivacyRule):
    face_detector: str = Field("mtcnn", description=f"one of {sorted(FACE_DETECTORS)}")
    text_detector: str = Field("ppocr_det", description=f"one of {sorted(TEXT_DETECTORS)}")
    face_min_confidence: float = Field(0.9, gt=0, le=1, description="MTCNN probability to count a face")
    tenants: dict[str, TenantPrivacy] = Field(default_factory=dict, description="per-tenant overrides")

    @field_validator("face_detector")
    @classmethod
    def _known_face_detector(cls, name: str) -> str:
        if name not in FACE_DETECTORS:
            raise ValueError(f"unknown face detector {name!r}; expected one of {sorted(FACE_DETECTORS)}")
        return name

    @field_validator("text_detector")
    @classmethod
    def _known_text_detector(cls, name: str) -> str:
        if name not in TEXT_DETECTORS:
            raise ValueError(f"unknown text detector {name!r}; expected one of {sorted(TEXT_DETECTORS)}")
        return name

    def for_tenant(self, tenant: str) -> PrivacyRule:
        """The rule for ``tenant``: the policy's, with that tenant's overrides applied."""
        base = {"faces": self.faces, "text": self.text, "keep_original": self.keep_original}
        override = self.tenants.get(tenant)
        if override is not None:
            base.update(override.model_dump(exclude_none=True))
        return PrivacyRule(**base)
