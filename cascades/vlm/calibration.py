"""The VLM's logprob confidence, calibrated: load the artefact, map a score, read the certified
accept threshold.

The artefact is an ordinary ``cascades.calibration`` one, fitted with ``fit_detector`` (Platt or
isotonic: the VLM reports only its chosen answer's probability, not a vector to temperature-scale)
on (raw confidence, answer's class id, was it right) from a calibration split; its class names
are the answer set (the labels for ``classify``, ``yes``/``no`` for ``verify``). When the
three-tier certificate was computed with the VLM's calibrated scores
(``policies.risk_control.choose_tier_thresholds`` with ``strong_score``), the artefact's
certificate holds ``three_tier.vlm_accept_threshold`` and ``certified_accept_threshold`` reads it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cascades.calibration import Calibrator, load_calibration
from visionroute.errors import ConfigError

FIELD = "calibration"
# An infeasible certificate accepts no VLM answer: calibrated scores lie in [0, 1], and this is
# the smallest float above 1 (a finite number, so traces stay plain JSON).
NEVER_ACCEPT = math.nextafter(1.0, 2.0)
VERIFY_ANSWERS = ("yes", "no")


def answer_names(task: str, labels: Sequence[str]) -> tuple[str, ...] | None:
    """The class names a calibration artefact must have for ``task`` (None: any, read_text)."""
    if task == "classify":
        return tuple(labels)
    if task == "verify":
        return VERIFY_ANSWERS
    return None


def load_vlm_calibrator(path: str | Path, *, task: str, labels: Sequence[str]) -> Calibrator:
    """The artefact at ``path``, checked to fit the VLM tier; ConfigError naming ``calibration``."""
    try:
        calibrator = load_calibration(path)
    except ConfigError as exc:
        raise ConfigError(f"{FIELD}: {exc.reason}", field=FIELD) from None
    artifact = calibrator.artifact
    if artifact.method not in ("platt", "isotonic"):
        raise ConfigError(
            f"{FIELD}: artefact {str(path)!r} uses {artifact.method!r}; the VLM's confidence needs a "
            "per-answer map, 'platt' or 'isotonic' (cascades.calibration.fit_detector)",
            field=FIELD,
        )
    expected = answer_names(task, labels)
    if expected is not None and tuple(artifact.class_names) != expected:
        raise ConfigError(
            f"{FIELD}: artefact {str(path)!r} was fitted for answers {artifact.class_names}, but task "
            f"{task!r} answers {list(expected)}",
            field=FIELD,
        )
    return calibrator


def calibrated_confidence(calibrator: Calibrator, raw: float, answer_id: int) -> float:
    """The calibrated confidence of one answer (``answer_id`` -1: the map for all answers)."""
    return float(calibrator.calibrate_scores(np.array([raw]), np.array([answer_id]))[0])


def certified_accept_threshold(calibrator: Calibrator, path: str | Path) -> float:
    """The VLM accept threshold the artefact's three-tier certificate proved (``NEVER_ACCEPT``
    when it proved none); ConfigError naming ``calibration`` when it holds none."""
    certificate = calibrator.certificate or {}
    three_tier = certificate.get("three_tier") or {}
    value = three_tier.get("vlm_accept_threshold")
    if value is None:
        raise ConfigError(
            f"{FIELD}: artefact {str(path)!r} has no three-tier certificate with a vlm_accept_threshold "
            "(certify with the VLM's calibrated scores, e.g. `visionroute example digits`)",
            field=FIELD,
        )
    if not certificate.get("feasible", True):
        return NEVER_ACCEPT
    threshold = float(value)  # the certificate writes +-inf as "inf" / "-inf"
    return min(NEVER_ACCEPT, max(0.0, threshold))
