"""Drift monitors in the running service: has a task's live traffic moved since its reference?

``DriftService`` feeds the monitors of router/drift/monitors.py (the statistics, their tests and
their benchmark live there) from live traffic, per task, in this ingress replica's memory:

- ``confidence``: the cheap tier's score (the ``onnx:<task>`` step of each trace);
- ``inputs``: image statistics of a sample of requests (``drift.input_fraction``, 1 in 4 by
  default, keyed by the request id: its reference and window count sampled requests). Where the task's calibration artefact stores an
  ``input_reference`` (policies/shift_guard.py: the statistics of its held-out calibration
  images), that is the reference, and live requests are measured the same way
  (``shift_guard.input_statistics``: log2 pixels, brightness, contrast, sharpness, JPEG
  blockiness); otherwise ``router.drift.monitors.image_statistics``' columns (pixels of the file,
  and brightness, contrast, sharpness of the luma shrunk to a shorter side of 224, as the shift
  guard measures them; JPEG quality from the file's quantisation tables) against the first requests;
- ``embeddings``: image embeddings, when something calls ``observe_embedding``;
- ``verdicts``: reviewers' verdicts (confirm / correct / reject).

While any monitor of a task alarms, its audit fraction is raised (``audit_fraction``;
router/drift/audit_raise.py) and the report shows the fraction in force per task.

Artefacts hold no scores, embeddings or verdicts, so those references are the first
``reference_size`` observations after this replica started. Each monitor then keeps a sliding
window of the latest ``window_size`` observations and tests it every ``every`` new ones.

Cost on the request path: ``observe_request`` reads the score from the trace and, for a
sampled request, the JPEG quantisation tables from the file header's bytes (no decode, no image
object) and hands the decoded pixels to one worker thread, which computes the statistics and runs the tests; the
request never waits for either. Observations whose pixels would push the worker's backlog past
``MAX_PENDING_PIXELS`` are dropped (and counted), so a slow worker cannot hold images in memory.
All state changes happen on that worker; readers take a lock.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from pydantic import ValidationError

from policies.audit_sampling import AuditConfig, is_sampled
from router.drift.audit_raise import AuditFraction, audit_fraction
from router.drift.config import DriftConfig
from router.drift.monitors import (
    INPUT_STATISTICS,
    MIN_SAMPLE,
    STATISTICS_MAX_SIDE,
    VERDICTS,
    ConfidenceDriftMonitor,
    DriftInputError,
    DriftResult,
    EmbeddingDriftMonitor,
    InputDriftMonitor,
    VerdictDriftMonitor,
    drift_metric_families,
    jpeg_file_quality,
)
from visionroute.errors import ConfigError
from visionroute.records import Analysis

log = logging.getLogger("visionroute.service.drift")

__all__ = ["DriftConfig", "DriftMonitorRow", "DriftReport", "DriftService"]

MONITOR_NAMES: tuple[str, ...] = ("confidence", "inputs", "embeddings", "verdicts")
MAX_PENDING_PIXELS = 64_000_000  # decoded pixels waiting for the worker (~190 MB of RGB) at most
WORKING_SIDE = 224  # image statistics are taken with the shorter side at most this (the shift guard's)
HISTORY = 100  # tests kept per monitor for the report's plot


@dataclass
class _Monitor:
    """One (task, monitor): its reference, its window and what its tests said."""

    task: str
    name: str
    reference_size: int
    window_size: int
    build: Callable[[Any], Any]  # reference observations -> a router.drift.monitors monitor
    reference_source: str = "first requests after start"
    reference: list[Any] = field(default_factory=list)
    monitor: Any = None
    n_reference: int = 0
    window: deque = field(default_factory=deque)
    since_test: int = 0
    observed: int = 0
    tests: int = 0
    latest: DriftResult | None = None
    alarm_since: float | None = None
    checked_at: float | None = None
    history: deque = field(default_factory=lambda: deque(maxlen=HISTORY))
    note: str = ""

    def __post_init__(self) -> None:
        self.window = deque(maxlen=self.window_size)

    def status(self) -> str:
        if self.latest is not None:
            return "alarm" if self.latest.alarm else "ok"
        if self.observed == 0:
            return "no data"
        if self.monitor is None:
            return "collecting reference"
        return "filling window"


def _cheap_tier_score(analysis: Analysis) -> float | None:
    stage = f"onnx:{analysis.task}"
    for step in analysis.trace:
        if step.stage == stage and step.error is None and step.score is not None:
            score = float(step.score)
            return score if math.isfinite(score) else None
    return None


def _input_details(analysis: Analysis) -> dict[str, Any]:
    return next((step.details for step in analysis.trace if step.stage == "input"), {})


def _working_luma(image: np.ndarray) -> np.ndarray:
    """The image's luma (ITU-R 601) with its shorter side at most ``WORKING_SIDE`` (area
    interpolation), as the shift guard takes it (policies/shift_guard.py): grey first, then
    shrunk, so a third of the bytes are resized. Blur, noise and light still show at the size the
    classifier sees; reference and window are measured alike."""
    import cv2

    grey = (
        image if image.ndim == 2 else cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_RGB2GRAY)
    )
    height, width = grey.shape
    factor = WORKING_SIDE / min(height, width)
    if factor < 1.0:
        size = (max(1, round(width * factor)), max(1, round(height * factor)))
        grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
    longest = max(grey.shape)
    if longest > STATISTICS_MAX_SIDE:  # a long thin image: image_statistics' bound on the cost
        factor = STATISTICS_MAX_SIDE / longest
        size = (max(1, round(grey.shape[1] * factor)), max(1, round(grey.shape[0] * factor)))
        grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
    return grey


def _luma_statistics(image: np.ndarray) -> dict[str, float]:
    """``image_statistics``' brightness, contrast and sharpness of a decoded RGB image, on its
    working luma, all in OpenCV: about half the CPU of shrinking the RGB image and measuring it
    through Pillow (issue 24: this runs for every request)."""
    import cv2

    grey = _working_luma(image)
    mean, std = cv2.meanStdDev(grey)
    return {
        "brightness": float(mean[0, 0]),
        "contrast": float(std[0, 0]),
        "sharpness": float(cv2.Laplacian(grey, cv2.CV_64F).var()),
    }


def _renamed(result: DriftResult, names: Sequence[str]) -> DriftResult:
    """InputDriftMonitor names its columns after drift.INPUT_STATISTICS; an artefact reference's
    columns are the shift guard's statistics, so its details are renamed by position."""
    mapping = dict(zip(INPUT_STATISTICS, names))
    statistics = {mapping[k]: v for k, v in result.details.get("statistics", {}).items()}
    return replace(result, details={**result.details, "statistics": statistics})


@dataclass(frozen=True)
class DriftMonitorRow:
    """One (task, monitor) in the report: its reference, its window and its latest test."""

    task: str
    monitor: str
    status: str  # no data | collecting reference | filling window | ok | alarm
    reference_source: str
    reference_size: int
    n_reference: int
    n_window: int
    observed: int
    tests: int
    score: float | None
    p_value: float | None
    alarm: bool
    level: float
    alarm_since_unix: float | None
    checked_at_unix: float | None
    details: dict[str, Any]  # the test's own details, JSON-safe (NaN and infinities are None)
    history: list[Any]  # the latest tests, for the report's plot
    note: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DriftReport:
    """What ``GET /v1/drift`` returns (``to_json``): every monitor of every watched task."""

    enabled: bool
    replica: str
    scope: str
    config: DriftConfig
    dropped_requests: int
    monitors: list[DriftMonitorRow]
    audit_fractions: list[AuditFraction] = field(default_factory=list)  # per task, when asked with one

    def to_json(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "replica": self.replica,
            "scope": self.scope,
            "config": self.config.model_dump(),
            "dropped_requests": self.dropped_requests,
            "monitors": [row.to_json() for row in self.monitors],
            "audit_fractions": [fraction.to_json() for fraction in self.audit_fractions],
        }


class DriftService:
    """The drift monitors of every watched task, on this replica (see the module docstring)."""

    def __init__(
        self,
        config: DriftConfig,
        *,
        tasks: Iterable[str],
        calibrations: Mapping[str, str | None] | None = None,
    ) -> None:
        tasks = list(tasks)
        unknown = sorted(set(config.tasks or ()) - set(tasks))
        if unknown:
            raise ConfigError(
                f"drift.tasks names unknown tasks {unknown}; expected some of {sorted(tasks)}",
                field="drift.tasks",
            )
        self.config = config
        self.tasks = [t for t in tasks if config.tasks is None or t in config.tasks] if config.enabled else []
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        self._lock = threading.Lock()
        self._pending_pixels = 0
        self.dropped = 0
        self._statistics: dict[str, Callable[[np.ndarray], np.ndarray] | None] = {}
        self._monitors: dict[tuple[str, str], _Monitor] = {}
        self._embedding_dimensions: dict[str, int] = {}
        self._audit_raised: set[str] = set()  # tasks whose audit fraction is raised (for the log)
        for task in self.tasks:
            self._add_task(task, (calibrations or {}).get(task))
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drift")

    @classmethod
    def from_app_config(cls, config) -> DriftService:
        """From ``router.config.AppConfig`` (its ``drift`` section and each cascade's artefact)."""
        return cls(
            config.drift,
            tasks=list(config.cascades),
            calibrations={task: cascade.tier.calibration for task, cascade in config.cascades.items()},
        )

    # -- set-up -------------------------------------------------------------------------------

    def _add_task(self, task: str, calibration: str | None) -> None:
        config = self.config

        def monitor(name: str, build: Callable[[Any], Any]) -> _Monitor:
            entry = _Monitor(task, name, config.reference_size, config.window_size, build)
            self._monitors[(task, name)] = entry
            return entry

        level = config.level
        monitor("confidence", lambda ref: ConfidenceDriftMonitor(ref, task=task, level=level))
        inputs = monitor("inputs", lambda ref: InputDriftMonitor(np.array(ref), task=task, level=level))
        monitor("embeddings", lambda ref: EmbeddingDriftMonitor(np.array(ref), task=task, level=level))
        monitor("verdicts", lambda ref: VerdictDriftMonitor(ref, task=task, level=level))
        self._monitors[
            (task, "embeddings")
        ].note = "nothing has fed embeddings on this replica (DriftService.observe_embedding)"
        self._statistics[task] = None  # drift.image_statistics against the first requests
        reference = self._artefact_reference(task, calibration)
        if reference is not None:
            from policies.shift_guard import FEATURES, input_statistics

            inputs.monitor = InputDriftMonitor(reference, task=task, level=level)
            inputs.n_reference = len(reference)
            inputs.reference_source = (
                f"calibration artefact {calibration} (input_reference, {len(reference)} images)"
            )
            self._statistics[task] = input_statistics
            inputs.note = f"shift-guard statistics {list(FEATURES)}"

    @staticmethod
    def _artefact_reference(task: str, calibration: str | None) -> np.ndarray | None:
        """The held-out calibration images' statistics, in shift_guard.FEATURES order; None when
        the artefact stores none (the first requests are the reference then)."""
        if not calibration:
            return None
        from cascades.calibration import load_calibration
        from policies.shift_guard import FEATURES, InputReference

        stored = load_calibration(calibration).artifact.input_reference
        if stored is None:
            return None
        where = f"cascades.{task}.tier.calibration"
        try:
            reference = InputReference.model_validate(stored)
        except ValidationError as exc:
            raise ConfigError(f"input_reference in {calibration!r} is invalid: {exc}", field=where) from None
        if sorted(reference.features) != sorted(FEATURES) or len(reference.holdout) < MIN_SAMPLE:
            log.info(
                "drift: %s's input_reference has features %s and %d held-out images; the inputs monitor "
                "needs all of %s and %d images, so it uses the first requests instead",
                task,
                reference.features,
                len(reference.holdout),
                list(FEATURES),
                MIN_SAMPLE,
            )
            return None
        columns = [reference.features.index(f) for f in FEATURES]
        return np.asarray(reference.holdout, np.float64)[:, columns]

    # -- observations (the request path: cheap, never waits for a test) -------------------------

    def observe_request(
        self, analysis: Analysis, image_bytes: bytes | None = None, *, count_score: bool = True
    ) -> None:
        """One analysed request: its cheap-tier score and its pixels' statistics. ``image_bytes``
        (the upload) gives JPEG quality; only the header is read. ``count_score=False`` for a
        request another model answered (a canary's candidate arm): its inputs still count."""
        task = analysis.task
        if task not in self._statistics:
            return
        score = _cheap_tier_score(analysis) if count_score else None
        details = _input_details(analysis)
        width = int(details.get("width", analysis.width))
        height = int(details.get("height", analysis.height))
        quality = math.nan
        if not self._input_sampled(analysis.trace.request_id):
            if score is not None:  # the inputs monitor skips this request: no statistics, no pixels held
                self._submit(self._append, task, "confidence", score)
            return
        if self._statistics[task] is None and image_bytes and details.get("format") == "JPEG":
            quality = jpeg_file_quality(image_bytes)  # the tables from the header: no image opened
        image = analysis.image_rgb
        pixels = int(image.shape[0] * image.shape[1])
        with self._lock:
            if self._pending_pixels + pixels > MAX_PENDING_PIXELS:
                self.dropped += 1
                image = None
            else:
                self._pending_pixels += pixels
        self._submit(self._on_request, task, score, image, pixels, width * height, quality)

    def _input_sampled(self, request_id: str) -> bool:
        """Whether this request's image statistics feed the inputs monitor: ``drift.input_fraction``
        of requests, a draw keyed by the request id (the statistics are ~1-2 ms of CPU each)."""
        fraction = self.config.input_fraction
        return fraction >= 1.0 or is_sampled(f"drift-inputs:{request_id}", fraction)

    def whole_image_tasks(self) -> set[str]:
        """Tasks whose inputs monitor compares with a calibration artefact's reference: measured
        on whole decodes, so their requests' images must not be decoded smaller."""
        return {task for task, measure in self._statistics.items() if measure is not None}

    def observe_embedding(self, task: str, vector) -> None:
        """One image embedding of ``task`` (e.g. from search indexing)."""
        if task not in self._statistics:
            return
        vector = np.asarray(vector, np.float64)
        if vector.ndim != 1 or not len(vector) or not np.all(np.isfinite(vector)):
            raise DriftInputError(
                f"an embedding must be a non-empty 1-D vector of finite numbers; got shape {vector.shape}",
                field="embedding",
            )
        with self._lock:
            dimension = self._embedding_dimensions.setdefault(task, len(vector))
            self._monitors[(task, "embeddings")].note = ""
        if len(vector) != dimension:
            raise DriftInputError(
                f"embedding has dimension {len(vector)}; {task}'s earlier embeddings have {dimension}",
                field="embedding",
            )
        self._submit(self._append, task, "embeddings", vector)

    def observe_verdict(self, task: str, verdict: str) -> None:
        """One reviewer's verdict on an item of ``task``: confirm, correct or reject."""
        if verdict not in VERDICTS:
            raise DriftInputError(
                f"unknown verdict {verdict!r}; expected one of {list(VERDICTS)}", field="verdict"
            )
        if task in self._statistics:
            self._submit(self._append, task, "verdicts", verdict)

    def reset(self, task: str, monitors: Sequence[str] = ("confidence",)) -> None:
        """Start ``monitors`` of ``task`` afresh from the next observations: after a new model or
        calibration goes live (a promotion), its scores are not the old reference's."""
        unknown = sorted(set(monitors) - set(MONITOR_NAMES))
        if unknown:
            raise DriftInputError(
                f"unknown monitors {unknown}; expected some of {list(MONITOR_NAMES)}", field="monitors"
            )
        if task in self._statistics:
            self._submit(self._reset, task, tuple(monitors))

    def _reset(self, task: str, monitors: tuple[str, ...]) -> None:
        for name in monitors:
            old = self._monitors[(task, name)]
            if name == "inputs" and self._statistics[task] is not None:
                continue  # the artefact's reference does not depend on the model
            fresh = _Monitor(task, name, old.reference_size, old.window_size, old.build)
            with self._lock:
                self._monitors[(task, name)] = fresh
                if name == "embeddings":
                    self._embedding_dimensions.pop(task, None)
            if old.alarm_since is not None:
                log.info("drift alarm cleared: task %s, monitor %s: reset to a new reference", task, name)

    def _submit(self, function, *args) -> None:
        def logged() -> None:  # the executor would keep an exception in a future nobody reads
            try:
                function(*args)
            except Exception:
                log.exception("drift: %s failed", function.__name__)

        try:
            self._worker.submit(logged)
        except RuntimeError:  # closed: the replica is shutting down
            pass

    # -- the worker ---------------------------------------------------------------------------

    def _on_request(
        self, task: str, score: float | None, image, pixels: int, file_pixels: int, quality: float
    ) -> None:
        try:
            if score is not None:
                self._append(task, "confidence", score)
            if image is not None:
                self._append(task, "inputs", self._image_statistics(task, image, file_pixels, quality))
        finally:
            if image is not None:
                with self._lock:
                    self._pending_pixels -= pixels

    def _image_statistics(self, task: str, image: np.ndarray, file_pixels: int, quality: float) -> np.ndarray:
        measure = self._statistics[task]
        if measure is not None:
            return np.asarray(measure(image), np.float64)
        stats = _luma_statistics(image)
        stats["pixels"] = float(file_pixels)  # the file's size (a large file may be decoded smaller)
        stats["jpeg_quality"] = quality
        return np.array([stats[k] for k in INPUT_STATISTICS], np.float64)

    def _append(self, task: str, name: str, value: Any) -> None:
        entry = self._monitors[(task, name)]
        with self._lock:
            entry.observed += 1
            if entry.monitor is None:
                entry.reference.append(value)
                if len(entry.reference) < entry.reference_size:
                    return
                reference, entry.reference = entry.reference, []
            else:
                entry.window.append(value)
                entry.since_test += 1
                if len(entry.window) < entry.window_size or entry.since_test < self.config.every:
                    return
                entry.since_test = 0
                window = list(entry.window)
        if entry.monitor is None:
            try:
                monitor = entry.build(reference)
                with self._lock:
                    entry.monitor, entry.n_reference = monitor, len(reference)
            except DriftInputError as exc:  # e.g. embeddings of two sizes: start the reference again
                log.warning("drift: %s/%s reference rejected: %s", task, name, exc)
                with self._lock:
                    entry.note = f"reference rejected: {exc.reason}"
            return
        self._test(entry, window)

    def _test(self, entry: _Monitor, window: list[Any]) -> None:
        try:
            result = entry.monitor.feed(np.array(window) if entry.name != "verdicts" else window)
        except DriftInputError as exc:
            log.warning("drift: %s/%s window rejected: %s", entry.task, entry.name, exc)
            with self._lock:
                entry.note = f"window rejected: {exc.reason}"
            return
        if entry.name == "inputs" and self._statistics[entry.task] is not None:
            from policies.shift_guard import FEATURES

            result = _renamed(result, FEATURES)
        now = time.time()
        with self._lock:
            was_alarm = entry.alarm_since is not None
            entry.latest, entry.checked_at, entry.tests = result, now, entry.tests + 1
            entry.history.append(
                {
                    "at_unix": now,
                    "observed": entry.observed,
                    "score": result.score,
                    "p_value": result.p_value,
                    "alarm": result.alarm,
                }
            )
            if result.alarm and not was_alarm:
                entry.alarm_since = now
            elif not result.alarm:
                entry.alarm_since = None
        if result.alarm and not was_alarm:
            log.warning(
                "drift alarm: task %s, monitor %s: p=%.3g < level %g (score %.4g; window %d vs reference %d, %s)",
                entry.task,
                entry.name,
                result.p_value,
                result.level,
                result.score,
                result.n_window,
                result.n_reference,
                entry.reference_source,
            )
        elif was_alarm and not result.alarm:
            log.info(
                "drift alarm cleared: task %s, monitor %s: p=%.3g >= level %g",
                entry.task,
                entry.name,
                result.p_value,
                result.level,
            )

    def drain(self, timeout_s: float | None = None) -> None:
        """Wait until every observation handed in so far is processed (tests, shutdown)."""
        self._worker.submit(lambda: None).result(timeout=timeout_s)

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)

    # -- reading --------------------------------------------------------------------------------

    def results(self) -> dict[tuple[str, str], DriftResult]:
        """The latest test of each (task, monitor) that has been tested."""
        with self._lock:
            return {key: entry.latest for key, entry in self._monitors.items() if entry.latest is not None}

    def report(self, audit: AuditConfig | None = None) -> DriftReport:
        """What ``GET /v1/drift`` returns (``DriftReport.to_json``): every monitor of every watched
        task, and with the policy's ``audit`` each task's audit fraction in force (raised or not)."""
        with self._lock:
            rows = [self._row(entry) for entry in self._monitors.values()]
            dropped = self.dropped
        return DriftReport(
            enabled=self.config.enabled,
            replica=self.replica,
            scope="this ingress replica, in memory since it started",
            config=self.config,
            dropped_requests=dropped,
            monitors=rows,
            audit_fractions=[]
            if audit is None
            else [audit_fraction(audit, t, self.alarms(t)) for t in self.tasks],
        )

    def alarms(self, task: str) -> tuple[str, ...]:
        """The task's monitors in alarm now."""
        with self._lock:
            return tuple(
                e.name for (t, _), e in self._monitors.items() if t == task and e.alarm_since is not None
            )

    def audit_fraction(self, task: str, audit: AuditConfig) -> AuditFraction:
        """The task's audit fraction in force (router/drift/audit_raise.py); a raise and its end
        are logged once each."""
        result = audit_fraction(audit, task, self.alarms(task))
        with self._lock:
            changed = result.raised != (task in self._audit_raised)
            if changed:
                (self._audit_raised.add if result.raised else self._audit_raised.discard)(task)
        if changed and result.raised:
            log.warning(
                "audit fraction of task %s raised %.1f%% -> %.1f%% (drift alarm on %s)",
                task,
                100 * result.base,
                100 * result.fraction,
                ", ".join(result.alarms),
            )
        elif changed:
            log.info("audit fraction of task %s back to %.1f%%: no drift alarm", task, 100 * result.base)
        return result

    def _row(self, entry: _Monitor) -> DriftMonitorRow:
        latest = entry.latest
        return DriftMonitorRow(
            task=entry.task,
            monitor=entry.name,
            status=entry.status(),
            reference_source=entry.reference_source,
            reference_size=entry.reference_size,
            n_reference=entry.n_reference if entry.monitor is not None else len(entry.reference),
            n_window=len(entry.window),
            observed=entry.observed,
            tests=entry.tests,
            score=latest.score if latest is not None else None,
            p_value=latest.p_value if latest is not None else None,
            alarm=bool(latest.alarm) if latest is not None else False,
            level=self.config.level,
            alarm_since_unix=entry.alarm_since,
            checked_at_unix=entry.checked_at,
            details=_json_safe(latest.details) if latest is not None else {},
            history=list(entry.history),
            note=entry.note,
        )

    def metric_families(self):
        """``visionroute_drift_score``, ``_p_value`` and ``_alarm`` per tested (task, monitor)."""
        return drift_metric_families(self.results().values())

    def collect(self):
        """prometheus_client collector protocol: ``metrics.registry.register(drift_service)``."""
        return self.metric_families()


def _json_safe(value: Any) -> Any:
    """NaN and infinities (JSON has neither) become None."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    return value
