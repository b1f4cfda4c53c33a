"""Fit and certify a learned router and its three-tier plans in one call (``visionroute calibrate
--router``; issue 22, item 3).

From labelled items with both tiers' answers (``RouterData``: the cheap classifier's full
probabilities, the VLM's answers and confidences, optionally the images) and one split:

1. the cheap tier's calibrator (temperature scaling by default) is fitted on the fit share, as
   ``evals.harness.calibrate`` does;
2. every item's classifier output is put through the served path (``router_stage.served_output``:
   the top-k answer rows, the calibrator, the completed probability vector), so the router is
   fitted on exactly what it will be served, for any number of classes;
3. the router (``fit_router``) is fitted on the fit share: output features, and with images the
   input statistics (``FeatureSpec.input_statistics``, the function the served stage calls) and
   the neighbours in a reference index of the fit share's pixel embeddings
   (``router_stage.pixel_embedder``, the served embedding);
4. both plans are certified on the certification share (``certify_router_plans``): the learned
   plan on the router's score, the fallback on the calibrated top-1 confidence, each with the
   VLM's accept threshold and, with ``max_review_share``, the review-capacity constraint;
5. both plans are applied to the held-out share for the summary (never to choose anything).

An infeasible capacity constraint is a ConfigError naming ``max_review_share`` with the smallest
share that works, for whichever plan needs the larger one; nothing is written then.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cascades.learned_router import CertifiedThresholds, RouterArtefact, certify_router_plans, fit_router
from cascades.router_features import NEIGHBOURS_K, OUTPUT_TOP_K, FeatureSpec
from cascades.router_stage import SERVED_ROWS, pixel_embedder, served_output
from policies.risk_control import TierCosts, TierOutcomes
from visionroute.errors import ConfigError

DEFAULT_EMBEDDING_DIM = 64  # grey 8x8 input pixels


@dataclass(frozen=True)
class RouterData:
    """Labelled items with both tiers' answers. ``strong_answers``: the VLM's class id per item
    (-1: no valid answer); ``strong_scores``: its confidence as the VLM stage compares it with
    the accept threshold (NaN: no answer). ``images``: what a client uploads (RGB uint8, or
    grey), needed for the input and neighbour features; None: output features only."""

    class_names: tuple[str, ...]
    probabilities: np.ndarray  # (n, C) the cheap classifier's, uncalibrated
    labels: np.ndarray  # (n,)
    strong_answers: np.ndarray  # (n,)
    strong_scores: np.ndarray  # (n,)
    images: Sequence[np.ndarray] | None = None
    name: str = "dataset"
    strong_score_name: str = "the VLM's confidence"

    def __post_init__(self) -> None:
        n = len(self.labels)
        p = np.asarray(self.probabilities)
        if p.ndim != 2 or p.shape != (n, len(self.class_names)):
            raise ConfigError(
                f"probabilities must have shape ({n}, {len(self.class_names)}) (items x class names), got {p.shape}",
                field="probabilities",
            )
        for name in ("strong_answers", "strong_scores"):
            value = np.asarray(getattr(self, name))
            if value.shape != (n,):
                raise ConfigError(f"{name} must have shape ({n},), got {value.shape}", field=name)
        answers = np.asarray(self.strong_answers)
        if ((answers < -1) | (answers >= len(self.class_names))).any():
            raise ConfigError(
                f"strong_answers must be class ids in [0, {len(self.class_names)}) or -1 (no answer)",
                field="strong_answers",
            )
        scores = np.asarray(self.strong_scores, np.float64)
        answered = ~np.isnan(scores)
        if answered.any() and ((scores[answered] < 0) | (scores[answered] > 1)).any():
            raise ConfigError("strong_scores must lie in [0, 1] (NaN: no answer)", field="strong_scores")
        if self.images is not None and len(self.images) != n:
            raise ConfigError(
                f"images must hold {n} images, one per item, got {len(self.images)}", field="images"
            )


@dataclass(frozen=True)
class HeldOut:
    """One plan applied to the held-out items."""

    n: int
    rates: dict[str, float]  # accept (cheap), vlm_accept, review
    accepted_error: float
    cost_per_item: float


@dataclass(frozen=True)
class RouterCalibration:
    calibrator: Any  # cascades.calibration.Calibrator of the cheap tier (the router is fitted on it)
    artefact: RouterArtefact  # with both certified plans
    held_out: dict[str, HeldOut]  # "learned", "fallback"
    sizes: dict[str, int]  # fit, certification, held_out

    @property
    def plans(self) -> dict[str, CertifiedThresholds]:
        return {"learned": self.artefact.plans.learned, "fallback": self.artefact.plans.fallback}


def default_spec(
    data: RouterData, *, neighbours_k: int = NEIGHBOURS_K, use_input: bool = True
) -> FeatureSpec:
    """Every feature block the data allows: output, and with images input and neighbours."""
    has_images = data.images is not None
    return FeatureSpec(
        output="classifier",
        top_k=min(OUTPUT_TOP_K, len(data.class_names)),
        use_input=has_images and use_input,
        neighbours_k=neighbours_k if has_images else 0,
    )


def _apply(plan: CertifiedThresholds, score, cheap_error, strong_score, strong_error, costs) -> HeldOut:
    """The plan's routing of items (``policies.thresholds.decide``'s comparisons, vectorised)."""
    n = len(score)
    cheap = score >= plan.accept_threshold
    escalated = ~cheap & (score >= plan.escalate_threshold)
    if plan.vlm_accept_threshold is None:
        vlm_ok = escalated
    else:
        with np.errstate(invalid="ignore"):  # NaN: no VLM answer, reviewed
            vlm_ok = escalated & (strong_score >= plan.vlm_accept_threshold)
    reviewed = ~(cheap | vlm_ok)
    accepted = int(cheap.sum() + vlm_ok.sum())
    errors = int((cheap & cheap_error).sum() + (vlm_ok & strong_error).sum())
    cost = costs.cheap + (costs.escalate * escalated.sum() + costs.review * reviewed.sum()) / max(n, 1)
    return HeldOut(
        n,
        {"accept": float(cheap.mean()), "vlm_accept": float(vlm_ok.mean()), "review": float(reviewed.mean())},
        errors / accepted if accepted else 0.0,
        float(cost),
    )


def calibrate_router(
    data: RouterData,
    fit_rows: np.ndarray,
    certify_rows: np.ndarray,
    held_out_rows: np.ndarray,
    *,
    alpha: float,
    delta: float,
    costs: TierCosts,
    max_review_share: float | None = None,
    method: str = "temperature",
    spec: FeatureSpec | None = None,
    embedding_dim: int = DEFAULT_EMBEDDING_DIM,
    served_rows: int = SERVED_ROWS,
    seed: int = 0,
) -> RouterCalibration:
    """Steps 1-5 of the module docstring."""
    from cascades.calibration import fit_classifier

    if max_review_share is not None and not 0.0 <= max_review_share <= 1.0:
        raise ConfigError(
            f"max_review_share must be in [0, 1], got {max_review_share}", field="max_review_share"
        )
    spec = spec or default_spec(data)
    if (spec.use_input or spec.neighbours_k > 0) and data.images is None:
        raise ConfigError(
            "the router's input and neighbour features need the images; the data has none",
            field="images",
        )
    labels = np.asarray(data.labels, np.int64)
    calibrator = fit_classifier(method, data.probabilities[fit_rows], labels[fit_rows], data.class_names)
    served, answers, top1 = served_output(
        data.probabilities, data.class_names, calibrator=calibrator, top_k=served_rows
    )
    # the spec's input definition, which the served stage computes too (FeatureSpec.input_statistics)
    statistics = spec.input_statistics([_rgb(image) for image in data.images]) if spec.use_input else None
    embeddings, embedding = None, ""
    if spec.neighbours_k > 0:
        embed = pixel_embedder(embedding_dim, version=spec.embedding_version, field="embedding-dim")
        embeddings = np.vstack([embed(_rgb(image)) for image in data.images])
        embedding = (
            f"input pixels resized to dimension {embedding_dim} (cascades.router_stage.pixel_embedder)"
        )

    def rows_of(block, rows):
        return None if block is None else block[rows]

    fitted = fit_router(
        class_names=data.class_names,
        spec=spec,
        output=served[fit_rows],
        cheap_answers=answers[fit_rows],
        labels=labels[fit_rows],
        input_statistics=rows_of(statistics, fit_rows),
        embeddings=rows_of(embeddings, fit_rows),
        embedding=embedding,
        seed=seed,
    )
    artefact = fitted.artefact

    def learned(rows):
        return artefact.score(
            output=served[rows],
            cheap_answers=answers[rows],
            input_statistics=rows_of(statistics, rows),
            embeddings=rows_of(embeddings, rows),
        )

    cheap_error = answers != labels
    strong_answers = np.asarray(data.strong_answers, np.int64)
    strong_error = strong_answers != labels  # no answer (-1) counts as wrong: it is never accepted
    strong_score = np.where(strong_answers >= 0, np.asarray(data.strong_scores, np.float64), np.nan)

    def outcomes(score, rows):
        return TierOutcomes(score, cheap_error[rows], strong_error[rows], strong_score[rows])

    artefact = certify_router_plans(
        artefact,
        learned_fit=outcomes(fitted.fit_scores, fit_rows),
        learned_certification=outcomes(learned(certify_rows), certify_rows),
        confidence_fit=outcomes(top1[fit_rows], fit_rows),
        confidence_certification=outcomes(top1[certify_rows], certify_rows),
        costs=costs,
        alpha=alpha,
        delta=delta,
        max_review_share=max_review_share,
    )
    _check_capacity(artefact, max_review_share)
    held = {}
    if len(held_out_rows):
        scores = {"learned": learned(held_out_rows), "fallback": top1[held_out_rows]}
        for name, plan in (("learned", artefact.plans.learned), ("fallback", artefact.plans.fallback)):
            held[name] = _apply(
                plan,
                scores[name],
                cheap_error[held_out_rows],
                strong_score[held_out_rows],
                strong_error[held_out_rows],
                costs,
            )
    sizes = {"fit": len(fit_rows), "certification": len(certify_rows), "held_out": len(held_out_rows)}
    return RouterCalibration(calibrator, artefact, held, sizes)


def _rgb(image: np.ndarray) -> np.ndarray:
    """A grey (H, W) image as the (H, W, 3) RGB a decoded upload is."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return image


def _check_capacity(artefact: RouterArtefact, max_review_share: float | None) -> None:
    if max_review_share is None:
        return
    needs = {}
    for name, plan in (("learned", artefact.plans.learned), ("fallback", artefact.plans.fallback)):
        capacity = plan.document.get("capacity") or {}
        if not capacity.get("feasible", True):
            needs[name] = float(capacity["smallest_feasible_review_share"])
    if needs:
        smallest = max(needs.values())
        which = ", ".join(f"{name} plan needs >= {share:.6g}" for name, share in needs.items())
        if smallest >= 1.0:
            raise ConfigError(
                f"max_review_share {max_review_share:g} is infeasible: no plan certified at this alpha and "
                f"delta with these items sends less than everything to human review ({which}); the smallest "
                "review share that works is 1: raise alpha or label more items",
                field="max_review_share",
            )
        rounded_up = math.ceil(smallest * 10_000) / 10_000  # printed, it must still work
        raise ConfigError(
            f"max_review_share {max_review_share:g} is infeasible: no certified plan sends that few items "
            f"to human review ({which}); the smallest review share that works is {rounded_up:g} "
            f"(rerun with --max-review-share {rounded_up:g} or more, or more labelled items)",
            field="max_review_share",
        )
