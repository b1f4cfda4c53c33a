"""The learned router on the request path (issue 22, item 3): ``RouterScoreStage`` runs between
the cheap tier and the decision, in-process (no Ray hop).

From the cheap tier's answer (``analysis.detections``), the image's statistics (the shift guard's
``input_statistics``) and the artefact's frozen reference index, it computes the router's
features and score (``cascades.learned_router.RouterArtefact``), and hands ``DecideStage`` a
``Route``: that score with the thresholds certified on it (``RouterArtefact.plans.learned``).
Its ``router`` step records the score, the feature vector (names and values) and the router's
version (the artefact's sha256), so replay can score another router on logged traces.

When a feature fails at run time (the reference lookup raises, the answer's labels are not the
router's, an input statistic cannot be computed), the request falls back to the confidence-only
thresholds certified in the same artefact (``plans.fallback``, on the calibrated top-1
confidence) and the ``router`` step says so, with the error: never an uncertified accept.

What is served is what was fitted, with two choices stated here:
- the classifier output block is read from the answer's rows (``Detections.from_class_probabilities``
  keeps the top 5): with at most 5 classes the probability vector is exact; with more, the
  classes not in the answer share the remaining mass equally (``output_probabilities``), so a
  router for more than 5 classes should be fitted through the same function;
- the reference index's embedding is the input pixels, resized to the index's dimension (grey
  ``s x s`` for d = s^2, RGB for d = 3 s^2; rows are L2-normalised by the index), the embedding
  the digits router is fitted on. Another embedding is a ConfigError at start-up.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cascades.learned_router import CertifiedThresholds, RouterArtefact
from policies.thresholds import answer_score, decide
from visionroute.errors import ConfigError, InputError
from visionroute.records import Analysis, Detections, Step
from visionroute.redaction import failure_summary

if TYPE_CHECKING:
    from cascades.pipeline import CascadeState

ROUTER_STAGE = "router"


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def output_probabilities(detections: Detections, n_classes: int) -> np.ndarray:
    """(1, C) class probabilities from a classifier's answer rows; classes without a row share
    what mass remains equally (exact when the answer holds every class)."""
    p = np.zeros(n_classes, np.float64)
    ids = np.asarray(detections.class_id, np.int64)
    if len(ids) and (ids.min() < 0 or ids.max() >= n_classes):
        raise InputError(f"answer class ids outside [0, {n_classes})", field="detections.class_id")
    p[ids] = np.asarray(detections.confidence, np.float64)
    missing = np.setdiff1d(np.arange(n_classes), ids)
    if len(missing):
        p[missing] = max(0.0, 1.0 - float(p.sum())) / len(missing)
    return p.reshape(1, -1)


def pixel_embedder(
    dim: int, *, field: str = "router.reference_index.dim"
) -> Callable[[np.ndarray], np.ndarray]:
    """Image (H, W, 3) -> (1, dim): the pixels resized to s x s (grey when dim = s^2, RGB when
    dim = 3 s^2)."""
    import cv2

    side = math.isqrt(dim)
    if side * side == dim:
        channels = 1
    elif dim % 3 == 0 and math.isqrt(dim // 3) ** 2 == dim // 3:
        side, channels = math.isqrt(dim // 3), 3
    else:
        raise ConfigError(
            f"router reference index dimension {dim} is not an input-pixel embedding (s*s grey or 3*s*s RGB)",
            field=field,
        )

    def embed(image_rgb: np.ndarray) -> np.ndarray:
        image = np.asarray(image_rgb)
        if channels == 1 and image.ndim == 3:
            image = cv2.cvtColor(image.astype(np.uint8), cv2.COLOR_RGB2GRAY)
        small = cv2.resize(image.astype(np.float32), (side, side), interpolation=cv2.INTER_AREA)
        return small.reshape(1, -1)

    return embed


@dataclass(frozen=True)
class Route:
    """What ``DecideStage`` decides with when a router is configured: ``score`` (the router's,
    or the top-1 confidence on the fallback; None: no answer rows) against ``thresholds``."""

    score: float | None
    thresholds: CertifiedThresholds
    router_version: str  # the artefact's sha256
    fallback: bool

    @property
    def version(self) -> str:
        return f"router@{self.router_version[:12]}:{'fallback' if self.fallback else 'learned'}"

    def decide_step(self, *, vlm_available: bool, is_calibrated: bool) -> Step:
        """The ``policy:thresholds`` step on this route (``policies.thresholds.decide``)."""
        decision, reason = decide(
            self.score, self.thresholds, vlm_available=vlm_available, is_calibrated=is_calibrated
        )
        if not self.fallback:
            reason = f"router {reason}"
        threshold = {
            k: v
            for k, v in (
                ("accept", _finite(self.thresholds.accept_threshold)),
                ("escalate", _finite(self.thresholds.escalate_threshold)),
            )
            if v is not None
        }
        return Step(
            stage="policy:thresholds",
            decision=decision,
            reason=reason,
            policy_version=self.version,
            score=self.score,
            threshold=threshold,
            details={
                "vlm_available": vlm_available,
                "score_source": "router" if not self.fallback else "top1 (router fallback)",
                "empty_result": self.thresholds.empty_result,
                "router_version": self.router_version,
                "fallback": self.fallback,
            },
        )


@dataclass(frozen=True, eq=False)
class ServedRouter:
    """A loaded, checked artefact and what serving it needs (the embedder)."""

    artefact: RouterArtefact
    embed: Callable[[np.ndarray], np.ndarray] | None  # None: the router uses no neighbours

    @classmethod
    def from_artefact(cls, artefact: RouterArtefact, *, field: str = "router") -> ServedRouter:
        if artefact.plans is None:
            raise ConfigError(
                f"{field}.plans is missing: a served router needs its certified plans "
                "(cascades.learned_router.certify_router_plans)",
                field=f"{field}.plans",
            )
        embed = None
        if artefact.index is not None:
            embed = pixel_embedder(artefact.index.dim, field=f"{field}.reference_index.dim")
        return cls(artefact, embed)

    @property
    def sha256(self) -> str:
        return self.artefact.sha256

    def features(self, analysis: Analysis) -> np.ndarray:
        """(1, d) features of this request (raises on any feature that cannot be computed)."""
        artefact, detections = self.artefact, analysis.detections
        if tuple(detections.class_names) != artefact.class_names:
            raise InputError("the answer's labels are not the router's", field="router.class_names")
        spec = artefact.spec
        if spec.output == "classifier":
            output: Any = output_probabilities(detections, len(artefact.class_names))
            answer = np.asarray([int(detections.class_id[0])], np.int64)
        else:
            output = [np.asarray(detections.confidence, np.float64)]
            answer = np.asarray([int(detections.class_id[0]) if len(detections) else -1], np.int64)
        statistics = None
        if spec.use_input:
            from policies.shift_guard import input_statistics

            statistics = np.asarray(input_statistics(analysis.image_rgb), np.float64).reshape(1, -1)
        embeddings = None if self.embed is None else self.embed(analysis.image_rgb)
        return artefact.features(
            output=output, cheap_answers=answer, input_statistics=statistics, embeddings=embeddings
        )


class RouterScoreStage:
    """The router's score and the thresholds certified on it, for ``DecideStage`` (``state.route``);
    step ``router``: score, features (names and values), version, or the fallback and its error.
    Tasks without a router, a failed cheap tier, and a rollout's candidate arm (a tier the router
    was not fitted for) are left to the thresholds as today."""

    name = ROUTER_STAGE

    def __init__(self, routers: Mapping[str, ServedRouter]) -> None:
        self.routers = dict(routers)

    async def run(self, state: CascadeState) -> None:
        analysis = state.analysis
        router = self.routers.get(analysis.task)
        if router is None or state.cheap_tier_failed:
            return
        choice = getattr(getattr(state, "arm", None), "choice", None)
        if choice is not None and choice.arm == "candidate":
            analysis.trace.append(
                Step(
                    stage=ROUTER_STAGE,
                    reason="not applied: the rollout's candidate tier serves; its own thresholds decide",
                    model_version=router.sha256,
                    details={"applied": False, "version": router.sha256},
                )
            )
            return
        plans = router.artefact.plans
        detections = analysis.detections
        started = time.perf_counter()
        if detections is None or len(detections) == 0:
            state.route = Route(None, plans.learned, router.sha256, fallback=False)
            analysis.trace.append(
                self._step(router, None, None, started, reason="no answer rows: nothing to score")
            )
            return
        try:
            features = await asyncio.to_thread(router.features, analysis)
            score = float(router.artefact.learner.score(features)[0])
            if not math.isfinite(score):
                raise ValueError("the router's score is not finite")
        except Exception as exc:  # any feature failure: the certified confidence-only plan decides
            top1 = answer_score(detections, "top1")
            state.route = Route(top1, plans.fallback, router.sha256, fallback=True)
            analysis.trace.append(
                self._step(
                    router,
                    None,
                    None,
                    started,
                    reason="a router feature failed; the confidence-only certified thresholds decide",
                    error=failure_summary(exc),
                    fallback=True,
                )
            )
            return
        state.route = Route(score, plans.learned, router.sha256, fallback=False)
        analysis.trace.append(
            self._step(
                router,
                score,
                dict(zip(router.artefact.spec.names, (float(v) for v in features[0]))),
                started,
                reason="the router's score; the thresholds certified on it decide",
            )
        )

    @staticmethod
    def _step(
        router: ServedRouter,
        score: float | None,
        features: dict[str, float] | None,
        started: float,
        *,
        reason: str,
        error: str | None = None,
        fallback: bool = False,
    ) -> Step:
        plans = router.artefact.plans
        plan = plans.fallback if fallback else plans.learned
        return Step(
            stage=ROUTER_STAGE,
            reason=reason,
            model="learned_router",
            model_version=router.sha256,
            score=score,
            error=error,
            latency_ms=(time.perf_counter() - started) * 1000.0,
            details={
                "applied": True,
                "version": router.sha256,
                "fallback": fallback,
                "plan": "fallback" if fallback else "learned",
                "score_source": plan.score,
                "features": features,
                "feature_names": list(router.artefact.spec.names),
                "thresholds": {
                    "accept": _finite(plan.accept_threshold),
                    "escalate": _finite(plan.escalate_threshold),
                },
                "alpha": plans.alpha,
                "delta": plans.delta,
            },
        )
