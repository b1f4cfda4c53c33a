"""Drift monitors: has a task's live traffic moved away from its reference window?

The thresholds are certified on the calibration data; the guarantee only carries over while live
traffic looks like it. Each monitor compares a window of recent requests with a reference window
(the calibration set, or the first N requests after a deploy where there is none) by a two-sample
test, and alarms when its p-value is below ``level``: on unshifted traffic (reference and window
drawn from the same distribution) a window alarms with probability <= ``level``, so ``level`` is
the false-alarm rate per window (``visionroute bench drift`` measures it, and the requests a
shift needs to be caught at that rate).

- ``confidence``: the cheap tier's confidence scores, two-sample Kolmogorov-Smirnov (scipy).
- ``inputs``: per-request image statistics (``image_statistics``: size, brightness, contrast,
  sharpness, JPEG quality), one KS test each, Bonferroni-combined (p = k * min p_j).
- ``embeddings``: image embeddings, the kernel two-sample test of Gretton, Borgwardt, Rasch,
  Schoelkopf and Smola, "A Kernel Two-Sample Test", JMLR 13:723-773, 2012: the unbiased MMD^2
  estimate (their Lemma 6) with a Gaussian kernel whose width is the median distance within the
  reference (their section 8), and a permutation p-value (exact under exchangeability, unlike
  the asymptotic null; sequential, after Besag and Clifford 1991, so that unshifted windows stop
  early). alibi-detect and frouros implement this test, but installing either would replace the
  project's numpy (alibi-detect 0.13 pins numpy 1.26; frouros 0.9 pulls numpy 2.1 and scipy
  1.14), so it is implemented here.
- ``verdicts``: the mix of reviewers' verdicts (confirm / correct / reject), the chi-square
  statistic of the 2 x k table with a permutation p-value (exact for small counts, where the
  chi-square approximation is not).

Every monitor has ``feed(window) -> DriftResult`` (score, p-value, alarm, sizes, details) and is
deterministic: a permutation test draws its permutations from a fixed seed. ``DriftMetrics`` and
``drift_metric_families`` export results to Prometheus (see their docstrings for how to hook
them into router/metrics.py).

The module lives in visionroute/ (beside records and state), not policies/: it decides nothing
about a request, it is shared plumbing that the router (per-request statistics, /metrics), the
evals (benchmarks, reports) and the CLI all read.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import GaugeMetricFamily

from visionroute.errors import InputError

INPUT_STATISTICS: tuple[str, ...] = ("pixels", "brightness", "contrast", "sharpness", "jpeg_quality")
VERDICTS: tuple[str, ...] = ("confirm", "correct", "reject")
STATISTICS_MAX_SIDE = 1024  # statistics of larger images are taken on a copy scaled to this side
MIN_SAMPLE = 5  # fewer values than this in a window or reference cannot be tested


class DriftInputError(InputError, ValueError):
    """A bad argument to a drift monitor; ``field`` names it (a ValueError for library callers)."""


@dataclass(frozen=True)
class DriftResult:
    task: str
    monitor: str
    score: float  # the test statistic: larger = further from the reference
    p_value: float
    alarm: bool
    level: float
    n_reference: int
    n_window: int
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_level(level: float) -> float:
    if isinstance(level, bool) or not isinstance(level, int | float) or not 0.0 < level < 1.0:
        raise DriftInputError(f"level must be a number in (0, 1); got {level!r}", field="level")
    return float(level)


def _as_matrix(values, name: str, *, columns: int | None = None) -> np.ndarray:
    try:
        matrix = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DriftInputError(f"{name} must be numeric: {exc}", field=name) from exc
    if matrix.ndim == 1 and columns is None:
        matrix = matrix[:, None]
    if matrix.ndim != 2 or (columns is not None and matrix.shape[1] != columns):
        want = f"(n, {columns})" if columns else "(n,) or (n, d)"
        raise DriftInputError(f"{name} must have shape {want}; got {matrix.shape}", field=name)
    if len(matrix) < MIN_SAMPLE:
        raise DriftInputError(f"{name} needs at least {MIN_SAMPLE} rows; got {len(matrix)}", field=name)
    return matrix


# --------------------------------------------------------------------------- per-request statistics

# JPEG Annex K luminance quantisation table, natural (row-major) order, as Pillow reports tables.
_IJG_LUMINANCE = np.array(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=np.float64,
).ravel()


def _ijg_tables() -> np.ndarray:
    """The luminance table libjpeg writes for quality 1..100 (jcparam.c, jpeg_quality_scaling)."""
    quality = np.arange(1, 101, dtype=np.float64)[:, None]
    scale = np.where(quality < 50, 5000.0 / quality, 200.0 - 2.0 * quality)
    return np.clip(np.floor((_IJG_LUMINANCE * scale + 50.0) / 100.0), 1, 255)


_IJG_TABLES = _ijg_tables()


def estimate_jpeg_quality(image: Image.Image) -> float:
    """The libjpeg quality (1-100) whose luminance table is closest to the image's; NaN if not a JPEG.

    Pillow keeps the quantisation tables of a decoded JPEG; libjpeg (and so Pillow, OpenCV and most
    cameras' software) derives them from the Annex K table by the quality scaling above, so the
    nearest table gives the encoder's quality exactly for those, and a close equivalent otherwise.
    """
    tables = getattr(image, "quantization", None)
    if not tables or 0 not in tables or len(tables[0]) != 64:
        return math.nan
    return _nearest_quality(tables[0])


def jpeg_file_quality(data: bytes) -> float:
    """``estimate_jpeg_quality`` from a file's bytes: its luminance table read straight from the
    DQT segments before the first scan, as Pillow reads it, without opening an image (a tenth of
    the CPU; the drift monitor does this for every request). NaN if not a JPEG or no table 0."""
    table = _jpeg_luma_table(data)
    return math.nan if table is None else _nearest_quality(table)


def _nearest_quality(table: Sequence[int]) -> float:
    observed = np.asarray(table, dtype=np.float64)
    return float(np.argmin(np.abs(_IJG_TABLES - observed).sum(axis=1)) + 1)


def _jpeg_luma_table(data: bytes) -> list[int] | None:
    """Quantisation table 0 in natural order (Pillow's ``quantization[0]``: the last one defined
    before the first scan), or None."""
    from PIL.JpegImagePlugin import zigzag_index  # the order Pillow stores a table in

    if data[:2] != b"\xff\xd8":
        return None
    found, at, end = None, 2, len(data)
    while at + 4 <= end:
        if data[at] != 0xFF:
            return None  # not a marker where one must be: a damaged file
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            at += 2
            continue
        if marker in (0xDA, 0xD9):  # the first scan (or the end): tables are all defined
            break
        length = int.from_bytes(data[at + 2 : at + 4], "big")
        if length < 2 or at + 2 + length > end:
            return None
        if marker == 0xDB:
            segment = data[at + 4 : at + 2 + length]
            while segment:
                precision = 1 if segment[0] >> 4 == 0 else 2
                size = 1 + 64 * precision
                if len(segment) < size:
                    return None
                if segment[0] & 15 == 0:
                    raw = segment[1:size]
                    values = (
                        raw
                        if precision == 1
                        else [int.from_bytes(raw[i : i + 2], "big") for i in range(0, 128, 2)]
                    )
                    found = [values[i] for i in zigzag_index]
                segment = segment[size:]
        at += 2 + length
    return found


def image_statistics(image: Image.Image | np.ndarray) -> dict[str, float]:
    """Size (pixels), brightness (mean luma), contrast (luma std), sharpness (variance of the
    Laplacian of the luma, which blur lowers and noise raises) and JPEG quality (NaN unless the
    image was decoded from a JPEG). Images larger than ``STATISTICS_MAX_SIDE`` are measured on a
    scaled copy, so the cost is bounded and the same rule applies to reference and window."""
    import cv2

    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3) or image.dtype != np.uint8:
            raise DriftInputError(
                f"image must be a uint8 HxW or HxWxC array; got {image.dtype} {image.shape}", field="image"
            )
        pil = Image.fromarray(image if image.ndim == 2 else image[..., :3])
    elif isinstance(image, Image.Image):
        pil = image
    else:
        raise DriftInputError(
            f"image must be a PIL image or a numpy array; got {type(image).__name__}", field="image"
        )
    width, height = pil.size
    quality = estimate_jpeg_quality(pil)
    luma = pil.convert("L")
    if max(width, height) > STATISTICS_MAX_SIDE:
        luma.thumbnail((STATISTICS_MAX_SIDE, STATISTICS_MAX_SIDE), Image.BILINEAR)
    pixels = np.asarray(luma, dtype=np.float64)
    return {
        "pixels": float(width * height),
        "brightness": float(pixels.mean()),
        "contrast": float(pixels.std()),
        "sharpness": float(cv2.Laplacian(pixels, cv2.CV_64F).var()),
        "jpeg_quality": quality,
    }


def statistics_matrix(rows: Iterable[Mapping[str, float]] | np.ndarray, name: str = "window") -> np.ndarray:
    """(n, len(INPUT_STATISTICS)) from ``image_statistics`` dicts (or such a matrix)."""
    if isinstance(rows, np.ndarray):
        return _as_matrix(rows, name, columns=len(INPUT_STATISTICS))
    rows = list(rows)
    for i, row in enumerate(rows):
        missing = [k for k in INPUT_STATISTICS if k not in row]
        if missing:
            raise DriftInputError(f"{name}[{i}] lacks {missing}", field=name)
    return _as_matrix(
        [[row[k] for k in INPUT_STATISTICS] for row in rows], name, columns=len(INPUT_STATISTICS)
    )


# --------------------------------------------------------------------------- monitors


class ConfidenceDriftMonitor:
    """Two-sample KS test of the window's confidence scores against the reference's."""

    name = "confidence"

    def __init__(self, reference, *, task: str = "default", level: float = 0.01) -> None:
        self.task, self.level = task, _check_level(level)
        self.reference = self._scores(reference, "reference")

    @staticmethod
    def _scores(values, name: str) -> np.ndarray:
        scores = _as_matrix(values, name)
        if scores.shape[1] != 1 or not np.all(np.isfinite(scores)):
            raise DriftInputError(f"{name} must be a 1-D array of finite scores", field=name)
        return scores[:, 0]

    def feed(self, window) -> DriftResult:
        from scipy.stats import ks_2samp

        scores = self._scores(window, "window")
        test = ks_2samp(self.reference, scores)
        p = float(test.pvalue)
        return DriftResult(
            self.task,
            self.name,
            float(test.statistic),
            p,
            p < self.level,
            self.level,
            len(self.reference),
            len(scores),
            {"reference_mean": float(self.reference.mean()), "window_mean": float(scores.mean())},
        )


class InputDriftMonitor:
    """KS test per input statistic (NaNs dropped), Bonferroni-combined; the score is the largest KS
    statistic. A statistic with fewer than ``MIN_SAMPLE`` finite values on either side is skipped
    (JPEG quality of PNG traffic)."""

    name = "inputs"

    def __init__(self, reference, *, task: str = "default", level: float = 0.01) -> None:
        self.task, self.level = task, _check_level(level)
        self.reference = statistics_matrix(reference, "reference")

    def feed(self, window) -> DriftResult:
        from scipy.stats import ks_2samp

        current = statistics_matrix(window, "window")
        per_statistic: dict[str, dict[str, float]] = {}
        for j, stat in enumerate(INPUT_STATISTICS):
            ref, win = self.reference[:, j], current[:, j]
            ref, win = ref[np.isfinite(ref)], win[np.isfinite(win)]
            if len(ref) < MIN_SAMPLE or len(win) < MIN_SAMPLE:
                continue
            test = ks_2samp(ref, win)
            per_statistic[stat] = {
                "ks": float(test.statistic),
                "p_value": float(test.pvalue),
                "reference_median": float(np.median(ref)),
                "window_median": float(np.median(win)),
            }
        if per_statistic:
            p = min(1.0, len(per_statistic) * min(v["p_value"] for v in per_statistic.values()))
            score = max(v["ks"] for v in per_statistic.values())
        else:
            p, score = 1.0, 0.0
        return DriftResult(
            self.task,
            self.name,
            score,
            p,
            p < self.level,
            self.level,
            len(self.reference),
            len(current),
            {"statistics": per_statistic},
        )


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T, 0.0)


def _median_bandwidth(x: np.ndarray) -> float:
    """Median pairwise Euclidean distance (Gretton et al. 2012, section 8), > 0."""
    distances = np.sqrt(_squared_distances(x, x)[np.triu_indices(len(x), k=1)])
    positive = distances[distances > 0]
    return float(np.median(positive)) if len(positive) else 1.0


class EmbeddingDriftMonitor:
    """Kernel two-sample test (MMD, Gretton et al. 2012) with a permutation p-value.

    The reference is subsampled (seeded) to ``max_reference`` rows to bound the cost, which is
    O(permutations * (reference + window)^2); its kernel block is computed once. The kernel width
    is fixed from the reference alone, so it cannot adapt to the window, and the permutations come
    from ``seed``: same window, same p-value on every replica.

    The p-value is Besag and Clifford's sequential Monte Carlo p-value ("Sequential Monte Carlo
    p-values", Biometrika 78(2), 1991): permutations are drawn in batches until ``stop_after``
    of them reach the observed statistic (p = stop_after / permutations drawn) or
    ``permutations`` are drawn (p = (1 + exceedances) / (1 + permutations)). It is exactly
    valid, and a window like the reference stops after a few dozen permutations.
    """

    name = "embeddings"
    batch = 50

    def __init__(
        self,
        reference,
        *,
        task: str = "default",
        level: float = 0.01,
        permutations: int = 500,
        stop_after: int = 10,
        max_reference: int = 300,
        seed: int = 0,
    ) -> None:
        self.task, self.level = task, _check_level(level)
        for name, value, least in (
            ("permutations", permutations, 19),
            ("stop_after", stop_after, 1),
            ("max_reference", max_reference, MIN_SAMPLE),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise DriftInputError(f"{name} must be an int >= {least}; got {value!r}", field=name)
        reference = self._embeddings(reference, "reference")
        if len(reference) > max_reference:
            keep = np.random.default_rng(seed).choice(len(reference), max_reference, replace=False)
            reference = reference[np.sort(keep)]
        self.reference = reference
        self.permutations, self.stop_after, self.seed = permutations, stop_after, seed
        self.bandwidth = _median_bandwidth(reference)
        self._reference_kernel = self._kernel(reference, reference, same=True)

    def _kernel(self, a: np.ndarray, b: np.ndarray, *, same: bool = False) -> np.ndarray:
        kernel = np.exp(-_squared_distances(a, b) / (2 * self.bandwidth**2))
        if same:
            np.fill_diagonal(kernel, 0.0)  # the unbiased estimate leaves out i == j
        return kernel

    @staticmethod
    def _embeddings(values, name: str) -> np.ndarray:
        x = _as_matrix(values, name)
        if not np.all(np.isfinite(x)):
            raise DriftInputError(f"{name} has non-finite values", field=name)
        return x

    def feed(self, window) -> DriftResult:
        y = self._embeddings(window, "window")
        if y.shape[1] != self.reference.shape[1]:
            raise DriftInputError(
                f"window has dimension {y.shape[1]}; the reference has {self.reference.shape[1]}",
                field="window",
            )
        cross = self._kernel(self.reference, y)
        kernel = np.block([[self._reference_kernel, cross], [cross.T, self._kernel(y, y, same=True)]])
        m, n = len(self.reference), len(y)
        observed_split = np.zeros((1, m + n))
        observed_split[0, :m] = 1.0
        observed = float(_unbiased_mmd2(kernel, observed_split, m, n)[0])
        p, drawn = self._p_value(kernel, observed, m, n)
        return DriftResult(
            self.task,
            self.name,
            observed,
            p,
            p < self.level,
            self.level,
            m,
            n,
            {"bandwidth": self.bandwidth, "permutations": drawn},
        )

    def _p_value(self, kernel: np.ndarray, observed: float, m: int, n: int) -> tuple[float, int]:
        rng = np.random.default_rng(self.seed)
        exceed = drawn = 0
        tolerance = 1e-12 * max(1.0, abs(observed))  # float noise must not break ties in our favour
        while drawn < self.permutations:
            size = min(self.batch, self.permutations - drawn)
            members = np.zeros((size, m + n))
            chosen = np.argsort(rng.random((size, m + n)), axis=1)[:, :m]
            np.put_along_axis(members, chosen, 1.0, axis=1)
            reached = np.cumsum(_unbiased_mmd2(kernel, members, m, n) >= observed - tolerance) + exceed
            if reached[-1] >= self.stop_after:
                at = drawn + int(np.argmax(reached >= self.stop_after)) + 1
                return self.stop_after / at, at
            exceed, drawn = int(reached[-1]), drawn + size
        return (1 + exceed) / (1 + self.permutations), drawn


def _unbiased_mmd2(kernel: np.ndarray, members: np.ndarray, m: int, n: int) -> np.ndarray:
    """MMD^2_u (Gretton et al. 2012, Lemma 6) for each row of ``members`` (1 = first sample).

    With a zero-diagonal kernel K and membership z: sum_xx = z'Kz, sum_yy = (1-z)'K(1-z),
    sum_xy = z'K(1-z), all from one matrix product.
    """
    kz = members @ kernel
    zkz = np.einsum("bi,bi->b", kz, members)
    zk1 = kz.sum(axis=1)
    total = kernel.sum()
    sum_xx, sum_xy = zkz, zk1 - zkz
    sum_yy = total - 2 * zk1 + zkz
    return sum_xx / (m * (m - 1)) + sum_yy / (n * (n - 1)) - 2 * sum_xy / (m * n)


class VerdictDriftMonitor:
    """Chi-square statistic of reviewers' verdict counts (reference vs window), permutation p-value.

    Under "same mix" the window's counts, given the pooled counts, are multivariate
    hypergeometric; drawing them is a permutation of the labels between the two windows.
    """

    name = "verdicts"

    def __init__(
        self,
        reference: Mapping[str, int] | Sequence[str],
        *,
        task: str = "default",
        level: float = 0.01,
        permutations: int = 2000,
        categories: Sequence[str] = VERDICTS,
        seed: int = 0,
    ) -> None:
        self.task, self.level = task, _check_level(level)
        self.categories = tuple(categories)
        self.permutations, self.seed = permutations, seed
        self.reference = self._counts(reference, "reference")

    def _counts(self, values: Mapping[str, int] | Sequence[str], name: str) -> np.ndarray:
        if isinstance(values, Mapping):
            unknown = sorted(set(values) - set(self.categories))
            counts = [values.get(c, 0) for c in self.categories]
            if any(isinstance(c, bool) or not isinstance(c, int | np.integer) or c < 0 for c in counts):
                raise DriftInputError(f"{name} counts must be ints >= 0; got {dict(values)}", field=name)
        else:
            values = list(values)
            unknown = sorted({v for v in values if v not in self.categories}, key=str)
            counts = [values.count(c) for c in self.categories]
        if unknown:
            raise DriftInputError(
                f"{name} has unknown verdicts {unknown}; expected {list(self.categories)}", field=name
            )
        if sum(counts) < MIN_SAMPLE:
            raise DriftInputError(
                f"{name} needs at least {MIN_SAMPLE} verdicts; got {sum(counts)}", field=name
            )
        return np.asarray(counts, dtype=np.int64)

    @staticmethod
    def _chi2(window: np.ndarray, pooled: np.ndarray, n_ref: int, n_win: int) -> np.ndarray:
        """Pearson's chi-square of the 2 x k table for each row of window counts."""
        used = pooled > 0
        pooled, window = pooled[used], window[..., used]
        total = n_ref + n_win
        expected_win = pooled * n_win / total
        expected_ref = pooled * n_ref / total
        ref = pooled - window
        return ((window - expected_win) ** 2 / expected_win).sum(-1) + (
            (ref - expected_ref) ** 2 / expected_ref
        ).sum(-1)

    def feed(self, window: Mapping[str, int] | Sequence[str]) -> DriftResult:
        counts = self._counts(window, "window")
        pooled = self.reference + counts
        n_ref, n_win = int(self.reference.sum()), int(counts.sum())
        observed = float(self._chi2(counts.astype(np.float64), pooled.astype(np.float64), n_ref, n_win))
        draws = np.random.default_rng(self.seed).multivariate_hypergeometric(
            pooled, n_win, size=self.permutations
        )
        null = self._chi2(draws.astype(np.float64), pooled.astype(np.float64), n_ref, n_win)
        p = float((1 + np.sum(null >= observed - 1e-12)) / (self.permutations + 1))
        shares = {
            c: {"reference": float(r / n_ref), "window": float(w / n_win)}
            for c, r, w in zip(self.categories, self.reference, counts)
        }
        return DriftResult(
            self.task, self.name, observed, p, p < self.level, self.level, n_ref, n_win, {"shares": shares}
        )


MONITORS = {
    m.name: m for m in (ConfidenceDriftMonitor, InputDriftMonitor, EmbeddingDriftMonitor, VerdictDriftMonitor)
}


# --------------------------------------------------------------------------- Prometheus export


class DriftMetrics:
    """Per-replica gauges, labelled by task and monitor, for a registry such as IngressMetrics'.

    Hook (router/metrics.py, IngressMetrics.__init__): ``self.drift = DriftMetrics(self.registry)``;
    then ``metrics.drift.observe(result)`` after each ``monitor.feed(window)``.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["task", "monitor"]
        self.score = Gauge(
            "visionroute_drift_score", "drift test statistic of the latest window", labels, registry=registry
        )
        self.p_value = Gauge(
            "visionroute_drift_p_value", "drift test p-value of the latest window", labels, registry=registry
        )
        self.alarm = Gauge(
            "visionroute_drift_alarm",
            "1 when the latest window's p-value is below level",
            labels,
            registry=registry,
        )

    def observe(self, result: DriftResult) -> None:
        self.score.labels(result.task, result.monitor).set(result.score)
        self.p_value.labels(result.task, result.monitor).set(result.p_value)
        self.alarm.labels(result.task, result.monitor).set(1.0 if result.alarm else 0.0)


def drift_metric_families(results: Iterable[DriftResult]) -> list[GaugeMetricFamily]:
    """The same three gauges from stored results, for a collector that reads shared state at
    scrape time (router/metrics.py's SharedStateCollector.collect: ``yield from
    drift_metric_families(latest_results)``), so every replica reports the same numbers."""
    window = "the latest window (monitor inputs: of a sample of requests, drift.input_fraction)"
    score = GaugeMetricFamily(
        "visionroute_drift_score", f"drift test statistic of {window}", labels=["task", "monitor"]
    )
    p_value = GaugeMetricFamily(
        "visionroute_drift_p_value", f"drift test p-value of {window}", labels=["task", "monitor"]
    )
    alarm = GaugeMetricFamily(
        "visionroute_drift_alarm",
        "1 when the latest window's p-value is below level",
        labels=["task", "monitor"],
    )
    for result in results:
        score.add_metric([result.task, result.monitor], result.score)
        p_value.add_metric([result.task, result.monitor], result.p_value)
        alarm.add_metric([result.task, result.monitor], 1.0 if result.alarm else 0.0)
    return [score, p_value, alarm]
