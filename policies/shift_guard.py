"""The shift guard: stop auto-accepting the cheap tier's answer when the input has moved away from
the data the certificate was computed on.

The risk certificate ("what we auto-accept is wrong at most alpha of the time") holds for
inputs drawn like the calibration data. Blur, noise, bad light or heavy JPEG break that
assumption, and the cheap tier's confidence does not drop with its accuracy (docs/evaluation.md,
"Robustness and the guarantee under shift", has the figures). The guard checks each would-be
accept against a reference of input statistics stored in the calibration artefact and, when the
input looks shifted, escalates it to the VLM (or sends it to review where no VLM is configured),
with the reason in the trace.

Statistics (``input_statistics``), on the decoded pixels the model sees, in grey levels 0..1:
- ``log2_pixels``: image size, log2(width * height);
- ``brightness``: mean grey level; ``contrast``: RMS contrast (standard deviation);
- ``sharpness``: log10 of the variance of the Laplacian (Pech-Pacheco et al., ICPR 2000):
  blur lowers it, noise raises it;
- ``blockiness``: log of the mean absolute step across 8x8 block edges over the mean step
  inside blocks (the idea of Wu and Yuen's GBIM, 1997): JPEG at low quality raises it.
Brightness, contrast and sharpness are measured on the image shrunk (area interpolation, never
enlarged) to a shorter side of 224, the classifier's input, so they do not depend on the
resolution; blockiness on the full-resolution grey image, where the JPEG grid is.

Per-request rule (stateless): each statistic becomes a robust z-score against the reference
(median and 1.4826 x MAD of the ``fit`` images); the score is the largest |z|. The conformal
p-value of the score against the scores of the held-out reference images is
``(1 + #{held-out scores >= score}) / (n + 1)``; the guard fires when it is <= the configured
``false_alarm_rate``. For clean inputs exchangeable with the reference this fires with
probability at most ``false_alarm_rate`` (split-conformal outlier detection: Vovk et al. 2005;
Bates et al., "Testing for outliers with conformal p-values", Ann. Statist. 2023).

Window rule (optional, ``window: N``): one input with a moderate shift looks like a clean
outlier, but N of them do not. Over the last N inputs the guard runs a two-sample
Kolmogorov-Smirnov test per statistic against the held-out reference images (Bonferroni over
the statistics) and fires while it rejects. The false-alarm budget is then split: each rule
runs at ``false_alarm_rate / 2``.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from visionroute.errors import ConfigError, InputError
from visionroute.records import Decision, Step

FEATURES: tuple[str, ...] = ("log2_pixels", "brightness", "contrast", "sharpness", "blockiness")
WORKING_SIDE = 224  # the classifier's input side: statistics are taken at this scale
BLOCK = 8  # the JPEG block size
# The least spread a statistic is given: a reference whose images all share one size has a MAD
# of 0 for log2_pixels, which would make any other size an infinite z.
SCALE_FLOOR = {
    "log2_pixels": 0.5,
    "brightness": 0.005,
    "contrast": 0.005,
    "sharpness": 0.02,
    "blockiness": 0.01,
}
MAD_TO_SIGMA = 1.4826  # MAD x this = the standard deviation, for normal data
STAGE = "policy:shift_guard"
MIN_WINDOW = 20  # fewer inputs make the two-sample test too weak to be worth its false alarms


# --------------------------------------------------------------------------- statistics


def _grey(image: np.ndarray) -> np.ndarray:
    """float32 grey levels in [0, 1] from uint8 or float [0, 1] images, (H, W) or (H, W, C)."""
    import cv2

    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or min(array.shape[:2]) < 1:
        raise InputError(f"expected an image (H, W) or (H, W, C), got shape {array.shape}", field="image")
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    elif np.issubdtype(array.dtype, np.floating):
        array = np.clip(array, 0.0, 1.0).astype(np.float32)
    else:
        raise InputError(f"expected uint8 or float [0, 1] pixels, got {array.dtype}", field="image")
    if array.ndim == 3:
        array = cv2.cvtColor(np.ascontiguousarray(array[..., :3]), cv2.COLOR_RGB2GRAY)
    return array


def _blockiness(grey: np.ndarray) -> float:
    """log(mean step across 8-pixel block edges / mean step inside blocks); 0 below 16 pixels."""
    grey = grey[:512, :512]  # the JPEG grid starts at the origin; a corner is enough and bounded
    ratios = []
    for steps in (np.abs(np.diff(grey, axis=1)), np.abs(np.diff(grey, axis=0)).T):
        if steps.shape[1] < 2 * BLOCK - 1:
            continue
        on_edge = (np.arange(steps.shape[1]) + 1) % BLOCK == 0
        ratios.append((steps[:, on_edge].mean() + 1e-3) / (steps[:, ~on_edge].mean() + 1e-3))
    return float(np.log(np.mean(ratios))) if ratios else 0.0


def input_statistics(image: np.ndarray) -> np.ndarray:
    """The statistics of one image, in the order of ``FEATURES``."""
    import cv2

    grey = _grey(image)
    height, width = grey.shape
    work = grey
    if min(height, width) > WORKING_SIDE:
        factor = WORKING_SIDE / min(height, width)
        size = (max(1, round(width * factor)), max(1, round(height * factor)))
        work = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
    laplacian = cv2.Laplacian(work, cv2.CV_32F)
    return np.array(
        [
            np.log2(float(height * width)),
            float(work.mean()),
            float(work.std()),
            float(np.log10(laplacian.var() + 1e-8)),
            _blockiness(grey),
        ]
    )


def statistics_matrix(images: Iterable[np.ndarray]) -> np.ndarray:
    """(n, len(FEATURES)) statistics of many images."""
    rows = [input_statistics(image) for image in images]
    return np.array(rows, np.float64).reshape(len(rows), len(FEATURES))


# --------------------------------------------------------------------------- the reference


def _check_features(features: Sequence[str], field: str) -> list[str]:
    features = list(features)
    unknown = [f for f in features if f not in FEATURES]
    if unknown or not features or len(set(features)) != len(features):
        raise ValueError(
            f"{field} must name distinct statistics from {list(FEATURES)}; got {features}"
            + (f" (unknown: {unknown})" if unknown else "")
        )
    return features


class InputReference(BaseModel):
    """What clean inputs look like: stored in the calibration artefact (``input_reference``)."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    features: list[str]
    median: list[float]  # per feature, over the fit images
    scale: list[float]  # per feature: 1.4826 x MAD over the fit images, at least SCALE_FLOOR
    holdout: list[list[float]]  # statistics of the held-out reference images, (n, features)
    n_fit: int = Field(ge=1)
    working_side: int = WORKING_SIDE
    created_at: str = ""
    source: str = ""  # what the images were, e.g. "digits(seed=0) calibration rows"

    @model_validator(mode="after")
    def _shapes(self) -> InputReference:
        _check_features(self.features, "features")
        n = len(self.features)
        if len(self.median) != n or len(self.scale) != n or any(len(row) != n for row in self.holdout):
            raise ValueError(f"median, scale and every holdout row need {n} values, one per feature")
        if not self.holdout:
            raise ValueError("holdout needs at least one image's statistics")
        if not all(s > 0 for s in self.scale):
            raise ValueError(f"scale must be > 0, got {self.scale}")
        return self

    @classmethod
    def from_statistics(cls, fit: np.ndarray, holdout: np.ndarray, *, source: str = "") -> InputReference:
        """From ``statistics_matrix`` of the fit images (median, MAD) and of held-out ones."""
        fit = np.asarray(fit, np.float64)
        holdout = np.asarray(holdout, np.float64)
        if fit.ndim != 2 or fit.shape[1] != len(FEATURES) or len(fit) < 1 or len(holdout) < 1:
            raise InputError(
                f"need (n, {len(FEATURES)}) statistics of at least one fit and one held-out image; "
                f"got {fit.shape} and {holdout.shape}",
                field="images",
            )
        median = np.median(fit, axis=0)
        mad = np.median(np.abs(fit - median), axis=0) * MAD_TO_SIGMA
        floor = np.array([SCALE_FLOOR[f] for f in FEATURES])
        return cls(
            features=list(FEATURES),
            median=median.tolist(),
            scale=np.maximum(mad, floor).tolist(),
            holdout=holdout.tolist(),
            n_fit=len(fit),
            created_at=dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
            source=source,
        )

    @classmethod
    def from_images(
        cls, fit_images: Iterable[np.ndarray], holdout_images: Iterable[np.ndarray], *, source: str = ""
    ) -> InputReference:
        """The fit images set the centre and spread; the held-out ones calibrate the false alarms:
        use the calibration split's fit and certify images."""
        return cls.from_statistics(
            statistics_matrix(fit_images), statistics_matrix(holdout_images), source=source
        )


def attach_reference(calibrator, reference: InputReference):
    """A copy of the ``cascades.calibration.Calibrator`` whose artefact carries ``reference``."""
    return type(calibrator)(
        calibrator.artifact.model_copy(update={"input_reference": reference.model_dump(mode="json")})
    )


def reference_from_artefact(path: str, *, field: str = "shift_guard") -> InputReference:
    """The reference stored in a calibration artefact; ConfigError when it has none.

    Only this section is read here (the guard owns its schema); the rest of the artefact is the
    calibrator's (``cascades.calibration.load_calibration`` validates it where the tier loads it)."""
    import json
    from pathlib import Path

    artefact = Path(path).expanduser()
    if not artefact.is_file():
        raise ConfigError(f"calibration artefact {str(path)!r} does not exist", field=field)
    try:
        document = json.loads(artefact.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"calibration artefact {str(path)!r} is not readable JSON: {exc}", field=field
        ) from None
    stored = document.get("input_reference") if isinstance(document, dict) else None
    if stored is None:
        raise ConfigError(
            f"calibration artefact {str(path)!r} has no input_reference; write one with "
            "`visionroute eval --corruptions` (its calibration.json) or "
            "policies.shift_guard.attach_reference",
            field=field,
        )
    try:
        return InputReference.model_validate(stored)
    except ValidationError as exc:
        raise ConfigError(f"input_reference in {str(path)!r} is invalid: {exc}", field=field) from None


# --------------------------------------------------------------------------- the guard


class ShiftGuardConfig(BaseModel):
    """The policy set's ``shift_guard`` section; off unless ``enabled``."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="check each would-be accept against the input reference")
    tasks: list[str] | None = Field(
        None,
        description="tasks to guard (default: every task); each needs a calibration artefact with an input_reference",
    )
    false_alarm_rate: float = Field(
        0.01, gt=0.0, lt=0.5, description="share of clean inputs the guard may flag (both rules together)"
    )
    features: list[str] = Field(default_factory=lambda: list(FEATURES), description="statistics to compare")
    window: int = Field(
        0,
        ge=0,
        le=100_000,
        description="0: the per-request rule alone; N >= 20: also a two-sample test over the last N inputs",
    )

    @field_validator("features")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        return _check_features(value, "features")

    @field_validator("window")
    @classmethod
    def _window(cls, value: int) -> int:
        if 0 < value < MIN_WINDOW:
            raise ValueError(f"window must be 0 (off) or at least {MIN_WINDOW} inputs, got {value}")
        return value

    def guards(self, task: str) -> bool:
        return self.enabled and (self.tasks is None or task in self.tasks)


@dataclass(frozen=True)
class ShiftVerdict:
    """One input judged against the reference (and, with a window, the recent inputs too)."""

    shifted: bool
    rule: str | None  # "request" or "window": which rule fired; None when neither did
    p_value: float  # the input's conformal p-value
    score: float  # its largest |z|
    feature: str  # the statistic with that |z|
    z: dict[str, float]
    values: dict[str, float]
    false_alarm_rate: float
    window_p_value: float | None = None  # Bonferroni-adjusted two-sample p-value of the window
    window_feature: str | None = None
    window_size: int = 0

    def details(self) -> dict[str, Any]:
        out = {
            "shifted": self.shifted,
            "rule": self.rule,
            "p_value": round(self.p_value, 6),
            "score": round(self.score, 4),
            "feature": self.feature,
            "z": {k: round(v, 3) for k, v in self.z.items()},
            "values": {k: round(v, 5) for k, v in self.values.items()},
            "false_alarm_rate": self.false_alarm_rate,
        }
        if self.window_p_value is not None:
            out |= {
                "window_p_value": float(f"{self.window_p_value:.6g}"),
                "window_feature": self.window_feature,
                "window_size": self.window_size,
            }
        return out


def guarded_decision(decision: Decision, shifted: bool, *, vlm_available: bool) -> Decision:
    """The decision once the guard has spoken: a shifted input is never auto-accepted from the
    cheap tier; it goes to the VLM, or to review where there is none. Nothing else changes."""
    if decision is Decision.ACCEPT and shifted:
        return Decision.ESCALATE if vlm_available else Decision.REVIEW
    return decision


class ShiftGuard:
    """Judges inputs against an ``InputReference``.

    Per request: the conformal p-value of the input's largest |z|. With ``window`` N > 0, also a
    two-sample Kolmogorov-Smirnov test per statistic between the last N inputs and the held-out
    reference images (Bonferroni over the statistics), which sees a moderate shift of many inputs
    that no single input shows. The false-alarm budget is then split evenly between the two rules.
    The window is this replica's recent inputs (thread-safe); a rebuilt guard starts empty.
    """

    def __init__(
        self,
        reference: InputReference,
        *,
        false_alarm_rate: float = 0.01,
        features: Sequence[str] | None = None,
        window: int = 0,
        version: str = "",
        source: str = "",
    ) -> None:
        features = list(features or reference.features)
        missing = [f for f in features if f not in reference.features]
        if missing:
            raise ConfigError(
                f"features {missing} are not in the input reference (it has {reference.features})",
                field="shift_guard.features",
            )
        if not 0.0 < false_alarm_rate < 0.5:
            raise ConfigError(
                f"false_alarm_rate must be in (0, 0.5), got {false_alarm_rate}",
                field="shift_guard.false_alarm_rate",
            )
        if window and window < MIN_WINDOW:
            raise ConfigError(
                f"window must be 0 (off) or at least {MIN_WINDOW} inputs, got {window}",
                field="shift_guard.window",
            )
        self.request_level = false_alarm_rate / 2 if window else false_alarm_rate
        n = len(reference.holdout)
        if 1.0 / (n + 1) > self.request_level:
            raise ConfigError(
                f"the per-request level {self.request_level:g} (false_alarm_rate {false_alarm_rate}"
                f"{', halved for the window rule' if window else ''}) is below 1/(n+1) = {1 / (n + 1):.4f} for "
                f"the reference's {n} held-out images, so that rule could never fire; raise false_alarm_rate or "
                f"build the reference from at least {int(np.ceil(1 / self.request_level)) - 1} held-out images",
                field="shift_guard.false_alarm_rate",
            )
        self.reference = reference
        self.features = features
        self.false_alarm_rate = float(false_alarm_rate)
        self.window = int(window)
        self.version = version
        self.source = source or reference.source
        at = [reference.features.index(f) for f in features]
        self._median = np.array(reference.median)[at]
        self._scale = np.array(reference.scale)[at]
        self._columns = [FEATURES.index(f) for f in features]  # where they are in input_statistics
        self._holdout_stats = np.array(reference.holdout)[:, at]
        self._holdout = np.sort(self._max_abs_z(self._holdout_stats))
        self._recent: deque[np.ndarray] = deque(maxlen=self.window or 1)
        self._lock = threading.Lock()

    @classmethod
    def from_config(
        cls, config: ShiftGuardConfig, reference: InputReference, *, version: str = "", source: str = ""
    ) -> ShiftGuard:
        return cls(
            reference,
            false_alarm_rate=config.false_alarm_rate,
            features=config.features,
            window=config.window,
            version=version,
            source=source,
        )

    def _max_abs_z(self, columns: np.ndarray) -> np.ndarray:
        return np.abs((columns - self._median) / self._scale).max(axis=1)

    def _selected(self, statistics: np.ndarray) -> np.ndarray:
        return np.asarray(statistics, np.float64).reshape(-1, len(FEATURES))[:, self._columns]

    def p_values(self, statistics: np.ndarray) -> np.ndarray:
        """The per-request rule's conformal p-values for rows of ``statistics_matrix``."""
        scores = self._max_abs_z(self._selected(statistics))
        n = len(self._holdout)
        at_least = n - np.searchsorted(self._holdout, scores, side="left")
        return (1.0 + at_least) / (n + 1.0)

    def is_shifted(self, statistics: np.ndarray) -> np.ndarray:
        """The per-request rule alone, for rows of ``statistics_matrix``."""
        return self.p_values(statistics) <= self.request_level

    def window_p_value(self, recent: np.ndarray) -> tuple[float, str]:
        """Bonferroni-adjusted two-sample KS p-value of recent inputs' statistics (the guard's
        features, as columns) against the held-out reference, and the statistic that drove it."""
        from scipy.stats import ks_2samp

        p = [
            float(ks_2samp(recent[:, k], self._holdout_stats[:, k]).pvalue) for k in range(len(self.features))
        ]
        worst = int(np.argmin(p))
        return min(1.0, p[worst] * len(p)), self.features[worst]

    def flags(
        self, statistics: np.ndarray, *, steady: bool = False, stride: int = 1
    ) -> dict[str, np.ndarray]:
        """Both rules over a stream of inputs in arrival order, for evals:
        {"request": bool (n,), "window": bool (n,), "shifted": either}.

        By default the window starts empty, as ``check`` would judge the stream one by one.
        ``steady``: the window already holds inputs of the same kind (it wraps around the
        stream), i.e. the guard some time after a shift began. ``stride``: the window test is
        recomputed every ``stride`` inputs and holds in between (``check`` runs it every input).
        """
        stats = self._selected(statistics)
        request = self.p_values(statistics) <= self.request_level
        window = np.zeros(len(stats), bool)
        if self.window and len(stats):
            level, size = self.false_alarm_rate / 2, self.window
            start = 0 if steady else size - 1
            verdict = False
            for k in range(start, len(stats)):
                if (k - start) % max(1, stride) == 0:
                    rows = np.arange(k - size + 1, k + 1) % len(stats)
                    verdict = self.window_p_value(stats[rows])[0] <= level
                window[k] = verdict
        return {"request": request, "window": window, "shifted": request | window}

    def check(self, image: np.ndarray) -> ShiftVerdict:
        """Judge one input (and add it to the window). Every input of a guarded task should pass
        through here, accepted or not, so that the window sees the traffic as it is."""
        stats = input_statistics(image)
        p_value = float(self.p_values(stats)[0])
        selected = stats[self._columns]
        z = dict(zip(self.features, ((selected - self._median) / self._scale).tolist()))
        feature = max(z, key=lambda f: abs(z[f]))
        window_p, window_feature, size = None, None, 0
        if self.window:
            with self._lock:
                self._recent.append(selected)
                recent = np.array(self._recent) if len(self._recent) == self.window else None
            if recent is not None:
                window_p, window_feature = self.window_p_value(recent)
                size = len(recent)
        rule = None
        if p_value <= self.request_level:
            rule = "request"
        elif window_p is not None and window_p <= self.false_alarm_rate / 2:
            rule = "window"
        return ShiftVerdict(
            shifted=rule is not None,
            rule=rule,
            p_value=p_value,
            score=abs(z[feature]),
            feature=feature,
            z=z,
            values=dict(zip(self.features, selected.tolist())),
            false_alarm_rate=self.false_alarm_rate,
            window_p_value=window_p,
            window_feature=window_feature,
            window_size=size,
        )

    def step(self, verdict: ShiftVerdict, decision: Decision, *, vlm_available: bool) -> Step:
        """The trace step for a would-be accept: passes it, or turns it into escalate / review."""
        new = guarded_decision(decision, verdict.shifted, vlm_available=vlm_available)
        median = self._median[self.features.index(verdict.feature)]
        where = (
            f"{verdict.feature} z={verdict.z[verdict.feature]:+.1f} ({verdict.values[verdict.feature]:.4g} "
            f"vs reference median {median:.4g}), conformal p={verdict.p_value:.3g}"
        )
        if verdict.rule == "request":
            why = f"input shift: {where} <= {self.request_level:g}"
        elif verdict.rule == "window":
            why = (
                f"input shift over the last {verdict.window_size} inputs: {verdict.window_feature} differs from the "
                f"reference (two-sample KS, Bonferroni p={verdict.window_p_value:.3g} <= {self.false_alarm_rate / 2:g})"
            )
        if verdict.shifted:
            then = "ask the VLM" if new is Decision.ESCALATE else "no VLM is configured: human review"
            reason = (
                f"{why}; the certificate does not cover inputs like this, so the cheap answer is not "
                f"auto-accepted: {then}"
            )
        else:
            reason = f"input matches the calibration reference (largest shift {where})"
        return Step(
            stage=STAGE,
            decision=new if verdict.shifted else None,  # a pass leaves the accept standing
            reason=reason,
            policy_version=self.version or None,
            # no ``score``: steps' scores are the answer's confidence (review priority reads the last one)
            threshold={"false_alarm_rate": self.false_alarm_rate},
            details={**verdict.details(), "reference": self.source},
        )
