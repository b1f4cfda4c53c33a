"""Refit a learned router from production labels, and certify its plans on items it never saw.

A recalibration job (router/services/recalibration.py) for a task served by a learned router
(``cascades.learned_router.RouterArtefact``) cannot simply move thresholds: the decisions come
from the router's score, and the router should learn from the labels production gathered. This
module builds the new router artefact from the review queue's items (``sample_from_items``):

1. **Features from the traces.** Every served request's trace holds the router step with the
   feature vector, its names and the router's version (sha256). A row is reused when its names
   are the incumbent's and its version is one whose feature definition is the incumbent's
   (``known_versions``: the incumbent and the routers refit from it, which share its spec).
   Items from another feature version, or from before the router served, are left out of the
   window (counted): which version scored an item depends on when it came, not on its label, so
   this restricts the window in time and keeps the sampling valid. No usable row at all is a
   refusal naming what is missing. A request whose features failed at run time (the fallback:
   no vector) has no router score; it is never fitted on and counts as the worst case in the
   certificate (accepted by every candidate, wrong), as a non-response does.
2. **One split, decided before any label is read.** An independent coin per item (a hash of the
   item id and a salt) puts it in the *fit share* (``FIT_SHARE``) or the *certification share*.
   The coin ignores the label, so the certification share is a Bernoulli subsample of the
   sampled items: each item's inclusion probability is multiplied by the same constant, the
   ratios ``pi_min / pi_i`` the betting test uses are unchanged, and the Horvitz-Thompson
   argument of ``policies.production_certify`` holds on it as stated there.
3. **The reference index is extended with the fit share** (never the certification share; the
   caller passes no erased item: ``build_artefact`` drops them before). The neighbour block is
   recomputed for every item against the extended index: fit items leave-one-out by id (as
   ``cascades.learned_router.fit_router`` scores the index's own items), certification items as
   a live request would see it. That needs each item's embedding (``embed``: the stored image
   through the served embedder). An item whose image is gone, withheld, or is not the one
   served is unusable there; to know, the neighbour block is first recomputed against the
   *incumbent* index and compared with the logged one (``NEIGHBOUR_TOLERANCE``): a mismatch
   (a redacted or resized copy) is treated like a missing image: not fitted, not indexed, the
   worst case in the certificate. The other blocks (output, input statistics) are the logged
   values, computed by the served code.
4. **The learner** (``LearnedScore``) is refit on the fit share's items whose cheap answer has a
   trusted label, weighted by 1 / inclusion probability (so it fits the traffic, not the queue's
   mix of escalations and audits; the weights do not matter for validity, only for power).
5. **Both plans certified** on the certification share with ``certify_production_plan`` (its own
   fit-test split inside, Horvitz-Thompson betting or exact binomial): ``learned`` on the refit
   router's score, ``fallback`` on the cheap tier's calibrated top-1 confidence of the same items.

Too few labels is ``TooFewLabels`` counted in items of the whole window: the certification
share's shortfall divided by its share, or the fit share's labelled minimum divided by its.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cascades.learned_router import CertifiedThresholds, RouterArtefact, RouterPlans
from cascades.router_features import NEIGHBOUR_NAMES, VOTE_NAMES, ReferenceIndex
from policies.production_certify import (
    ProductionSample,
    TooFewLabels,
    certify_production_plan,
    sample_from_items,
)
from policies.risk_control import TierCosts
from policies.router_learner import LearnedScore

FIT_SHARE = 0.5  # of the window's items: the learner and the index; the rest certify
MIN_FIT_LABELS = 40  # labelled cheap answers the learner needs in the fit share
MIN_FIT_EACH = 3  # ... with at least this many right and this many wrong
NEIGHBOUR_TOLERANCE = 1e-4  # logged vs recomputed neighbour block (float32 search, JSON floats)
WORST_SCORE = 1.0  # a row without a router score: above every finite candidate, so "accepted"
ROUTER_STAGE = "router"


class RefitRefused(Exception):
    """The refit cannot be built from these items; ``reason`` says what is missing."""

    def __init__(self, reason: str, **details: Any) -> None:
        super().__init__(reason)
        self.reason = reason
        self.details = details


@dataclass(frozen=True)
class RouterRefit:
    """The refit router artefact (with both certified plans) and how it was built."""

    artefact: RouterArtefact
    report: dict[str, Any]
    fit_item_ids: tuple[str, ...]
    certification_item_ids: tuple[str, ...]
    indexed_item_ids: tuple[str, ...]  # the production items added to the reference index


def in_fit_share(item_id: str, salt: str, share: float = FIT_SHARE) -> bool:
    """The item's coin: independent of its label (a hash of its id), fixed for a salt."""
    digest = hashlib.sha256(f"router-refit:{salt}:{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < share


def router_step(item: Any) -> dict[str, Any] | None:
    steps = item.trace.get("steps", []) if isinstance(item.trace, dict) else []
    return next(
        (
            s
            for s in reversed(steps)
            if s.get("stage") == ROUTER_STAGE and (s.get("details") or {}).get("applied")
        ),
        None,
    )


def label_class(
    item: Any, class_names: Sequence[str], distrusted: frozenset[str] = frozenset()
) -> int | None:
    """The class the reviewer's label names (None: no label, a flagged reviewer's, a reject, or a
    class not the router's): what the item adds to the reference index."""
    label = item.label or {}
    if item.status != "labelled" or not label or getattr(item, "labelled_by", None) in distrusted:
        return None
    if label.get("verdict") == "confirm":
        name = item.proposed[0].get("label") if item.proposed else None
    elif label.get("verdict") == "correct":
        name = label.get("label")
    else:
        return None
    return class_names.index(name) if name in class_names else None


def _probabilities(item: Any, n_classes: int) -> np.ndarray:
    """(1, C) the served answer rows as the router stage completes them (``output_probabilities``)."""
    p = np.zeros(n_classes)
    ids = [int(row["class_id"]) for row in item.proposed]
    p[ids] = [float(row["confidence"]) for row in item.proposed]
    missing = np.ones(n_classes, bool)
    missing[ids] = False
    if missing.any():
        p[missing] = max(0.0, 1.0 - float(p.sum())) / int(missing.sum())
    return p.reshape(1, -1)


def _neighbour_blocks(index, which, embeddings, answers, probabilities, artefact, exclude=None) -> np.ndarray:
    """The neighbour (and vote) block of rows ``which`` against ``index``, as one batch."""
    spec = artefact.spec
    return index.neighbour_features(
        np.vstack([embeddings[i] for i in which]),
        np.asarray([answers[i] for i in which], np.int64),
        spec.neighbours_k,
        exclude_ids=exclude,
        probabilities=np.vstack([probabilities[i] for i in which]) if spec.neighbour_votes else None,
    )


def refit_router(
    items: Iterable[Any],
    *,
    task: str,
    incumbent: RouterArtefact,
    known_versions: Iterable[str],
    embed: Callable[[Any], np.ndarray | None] | None,
    alpha: float,
    delta: float,
    costs: TierCosts,
    salt: str,
    has_vlm: bool,
    distrusted_reviewers: frozenset[str] = frozenset(),
    max_review_share: float | None = None,
) -> RouterRefit:
    """The module docstring's steps 1-5. ``items``: the task's review items (no erased one);
    ``embed(item)``: the (1, d) embedding of the image the item was served on, or None when it
    cannot be had. Raises ``RefitRefused`` or ``TooFewLabels``."""
    spec, names = incumbent.spec, incumbent.spec.names
    known = set(known_versions) | {incumbent.sha256}
    queued = sample_from_items(list(items), task=task, distrusted_reviewers=distrusted_reviewers)
    base = queued.sample
    neighbours = spec.neighbours_k > 0
    if neighbours and embed is None:
        raise RefitRefused(
            "the router uses a reference index, and extending it needs each item's embedding; no "
            "embedder was given (the stored images through the served embedder)"
        )
    nb_names = NEIGHBOUR_NAMES + (VOTE_NAMES if spec.neighbour_votes else ())
    nb_cols = [names.index(n) for n in nb_names] if neighbours else []
    left_out = {"other_feature_version": 0}
    other_versions: dict[str, int] = {}
    rows: list[int] = []  # row of base kept
    features: list[np.ndarray | None] = []  # None: no router score (fallback, or image unusable)
    embeddings: list[np.ndarray | None] = []
    classes: list[int | None] = []
    answers: list[int] = []
    probabilities: list[np.ndarray | None] = []
    counts = {"fallback": 0, "image_unusable": 0}
    for r, item in enumerate(queued.items):
        step = router_step(item)
        details = (step or {}).get("details") or {}
        if (
            step is None
            or details.get("version") not in known
            or tuple(details.get("feature_names") or ()) != names
        ):
            left_out["other_feature_version"] += 1
            key = "none (no router step)" if step is None else str(details.get("version"))[:12]
            other_versions[key] = other_versions.get(key, 0) + 1
            continue
        rows.append(r)
        classes.append(label_class(item, incumbent.class_names, distrusted_reviewers))
        answer = int(item.proposed[0]["class_id"]) if item.proposed else -1
        answers.append(answer)
        logged = details.get("features")
        vector = None
        if not details.get("fallback") and isinstance(logged, dict):
            vector = np.array([float(logged[n]) for n in names], np.float64)
        if vector is None:
            counts["fallback"] += 1
        probabilities.append(
            _probabilities(item, len(incumbent.class_names))
            if item.proposed
            else np.zeros((1, len(incumbent.class_names)))
        )
        emb = embed(item) if neighbours and vector is not None and answer >= 0 else None
        if neighbours and vector is not None and emb is None:
            counts["image_unusable"] += 1
            vector = None
        features.append(vector)
        embeddings.append(emb)
    if neighbours:  # the image must be the one served: its neighbours in the incumbent index agree
        check = [i for i, e in enumerate(embeddings) if e is not None]
        if check:
            again = _neighbour_blocks(incumbent.index, check, embeddings, answers, probabilities, incumbent)
            logged = np.vstack([features[i][nb_cols] for i in check])
            close = np.isclose(again, logged, atol=NEIGHBOUR_TOLERANCE, rtol=NEIGHBOUR_TOLERANCE).all(1)
            for i in np.asarray(check)[~close]:  # a redacted or resized copy: unusable
                features[i], embeddings[i] = None, None
                counts["image_unusable"] += 1
    if not rows:
        seen = ", ".join(f"{v}: {n}" for v, n in sorted(other_versions.items())) or "none"
        raise RefitRefused(
            f"no review item of task {task!r} carries the router's feature vector of a known version "
            f"(versions {sorted(v[:12] for v in known)}, features {list(names)}); the items carry "
            f"{seen}. The router cannot be refit from logged features: collect labels under the "
            "current router; the running version stays",
            left_out=left_out,
        )
    n = len(rows)
    fit = np.array([in_fit_share(queued.items[r].id, salt) for r in rows])
    usable = np.array([f is not None for f in features])
    pi = base.inclusion_probability[rows]
    cheap_error = base.cheap_error[rows]
    # -- the extended index: the incumbent's rows, then the fit share's labelled items
    index, indexed, index_row = incumbent.index, [], {}
    if neighbours:
        new = [i for i in range(n) if fit[i] and usable[i] and classes[i] is not None]
        if new:
            start = len(incumbent.index)
            index = ReferenceIndex.from_items(
                np.vstack([incumbent.index.embeddings, *[embeddings[i] for i in new]]),
                np.concatenate([incumbent.index.labels, [classes[i] for i in new]]),
                incumbent.index.n_classes,
            )
            index_row = {i: start + k for k, i in enumerate(new)}
            indexed = new
        scored = list(np.flatnonzero(usable))
        if scored:
            exclude = np.array([index_row.get(i, -1) for i in scored])  # -1: not in the index
            blocks = _neighbour_blocks(index, scored, embeddings, answers, probabilities, incumbent, exclude)
            for k, i in enumerate(scored):
                features[i] = features[i].copy()
                features[i][nb_cols] = blocks[k]
    # -- the learner, on the fit share's labelled cheap answers
    trains = fit & usable & ~np.isnan(cheap_error)
    n_train = int(trains.sum())
    wrong = int(np.nansum(cheap_error[trains]))
    if n_train < MIN_FIT_LABELS or min(wrong, n_train - wrong) < MIN_FIT_EACH:
        short = max(MIN_FIT_LABELS - n_train, 0)
        more = math.ceil(max(short, 1) / FIT_SHARE)
        raise TooFewLabels(
            f"cheap_error: the router's learner needs at least {MIN_FIT_LABELS} labelled cheap answers in "
            f"the fit share with at least {MIN_FIT_EACH} right and {MIN_FIT_EACH} wrong; it has {n_train} "
            f"({wrong} wrong). About {more} more labels of the cheap tier's answers under the current router "
            f"are needed ({FIT_SHARE:.0%} of items fit). This is a refusal, not a weaker router.",
            field="cheap_error",
            needed_more=more,
        )
    x_fit = np.vstack([features[i] for i in np.flatnonzero(trains)])
    learner = LearnedScore.fit(
        x_fit, cheap_error[trains] == 0.0, names, c=incumbent.learner.c, sample_weight=1.0 / pi[trains]
    )
    # -- the certification share: the refit score, and the top-1 confidence for the fallback
    cert = np.flatnonzero(~fit)
    score = np.full(len(cert), WORST_SCORE)
    scored = [k for k, i in enumerate(cert) if usable[i]]
    if scored:
        score[scored] = learner.score(np.vstack([features[cert[k]] for k in scored]))
    # no router score: accepted by every candidate and wrong (unknown label), as a non-response
    cert_error = np.where(usable[cert], cheap_error[cert], np.nan)
    top1 = np.array(
        [
            float(queued.items[rows[i]].proposed[0]["confidence"]) if queued.items[rows[i]].proposed else 0.0
            for i in cert
        ]
    )
    strong_error = base.strong_error[rows][cert]
    strong_score = base.strong_score[rows][cert]
    if not has_vlm:
        strong_error = np.full(len(cert), np.nan)
    min_pi = base.min_inclusion_probability

    def certified(values, error, what):
        sample = ProductionSample(values, error, pi[cert], strong_error, strong_score, min_pi)
        name = "the refit router's score" if what == "learned" else "cheap tier's calibrated top-1 confidence"
        try:
            return certify_production_plan(
                sample,
                costs=costs,
                alpha=alpha,
                delta=delta,
                max_review_share=max_review_share,
                score_name=name,
            )
        except TooFewLabels as exc:
            more = math.ceil(exc.needed_more / (1.0 - FIT_SHARE))
            raise TooFewLabels(
                f"{exc.reason} ({what} plan, on the certification share: {1 - FIT_SHARE:.0%} of the items; "
                f"about {more} more labelled items in all)",
                field=exc.field,
                needed_more=more,
            ) from None

    learned = certified(score, cert_error, "learned")
    if not learned.certificate.is_feasible:
        raise RefitRefused(
            f"the refit router's labels show no plan keeps the accepted error <= {alpha:g} at delta={delta:g} "
            f"({learned.certificate.n} certification items): nothing to propose; the running version stays",
            certificate=learned.certificate.to_dict(),
        )
    fallback = certified(top1, cheap_error[cert], "fallback")
    plans = RouterPlans(
        CertifiedThresholds.from_plan(learned, "learned"),
        CertifiedThresholds.from_plan(fallback, "top1"),
        float(alpha),
        float(delta),
    )
    artefact = dataclasses.replace(incumbent, learner=learner, index=index, plans=plans)
    ids = [queued.items[r].id for r in rows]
    report = {
        "parent_router": incumbent.sha256,
        "router": artefact.sha256,
        "split": {
            "fit_share": FIT_SHARE,
            "salt": salt,
            "rule": "sha256(salt, item id): independent of labels",
        },
        "items": n,
        "fit_items": int(fit.sum()),
        "certification_items": len(cert),
        "learner_rows": n_train,
        "learner_wrong": wrong,
        "index_rows": {
            "incumbent": 0 if incumbent.index is None else len(incumbent.index),
            "added": len(indexed),
        },
        "no_router_score": counts,
        "left_out": {**queued.left_out, **left_out},
        "other_feature_versions": other_versions,
        "learned_certificate": learned.certificate.statement(),
        "fallback_certificate": fallback.certificate.statement(),
    }
    return RouterRefit(
        artefact,
        report,
        tuple(ids[i] for i in np.flatnonzero(fit)),
        tuple(ids[i] for i in cert),
        tuple(ids[i] for i in indexed),
    )
