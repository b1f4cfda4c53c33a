"""``AnalysedImage``: what indexing one analysed image needs, and nothing more.

The ingress sends these to the search tier (``SearchService.index_analysed``), not the
``Analysis``: an ``Analysis`` carries the decoded image (0.75 MB for a 512x512 photo) and the
whole trace, and over a Ray hop an argument past 100 KB goes through the object store (a put in
the ingress, a fetch in the search replica) for every batch. The index needs the outcome (its
search metadata), the cheap tier's class probabilities (the embedding, when the embedder reuses
them: retrieval/embedders/conse.py) and the pixels only where it cannot reuse them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from visionroute.records import Analysis, ClassProbabilities

# (model file sha256, preprocessing): what decides whether an embedder can reuse probabilities.
ProbabilitiesSource = tuple[str | None, str]


@dataclass(frozen=True)
class AnalysedImage:
    tenant: str
    image_sha256: str
    task: str
    request_id: str
    decision: str | None = None  # Decision.value
    labels: tuple[str, ...] = ()  # the answer's labels (non-empty ones)
    review_item_id: str | None = None
    probabilities: ClassProbabilities | None = None
    image_rgb: np.ndarray | None = None  # (h, w, 3) uint8; None: embed from ``probabilities``

    @classmethod
    def from_analysis(cls, analysis: Analysis, *, with_pixels: bool = True) -> AnalysedImage:
        """``with_pixels`` False leaves the pixels out when there are probabilities to embed
        from (an image without any always carries its pixels)."""
        detections = analysis.detections
        probabilities = None if detections is None else detections.class_probabilities
        labels = () if detections is None or not len(detections) else tuple(x for x in detections.labels if x)
        return cls(
            tenant=analysis.tenant,
            image_sha256=analysis.image_sha256,
            task=analysis.task,
            request_id=analysis.trace.request_id,
            decision=None if analysis.decision is None else analysis.decision.value,
            labels=labels,
            review_item_id=analysis.review_item_id,
            probabilities=probabilities,
            image_rgb=analysis.image_rgb if with_pixels or probabilities is None else None,
        )

    @property
    def source(self) -> ProbabilitiesSource | None:
        """Where the probabilities came from (None: there are none)."""
        p = self.probabilities
        return None if p is None else (p.model_sha256, p.preprocessing)
