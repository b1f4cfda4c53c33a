"""A synthetic production window for a learned router, for the refit's tests and its simulation.

Four classes; each item's embedding is its true class's centre plus noise, so the reference
index's neighbours know the truth better than the cheap tier does. The cheap tier's top-1
confidence c is uniform on [0.3, 1] and its answer is right with probability sqrt(c) (its score is
informative but miscalibrated). The incumbent router (``incumbent``) was fitted offline on 150
items; production serves it: each request's trace carries the router step (the feature vector,
its names, the router's version) and the ``policy:thresholds`` score. The queue holds every item
the incumbent did not accept (a review, inclusion probability 1) and an audit sample of its
accepts at ``audit_fraction``; reviewers label what they see (no non-response unless asked).

``true_accepted_error`` puts a fresh population through a served artefact's learned plan: the
figure a certificate promises about.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from cascades.learned_router import RouterArtefact, fit_router
from cascades.router_features import FeatureSpec

CLASSES = ("a", "b", "c", "d")
DIM = 8
SPEC = FeatureSpec(output="classifier", top_k=3, use_input=False, neighbours_k=5, neighbour_votes=True)
CENTRES = np.eye(len(CLASSES), DIM) * 3.0


def population(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Items as served: true class, embedding, answer rows (top-3), the completed probabilities."""
    c = len(CLASSES)
    truth = rng.integers(0, c, n)
    embedding = CENTRES[truth] + rng.normal(0, 1.2, (n, DIM))
    conf = rng.uniform(0.3, 1.0, n)
    right = rng.random(n) < np.sqrt(conf)
    answer = np.where(right, truth, (truth + rng.integers(1, c, n)) % c)
    rows = np.zeros((n, 3), np.int64)
    probs = np.zeros((n, c))
    for i in range(n):
        others = [k for k in rng.permutation(c) if k != answer[i]]
        rows[i] = [answer[i], others[0], others[1]]
        probs[i, rows[i]] = [conf[i], (1 - conf[i]) * 0.6, (1 - conf[i]) * 0.3]
        probs[i, others[2]] = (1 - conf[i]) * 0.1  # the stage shares what rows leave equally
    return {
        "truth": truth,
        "embedding": embedding,
        "conf": conf,
        "answer": answer,
        "rows": rows,
        "probs": probs,
    }


def incumbent(seed: int = 0) -> RouterArtefact:
    rng = np.random.default_rng(seed)
    p = population(150, rng)
    return fit_router(
        class_names=CLASSES,
        spec=SPEC,
        output=p["probs"],
        cheap_answers=p["answer"],
        labels=p["truth"],
        embeddings=p["embedding"],
        embedding="synthetic",
    ).artefact


def window(
    router: RouterArtefact,
    n_traffic: int,
    rng: np.random.Generator,
    *,
    accept_threshold: float = 0.8,
    audit_fraction: float = 0.25,
    prefix: str = "item",
    version: str | None = None,
) -> tuple[list[SimpleNamespace], dict[str, np.ndarray]]:
    """The queue's items of ``n_traffic`` served requests, and id -> embedding (the stored images)."""
    p = population(n_traffic, rng)
    features = router.features(output=p["probs"], cheap_answers=p["answer"], embeddings=p["embedding"])
    score = router.learner.score(features)
    items, embeddings = [], {}
    for i in range(n_traffic):
        accepted = score[i] >= accept_threshold
        if accepted and rng.random() >= audit_fraction:
            continue
        item_id = f"{prefix}-{i}"
        embeddings[item_id] = p["embedding"][i : i + 1]
        proposed = [
            {"label": CLASSES[k], "class_id": int(k), "confidence": float(p["probs"][i, k])}
            for k in p["rows"][i]
        ]
        right = p["answer"][i] == p["truth"][i]
        label = {"verdict": "confirm"} if right else {"verdict": "correct", "label": CLASSES[p["truth"][i]]}
        details = {
            "applied": True,
            "version": version or router.sha256,
            "fallback": False,
            "feature_names": list(router.spec.names),
            "features": dict(zip(router.spec.names, map(float, features[i]))),
        }
        trace = {
            "steps": [
                {"stage": "router", "score": float(score[i]), "details": details},
                {"stage": "policy:thresholds", "score": float(score[i])},
            ]
        }
        items.append(
            SimpleNamespace(
                id=item_id,
                task="t",
                tenant="default",
                kind="audit" if accepted else "review",
                created_at=float(i),
                inclusion_probability=audit_fraction if accepted else 1.0,
                trace=trace,
                proposed=proposed,
                status="labelled",
                label=label,
                labelled_by="reviewer",
            )
        )
    return items, embeddings


def true_accepted_error(artefact: RouterArtefact, n: int, rng: np.random.Generator) -> float:
    """The learned plan's accepted error on a fresh population (no VLM: cheap accepts only)."""
    p = population(n, rng)
    score = artefact.score(output=p["probs"], cheap_answers=p["answer"], embeddings=p["embedding"])
    accepted = score >= artefact.plans.learned.accept_threshold
    return float((p["answer"][accepted] != p["truth"][accepted]).mean()) if accepted.any() else 0.0


def simulate(draws: int, *, n_traffic: int = 3000, alpha: float = 0.1, delta: float = 0.1, seed: int = 0):
    """Refit the incumbent on ``draws`` independent windows; per draw the learned plan's true
    accepted error (fresh population), its accepted share, and whether it exceeds alpha. A
    refusal (too few labels, infeasible) counts as no violation and is reported."""
    from cascades.router_refit import RefitRefused, refit_router
    from policies.production_certify import TooFewLabels
    from policies.risk_control import TierCosts

    router = incumbent(seed)
    out = []
    for draw in range(draws):
        rng = np.random.default_rng([seed, draw])
        items, embeddings = window(router, n_traffic, rng, prefix=f"d{draw}")
        try:
            refit = refit_router(
                items,
                task="t",
                incumbent=router,
                known_versions=(),
                embed=lambda item, stored=embeddings: stored.get(item.id),
                alpha=alpha,
                delta=delta,
                costs=TierCosts(),
                salt=f"draw-{draw}",
                has_vlm=False,
            )
        except (RefitRefused, TooFewLabels) as exc:
            out.append({"draw": draw, "refused": str(exc)[:80]})
            continue
        p = population(20_000, rng)
        score = refit.artefact.score(output=p["probs"], cheap_answers=p["answer"], embeddings=p["embedding"])
        accepted = score >= refit.artefact.plans.learned.accept_threshold
        error = float((p["answer"][accepted] != p["truth"][accepted]).mean()) if accepted.any() else 0.0
        out.append(
            {"draw": draw, "error": error, "accepted": float(accepted.mean()), "violation": error > alpha}
        )
    return out


if __name__ == "__main__":  # python -m tests.support.production_router_sim [draws [alpha]]
    import sys
    import time

    started = time.perf_counter()
    draws = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    alpha = float(sys.argv[2]) if len(sys.argv) > 2 else 0.1
    rows = simulate(draws, alpha=alpha)
    done = [r for r in rows if "error" in r]
    errors = np.array([r["error"] for r in done])
    print(
        f"{draws} draws ({len(rows) - len(done)} refused), alpha {alpha:g}, delta 0.1: violation rate "
        f"{np.mean([r['violation'] for r in done]):.3f}; true accepted error median {np.median(errors):.4f} "
        f"(max {errors.max():.4f}); accepted share median {np.median([r['accepted'] for r in done]):.3f}; "
        f"{time.perf_counter() - started:.0f} s"
    )
