"""The decision after the VLM tier: accept, or send to human review with the reason.

    the VLM failed (down, slow, broken)            -> review
    its output is invalid (not the schema's JSON)  -> review
    no answer confidence (no token logprobs)       -> review
    confidence < accept_threshold                  -> review
    disagreement with the cheap tier > margin      -> review
    otherwise                                      -> accept

``disagreement`` is how much more the cheap tier supported its own answer than the VLM's:
support(cheap answer) - support(VLM answer), from the cheap tier's probabilities, clipped at 0.
Agreeing answers give 0; an unsure cheap tier cannot veto the VLM; a sure one that the VLM
contradicts sends the item to a human. Pure functions only: no I/O, no clock.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from visionroute.records import Decision, Detections


@dataclass(frozen=True)
class VlmOutcome:
    """What the VLM stage learnt, reduced to what the decision needs."""

    answer: str | None  # the label, "yes"/"no", or the text read; None when there is none
    confidence: float | None  # from token logprobs, in [0, 1]
    disagreement: float | None = None  # None: nothing to compare against
    error: str | None = None  # backend failure (timeout, 5xx, connection, circuit open, ...)
    invalid_reason: str | None = None  # the output was not a valid answer


@dataclass(frozen=True)
class VlmPolicy:
    version: str
    accept_threshold: float
    disagreement_margin: float

    @property
    def thresholds(self) -> dict[str, float]:
        return {"accept": self.accept_threshold, "disagreement_margin": self.disagreement_margin}


def decide_after_vlm(outcome: VlmOutcome, policy: VlmPolicy) -> tuple[Decision, str]:
    """Accept only a valid, confident answer that the cheap tier does not contradict."""
    if outcome.error is not None:
        return Decision.REVIEW, f"the VLM failed ({outcome.error}); a human decides"
    if outcome.invalid_reason is not None or outcome.answer is None:
        return Decision.REVIEW, f"the VLM's output is invalid ({outcome.invalid_reason or 'no answer'})"
    if outcome.confidence is None:
        return Decision.REVIEW, "the VLM answer has no confidence (no token logprobs came back)"
    if outcome.confidence < policy.accept_threshold:
        return (
            Decision.REVIEW,
            f"VLM answer {outcome.answer!r} confidence {outcome.confidence:.3f} < accept threshold "
            f"{policy.accept_threshold}",
        )
    if outcome.disagreement is not None and outcome.disagreement > policy.disagreement_margin:
        return (
            Decision.REVIEW,
            f"VLM answer {outcome.answer!r} disagrees with the cheap tier by {outcome.disagreement:.3f} > "
            f"margin {policy.disagreement_margin}",
        )
    agreement = (
        "no cheap answer to compare"
        if outcome.disagreement is None
        else f"disagreement {outcome.disagreement:.3f} <= {policy.disagreement_margin}"
    )
    return (
        Decision.ACCEPT,
        f"VLM answer {outcome.answer!r} confidence {outcome.confidence:.3f} >= {policy.accept_threshold}; {agreement}",
    )


# -- disagreement with the cheap tier, per task ---------------------------------------------------


def classify_disagreement(cheap: Detections | None, vlm_label: str) -> float | None:
    """Cheap tier's probability of its top label minus its probability of the VLM's label.

    A VLM label outside the cheap tier's top-k counts as probability 0 there.
    """
    if cheap is None or len(cheap) == 0:
        return None
    labels = cheap.labels
    top = int(cheap.confidence.argmax())
    support_vlm = max(
        (float(c) for label, c in zip(labels, cheap.confidence) if label == vlm_label), default=0.0
    )
    return max(0.0, float(cheap.confidence[top]) - support_vlm)


def verify_disagreement(cheap_confidence: float | None, verdict: str) -> float | None:
    """The cheap tier claimed the object with probability p: a VLM 'no' disagrees by p - (1 - p)."""
    if cheap_confidence is None:
        return None
    if verdict == "yes":
        return 0.0
    return max(0.0, 2.0 * cheap_confidence - 1.0)


def text_disagreement(cheap_text: str | None, vlm_text: str) -> float | None:
    """1 - similarity of the two readings (difflib ratio); None when the cheap tier read none."""
    if cheap_text is None:
        return None
    return 1.0 - difflib.SequenceMatcher(None, cheap_text, vlm_text).ratio()
