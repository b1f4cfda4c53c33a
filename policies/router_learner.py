"""The learned router's score: P(the cheap tier's answer is correct | features), from a logistic
regression stored as JSON (issue 22, item 1).

Why logistic regression and not HistGradientBoosting: the learner is fitted on the fit share
only (a few hundred labelled items, of which the cheap tier gets 5-15% wrong: a few dozen
positives), where a boosted forest overfits and its probabilities are poorly ranked out of
sample, while a regularised linear model on standardised features is stable at that size. The
certificate needs a good *ranking* on unseen items, not a flexible one on the fit share. It is
also the simplest artefact that loads without running code: a scaler (mean and scale per
feature), the coefficients and the intercept, by feature name, in JSON (no pickle; skl2onnx is
not in the venv and is not needed). Scoring one request is a dot product (about a microsecond).

``LearnedScore.sha256`` (canonical JSON of the document) is its version; the router artefact
(``cascades.learned_router``) stores it and the trace will record it.

``cross_fitted_scores`` gives out-of-fold scores on the fit share itself: the three-tier plan
places and orders its candidate thresholds on the fit share, and in-sample scores of a learner
are optimistic there (they would place the grid where unseen items do not fall).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from visionroute.errors import ConfigError, InputError

FORMAT = "visionroute.learned_score/1"
DEFAULT_C = 1.0  # inverse L2 strength on standardised features (scikit-learn's default)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # stable for large |z|


@dataclass(frozen=True, eq=False)
class LearnedScore:
    """score(x) = sigmoid(intercept + coef . (x - mean) / scale): P(cheap answer correct)."""

    feature_names: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    n_fit: int = 0
    c: float = DEFAULT_C

    def __post_init__(self) -> None:
        d = len(self.feature_names)
        for name in ("mean", "scale", "coef"):
            value = np.asarray(getattr(self, name), np.float64).reshape(-1)
            if value.shape != (d,) or not np.isfinite(value).all():
                raise ConfigError(
                    f"learner.{name} must hold {d} finite numbers (one per feature), got shape {value.shape}",
                    field=f"learner.{name}",
                )
            object.__setattr__(self, name, value)
        if (self.scale <= 0).any():
            raise ConfigError("learner.scale must be positive", field="learner.scale")
        if len(set(self.feature_names)) != d:
            raise ConfigError("learner.feature_names has duplicates", field="learner.feature_names")
        if not math.isfinite(self.intercept):
            raise ConfigError("learner.intercept must be finite", field="learner.intercept")
        # one request's score in plain Python (numpy's per-call cost dominates a 20-number dot)
        object.__setattr__(self, "_one_row", (self.mean.tolist(), self.scale.tolist(), self.coef.tolist()))

    # -- fitting ------------------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        features: np.ndarray,
        is_correct: np.ndarray,
        feature_names: Sequence[str],
        *,
        c: float = DEFAULT_C,
        sample_weight: np.ndarray | None = None,
    ) -> LearnedScore:
        """``sample_weight``: per item (e.g. 1 / inclusion probability, so a refit on production
        labels fits the traffic rather than the review queue's mix); None: equal weights."""
        from sklearn.linear_model import LogisticRegression

        x, y = _check(features, is_correct, feature_names)
        mean = x.mean(0)
        scale = x.std(0)
        scale = np.where(scale > 1e-12, scale, 1.0)  # a constant feature gets weight 0 anyway
        z = (x - mean) / scale
        if y.all() or not y.any():  # one class: the base rate, no ranking to learn
            p = float(np.clip(y.mean(), 1e-6, 1 - 1e-6))
            return cls(
                tuple(feature_names), mean, scale, np.zeros(x.shape[1]), math.log(p / (1 - p)), len(y), c
            )
        # Newton-Cholesky: the same L2-penalised objective as lbfgs, exact for a few dozen
        # features and ~10x faster here (the bench fits 6 learners per draw, 500+ draws)
        if sample_weight is not None:
            sample_weight = np.asarray(sample_weight, np.float64).reshape(-1)
            if sample_weight.shape != y.shape or not (np.isfinite(sample_weight) & (sample_weight > 0)).all():
                raise InputError(
                    f"sample_weight must hold {len(y)} positive finite numbers", field="sample_weight"
                )
            sample_weight = sample_weight * (len(y) / sample_weight.sum())  # keeps C's meaning
        model = LogisticRegression(C=c, max_iter=1000, solver="newton-cholesky").fit(
            z, y, sample_weight=sample_weight
        )
        return cls(tuple(feature_names), mean, scale, model.coef_[0], float(model.intercept_[0]), len(y), c)

    def score(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.feature_names):
            raise InputError(
                f"expected features of shape (n, {len(self.feature_names)}), got {x.shape}", field="features"
            )
        if len(x) == 1:
            mean, scale, coef = self._one_row
            z = self.intercept + sum((v - m) / s * c for v, m, s, c in zip(x[0].tolist(), mean, scale, coef))
            return np.array([0.5 * (1.0 + math.tanh(0.5 * z))])
        return _sigmoid(self.intercept + ((x - self.mean) / self.scale) @ self.coef)

    # -- the stored form ----------------------------------------------------------------------

    def to_document(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "model": "logistic_regression",
            "feature_names": list(self.feature_names),
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "coef": self.coef.tolist(),
            "intercept": self.intercept,
            "n_fit": self.n_fit,
            "c": self.c,
        }

    @property
    def sha256(self) -> str:
        canonical = json.dumps(self.to_document(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @classmethod
    def from_document(
        cls, document: Any, *, feature_names: Sequence[str] | None = None, field: str = "learner"
    ) -> LearnedScore:
        """Parse and check a stored learner; ``feature_names``: what the router's feature spec
        produces (a mismatch is a ConfigError naming ``learner.feature_names``)."""
        if not isinstance(document, dict):
            raise ConfigError(f"{field}: expected an object, got {type(document).__name__}", field=field)
        for key in ("format", "model", "feature_names", "mean", "scale", "coef", "intercept"):
            if key not in document:
                raise ConfigError(f"{field}.{key} is missing", field=f"{field}.{key}")
        if document["format"] != FORMAT or document["model"] != "logistic_regression":
            raise ConfigError(
                f"{field}.format/model is {document['format']!r}/{document['model']!r}; expected "
                f"{FORMAT!r}/'logistic_regression'",
                field=f"{field}.format",
            )
        names = tuple(str(n) for n in document["feature_names"])
        if feature_names is not None and names != tuple(feature_names):
            raise ConfigError(
                f"{field}.feature_names {list(names)} do not match the features the router computes "
                f"{list(feature_names)}",
                field=f"{field}.feature_names",
            )
        try:
            return cls(
                names,
                np.asarray(document["mean"], np.float64),
                np.asarray(document["scale"], np.float64),
                np.asarray(document["coef"], np.float64),
                float(document["intercept"]),
                int(document.get("n_fit", 0)),
                float(document.get("c", DEFAULT_C)),
            )
        except ConfigError as exc:  # the constructor names learner.<part>; say where it sits
            part = (exc.field or "learner").removeprefix("learner")
            raise ConfigError(f"{field}: {exc}", field=f"{field}{part}") from exc
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{field}: {exc}", field=field) from exc


def _check(features: Any, is_correct: Any, feature_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(features, np.float64)
    y = np.asarray(is_correct, bool).reshape(-1)
    if x.ndim != 2 or x.shape[0] != len(y):
        raise InputError(f"features must have shape ({len(y)}, d), got {x.shape}", field="features")
    if x.shape[1] != len(feature_names):
        raise InputError(
            f"{x.shape[1]} feature columns but {len(feature_names)} feature names", field="feature_names"
        )
    if not np.isfinite(x).all():
        raise InputError("features contain NaN or infinity", field="features")
    if len(y) < 2:
        raise InputError(f"needs at least 2 items to fit, got {len(y)}", field="features")
    return x, y


def cross_fitted_scores(
    features: np.ndarray,
    is_correct: np.ndarray,
    feature_names: Sequence[str],
    *,
    folds: int = 5,
    seed: int = 0,
    c: float = DEFAULT_C,
) -> np.ndarray:
    """Each item scored by a learner fitted without its fold (out-of-fold scores)."""
    x, y = _check(features, is_correct, feature_names)
    folds = max(2, min(folds, len(y)))
    fold_of = np.random.default_rng(seed).permutation(len(y)) % folds
    out = np.empty(len(y))
    for f in range(folds):
        held = fold_of == f
        out[held] = LearnedScore.fit(x[~held], y[~held], feature_names, c=c).score(x[held])
    return out
