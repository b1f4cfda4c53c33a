"""The learned router's features, reference index and artefact (cascades.router_features,
cascades.learned_router): leave-one-out, the stored form, and bad artefacts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cascades.learned_router import RouterArtefact, fit_router
from cascades.router_features import (
    NO_NEIGHBOUR_DISTANCE,
    FeatureSpec,
    ReferenceIndex,
    classifier_features,
    detector_features,
)
from visionroute.errors import ConfigError

CLASSES = [str(d) for d in range(4)]


def clustered(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    centres = rng.normal(size=(4, 16)) * 3
    embeddings = centres[labels] + rng.normal(size=(n, 16))
    logits = np.eye(4)[labels] * 2 + rng.normal(size=(n, 4)) * 1.5
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return embeddings, labels, probabilities


def test_leave_one_out_excludes_the_item_by_id_and_keeps_its_duplicate():
    embeddings, labels, _ = clustered(60)
    embeddings[7] = embeddings[3]  # an exact duplicate of item 3 under another id
    index = ReferenceIndex.from_items(embeddings, labels, 4)
    rows = np.arange(len(labels))
    distances, ids = index.search(embeddings, 5, exclude_ids=rows)
    assert not (ids == rows[:, None]).any()
    assert ids[3, 0] == 7 and distances[3, 0] == pytest.approx(0.0, abs=1e-5)
    assert (np.diff(distances, axis=1) >= -1e-6).all()  # sorted
    # without exclusion every item finds itself (or its duplicate) first
    _, ids_all = index.search(embeddings, 1)
    assert (ids_all[:, 0] == rows)[np.setdiff1d(rows, [3, 7])].all()


def test_search_pads_never_returns_faiss_padding():
    embeddings, labels, _ = clustered(3)
    index = ReferenceIndex.from_items(embeddings, labels, 4)
    distances, ids = index.search(embeddings, 5, exclude_ids=np.arange(3))
    assert (ids[:, 2:] == -1).all() and (distances[:, 2:] == NO_NEIGHBOUR_DISTANCE).all()
    features = index.neighbour_features(embeddings, labels, 5, exclude_ids=np.arange(3))
    assert np.isfinite(features).all() and ((features[:, 0] >= 0) & (features[:, 0] <= 1)).all()


def test_one_request_path_computes_the_batch_numbers():
    embeddings, labels, probabilities = clustered(80)
    index = ReferenceIndex.from_items(embeddings[:60], labels[:60], 4)
    answers = probabilities.argmax(1)
    batch = index.neighbour_features(embeddings[60:], answers[60:], 10)
    rows = [index.neighbour_features(embeddings[i : i + 1], answers[i : i + 1], 10)[0] for i in range(60, 80)]
    np.testing.assert_allclose(np.array(rows), batch, rtol=1e-12, atol=1e-12)
    loo = index.neighbour_features(embeddings[:60], answers[:60], 10, exclude_ids=np.arange(60))
    one = index.neighbour_features(embeddings[5:6], answers[5:6], 10, exclude_ids=np.array([5]))
    np.testing.assert_allclose(one[0], loo[5], rtol=1e-12, atol=1e-12)


def test_output_features():
    p = np.array([[0.7, 0.2, 0.1, 0.0], [0.25, 0.25, 0.25, 0.25]])
    f = classifier_features(p, 3)
    assert f[0, :3].tolist() == pytest.approx([0.7, 0.2, 0.1])
    assert f[0, 3] == pytest.approx(0.5) and f[1, 4] == pytest.approx(1.0)  # margin; max entropy is 1
    d = detector_features([np.array([0.9, 0.3]), np.array([])])
    assert d[0].tolist() == pytest.approx([2, 0.9, 0.6, 0.3, 1]) and d[1].tolist() == [0, 0, 0, 0, 0]


def fitted(spec=FeatureSpec(use_input=False)):
    embeddings, labels, probabilities = clustered(120)
    return fit_router(
        class_names=CLASSES,
        spec=spec,
        output=probabilities,
        cheap_answers=probabilities.argmax(1),
        labels=labels,
        embeddings=embeddings,
    ), (embeddings, labels, probabilities)


def test_artefact_round_trips_through_json(tmp_path):
    router, (embeddings, _, probabilities) = fitted()
    path = router.artefact.save(tmp_path / "router.json")
    loaded = RouterArtefact.load(path, class_names=CLASSES)
    kwargs = dict(output=probabilities, cheap_answers=probabilities.argmax(1), embeddings=embeddings)
    np.testing.assert_array_equal(loaded.score(**kwargs), router.artefact.score(**kwargs))
    assert loaded.sha256 == router.artefact.sha256 and loaded.index.sha256 == router.artefact.index.sha256
    assert len(router.fit_scores) == 120 and ((router.fit_scores > 0) & (router.fit_scores < 1)).all()


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (
            lambda d: d["learner"].update(feature_names=d["learner"]["feature_names"][::-1]),
            "router.learner.feature_names",
        ),
        (lambda d: d.update(class_names=["a", "b", "c", "d"]), "router.class_names"),
        (lambda d: d.pop("reference_index"), "router.reference_index"),
        (lambda d: d["reference_index"].update(sha256="0" * 64), "router.reference_index.sha256"),
        (lambda d: d["learner"].update(coef=[1.0]), "router.learner.coef"),
        (lambda d: d.update(features={"output": "segmenter"}), "router.features.output"),
    ],
)
def test_a_mismatched_artefact_is_a_config_error_naming_the_field(edit, field):
    router, _ = fitted()
    document = json.loads(json.dumps(router.artefact.to_document()))
    edit(document)
    with pytest.raises(ConfigError) as info:
        RouterArtefact.from_document(document, class_names=CLASSES)
    assert info.value.field == field


def test_missing_artefact_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        RouterArtefact.load(tmp_path / "nope.json")
    assert info.value.field == "router"
