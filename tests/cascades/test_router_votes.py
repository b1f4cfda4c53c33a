"""The neighbours' class vote and the output log-odds (cascades.router_features, issue 22): their
numbers on a hand-made index, the one-request path, and a spec document that stays what it was
when they are off (so a stored router keeps its sha256)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cascades.router_features import (
    LOG_ODDS_NAMES,
    NEIGHBOUR_NAMES,
    VOTE_NAMES,
    FeatureSpec,
    ReferenceIndex,
    classifier_features,
    output_log_odds,
)
from policies.router_learner import LearnedScore
from visionroute.errors import ConfigError


def test_the_vote_block_on_a_hand_made_index():
    # three neighbours of class 1 at distance ~0, one of class 0 far away
    embeddings = np.array([[1.0, 0.0], [1.0, 0.001], [1.0, -0.001], [-1.0, 0.0]])
    index = ReferenceIndex.from_items(embeddings, np.array([1, 1, 1, 0]), 2)
    p = np.array([[0.7, 0.3]])  # the cheap tier says class 0 ...
    block = index.neighbour_features(np.array([[1.0, 0.0]]), np.array([0]), 4, probabilities=p)
    assert block.shape == (1, len(NEIGHBOUR_NAMES) + len(VOTE_NAMES))
    vote_top, margin, log_odds = block[0, len(NEIGHBOUR_NAMES) :]
    assert vote_top == pytest.approx(1.0, abs=1e-3)  # ... its neighbours all but say class 1
    assert margin == pytest.approx(-1.0, abs=1e-3)
    # posterior of class 0: 0.7 * (1 + 1) / 6 against class 1: 0.3 * (3 + 1) / 6
    q = 0.7 * 2 / (0.7 * 2 + 0.3 * 4)
    assert log_odds == pytest.approx(math.log(q / (1 - q)))


def test_one_request_votes_equal_the_batch_votes():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 120)
    embeddings = np.eye(4)[labels] * 3 + rng.normal(size=(120, 4))
    logits = np.eye(4)[labels] * 2 + rng.normal(size=(120, 4)) * 1.5
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    answers = p.argmax(1)
    index = ReferenceIndex.from_items(embeddings[:80], labels[:80], 4)
    batch = index.neighbour_features(embeddings[80:], answers[80:], 10, probabilities=p[80:])
    rows = [
        index.neighbour_features(embeddings[i : i + 1], answers[i : i + 1], 10, probabilities=p[i : i + 1])[0]
        for i in range(80, 120)
    ]
    np.testing.assert_allclose(np.array(rows), batch, rtol=1e-10, atol=1e-10)


def test_output_log_odds_are_clipped_and_ordered():
    f = output_log_odds(np.array([[0.8, 0.2, 0.0], [1.0, 0.0, 0.0]]))
    assert f[0].tolist() == pytest.approx([math.log(4), math.log(4)])
    assert np.isfinite(f).all() and f[1, 0] == f[1, 1] > 0


def test_one_request_output_features_and_score_equal_the_batch():
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(6) * 0.3, size=30)
    p[0] = [1.0, 0, 0, 0, 0, 0]
    for block in (lambda q: classifier_features(q, 3), output_log_odds):
        batch = block(p)
        rows = np.array([block(p[i : i + 1])[0] for i in range(30)])
        np.testing.assert_allclose(rows, batch, rtol=1e-12, atol=1e-12)
    x = rng.normal(size=(30, 4))
    learner = LearnedScore.fit(x, x[:, 0] + rng.normal(size=30) > 0, ("a", "b", "c", "d"))
    rows = np.array([learner.score(x[i : i + 1])[0] for i in range(30)])
    np.testing.assert_allclose(rows, learner.score(x), rtol=1e-12, atol=1e-15)


def test_the_spec_writes_the_new_flags_only_when_on():
    plain = FeatureSpec(use_input=False, embedding_version=1)  # the definitions stored before keys
    assert set(plain.to_document()) == {"output", "top_k", "use_input", "neighbours_k"}
    rich = FeatureSpec(use_input=False, neighbour_votes=True, output_log_odds=True)
    assert FeatureSpec.from_document(rich.to_document()) == rich
    assert rich.names[5:7] == LOG_ODDS_NAMES and rich.names[-3:] == VOTE_NAMES
    with pytest.raises(ConfigError) as info:
        FeatureSpec(output="detector", neighbour_votes=True)
    assert info.value.field == "features.neighbour_votes"
    with pytest.raises(ConfigError) as info:
        FeatureSpec(neighbours_k=0, neighbour_votes=True)
    assert info.value.field == "features.neighbour_votes"
