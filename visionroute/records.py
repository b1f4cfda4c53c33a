"""The records every stage speaks: ``Detections``, ``Decision``, ``Step``, ``Trace``, ``Analysis``.

``Detections`` holds parallel numpy arrays (like supervision's type of the same name). A
classifier's answer is a ``Detections`` too: one row per candidate class, every row's box the
whole image, sorted by confidence, so stages, policies and evals handle one shape.

A ``Trace`` is append-only: a stage adds one ``Step``; nothing edits a step after the fact.
It is what the API returns, what the review queue stores and what ``evals`` replays.
"""

from __future__ import annotations

import dataclasses
import enum
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class Decision(str, enum.Enum):
    ACCEPT = "accept"  # the answer goes back to the caller as final
    ESCALATE = "escalate"  # ask the stronger tier (the VLM)
    REVIEW = "review"  # a human decides; the item is in the review queue
    REJECT = "reject"  # nothing is answered (budget exhausted, policy refusal)


def _as_array(name: str, value: Any, dtype: Any, shape_tail: tuple[int, ...]) -> np.ndarray:
    array = np.asarray(value, dtype=dtype)
    if array.ndim != 1 + len(shape_tail) or array.shape[1:] != shape_tail:
        expected = "(n, " + ", ".join(map(str, shape_tail)) + ")" if shape_tail else "(n,)"
        raise ValueError(f"Detections.{name} must have shape {expected}, got {array.shape}")
    return array


@dataclass(frozen=True, eq=False)
class ClassProbabilities:
    """A classifier's raw softmax over all its classes for one image (before any calibration)
    and what made it: the model file's sha256 and the decoder's preprocessing. A consumer that
    would run the same file the same way (the search embedder, retrieval/embedders/conse.py)
    reuses them instead of running the model again; any other source is recomputed."""

    values: np.ndarray  # (C,) float64, sums to 1
    preprocessing: str  # ClassifierDecoder.preprocessing: resize, size, mean, std, channels, outputs
    model_sha256: str | None = None  # set by the ONNX stage that ran the model


@dataclass(frozen=True)
class Detections:
    """Boxes (or whole-image classes) with confidences and class ids, as parallel arrays.

    ``confidence`` is calibrated once a calibrator has run (``is_calibrated``), raw otherwise.
    """

    xyxy: np.ndarray  # (n, 4) float32, pixels of the original image
    confidence: np.ndarray  # (n,) float32 in [0, 1]
    class_id: np.ndarray  # (n,) int64; -1 when the model has no classes (text boxes)
    class_names: tuple[str, ...] = ()  # the model's label set; index with class_id
    is_calibrated: bool = False
    # a classifier's whole softmax (not only the top-k rows), for reuse by the search embedder
    class_probabilities: ClassProbabilities | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "xyxy", _as_array("xyxy", self.xyxy, np.float32, (4,)))
        object.__setattr__(self, "confidence", _as_array("confidence", self.confidence, np.float32, ()))
        object.__setattr__(self, "class_id", _as_array("class_id", self.class_id, np.int64, ()))
        n = len(self.xyxy)
        if len(self.confidence) != n or len(self.class_id) != n:
            raise ValueError(
                "Detections arrays must have equal length, got "
                f"xyxy={n}, confidence={len(self.confidence)}, class_id={len(self.class_id)}"
            )

    @classmethod
    def empty(cls, class_names: Sequence[str] = ()) -> Detections:
        return cls(np.zeros((0, 4)), np.zeros(0), np.zeros(0), tuple(class_names))

    @classmethod
    def from_class_probabilities(
        cls,
        probabilities: np.ndarray,
        class_names: Sequence[str],
        *,
        width: int,
        height: int,
        top_k: int = 5,
        is_calibrated: bool = False,
    ) -> Detections:
        """The top-k classes of one image, each as a whole-image row, best first."""
        order = np.argsort(-probabilities, kind="stable")[:top_k]
        boxes = np.tile(np.array([0, 0, width, height], np.float32), (len(order), 1))
        return cls(boxes, probabilities[order], order, tuple(class_names), is_calibrated)

    def __len__(self) -> int:
        return len(self.xyxy)

    def __getitem__(self, index: Any) -> Detections:
        if isinstance(index, (int, np.integer)):
            index = [int(index)]
        return dataclasses.replace(
            self,
            xyxy=self.xyxy[index],
            confidence=self.confidence[index],
            class_id=self.class_id[index],
        )

    def with_confidence(self, confidence: np.ndarray, *, is_calibrated: bool) -> Detections:
        return dataclasses.replace(self, confidence=confidence, is_calibrated=is_calibrated)

    @property
    def labels(self) -> list[str | None]:
        return [
            self.class_names[i] if 0 <= i < len(self.class_names) else None for i in self.class_id.tolist()
        ]

    def to_dicts(self) -> list[dict[str, Any]]:
        return [
            {
                "label": label,
                "class_id": int(cid),
                "confidence": round(float(conf), 6),
                "xyxy": [round(float(v), 2) for v in box],
            }
            for label, cid, conf, box in zip(self.labels, self.class_id, self.confidence, self.xyxy)
        ]


@dataclass(frozen=True)
class Step:
    """What one stage did and why: appended to the trace, never edited."""

    stage: str  # e.g. "onnx:classify", "policy:thresholds", "vlm", "review_queue"
    decision: Decision | None = None  # what this step decided, if it decided anything
    reason: str = ""  # one human sentence: why this decision
    model: str | None = None
    model_version: str | None = None  # checksum or version string of the artefact used
    policy_version: str | None = None
    score: float | None = None
    threshold: dict[str, float] | None = None  # the thresholds compared against score
    cost_units: float = 0.0
    latency_ms: float = 0.0
    error: str | None = None  # set when the stage failed; a failed step never accepts
    details: dict[str, Any] = field(default_factory=dict)
    at_unix: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if self.error is not None and self.decision is Decision.ACCEPT:
            raise ValueError(f"step {self.stage!r} failed ({self.error}) and cannot accept")

    def to_dict(self) -> dict[str, Any]:
        """The step as JSON-ready data, field by field in declaration order; its containers
        (``threshold``, ``details``) are copies, so a caller's edit never reaches the trace.
        Built directly: ``dataclasses.asdict`` deep-copies every value, even the strings, and
        this runs for every step of every response and queued item."""
        return {
            "stage": self.stage,
            "decision": self.decision.value if self.decision is not None else None,
            "reason": self.reason,
            "model": self.model,
            "model_version": self.model_version,
            "policy_version": self.policy_version,
            "score": self.score,
            "threshold": _plain(self.threshold),
            "cost_units": self.cost_units,
            "latency_ms": self.latency_ms,
            "error": self.error,
            "details": _plain(self.details),
            "at_unix": self.at_unix,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Step:
        data = dict(data)
        if data.get("decision") is not None:
            data["decision"] = Decision(data["decision"])
        return cls(**data)


_LEAVES = frozenset({str, int, float, bool, type(None)})


def _plain(value: Any) -> Any:
    """``value`` with every dict, list and tuple copied and dataclasses as dicts (what
    ``dataclasses.asdict`` gives), without its deep copy of each leaf: the leaves a step holds
    (strings, numbers, enums) are never edited in place."""
    kind = type(value)
    if kind in _LEAVES:
        return value
    if kind is dict:
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        items = [_plain(item) for item in value]
        return kind(*items) if hasattr(value, "_fields") else kind(items)  # a namedtuple takes fields
    if isinstance(value, dict):
        return kind((key, _plain(item)) for key, item in value.items())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


class Trace:
    """The append-only list of steps for one request."""

    def __init__(self, request_id: str | None = None, steps: Sequence[Step] = ()) -> None:
        self.request_id = request_id or uuid.uuid4().hex
        self._steps: list[Step] = list(steps)

    def append(self, step: Step) -> Step:
        self._steps.append(step)
        return step

    @property
    def steps(self) -> tuple[Step, ...]:
        return tuple(self._steps)

    def __iter__(self) -> Iterator[Step]:
        return iter(self._steps)

    def __len__(self) -> int:
        return len(self._steps)

    @property
    def decision(self) -> Decision | None:
        """The last decision any step made (the trace's outcome so far)."""
        for step in reversed(self._steps):
            if step.decision is not None:
                return step.decision
        return None

    @property
    def cost_units(self) -> float:
        return float(sum(step.cost_units for step in self._steps))

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "decision": self.decision.value if self.decision else None,
            "cost_units": self.cost_units,
            "steps": [step.to_dict() for step in self._steps],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trace:
        return cls(data.get("request_id"), [Step.from_dict(s) for s in data.get("steps", [])])


@dataclass
class Analysis:
    """One request as it flows through the cascade: the image, the current answer, the trace.

    Stages read ``image_rgb`` and ``detections`` and append to ``trace``; the answer may be
    replaced by a stronger tier, but every earlier answer stays visible in the trace's steps.
    """

    image_rgb: np.ndarray  # (h, w, 3) uint8
    image_sha256: str
    task: str  # the cascade's name in config, e.g. "classify"
    tenant: str = "default"
    trace: Trace = field(default_factory=Trace)
    detections: Detections | None = None
    answer_text: str | None = None  # a text answer (the VLM's read_text), returned beside `detections`
    metadata: dict[str, Any] = field(default_factory=dict)
    review_item_id: str | None = None
    policy_version: str | None = None  # the policy set that decided this request, start to end

    @property
    def width(self) -> int:
        return int(self.image_rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.image_rgb.shape[0])

    @property
    def decision(self) -> Decision | None:
        return self.trace.decision

    @property
    def degraded(self) -> bool:
        """True when a step answered in a degraded mode (an exhausted budget's accept_degraded)."""
        return any(step.details.get("degraded") for step in self.trace)
