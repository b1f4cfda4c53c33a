"""The learned router: features (``cascades.router_features``) -> a logistic score
(``policies.router_learner``) of P(the cheap answer is correct), fitted on the fit share, with
the frozen reference index it was fitted against, in one JSON artefact (issue 22).

``fit_router`` does the whole fit from the fit share's items:
1. the reference index is built from the fit share's embeddings and labels;
2. each fit item's neighbour features are computed leave-one-out (its own row excluded by id),
   so it sees the index as a request that is not in it would;
3. the logistic score is fitted on those features against "cheap answer correct";
4. out-of-fold scores of the fit items (``cross_fitted_scores``) are returned for the plan's
   candidate grid (``policies.risk_control.choose_tier_thresholds`` places and orders its
   candidates on the fit share; the certificate is then computed on items the learner and the
   index never saw).

``RouterArtefact`` is what a deployment loads: the class names of the tier it routes for, the
feature spec, the learner, the reference index, and its version (sha256 of the canonical
document); ``from_document`` checks every part and raises ConfigError naming the field.
The artefact also ships the certified plans the served stage decides with (``RouterPlans``):
the three-tier thresholds certified on the learned score, and the confidence-only thresholds the
request falls back to when a feature fails at run time (``certify_router_plans`` certifies both
from one certification split). Both are part of the document, so its sha256 covers them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cascades.router_features import FeatureSpec, ReferenceIndex
from policies.risk_control import TierCosts, TierOutcomes, TierPlan, choose_tier_thresholds
from policies.router_learner import LearnedScore, cross_fitted_scores
from visionroute.errors import ConfigError

FORMAT = "visionroute.router/1"
PLAN_NAMES = ("learned", "fallback")


def _threshold(document: dict[str, Any], key: str, field: str, *, optional: bool = False) -> float | None:
    value = document.get(key)
    if value is None and optional:
        return None
    try:
        number = float(value)  # TierPlan.to_dict writes +-inf as the strings "inf" / "-inf"
    except (TypeError, ValueError):
        raise ConfigError(f"{field}.{key} must be a number, got {value!r}", field=f"{field}.{key}") from None
    if number != number:  # NaN
        raise ConfigError(f"{field}.{key} is NaN", field=f"{field}.{key}")
    return number


@dataclass(frozen=True)
class CertifiedThresholds:
    """One certified three-tier plan as ``policies.thresholds.decide`` reads it: accept when the
    score >= ``accept_threshold``, escalate down to ``escalate_threshold``, review below; an
    answer with no score (no detections) goes to review. Thresholds may be infinite (``inf``:
    never accept). ``score`` names what the thresholds are on: ``learned`` (the router's score)
    or ``top1`` (the cheap tier's calibrated top-1 confidence, the fallback)."""

    score: str
    accept_threshold: float
    escalate_threshold: float
    vlm_accept_threshold: float | None
    document: dict[str, Any]  # the TierPlan's to_dict(): certificate, rates, capacity
    empty_result: str = "review"

    @property
    def feasible(self) -> bool:
        """False: the certificate certified nothing, so this plan accepts no cheap answer."""
        return self.accept_threshold != float("inf")

    @classmethod
    def from_plan(cls, plan: TierPlan, score: str) -> CertifiedThresholds:
        return cls.from_document(plan.to_dict(), score=score, field="router.plans")

    @classmethod
    def from_document(cls, document: Any, *, score: str, field: str) -> CertifiedThresholds:
        if not isinstance(document, dict):
            raise ConfigError(f"{field}: expected an object", field=field)
        for key in ("accept_threshold", "review_threshold", "certificate"):
            if key not in document:
                raise ConfigError(f"{field}.{key} is missing", field=f"{field}.{key}")
        accept = _threshold(document, "accept_threshold", field)
        escalate = _threshold(document, "review_threshold", field)
        if escalate > accept:
            raise ConfigError(
                f"{field}.review_threshold ({escalate}) exceeds accept_threshold ({accept})",
                field=f"{field}.review_threshold",
            )
        vlm = _threshold(document, "vlm_accept_threshold", field, optional=True)
        return cls(score, accept, escalate, vlm, dict(document))


@dataclass(frozen=True)
class RouterPlans:
    """The plans a served router decides with: ``learned`` on the router's score, ``fallback``
    on the calibrated top-1 confidence (when a feature fails at run time); ``alpha``/``delta``
    their common target."""

    learned: CertifiedThresholds
    fallback: CertifiedThresholds
    alpha: float
    delta: float

    def to_document(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "delta": self.delta,
            "learned": self.learned.document,
            "fallback": self.fallback.document,
        }

    @classmethod
    def from_document(cls, document: Any, *, field: str = "router.plans") -> RouterPlans:
        if not isinstance(document, dict):
            raise ConfigError(f"{field}: expected an object", field=field)
        for key in ("alpha", "delta", *PLAN_NAMES):
            if key not in document:
                raise ConfigError(f"{field}.{key} is missing", field=f"{field}.{key}")
        return cls(
            CertifiedThresholds.from_document(document["learned"], score="learned", field=f"{field}.learned"),
            CertifiedThresholds.from_document(document["fallback"], score="top1", field=f"{field}.fallback"),
            float(document["alpha"]),
            float(document["delta"]),
        )


@dataclass(frozen=True, eq=False)
class RouterArtefact:
    class_names: tuple[str, ...]
    spec: FeatureSpec
    learner: LearnedScore
    index: ReferenceIndex | None  # None when spec.neighbours_k == 0
    embedding: str = ""  # what the embedding is, e.g. "cheap tier input pixels (8x8), L2-normalised"
    plans: RouterPlans | None = None  # the certified thresholds it is served with (certify_router_plans)

    def features(
        self,
        *,
        output,
        cheap_answers: np.ndarray,
        input_statistics: np.ndarray | None = None,
        embeddings: np.ndarray | None = None,
        exclude_ids: np.ndarray | None = None,
    ) -> np.ndarray:
        return self.spec.extract(
            output=output,
            cheap_answers=cheap_answers,
            input_statistics=input_statistics,
            embeddings=embeddings,
            index=self.index,
            exclude_ids=exclude_ids,
        )

    def score(self, **kwargs) -> np.ndarray:
        """The router score (P(cheap answer correct)) of each item; keyword arguments as ``features``."""
        return self.learner.score(self.features(**kwargs))

    # -- the stored form ----------------------------------------------------------------------

    def to_document(self) -> dict[str, Any]:
        document = {
            "format": FORMAT,
            "class_names": list(self.class_names),
            "features": self.spec.to_document(),
            "embedding": self.embedding,
            "learner": self.learner.to_document(),
            "learner_sha256": self.learner.sha256,
            "reference_index": None if self.index is None else self.index.to_document(),
        }
        if self.plans is not None:  # absent from plan-less documents, so their sha256 is unchanged
            document["plans"] = self.plans.to_document()
        return document

    @property
    def sha256(self) -> str:
        canonical = json.dumps(self.to_document(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def version(self) -> str:
        return f"router@{self.sha256[:12]}"

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps({**self.to_document(), "sha256": self.sha256}))
        return path

    @classmethod
    def load(cls, path: str | Path, *, class_names: Sequence[str] | None = None) -> RouterArtefact:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"router artefact {str(path)!r} does not exist", field="router")
        try:
            document = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"router artefact {str(path)!r} is not JSON: {exc}", field="router") from exc
        return cls.from_document(document, class_names=class_names)

    @classmethod
    def from_document(cls, document: Any, *, class_names: Sequence[str] | None = None) -> RouterArtefact:
        """Check and rebuild; ``class_names``: the labels of the tier this router is deployed with
        (a mismatch is a ConfigError naming ``router.class_names``). A document of some other
        shape than the checks below name (a list nested thousands deep, a number where a list
        belongs) is a ConfigError naming ``router``, never a crash."""
        try:
            return cls._from_document(document, class_names=class_names)
        except (
            TypeError,
            ValueError,
            KeyError,
            IndexError,
            AttributeError,
            OverflowError,
            RecursionError,
        ) as exc:
            raise ConfigError(
                f"router: not a router document ({type(exc).__name__}: {str(exc)[:200]})", field="router"
            ) from None

    @classmethod
    def _from_document(cls, document: Any, *, class_names: Sequence[str] | None = None) -> RouterArtefact:
        if not isinstance(document, dict):
            raise ConfigError("router: expected an object", field="router")
        for key in ("format", "class_names", "features", "learner"):
            if key not in document:
                raise ConfigError(f"router.{key} is missing", field=f"router.{key}")
        if document["format"] != FORMAT:
            raise ConfigError(
                f"router.format is {document['format']!r}; expected {FORMAT!r}", field="router.format"
            )
        if not isinstance(document["class_names"], list) or not all(
            isinstance(n, str) for n in document["class_names"]
        ):
            raise ConfigError("router.class_names must be a list of strings", field="router.class_names")
        names = tuple(document["class_names"])
        if class_names is not None and names != tuple(class_names):
            raise ConfigError(
                f"router.class_names {list(names)} do not match the cheap tier's labels {list(class_names)}",
                field="router.class_names",
            )
        spec = FeatureSpec.from_document(document["features"], field="router.features")
        learner = LearnedScore.from_document(
            document["learner"], feature_names=spec.names, field="router.learner"
        )
        if "learner_sha256" in document and document["learner_sha256"] != learner.sha256:
            raise ConfigError(
                f"router.learner_sha256 is {document['learner_sha256']!r}; the learner hashes to {learner.sha256!r}",
                field="router.learner_sha256",
            )
        index = None
        if spec.neighbours_k > 0:
            if document.get("reference_index") is None:
                raise ConfigError(
                    f"router.reference_index is missing; the features use {spec.neighbours_k} neighbours",
                    field="router.reference_index",
                )
            index = ReferenceIndex.from_document(document["reference_index"], field="router.reference_index")
            if index.n_classes != len(names):
                raise ConfigError(
                    f"router.reference_index has {index.n_classes} classes, the router {len(names)}",
                    field="router.reference_index.n_classes",
                )
        plans = None
        if document.get("plans") is not None:
            plans = RouterPlans.from_document(document["plans"], field="router.plans")
        artefact = cls(names, spec, learner, index, str(document.get("embedding", "")), plans)
        if "sha256" in document and document["sha256"] != artefact.sha256:
            raise ConfigError(
                f"router.sha256 is {document['sha256']!r}; the document hashes to {artefact.sha256!r}",
                field="router.sha256",
            )
        return artefact


@dataclass(frozen=True)
class FittedRouter:
    artefact: RouterArtefact
    fit_scores: np.ndarray  # out-of-fold scores of the fit items (for the plan's candidate grid)


def fit_router(
    *,
    class_names: Sequence[str],
    spec: FeatureSpec,
    output,
    cheap_answers: np.ndarray,
    labels: np.ndarray,
    input_statistics: np.ndarray | None = None,
    embeddings: np.ndarray | None = None,
    embedding: str = "",
    folds: int = 5,
    seed: int = 0,
    reference_embeddings: np.ndarray | None = None,
    reference_labels: np.ndarray | None = None,
) -> FittedRouter:
    """Fit the router on the fit share's items (see the module docstring). ``reference_*``:
    more labelled items for the reference index only (e.g. the tiers' training items; never
    the certification items), after the fit items, which stay its first rows."""
    labels = np.asarray(labels, np.int64)
    cheap_answers = np.asarray(cheap_answers, np.int64)
    index = None
    if spec.neighbours_k > 0:
        if embeddings is None:
            raise ConfigError("the router uses neighbours but no embeddings were given", field="embeddings")
        items, item_labels = np.asarray(embeddings), labels
        if reference_embeddings is not None:
            items = np.concatenate([items, np.asarray(reference_embeddings, items.dtype)])
            item_labels = np.concatenate([labels, np.asarray(reference_labels, np.int64)])
        index = ReferenceIndex.from_items(items, item_labels, len(class_names))
    features = spec.extract(
        output=output,
        cheap_answers=cheap_answers,
        input_statistics=input_statistics,
        embeddings=embeddings,
        index=index,
        exclude_ids=np.arange(len(labels)) if index is not None else None,  # leave-one-out
    )
    correct = cheap_answers == labels
    learner = LearnedScore.fit(features, correct, spec.names)
    fit_scores = cross_fitted_scores(features, correct, spec.names, folds=folds, seed=seed)
    return FittedRouter(RouterArtefact(tuple(class_names), spec, learner, index, embedding), fit_scores)


def certify_router_plans(
    artefact: RouterArtefact,
    *,
    learned_fit: TierOutcomes,
    learned_certification: TierOutcomes,
    confidence_fit: TierOutcomes,
    confidence_certification: TierOutcomes,
    costs: TierCosts,
    alpha: float,
    delta: float,
    max_review_share: float | None = None,
    n_points: int = 40,
) -> RouterArtefact:
    """The artefact with both served plans certified on one certification split
    (``policies.risk_control.choose_tier_thresholds``, the same certificate as today's plan):
    ``learned`` on the router's score (``learned_fit``: the fit share's out-of-fold scores, which
    order the candidates; ``learned_certification``: the certification items, which the learner
    and the reference index never saw) and ``fallback`` on the calibrated top-1 confidence of
    the same items. Errors (``cheap_error``, ``strong_error``) are the same items' in both."""
    plans = {}
    for name, fit, certification in (
        ("learned", learned_fit, learned_certification),
        ("fallback", confidence_fit, confidence_certification),
    ):
        plan = choose_tier_thresholds(
            fit,
            certification,
            costs=costs,
            alpha=alpha,
            delta=delta,
            n_points=n_points,
            max_review_share=max_review_share,
        )
        plans[name] = CertifiedThresholds.from_plan(plan, "learned" if name == "learned" else "top1")
    return dataclasses.replace(
        artefact, plans=RouterPlans(plans["learned"], plans["fallback"], float(alpha), float(delta))
    )
