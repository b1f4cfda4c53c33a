"""The learned router on the request path (issue 22, item 3): ``RouterScoreStage`` runs between
the cheap tier and the decision, in-process (no Ray hop).

From the cheap tier's answer (``analysis.detections``), the image's statistics (the shift guard's
five, under the artefact's definition: ``FeatureSpec.input_statistics``, the function calibration
used) and the artefact's frozen reference index, it computes the router's
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
  classes not in the answer share the remaining mass equally (``output_probabilities``). A
  router is therefore fitted on ``served_output``: the full probability vectors put through the
  served path itself (top-k rows, the tier's calibrator, ``output_probabilities``), so the
  features served for an image are the features fitted for it, for any number of classes;
- the reference index's embedding is the input pixels, resized to the index's dimension (grey
  ``s x s`` for d = s^2, RGB for d = 3 s^2; rows are L2-normalised by the index), the embedding
  the digits router is fitted on, under the artefact's ``features.embedding_version``
  (``pixel_embedder``: 2, the upload's bounded copy, for grey the one the input block reads, so
  a request reduces its upload once for both; 1, the whole upload, for artefacts stored before
  the key). Another embedding is a ConfigError at start-up.

The plan decides the VLM's answer too: when the plan certified a VLM accept threshold, the stage
hands it to the VLM stage with the request (``analysis.metadata[VLM_ACCEPT_KEY]``), which applies
it instead of its configured one and names the plan in its step (``cascades.vlm.stage``).

The features cost something, and the ``router`` step carries it in ``cost_units`` (counted in the
cheap tier's cost: ``policies.costs.tier_of_stage``). The price is the bench's rule: the features'
measured time on this request over the cheap tier's, times the cheap tier's price
(``cost_units = cheap_cost_units * features_ms / cheap_latency_ms``); a configured price
(``cascades.<task>.router.cost_units``) replaces it with a fixed one. ``timeout_ms`` bounds the
features: a request whose features take longer takes the fallback plan (0: every request does).

Where they run: on the event loop while this task's features typically take under
``INLINE_BELOW_MS`` of CPU (5 ms; a photo's features with both bounded blocks take about 1 ms, a
thread hop 0.4 ms more), else in a thread, and always in a thread under a ``timeout_ms`` (the loop cannot
interrupt its own work). The step says which (``details.ran``). The estimate reads the
features' CPU time (``time.thread_time``), not their wall time: on a loaded machine a request
whose thread waited for a core would otherwise send the next ones to a thread, where the hop
and the wait for the loop come on top. The step's ``latency_ms`` stays the wall time the request
spent in the stage; ``pricing.features_ms`` and ``pricing.features_cpu_ms`` are the features'
wall and CPU time (their own work; OpenCV's helper threads, if it uses any, are not counted).
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cascades.arm_router import arm_router
from cascades.learned_router import CertifiedThresholds, RouterArtefact
from cascades.router_features import (
    EMBEDDING_VERSION,
    BoundedCopy,
    bounded_copy,
    bounded_grey,
    check_embedding_version,
    input_statistics,
)
from policies.thresholds import answer_score, decide
from visionroute.errors import ConfigError, InputError
from visionroute.records import Analysis, Detections, Step
from visionroute.redaction import failure_summary

if TYPE_CHECKING:
    from cascades.pipeline import CascadeState

ROUTER_STAGE = "router"
# The key under which a learned router's plan hands the VLM stage its certified accept threshold.
VLM_ACCEPT_KEY = "router_vlm_accept"
# The served classifier's answer rows (cascades.decoders.classifier: top_k)
SERVED_ROWS = 5
# Features that typically take less than this run on the event loop: the asyncio.to_thread hop
# costs about 0.4 ms (docs/routing_figures.md), as much as the features of a photo themselves
# (about 1 ms on a quiet 2-core machine, 2-3 ms on a busy one); slower ones (a version 1 input
# block on a large upload) run in a thread, so they never hold the loop long.
INLINE_BELOW_MS = 5.0
INLINE_SMOOTHING = 0.2  # the newest request's weight in the running estimate of the features' time
# One request counts as at most this in the estimate: a cold first request or a pause moves it
# little, a router that is always slow crosses INLINE_BELOW_MS on its second request.
INLINE_SAMPLE_CAP_MS = 4 * INLINE_BELOW_MS


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
    missing = np.ones(n_classes, bool)  # a mask, not np.setdiff1d: no sort of 1,000 class ids
    missing[ids] = False
    n_missing = int(missing.sum())
    if n_missing:
        p[missing] = max(0.0, 1.0 - float(p.sum())) / n_missing
    return p.reshape(1, -1)


def served_output(
    probabilities: np.ndarray,
    class_names: Sequence[str],
    *,
    calibrator: Any = None,
    top_k: int = SERVED_ROWS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The classifier output as the served router sees it, from the model's full (n, C)
    probabilities: each row through the served path (the top ``top_k`` classes as answer rows,
    ``calibrator.apply`` when the tier is calibrated, then ``output_probabilities``). Returns the
    (n, C) probabilities the features are computed on, the answers (class ids) and the top-1
    confidences (the fallback plan's score), all as the service computes them."""
    p = np.asarray(probabilities, np.float64)
    if p.ndim != 2 or p.shape[1] != len(class_names):
        raise InputError(
            f"expected probabilities of shape (n, {len(class_names)}), got {p.shape}", field="probabilities"
        )
    rows, answers, top1 = [], [], []
    for row in p:
        detections = Detections.from_class_probabilities(row, class_names, width=1, height=1, top_k=top_k)
        if calibrator is not None:
            detections = calibrator.apply(detections)
        rows.append(output_probabilities(detections, len(class_names))[0])
        answers.append(int(detections.class_id[0]))
        top1.append(answer_score(detections, "top1"))
    return np.array(rows).reshape(p.shape), np.array(answers, np.int64), np.array(top1, np.float64)


def vlm_accept_threshold(plan: CertifiedThresholds) -> float | None:
    """The plan's VLM accept threshold as the VLM stage applies it (None: the plan has none, the
    stage's own threshold applies): ``inf`` (no VLM answer is accepted) becomes the smallest
    number above 1, ``-inf`` (every answer) 0; the VLM's confidence lies in [0, 1]."""
    from cascades.vlm.calibration import NEVER_ACCEPT

    if plan.vlm_accept_threshold is None:
        return None
    return min(NEVER_ACCEPT, max(0.0, plan.vlm_accept_threshold))


def pixel_embedder(
    dim: int, *, version: int = EMBEDDING_VERSION, field: str = "router.reference_index.dim"
) -> Callable[..., np.ndarray]:
    """Image (H, W, 3) -> (1, dim): the pixels resized to s x s (grey when dim = s^2, RGB when
    dim = 3 s^2) under the embedding's definition ``version`` (``FeatureSpec.embedding_version``):
    1, the whole upload in float, area-resized; 2, its bounded copy (``bounded_copy``; for grey,
    ``bounded_grey``, which the caller may hand in as ``grey=``: the same numbers), area-resized.
    Calibration and the served stage both embed with this function."""
    import cv2

    check_embedding_version(version, "features.embedding_version")
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

    def embed(image_rgb: np.ndarray, *, grey: BoundedCopy | None = None) -> np.ndarray:
        if version == 2:
            if channels == 1:
                work = (grey if grey is not None else bounded_grey(image_rgb)).work
            else:
                work = bounded_copy(np.asarray(image_rgb)).work
            return cv2.resize(work, (side, side), interpolation=cv2.INTER_AREA).reshape(1, -1)
        image = np.asarray(image_rgb)
        if channels == 1 and image.ndim == 3:
            image = cv2.cvtColor(image.astype(np.uint8, copy=False), cv2.COLOR_RGB2GRAY)
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
                # the plan's VLM accept threshold, which the VLM stage applies (None: its own)
                "vlm_accept_threshold": vlm_accept_threshold(self.thresholds),
            },
        )


@dataclass(frozen=True, eq=False)
class ServedRouter:
    """A loaded, checked artefact and what serving it needs (the embedder), with its price and
    time limit: ``cost_units`` None prices each request's features by their measured time
    (module docstring); ``timeout_s`` None lets them take as long as they take."""

    artefact: RouterArtefact
    embed: Callable[[np.ndarray], np.ndarray] | None  # None: the router uses no neighbours
    cost_units: float | None = None
    timeout_s: float | None = None

    @classmethod
    def from_artefact(
        cls,
        artefact: RouterArtefact,
        *,
        field: str = "router",
        cost_units: float | None = None,
        timeout_s: float | None = None,
    ) -> ServedRouter:
        if artefact.plans is None:
            raise ConfigError(
                f"{field}.plans is missing: a served router needs its certified plans "
                "(cascades.learned_router.certify_router_plans)",
                field=f"{field}.plans",
            )
        embed = None
        if artefact.index is not None:
            embed = pixel_embedder(
                artefact.index.dim,
                version=artefact.spec.embedding_version,
                field=f"{field}.reference_index.dim",
            )
        return cls(artefact, embed, cost_units, timeout_s)

    @functools.cached_property
    def sha256(self) -> str:  # computed once: the artefact hashes its whole document
        return self.artefact.sha256

    @functools.cached_property
    def _grey_embedding(self) -> bool:
        index = self.artefact.index
        return index is not None and math.isqrt(index.dim) ** 2 == index.dim

    @functools.cached_property
    def _reads_bounded_grey(self) -> bool:
        """Whether this request's features read the upload's ``bounded_grey`` copy (the input
        block version 2, a grey embedding version 2): it is made once for both."""
        spec = self.artefact.spec
        return (spec.use_input and spec.input_version == 2) or (
            self._grey_embedding and spec.embedding_version == 2
        )

    @functools.cached_property
    def _shares_grey(self) -> bool:
        """Whether the input block (version 2) and a version 1 grey embedding start from one grey
        conversion (a router fitted before embedding version 2)."""
        spec = self.artefact.spec
        return (
            spec.use_input
            and spec.input_version == 2
            and self._grey_embedding
            and spec.embedding_version == 1
        )

    @functools.cached_property
    def feature_names(self) -> tuple[str, ...]:  # built once, not per request
        return self.artefact.spec.names

    @functools.cached_property
    def index_sha256(self) -> str | None:
        return None if self.artefact.index is None else self.artefact.index.sha256

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
        image = analysis.image_rgb
        # the upload's bounded grey copy, made once for the input block and a grey embedding
        grey = bounded_grey(image) if self._reads_bounded_grey else None
        # the input block under the artefact's definition: the function calibration computed it with
        statistics = None
        if spec.use_input:
            statistics = input_statistics(image, spec.input_version, grey=grey).reshape(1, -1)
        embeddings = None
        if self.embed is not None:
            if spec.embedding_version == 2:
                embeddings = self.embed(image, grey=grey if self._grey_embedding else None)
            elif self._shares_grey and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
                # a version 1 grey embedding begins with the grey conversion the copy holds
                embeddings = self.embed(grey.full)
            else:
                embeddings = self.embed(image)
        return artefact.features(
            output=output, cheap_answers=answer, input_statistics=statistics, embeddings=embeddings
        )

    def scored(self, analysis: Analysis) -> tuple[np.ndarray, float, float, float]:
        """(features (1, d), score, milliseconds both took, CPU milliseconds this thread spent on
        them) of this request; raises on a feature that cannot be computed or a score that is not
        finite. The CPU time is the features' own work: it leaves out the time the thread waited
        for a core (other processes, ONNX Runtime's threads), which the wall time includes."""
        started, cpu_started = time.perf_counter(), time.thread_time()
        features = self.features(analysis)
        score = float(self.artefact.learner.score(features)[0])
        if not math.isfinite(score):
            raise ValueError("the router's score is not finite")
        return (
            features,
            score,
            (time.perf_counter() - started) * 1000.0,
            (time.thread_time() - cpu_started) * 1000.0,
        )

    def price(
        self, features_ms: float, cheap: Step | None, *, features_cpu_ms: float | None = None
    ) -> tuple[float, dict[str, Any]]:
        """The features' cost units on this request and how they were priced (module docstring);
        a measured price also records the features' own CPU time (``scored``)."""
        if self.cost_units is not None:
            return self.cost_units, {"rule": "configured", "cost_units": self.cost_units}
        if cheap is None or not cheap.latency_ms or cheap.latency_ms <= 0:
            return 0.0, {"rule": "measured", "note": "no cheap-tier latency to price against"}
        units = cheap.cost_units * features_ms / cheap.latency_ms
        return units, {
            "rule": "measured",
            "features_ms": features_ms,
            "features_cpu_ms": features_cpu_ms,
            "cheap_latency_ms": cheap.latency_ms,
            "cheap_cost_units": cheap.cost_units,
        }


class RouterScoreStage:
    """The router's score and the thresholds certified on it, for ``DecideStage`` (``state.route``);
    step ``router``: score, features (names and values), version, or the fallback and its error.
    Tasks without a router, a failed cheap tier, and a rollout's candidate arm without a router of
    its own (a tier the router was not fitted for) are left to the thresholds as today; an arm that
    carries a refit router scores with it (cascades/arm_router.py)."""

    name = ROUTER_STAGE

    def __init__(self, routers: Mapping[str, ServedRouter]) -> None:
        self.routers = dict(routers)
        self._typical_ms: dict[str, float] = {}  # per task, the features' recent time (smoothed)

    async def run(self, state: CascadeState) -> None:
        analysis = state.analysis
        router = self.routers.get(analysis.task)
        if router is None or state.cheap_tier_failed:
            return
        # a rollout arm's refit router, or the adopted incumbent's (cascades/arm_router.py)
        router, stands_aside = arm_router(getattr(state, "arm", None), router)
        if stands_aside:
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
            self._route(state, Route(None, plans.learned, router.sha256, fallback=False))
            analysis.trace.append(
                self._step(router, None, None, started, reason="no answer rows: nothing to score")
            )
            return
        try:
            features, score, features_ms, features_cpu_ms, inline = await self._scored(router, analysis)
        except Exception as exc:  # any feature failure: the certified confidence-only plan decides
            error = failure_summary(exc)
            top1 = answer_score(detections, "top1")
            self._route(state, Route(top1, plans.fallback, router.sha256, fallback=True))
            analysis.trace.append(
                self._step(
                    router,
                    None,
                    None,
                    started,
                    reason="a router feature failed; the confidence-only certified thresholds decide",
                    error=error,
                    fallback=True,
                )
            )
            return
        self._route(state, Route(score, plans.learned, router.sha256, fallback=False))
        cheap = next((s for s in reversed(analysis.trace.steps) if s.stage.startswith("onnx:")), None)
        cost_units, pricing = router.price(features_ms, cheap, features_cpu_ms=features_cpu_ms)
        analysis.trace.append(
            self._step(
                router,
                score,
                dict(zip(router.feature_names, features[0].tolist())),
                started,
                reason="the router's score; the thresholds certified on it decide",
                cost_units=cost_units,
                pricing=pricing,
                ran="inline" if inline else "thread",
            )
        )

    async def _scored(
        self, router: ServedRouter, analysis: Analysis
    ) -> tuple[np.ndarray, float, float, float, bool]:
        """``router.scored`` and whether it ran on the event loop: there while this task's features
        typically take under ``INLINE_BELOW_MS`` and the router has no time limit (the loop cannot
        interrupt its own work; a limit is enforced by waiting on a thread); else in a thread,
        within the limit, so slow features (large uploads, a version 1 input block) never hold
        the replica's other requests."""
        task = analysis.task
        inline = router.timeout_s is None and self._typical_ms.get(task, 0.0) < INLINE_BELOW_MS
        if inline:
            result = router.scored(analysis)
        else:
            work = asyncio.to_thread(router.scored, analysis)
            if router.timeout_s is None:
                result = await work
            else:
                try:
                    result = await asyncio.wait_for(work, router.timeout_s)
                except asyncio.TimeoutError:
                    raise TimeoutError(
                        f"the features took longer than {router.timeout_s * 1000.0:g} ms"
                    ) from None
        # the estimate is of the features' own CPU time: a request whose thread waited for a core
        # (a loaded machine) would send the next ones to a thread, where they wait longer still
        typical, sample = self._typical_ms.get(task, 0.0), min(result[3], INLINE_SAMPLE_CAP_MS)
        self._typical_ms[task] = typical + INLINE_SMOOTHING * (sample - typical)
        return (*result, inline)

    @staticmethod
    def _route(state: CascadeState, route: Route) -> None:
        """Decide with ``route``, and hand the VLM stage the plan's VLM accept threshold."""
        state.route = route
        threshold = vlm_accept_threshold(route.thresholds)
        if threshold is not None:
            state.analysis.metadata[VLM_ACCEPT_KEY] = {"threshold": threshold, "source": route.version}

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
        cost_units: float = 0.0,
        pricing: dict[str, Any] | None = None,
        ran: str | None = None,
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
            cost_units=cost_units,
            latency_ms=(time.perf_counter() - started) * 1000.0,
            details={
                "applied": True,
                "version": router.sha256,
                "fallback": fallback,
                "plan": "fallback" if fallback else "learned",
                "score_source": plan.score,
                "features": features,
                "feature_names": list(router.feature_names),
                "thresholds": {
                    "accept": _finite(plan.accept_threshold),
                    "escalate": _finite(plan.escalate_threshold),
                    "vlm_accept": vlm_accept_threshold(plan),
                },
                "alpha": plans.alpha,
                "delta": plans.delta,
                "reference_index_sha256": router.index_sha256,
                "pricing": pricing,
                "ran": ran,  # "inline" (on the event loop) or "thread"; None: no features computed
            },
        )
