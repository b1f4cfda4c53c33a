"""The learned router refit from production labels (cascades/router_refit.py): logged
features reused only at the router's feature version, the reference index extended with the fit
share alone, both plans certified on items the refit never saw, refusals that say what is missing."""

from __future__ import annotations

import numpy as np
import pytest

from cascades.learned_router import RouterArtefact
from cascades.router_refit import FIT_SHARE, RefitRefused, in_fit_share, refit_router
from policies.production_certify import TooFewLabels
from policies.risk_control import TierCosts
from policies.router_learner import LearnedScore
from tests.support import production_router_sim as sim
from visionroute.errors import InputError


@pytest.fixture(scope="module")
def incumbent() -> RouterArtefact:
    return sim.incumbent()


def refit(items, incumbent, embeddings, **kwargs):
    options = dict(
        task="t",
        incumbent=incumbent,
        known_versions=(),
        embed=lambda item: embeddings.get(item.id),
        alpha=0.1,
        delta=0.1,
        costs=TierCosts(),
        salt="test",
        has_vlm=False,
    )
    return refit_router(items, **{**options, **kwargs})


def test_the_refit_learns_from_the_fit_share_indexes_it_and_certifies_on_the_rest(incumbent):
    items, embeddings = sim.window(incumbent, 3000, np.random.default_rng(3))
    result = refit(items, incumbent, embeddings)
    new = result.artefact
    fit, cert = set(result.fit_item_ids), set(result.certification_item_ids)
    assert fit and cert and not fit & cert
    assert set(result.indexed_item_ids) <= fit  # never a certification item in the index
    assert len(new.index) == len(incumbent.index) + len(result.indexed_item_ids)
    # the incumbent's rows first, then exactly the indexed items' embeddings
    assert np.allclose(new.index.embeddings[: len(incumbent.index)], incumbent.index.embeddings, atol=1e-6)
    added = RouterArtefact.from_document(new.to_document()).index.embeddings[len(incumbent.index) :]
    expected = np.vstack([embeddings[i] for i in result.indexed_item_ids])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert np.allclose(added, expected, atol=1e-6)
    certification_rows = np.vstack([embeddings[i] for i in cert])
    certification_rows /= np.linalg.norm(certification_rows, axis=1, keepdims=True)
    distances, _ = new.index.search(certification_rows, 1)
    assert distances.min() > 1e-4  # no certification item is in the index
    # a new learner and index, the same feature definition, both plans certified
    assert new.learner.sha256 != incumbent.learner.sha256 and new.spec == incumbent.spec
    assert new.plans.learned.feasible and new.plans.alpha == 0.1 and new.plans.delta == 0.1
    assert new.plans.learned.document["certificate"]["n"] <= len(cert)
    assert "refit router's score" in new.plans.learned.document["certificate"]["score"]
    assert RouterArtefact.from_document({**new.to_document(), "sha256": new.sha256}).sha256 == new.sha256
    assert result.report["parent_router"] == incumbent.sha256
    # the split is the coin's, fixed before any label: about FIT_SHARE of the items
    assert all(in_fit_share(i, "test") for i in fit) and not any(in_fit_share(i, "test") for i in cert)
    assert abs(len(fit) / (len(fit) + len(cert)) - FIT_SHARE) < 0.06


def test_features_of_another_version_are_refused_naming_what_is_missing(incumbent):
    items, embeddings = sim.window(incumbent, 400, np.random.default_rng(4), version="f" * 64)
    with pytest.raises(RefitRefused) as caught:
        refit(items, incumbent, embeddings)
    reason = caught.value.reason
    assert "feature vector" in reason and "ffffffffffff" in reason and incumbent.spec.names[0] in reason
    # mixed windows: the other version's items are left out of the window and counted
    current, more = sim.window(incumbent, 3000, np.random.default_rng(5), prefix="now")
    result = refit(items + current, incumbent, {**embeddings, **more})
    assert result.report["left_out"]["other_feature_version"] == len(items)
    assert not {i.id for i in items} & set(result.fit_item_ids + result.certification_item_ids)


def test_too_few_labels_is_a_refusal_saying_how_many_more(incumbent):
    items, embeddings = sim.window(incumbent, 60, np.random.default_rng(6))
    with pytest.raises(TooFewLabels) as caught:
        refit(items, incumbent, embeddings)
    assert caught.value.needed_more > 0 and f"{caught.value.needed_more} more" in caught.value.reason


def test_an_image_not_as_served_a_fallback_row_or_a_flagged_label_never_enters_the_index(incumbent):
    items, embeddings = sim.window(incumbent, 3000, np.random.default_rng(7))
    altered = {item.id for item in items[::40]}
    stored = {k: (v + 0.5 if k in altered else v) for k, v in embeddings.items()}  # a redacted copy
    fallback = items[5]
    step, *rest = fallback.trace["steps"]
    failed = {**step, "details": {**step["details"], "fallback": True, "features": None}}
    fallback.trace = {"steps": [failed, *rest]}
    flagged = next(i for i in items[8:] if in_fit_share(i.id, "test") and i.id not in altered)
    flagged.labelled_by = "noisy"
    result = refit(items, incumbent, stored, alpha=0.15, distrusted_reviewers=frozenset({"noisy"}))
    assert result.report["no_router_score"] == {"fallback": 1, "image_unusable": len(altered)}
    # neither reaches the index, nor does a flagged reviewer's label
    assert not (altered | {fallback.id, flagged.id}) & set(result.indexed_item_ids)


def test_a_weighted_learner_fit_checks_its_weights():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 2)), rng.random(50) < 0.6
    plain = LearnedScore.fit(x, y, ("a", "b"))
    equal = LearnedScore.fit(x, y, ("a", "b"), sample_weight=np.full(50, 4.0))
    assert np.allclose(plain.coef, equal.coef) and np.isclose(plain.intercept, equal.intercept)
    with pytest.raises(InputError) as caught:
        LearnedScore.fit(x, y, ("a", "b"), sample_weight=np.zeros(50))
    assert caught.value.field == "sample_weight"


@pytest.mark.slow
def test_the_refit_routers_certificate_holds_over_independent_windows():
    """A few draws of the simulation (the report runs 200: python -m tests.support.production_router_sim)."""
    rows = sim.simulate(4)
    done = [r for r in rows if "error" in r]
    assert len(done) >= 3
    assert sum(r["violation"] for r in done) <= 1  # delta 0.1; observed errors sit well below alpha
    assert all(r["accepted"] > 0.3 for r in done)  # and the certificate is not vacuous
