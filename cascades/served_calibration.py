"""A calibrator refit from production labels, served on the arms of the artefact carrying it (issue 23).

A recalibration job asked to serve its calibrator (``serve_calibrator``, router/services/
recalibration.py) fits ``P(right | score)`` on one share of its labelled items and certifies the
thresholds on the rest *after* that map: the artefact's ``calibrator.served`` is the chain of
monotone maps its thresholds act on. Every arm that serves the artefact (a rollout's candidate,
in shadow or canary; the task's incumbent once it is adopted) runs its cheap tier through
``CalibratedTier``, which maps every answer row's confidence through the chain before anything
reads it: the score certified is the score served, computed the same way (each map in float64,
rounded to the float32 of ``Detections.confidence``).

A chain, not one map: the next job certifies on the scale the incumbent serves, so its map comes
after the incumbent's (``then``); the tier's own calibration (``cascades.<task>.tier.calibration``)
runs first, in the tier, as always.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from visionroute.errors import ConfigError

METHOD = "isotonic P(right | score), weighted by 1 / inclusion probability, read by linear interpolation"


@dataclass(frozen=True)
class ServedCalibration:
    """``maps``: (breakpoints, P(right) at each), applied in order; empty: the identity."""

    maps: tuple[tuple[tuple[float, ...], tuple[float, ...]], ...] = ()

    def apply(self, confidence: Any) -> np.ndarray:
        """The served confidences (float32, as ``Detections`` holds them)."""
        values = np.asarray(confidence, np.float32)
        for scores, p_correct in self.maps:  # float32 after each map: a chain's tail applied to a
            # recorded (float32) score gives what the whole chain gives (the next job rescores so)
            values = np.interp(values.astype(np.float64), scores, p_correct).astype(np.float32)
        return values

    def then(self, scores: Sequence[float], p_correct: Sequence[float]) -> ServedCalibration:
        return ServedCalibration((*self.maps, (tuple(map(float, scores)), tuple(map(float, p_correct)))))

    def after(self, prefix: ServedCalibration) -> ServedCalibration | None:
        """The maps that take ``prefix``'s scale to this one's (None: ``prefix`` is not where this
        chain passes through)."""
        n = len(prefix.maps)
        return ServedCalibration(self.maps[n:]) if self.maps[:n] == prefix.maps else None

    def to_document(self) -> dict[str, Any]:
        return {
            "method": METHOD,
            "maps": [{"scores": list(s), "p_correct": list(p)} for s, p in self.maps],
        }

    @classmethod
    def from_document(cls, document: Any, *, field: str = "calibrator.served") -> ServedCalibration:
        """The chain, checked: each map's breakpoints strictly increasing and its values in [0, 1]
        and non-decreasing (a map that reorders answers would not be the certified one)."""
        if document is None:
            return cls()
        if not isinstance(document, dict) or not isinstance(document.get("maps"), list):
            raise ConfigError(
                f"{field}: expected {{'maps': [...]}}, got {type(document).__name__}", field=field
            )
        maps = []
        for i, one in enumerate(document["maps"]):
            where = f"{field}.maps[{i}]"
            if not isinstance(one, dict) or set(one) != {"scores", "p_correct"}:
                raise ConfigError(f"{where}: expected the keys 'scores' and 'p_correct'", field=where)
            scores, p_correct = (
                _numbers(one["scores"], f"{where}.scores"),
                _numbers(one["p_correct"], f"{where}.p_correct"),
            )
            if not scores or len(scores) != len(p_correct):
                raise ConfigError(
                    f"{where}: {len(scores)} scores and {len(p_correct)} values; expected as many, at least one",
                    field=f"{where}.p_correct",
                )
            if any(b <= a for a, b in zip(scores, scores[1:])):
                raise ConfigError(f"{where}.scores must be strictly increasing", field=f"{where}.scores")
            if (
                any(b < a for a, b in zip(p_correct, p_correct[1:]))
                or not 0.0 <= p_correct[0] <= p_correct[-1] <= 1.0
            ):
                raise ConfigError(
                    f"{where}.p_correct must be non-decreasing probabilities in [0, 1]",
                    field=f"{where}.p_correct",
                )
            maps.append((scores, p_correct))
        return cls(tuple(maps))


def _numbers(values: Any, field: str) -> tuple[float, ...]:
    if not isinstance(values, list) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
    ):
        raise ConfigError(f"{field}: expected a list of finite numbers", field=field)
    return tuple(float(v) for v in values)


class CalibratedTier:
    """A cheap tier whose answers' confidences go through ``calibration`` (a ``ServedCalibration``)."""

    def __init__(self, inner: Any, calibration: ServedCalibration) -> None:
        self.inner = inner
        self.calibration = calibration

    def _mapped(self, result: Any) -> Any:
        detections = result.detections
        served = detections.with_confidence(self.calibration.apply(detections.confidence), is_calibrated=True)
        return dataclasses.replace(result, detections=served)

    async def predict(self, image_rgb: np.ndarray) -> Any:
        return self._mapped(await self.inner.predict(image_rgb))

    async def predict_many(self, images: list[np.ndarray]) -> list[Any]:
        many = getattr(self.inner, "predict_many", None)
        if many is None:
            import asyncio

            results = await asyncio.gather(*(self.inner.predict(image) for image in images))
        else:
            results = await many(images)
        return [self._mapped(result) for result in results]

    async def describe(self) -> dict[str, Any]:
        return {**(await self.inner.describe()), "production_calibration": self.calibration.to_document()}
