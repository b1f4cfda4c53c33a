"""Calibrated confidences: fit on a labelled set, persist as a versioned JSON artefact, apply.

Methods
- ``temperature`` (classifiers): one scalar T, probabilities softmax(z / T), fitted by minimising
  the negative log-likelihood (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017).
  It never changes the predicted class.
- ``platt`` (detector scores, or a classifier's top-1 confidence): per class,
  p = sigmoid(a * logit(s) + b) fitted by logistic regression (Platt 1999).
- ``isotonic`` (same inputs): per class, a monotone piecewise-linear map fitted by isotonic
  regression (Zadrozny and Elkan, KDD 2002).
Per-class maps fall back to one map fitted on all classes (key ``"*"``) when a class has too few
calibration rows or only one outcome.

The artefact records the method, the sha256 of the calibration data, its size, the date, the
model it belongs to and, once ``visionroute calibrate`` has chosen thresholds, the risk
certificate (see ``policies.risk_control``). ``load_calibration(path)`` returns a
``Calibrator``; the service records ``calibrator.artifact_id`` and ``calibrator.certificate``
in every trace.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from visionroute.errors import ConfigError, InputError
from visionroute.records import Detections

METHODS = ("temperature", "platt", "isotonic")
SCHEMA_VERSION = 1
GLOBAL_KEY = "*"  # the map used for classes without their own
MIN_ROWS_PER_CLASS = 30  # below this a per-class map overfits; use the global one
_EPS = 1e-6


# --------------------------------------------------------------------------- the artefact


class PlattMap(BaseModel):
    model_config = ConfigDict(extra="forbid")
    a: float
    b: float


class IsotonicMap(BaseModel):
    model_config = ConfigDict(extra="forbid")
    x: list[float]  # increasing input scores (sklearn's X_thresholds_)
    y: list[float]  # calibrated values at x; linear in between, clipped outside

    @model_validator(mode="after")
    def _same_length(self) -> IsotonicMap:
        if len(self.x) != len(self.y) or not self.x:
            raise ValueError(
                f"isotonic map needs equal, non-empty x and y, got {len(self.x)} and {len(self.y)}"
            )
        return self


class CalibrationArtifact(BaseModel):
    """The JSON file: everything needed to apply the calibration and to audit where it came from."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    method: Literal["temperature", "platt", "isotonic"]
    kind: Literal["classifier", "detector"]
    created_at: str  # ISO 8601, UTC
    data_sha256: str  # of the calibration inputs and labels, in order
    n_samples: int = Field(ge=1)
    class_names: list[str]
    model: dict[str, str] = Field(default_factory=dict)  # e.g. {"name": ..., "sha256": ...}
    temperature: float | None = Field(default=None, gt=0)
    platt: dict[str, PlattMap] | None = None
    isotonic: dict[str, IsotonicMap] | None = None
    fit_metrics: dict[str, float] = Field(default_factory=dict)
    certificate: dict[str, Any] | None = None
    # Statistics of the calibration images (policies.shift_guard.InputReference), for the shift
    # guard. Optional: artefacts without it load as before and keep their artifact_id.
    input_reference: dict[str, Any] | None = None

    def document(self) -> dict[str, Any]:
        """The JSON document (what ``save`` writes and ``artifact_id`` hashes); an absent
        input_reference is left out, so artefacts written before it existed keep their id."""
        document = self.model_dump(mode="json")
        if document.get("input_reference") is None:
            document.pop("input_reference", None)
        return document

    @model_validator(mode="after")
    def _params_match_method(self) -> CalibrationArtifact:
        given = {m for m in METHODS if getattr(self, m) is not None}
        if given != {self.method}:
            raise ValueError(
                f"method {self.method!r} needs exactly its own parameters; found {sorted(given)}"
            )
        if self.method == "temperature" and self.kind != "classifier":
            raise ValueError(
                "temperature scaling needs a classifier's full probability vector; use platt or isotonic for detectors"
            )
        maps = self.platt or self.isotonic
        if maps is not None and GLOBAL_KEY not in maps:
            raise ValueError(f"per-class maps need the fallback key {GLOBAL_KEY!r}")
        return self


def arrays_sha256(*arrays: np.ndarray) -> str:
    """A stable hash of the calibration data: dtype, shape and bytes of each array, in order."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- the calibrator


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def _log_probabilities(probabilities: np.ndarray) -> np.ndarray:
    return np.log(np.clip(np.asarray(probabilities, np.float64), 1e-12, 1.0))


@dataclasses.dataclass(frozen=True)
class Calibrator:
    """Applies one calibration artefact. Immutable; safe to share between threads."""

    artifact: CalibrationArtifact

    @property
    def method(self) -> str:
        return self.artifact.method

    @property
    def artifact_id(self) -> str:
        """``"<method>@<first 12 hex of the artefact's sha256>"``: what traces record."""
        canonical = json.dumps(self.artifact.document(), sort_keys=True, separators=(",", ":"))
        return f"{self.method}@{hashlib.sha256(canonical.encode()).hexdigest()[:12]}"

    @property
    def certificate(self) -> dict[str, Any] | None:
        return dict(self.artifact.certificate) if self.artifact.certificate is not None else None

    def with_certificate(self, certificate: dict[str, Any] | None) -> Calibrator:
        return Calibrator(self.artifact.model_copy(update={"certificate": certificate}))

    def trace_details(self) -> dict[str, Any]:
        """What a stage puts in its ``Step.details`` so the trace names the calibration used."""
        return {"calibration": self.artifact_id, "certificate": self.certificate}

    # -- scores ------------------------------------------------------------------------------

    def calibrate_probabilities(self, probabilities: np.ndarray) -> np.ndarray:
        """(n, C) class probabilities (or logits' softmax) -> calibrated (n, C); classifiers only.

        Temperature scaling is exact from probabilities: softmax(log p / T) == softmax(z / T).
        Platt and isotonic map each column with its class's map (top-label calibration: the
        top-1 value is calibrated; the rest keep their order but are not renormalised).
        """
        probabilities = np.asarray(probabilities, np.float64)
        if probabilities.ndim != 2 or probabilities.shape[1] != len(self.artifact.class_names):
            raise InputError(
                f"expected probabilities of shape (n, {len(self.artifact.class_names)}), got {probabilities.shape}",
                field="probabilities",
            )
        if self.artifact.temperature is not None:
            return _softmax(_log_probabilities(probabilities) / self.artifact.temperature)
        classes = np.broadcast_to(np.arange(probabilities.shape[1]), probabilities.shape)
        return self.calibrate_scores(probabilities.ravel(), classes.ravel()).reshape(probabilities.shape)

    def calibrate_scores(self, scores: np.ndarray, class_ids: np.ndarray) -> np.ndarray:
        """Per-row scores with their class ids -> calibrated scores (Platt or isotonic)."""
        maps = self.artifact.platt or self.artifact.isotonic
        if maps is None:
            raise InputError(
                "temperature scaling calibrates whole probability vectors; use calibrate_probabilities",
                field="method",
            )
        scores = np.asarray(scores, np.float64)
        class_ids = np.asarray(class_ids, np.int64)
        out = np.empty_like(scores)
        for key in np.unique(class_ids):
            rows = class_ids == key
            out[rows] = _apply_map(maps.get(str(int(key)), maps[GLOBAL_KEY]), scores[rows])
        return np.clip(out, 0.0, 1.0)

    def apply(self, detections: Detections) -> Detections:
        """Calibrated copy of ``detections`` (``is_calibrated=True``); rows keep their order.

        A classifier's answer holds its top-k classes as rows. For temperature scaling the
        probability mass outside the top k is unknown; it is taken as spread evenly over the
        other classes (exact when all classes are present, and the rank order never changes).
        """
        if detections.is_calibrated:
            raise InputError(
                f"detections are already calibrated; applying {self.artifact_id} twice would distort them",
                field="detections",
            )
        if len(detections) == 0:
            return detections.with_confidence(detections.confidence, is_calibrated=True)
        if self.artifact.temperature is not None:
            calibrated = self._temperature_top_k(detections.confidence)
        else:
            calibrated = self.calibrate_scores(detections.confidence, detections.class_id)
        return detections.with_confidence(calibrated.astype(np.float32), is_calibrated=True)

    def _temperature_top_k(self, top_k: np.ndarray) -> np.ndarray:
        n_classes = len(self.artifact.class_names)
        inv_t = 1.0 / float(self.artifact.temperature)
        p = np.clip(np.asarray(top_k, np.float64), 1e-12, 1.0)
        powered = p**inv_t
        rest_classes = n_classes - len(p)
        rest_mass = max(0.0, 1.0 - float(p.sum()))
        rest = (
            rest_classes * (rest_mass / rest_classes) ** inv_t if rest_classes > 0 and rest_mass > 0 else 0.0
        )
        return powered / (powered.sum() + rest)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.artifact.document(), indent=2) + "\n")
        return path


def _apply_map(mapping: PlattMap | IsotonicMap, scores: np.ndarray) -> np.ndarray:
    if isinstance(mapping, PlattMap):
        return 1.0 / (1.0 + np.exp(-(mapping.a * _logit(scores) + mapping.b)))
    return np.interp(scores, mapping.x, mapping.y)  # clips outside [x0, xn] like sklearn's "clip"


def load_calibration(path: str | Path) -> Calibrator:
    """Read and validate an artefact written by ``Calibrator.save`` / ``visionroute calibrate``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"calibration artefact {str(path)!r} does not exist", field="calibration_path")
    try:
        return Calibrator(CalibrationArtifact.model_validate_json(path.read_text()))
    except ValidationError as exc:
        raise ConfigError(
            f"calibration artefact {str(path)!r} is invalid: {exc}", field="calibration_path"
        ) from exc


# --------------------------------------------------------------------------- fitting


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 minimising the mean negative log-likelihood of softmax(logits / T)."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels, np.int64)

    def nll(log_t: float) -> float:
        return float(-log_softmax(logits / np.exp(log_t), axis=1)[np.arange(len(labels)), labels].mean())

    # NLL is convex in 1/T, so a bounded scalar search over log T finds the optimum.
    result = minimize_scalar(nll, bounds=(np.log(0.02), np.log(50.0)), method="bounded")
    return float(np.exp(result.x))


def _fit_binary_map(method: str, scores: np.ndarray, outcomes: np.ndarray) -> PlattMap | IsotonicMap:
    if method == "platt":
        from sklearn.linear_model import LogisticRegression

        if len(np.unique(outcomes)) < 2:  # nothing to separate: a constant map at the observed rate
            rate = float(np.clip(outcomes.mean(), _EPS, 1 - _EPS))
            return PlattMap(a=0.0, b=float(np.log(rate / (1 - rate))))
        model = LogisticRegression(C=1e4).fit(_logit(scores)[:, None], outcomes)
        return PlattMap(a=float(model.coef_[0, 0]), b=float(model.intercept_[0]))
    from sklearn.isotonic import IsotonicRegression

    model = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(
        scores, outcomes
    )
    return IsotonicMap(x=model.X_thresholds_.tolist(), y=model.y_thresholds_.tolist())


def _fit_per_class(method: str, scores: np.ndarray, outcomes: np.ndarray, class_ids: np.ndarray) -> dict:
    maps = {GLOBAL_KEY: _fit_binary_map(method, scores, outcomes)}
    for key in np.unique(class_ids):
        rows = class_ids == key
        if rows.sum() >= MIN_ROWS_PER_CLASS and len(np.unique(outcomes[rows])) == 2:
            maps[str(int(key))] = _fit_binary_map(method, scores[rows], outcomes[rows])
    return maps


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ConfigError(
            f"unknown calibration method {method!r}; expected one of {list(METHODS)}", field="method"
        )


def fit_classifier(
    method: str,
    probabilities: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    *,
    model: dict[str, str] | None = None,
) -> Calibrator:
    """Fit on (n, C) class probabilities (softmax outputs) and true labels.

    ``temperature`` uses the whole vector; ``platt``/``isotonic`` fit the top-1 confidence
    against top-1 correctness, per predicted class.
    """
    _check_method(method)
    probabilities = np.asarray(probabilities, np.float64)
    labels = np.asarray(labels, np.int64)
    if (
        probabilities.ndim != 2
        or probabilities.shape[1] != len(class_names)
        or len(labels) != len(probabilities)
    ):
        raise InputError(
            f"expected probabilities (n, {len(class_names)}) and labels (n,), got {probabilities.shape} and {labels.shape}",
            field="probabilities",
        )
    params: dict[str, Any] = {}
    if method == "temperature":
        params["temperature"] = fit_temperature(_log_probabilities(probabilities), labels)
    else:
        predicted = probabilities.argmax(axis=1)
        top1 = probabilities.max(axis=1)
        params[method] = _fit_per_class(method, top1, (predicted == labels).astype(float), predicted)
    fit_metrics = {
        "accuracy": float((probabilities.argmax(axis=1) == labels).mean()),
        "mean_top1_confidence": float(probabilities.max(axis=1).mean()),
    }
    artifact = CalibrationArtifact(
        method=method,
        kind="classifier",
        created_at=_now(),
        data_sha256=arrays_sha256(probabilities.astype(np.float32), labels),
        n_samples=len(labels),
        class_names=list(class_names),
        model=dict(model or {}),
        fit_metrics=fit_metrics,
        **params,
    )
    return Calibrator(artifact)


def fit_detector(
    method: str,
    scores: np.ndarray,
    class_ids: np.ndarray,
    is_true_positive: np.ndarray,
    class_names: Sequence[str],
    *,
    model: dict[str, str] | None = None,
) -> Calibrator:
    """Fit per-class Platt or isotonic maps on detection scores and whether each was a true positive
    (matched to a ground-truth box at the chosen IoU, e.g. by ``evals.detection.match_detections``)."""
    _check_method(method)
    if method == "temperature":
        raise ConfigError(
            "temperature scaling is for classifiers; use 'platt' or 'isotonic' for detector scores",
            field="method",
        )
    scores = np.asarray(scores, np.float64)
    class_ids = np.asarray(class_ids, np.int64)
    outcomes = np.asarray(is_true_positive, bool).astype(float)
    if not (len(scores) == len(class_ids) == len(outcomes)) or len(scores) == 0:
        raise InputError(
            f"scores, class_ids and is_true_positive must be equal, non-empty lengths; got {len(scores)}, {len(class_ids)}, {len(outcomes)}",
            field="scores",
        )
    artifact = CalibrationArtifact(
        method=method,
        kind="detector",
        created_at=_now(),
        data_sha256=arrays_sha256(scores.astype(np.float32), class_ids, outcomes.astype(np.int8)),
        n_samples=len(scores),
        class_names=list(class_names),
        model=dict(model or {}),
        **{method: _fit_per_class(method, scores, outcomes, class_ids)},
    )
    return Calibrator(artifact)
