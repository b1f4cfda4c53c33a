"""Run many metrics over one stream of batches, overall and per metadata slice.

``MetricSuite({"accuracy": Accuracy, ...}, slice_keys=("source", "lighting"))`` keeps one set of
metrics for all items (slice ``"all"``) and one per value of each key (slice
``"source=web"``). ``update(metadata=[{...} per item], **arrays)`` routes each item's rows to
its slices; every metric takes the arrays it needs from the batch. Continuous metadata (size,
brightness) should be binned into named buckets first (``bucket``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from evals.metrics import Metric

ALL = "all"
MISSING = "<missing>"


def bucket(value: float, edges: Sequence[float], names: Sequence[str]) -> str:
    """Name the interval of ``value``: ``bucket(300, [256, 1024], ["small", "medium", "large"])``."""
    if len(names) != len(edges) + 1:
        raise ValueError(f"need {len(edges) + 1} names for {len(edges)} edges, got {len(names)}")
    return names[int(np.searchsorted(edges, value, side="right"))]


class MetricSuite:
    def __init__(self, factories: Mapping[str, Callable[[], Metric]], slice_keys: Sequence[str] = ()) -> None:
        self.factories = dict(factories)
        self.slice_keys = tuple(slice_keys)
        self.reset()

    def reset(self) -> None:
        self.slices: dict[str, dict[str, Metric]] = {ALL: self._fresh()}

    def _fresh(self) -> dict[str, Metric]:
        return {name: factory() for name, factory in self.factories.items()}

    def update(self, *, metadata: Sequence[Mapping[str, Any]] | None = None, **arrays: Any) -> None:
        arrays = {k: np.asarray(v) for k, v in arrays.items() if v is not None}
        n = len(next(iter(arrays.values())))
        for metric in self.slices[ALL].values():
            metric.update(**arrays)
        if not self.slice_keys:
            return
        if metadata is None or len(metadata) != n:
            raise ValueError(
                f"slicing by {self.slice_keys} needs one metadata dict per item ({n}), got {None if metadata is None else len(metadata)}"
            )
        for key in self.slice_keys:
            values = np.array([str(m.get(key, MISSING)) for m in metadata])
            for value in np.unique(values):
                rows = values == value
                name = f"{key}={value}"
                metrics = self.slices.setdefault(name, self._fresh())
                for metric in metrics.values():
                    metric.update(**{k: v[rows] for k, v in arrays.items()})

    def compute(self) -> dict[str, dict[str, Any]]:
        """{slice: {metric values merged}, "n": items}; metric keys must not collide."""
        out: dict[str, dict[str, Any]] = {}
        for slice_name, metrics in self.slices.items():
            merged: dict[str, Any] = {}
            for metric in metrics.values():
                merged.update(metric.compute())
            first = next(iter(metrics.values()))
            merged["n"] = getattr(first, "count", None)
            out[slice_name] = merged
        return out

    def metric(self, name: str, slice_name: str = ALL) -> Metric:
        return self.slices[slice_name][name]
