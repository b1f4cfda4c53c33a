"""What a learned router sees of one request: the cheap tier's whole output, the input's
statistics and its nearest labelled neighbours (issue 22, item 1).

Three groups of features, each a block of named columns (``FeatureSpec.names`` gives the order):

- **output** (``classifier_features``): the top-k probabilities of the cheap classifier, the
  margin between the first two, the entropy (divided by log C, so in [0, 1]); for detectors
  (``detector_features``): the box count and the boxes' score statistics (max, mean, std, the
  count above 0.5).
- **input** (``input_features``): the five image statistics the shift guard defines (size,
  brightness, contrast, sharpness, blockiness; ``policies.shift_guard.input_statistics``), computed
  by ``input_statistics`` under the definition the artefact names (``FeatureSpec.input_version``):
  version 2 (new routers) on a bounded copy of the upload, so they cost about the same for a
  photo as for a thumbnail (``bounded_input_statistics``); version 1 (routers fitted before it)
  the shift guard's own function on the whole upload. Calibration and the served stage both call
  ``input_statistics`` with the artefact's version, so the served features are the certified ones.
- **neighbours** (``ReferenceIndex.neighbour_features``): the k nearest labelled items of the
  request's embedding in a frozen *reference index* (exact FAISS search, in-process), with their
  agreement with the cheap answer (share of the k, and weighted by 1 / (distance + eps)), the
  nearest distance, the mean distance, and the distance to the nearest neighbour that agrees
  and to the nearest that does not (``NO_NEIGHBOUR_DISTANCE`` when none of the k does);
  with ``FeatureSpec.neighbour_votes`` (classifiers only) also the neighbours' class vote
  (``VOTE_NAMES``): the top vote share, the cheap answer's vote margin over the best other class,
  and the log-odds of the cheap answer under the cheap probabilities times the neighbours'
  Laplace-smoothed vote counts (a naive-Bayes combination of the two opinions, which a linear
  learner cannot form from the separate columns).
- **output log-odds** (``FeatureSpec.output_log_odds``): log p1 / (1 - p1) and log p1 / p2, the
  output block on a scale where a linear learner separates 0.99 from 0.9999.

The reference index holds labelled items disjoint from the items a certificate is computed on
(the fit share). It is frozen and versioned: ``sha256`` covers the embeddings, the labels and the
metric, and the router artefact stores it (``cascades.learned_router``). When the index's own
items train the learner they are scored leave-one-out (``exclude_ids``: each item's own row is
dropped by id, never by distance, so an exact duplicate of it still counts), so the training
rows see the index as a new request would and certification items and live requests see the
same index.

The embedding is the caller's: the search embedder's where it fits the task, else the cheap
tier's own input or features (for the 8x8 digits, the 64 pixels the cheap tier reads). The
served stage's pixel embedding (``router_stage.pixel_embedder``) has a version in the artefact
as the input block has (``FeatureSpec.embedding_version``): version 2 (new routers) resizes the
upload's bounded copy, for a grey embedding the very copy the input block reads
(``bounded_grey``), so a request makes one reduced copy for both; version 1 (routers stored
before it) the whole upload. Rows are
L2-normalised once here (clip-retrieval's rule), and the search is exact (``IndexFlatL2``): a
reference index is a few hundred to a few thousand items, where exact search costs microseconds.
"""

from __future__ import annotations

import base64
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from visionroute.errors import ConfigError, InputError

OUTPUT_TOP_K = 3
NEIGHBOURS_K = 10
# bounds a stored spec is checked against (far above any fitted router's)
MAX_TOP_K = 1000
MAX_NEIGHBOURS_K = 1000
NO_NEIGHBOUR_DISTANCE = 2.0  # the largest distance between two unit vectors
INPUT_NAMES = ("log2_pixels", "brightness", "contrast", "sharpness", "blockiness")  # shift guard's order
DETECTOR_NAMES = ("box_count", "box_score_max", "box_score_mean", "box_score_std", "box_count_above_half")
NEIGHBOUR_NAMES = (
    "nn_agreement",
    "nn_agreement_weighted",
    "nn_distance_min",
    "nn_distance_mean",
    "nn_distance_agree",
    "nn_distance_disagree",
)
VOTE_NAMES = ("nn_vote_top", "nn_vote_margin", "nn_posterior_log_odds")
LOG_ODDS_NAMES = ("log_odds_top1", "log_ratio_top12")
LOG_ODDS_CLIP = 12.0  # |log-odds| beyond this carries no ranking a 270-item fit can use
# One request's row is computed in plain Python up to this many classes (numpy's per-call cost
# dominates there); above it numpy is faster (1,000 classes: 0.016 ms against 0.21 ms).
PYTHON_ROW_MAX_CLASSES = 64
INDEX_FORMAT = "visionroute.reference_index/1"


# --------------------------------------------------------------------------- the cheap tier's output


def classifier_feature_names(top_k: int = OUTPUT_TOP_K) -> tuple[str, ...]:
    return (*(f"p_top{i + 1}" for i in range(top_k)), "margin", "entropy")


def classifier_features(probabilities: np.ndarray, top_k: int = OUTPUT_TOP_K) -> np.ndarray:
    """(n, C) class probabilities -> (n, top_k + 2): top-k probabilities, margin, entropy / log C."""
    p = np.asarray(probabilities, np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise InputError(f"expected probabilities of shape (n, C >= 2), got {p.shape}", field="probabilities")
    if not 1 <= top_k <= p.shape[1]:
        raise InputError(f"top_k must be in [1, {p.shape[1]}], got {top_k}", field="top_k")
    if len(p) == 1 and p.shape[1] <= PYTHON_ROW_MAX_CLASSES:  # one request, few classes
        row = p[0].tolist()
        top1 = sorted(row, reverse=True)
        entropy1 = -sum(v * math.log(v) for v in row if v > 0) / math.log(len(row))
        return np.array([[*top1[:top_k], top1[0] - top1[1], entropy1]])
    top = -np.sort(-p, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(p > 0, p * np.log(p), 0.0).sum(1) / np.log(p.shape[1])
    return np.column_stack([top[:, :top_k], top[:, 0] - top[:, 1], entropy])


def _log_odds(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.clip(np.log(p) - np.log(q), -LOG_ODDS_CLIP, LOG_ODDS_CLIP)


def output_log_odds(probabilities: np.ndarray) -> np.ndarray:
    """(n, C) -> (n, 2) in ``LOG_ODDS_NAMES`` order: log p1 / (1 - p1) and log p1 / p2, clipped."""
    p = np.asarray(probabilities, np.float64)
    if len(p) == 1 and p.shape[1] <= PYTHON_ROW_MAX_CLASSES:  # the same numbers; a test holds them equal
        first, second = sorted(p[0].tolist(), reverse=True)[:2]
        return np.array([[_log_odds1(first, 1.0 - first), _log_odds1(first, second)]])
    top = -np.sort(-p, axis=1)
    return np.column_stack([_log_odds(top[:, 0], 1.0 - top[:, 0]), _log_odds(top[:, 0], top[:, 1])])


def _log_odds1(p: float, q: float) -> float:
    """``_log_odds`` of two floats."""
    log_p = math.log(p) if p > 0 else -math.inf
    log_q = math.log(q) if q > 0 else -math.inf
    if log_p == log_q:  # both 0 (never for a top probability) or equal
        return 0.0
    return min(LOG_ODDS_CLIP, max(-LOG_ODDS_CLIP, log_p - log_q))


def detector_features(box_scores: Sequence[np.ndarray]) -> np.ndarray:
    """Per image the boxes' calibrated scores -> (n, 5) in ``DETECTOR_NAMES`` order (zeros for none)."""
    rows = []
    for scores in box_scores:
        s = np.asarray(scores, np.float64).reshape(-1)
        if len(s) == 0:
            rows.append((0.0, 0.0, 0.0, 0.0, 0.0))
        else:
            rows.append((len(s), s.max(), s.mean(), s.std(), float((s > 0.5).sum())))
    return np.array(rows, np.float64).reshape(len(rows), len(DETECTOR_NAMES))


# The input block's definitions (``FeatureSpec.input_version``; the artefact stores it):
# 1: ``policies.shift_guard.input_statistics`` on the whole upload (2.4-2.8 ms for a 512 px photo);
# 2: ``bounded_input_statistics``, the same five statistics on a bounded copy (about 0.3 ms).
INPUT_VERSIONS = (1, 2)
INPUT_VERSION = 2  # what new routers are fitted with
BLOCKINESS_WINDOW = 128  # version 2 measures JPEG blockiness in a central window this size


@dataclass(frozen=True, eq=False)
class BoundedCopy:
    """An upload reduced once for the features whose cost is bounded by the working size (input
    block version 2, pixel embedding version 2): ``full`` the upload in its own resolution
    (uint8 kept uint8; grey for a grey copy), ``work`` its float32 copy with a shorter side of at
    most ``WORKING_SIDE`` on the scale ``full * scale`` ([0, 1] for uint8)."""

    full: np.ndarray
    work: np.ndarray
    scale: float


def bounded_copy(array: np.ndarray) -> BoundedCopy:
    """``array`` ((H, W) grey or (H, W, C), uint8 or float) shrunk to a shorter side of
    ``WORKING_SIDE`` in two cheap steps: an exact k x k box average (k = shorter side // 224; uint8
    stays uint8) and then bilinear to 224 (a factor below 2, so no pixel is skipped), instead of
    one fractional area resize of the whole image; float only at the working size."""
    import cv2

    from policies.shift_guard import WORKING_SIDE

    height, width = array.shape[:2]
    work = array
    k = min(height, width) // WORKING_SIDE
    if k > 1:  # an exact box average: OpenCV's integer area path, on whole k x k blocks
        work = cv2.resize(
            work[: height // k * k, : width // k * k], (width // k, height // k), interpolation=cv2.INTER_AREA
        )
    if min(work.shape[:2]) > WORKING_SIDE:
        factor = WORKING_SIDE / min(work.shape[:2])
        size = (max(1, round(work.shape[1] * factor)), max(1, round(work.shape[0] * factor)))
        work = cv2.resize(work, size, interpolation=cv2.INTER_LINEAR)
    scale = 1.0 / 255.0 if array.dtype == np.uint8 else 1.0
    return BoundedCopy(array, work.astype(np.float32) * np.float32(scale), scale)


def bounded_grey(image: np.ndarray) -> BoundedCopy:
    """The grey ``bounded_copy`` of an upload: the one the input block (version 2) and a grey
    pixel embedding (version 2) both read, so the stage makes it once per request.
    uint8 uploads take OpenCV's grey conversion; float [0, 1] images take the guard's."""
    import cv2

    from policies.shift_guard import _grey

    array = np.asarray(image)
    if array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] >= 3 and min(array.shape[:2]) >= 1:
        grey = cv2.cvtColor(np.ascontiguousarray(array[..., :3]), cv2.COLOR_RGB2GRAY)
    elif array.dtype == np.uint8 and array.ndim == 2 and min(array.shape) >= 1:
        grey = array
    else:  # other layouts and float images: the guard's conversion, which also rejects bad input
        grey = _grey(array)
    return bounded_copy(grey)


def bounded_input_statistics(image: np.ndarray | BoundedCopy) -> np.ndarray:
    """The shift guard's five statistics (``INPUT_NAMES`` order) at a cost bounded by the
    working size rather than the upload's (input block version 2):

    - ``log2_pixels`` of the whole upload;
    - brightness, contrast and sharpness on the grey ``bounded_copy`` (shorter side
      ``WORKING_SIDE``, 224, as the guard; the guard itself takes one fractional area resize);
    - blockiness (the guard's formula, ``window_blockiness``) on a central ``BLOCKINESS_WINDOW``
      square of the full-resolution grey image, its corner on the 8-pixel JPEG grid (the centre
      is usually textured, where block edges show; the guard reads the top-left 512 x 512).

    Means and deviations are accumulated in float64 (``cv2.meanStdDev``). ``image`` may be the
    upload's ``bounded_grey`` copy already made (the same numbers)."""
    import cv2

    from policies.shift_guard import BLOCK

    copy = image if isinstance(image, BoundedCopy) else bounded_grey(image)
    grey, work = copy.full, copy.work
    height, width = grey.shape
    mean, std = (float(v) for v in np.ravel(cv2.meanStdDev(work)))
    laplacian_std = float(np.ravel(cv2.meanStdDev(cv2.Laplacian(work, cv2.CV_32F)))[1])
    top = max(0, (height - BLOCKINESS_WINDOW) // 2) // BLOCK * BLOCK
    left = max(0, (width - BLOCKINESS_WINDOW) // 2) // BLOCK * BLOCK
    window = grey[top : top + BLOCKINESS_WINDOW, left : left + BLOCKINESS_WINDOW]
    return np.array(
        [
            np.log2(float(height * width)),
            mean,
            std,
            float(np.log10(laplacian_std**2 + 1e-8)),
            window_blockiness(window, copy.scale),
        ]
    )


def window_blockiness(grey: np.ndarray, scale: float = 1.0) -> float:
    """The shift guard's blockiness (``policies.shift_guard._blockiness``: log of the mean step
    across 8-pixel block edges over the mean step inside blocks; 0 below 16 pixels) of a grey
    window (uint8 or float32) whose corner is on the JPEG grid, on grey levels ``grey * scale``.
    The steps are taken by ``cv2.absdiff`` in the window's own type (exact for uint8) and the
    edge columns read as a strided view: a few small arrays instead of the guard's masks."""
    import cv2

    from policies.shift_guard import BLOCK

    ratios = []
    for image in (grey, np.ascontiguousarray(grey.T)):  # steps along rows, then along columns
        if image.shape[1] < 2 * BLOCK:
            continue
        steps = cv2.absdiff(image[:, 1:], image[:, :-1])  # step j sits between pixels j and j + 1
        edge = steps[:, BLOCK - 1 :: BLOCK]
        edge_sum, total = float(edge.sum(dtype=np.float64)), float(steps.sum(dtype=np.float64))
        n_edge = edge.size
        inside = (total - edge_sum) / (steps.size - n_edge)
        ratios.append((edge_sum / n_edge * scale + 1e-3) / (inside * scale + 1e-3))
    return float(np.log(np.mean(ratios))) if ratios else 0.0


# The pixel embedding's definitions (``FeatureSpec.embedding_version``; the artefact stores it):
# 1: the whole upload in float, area-resized to s x s (grey or RGB; ~0.3 ms for a 512 px photo);
# 2: the upload's bounded copy (``bounded_grey``, the input block's own copy, for a grey
#    embedding; ``bounded_copy`` of the RGB upload for an RGB one), area-resized to s x s.
EMBEDDING_VERSIONS = (1, 2)
EMBEDDING_VERSION = 2  # what new routers are fitted with


def check_embedding_version(version: Any, field: str = "features.embedding_version") -> int:
    if isinstance(version, bool) or version not in EMBEDDING_VERSIONS:
        raise ConfigError(
            f"{field} is {version!r}; this build computes the pixel embeddings of versions "
            f"{list(EMBEDDING_VERSIONS)} (refit the router with this build)",
            field=field,
        )
    return int(version)


def check_input_version(version: Any, field: str = "features.input_version") -> int:
    if isinstance(version, bool) or version not in INPUT_VERSIONS:
        raise ConfigError(
            f"{field} is {version!r}; this build computes the input statistics of versions "
            f"{list(INPUT_VERSIONS)} (refit the router with this build)",
            field=field,
        )
    return int(version)


def input_statistics(
    image: np.ndarray, version: int = INPUT_VERSION, *, grey: BoundedCopy | None = None
) -> np.ndarray:
    """One image's input block (``INPUT_NAMES`` order) under definition ``version``: the one
    function calibration and the served stage both compute it with. ``grey``: the image's
    ``bounded_grey`` copy when the caller has made it (version 2 reads it; the same numbers)."""
    if check_input_version(version) == 1:
        from policies.shift_guard import input_statistics as full_resolution

        return full_resolution(image)
    return bounded_input_statistics(image if grey is None else grey)


def input_features(images: Sequence[np.ndarray], version: int = INPUT_VERSION) -> np.ndarray:
    """``input_statistics`` of many images, (n, 5)."""
    rows = [input_statistics(image, version) for image in images]
    return np.array(rows, np.float64).reshape(len(rows), len(INPUT_NAMES))


# --------------------------------------------------------------------------- the reference index


def _normalised(embeddings: np.ndarray, field: str) -> np.ndarray:
    x = np.ascontiguousarray(np.asarray(embeddings, np.float32))
    if x.ndim != 2 or x.shape[1] < 1:
        raise InputError(f"expected embeddings of shape (n, d), got {x.shape}", field=field)
    if not np.isfinite(x).all():
        raise InputError("embeddings contain NaN or infinity", field=field)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


@dataclass(frozen=True, eq=False)
class ReferenceIndex:
    """Labelled, L2-normalised embeddings under exact L2 search. Immutable after construction
    (the FAISS index is built once; nothing changes per request)."""

    embeddings: np.ndarray  # (n, d) float32, unit rows
    labels: np.ndarray  # (n,) int64 class ids
    n_classes: int

    def __post_init__(self) -> None:
        import faiss

        labels = np.asarray(self.labels, np.int64)
        if labels.shape != (len(self.embeddings),):
            raise InputError(
                f"labels must have shape ({len(self.embeddings)},), got {labels.shape}", field="labels"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= self.n_classes):
            raise InputError(f"labels must be class ids in [0, {self.n_classes})", field="labels")
        index = faiss.IndexFlatL2(self.embeddings.shape[1])
        index.add(self.embeddings)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "_index", index)

    @classmethod
    def from_items(cls, embeddings: np.ndarray, labels: np.ndarray, n_classes: int) -> ReferenceIndex:
        return cls(_normalised(embeddings, "embeddings"), np.asarray(labels, np.int64), int(n_classes))

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def sha256(self) -> str:
        """The version: the embeddings' bytes, the labels and the metric."""
        h = hashlib.sha256(f"{INDEX_FORMAT}:l2:{self.dim}:{self.n_classes}".encode())
        h.update(self.embeddings.astype("<f4").tobytes())
        h.update(self.labels.astype("<i8").tobytes())
        return h.hexdigest()

    def search(
        self, queries: np.ndarray, k: int, *, exclude_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(distances (n, k) Euclidean between unit vectors, ids (n, k)); ``exclude_ids[i]`` (a row
        of this index, or -1) is never among row i's neighbours. Where fewer than k items remain,
        the tail is padded with id -1 and ``NO_NEIGHBOUR_DISTANCE`` (FAISS's own -1 padding is
        replaced, never returned as a row)."""
        q = _normalised(queries, "queries")
        if q.shape[1] != self.dim:
            raise InputError(f"queries have dimension {q.shape[1]}, the index {self.dim}", field="queries")
        extra = 0 if exclude_ids is None else 1
        width = min(k + extra, len(self))
        if width == 0:
            return np.full((len(q), k), NO_NEIGHBOUR_DISTANCE), np.full((len(q), k), -1, np.int64)
        squared, ids = self._index.search(q, width)
        distances = np.sqrt(np.maximum(squared, 0.0)).astype(np.float64)
        ids = ids.astype(np.int64)
        if exclude_ids is not None:
            exclude = np.asarray(exclude_ids, np.int64).reshape(-1, 1)
            keep = ids != exclude
            # each row keeps its first k kept neighbours, in order
            order = np.argsort(~keep, axis=1, kind="stable")
            ids = np.take_along_axis(np.where(keep, ids, -1), order, axis=1)
            distances = np.take_along_axis(np.where(keep, distances, NO_NEIGHBOUR_DISTANCE), order, axis=1)
        distances = np.where(ids < 0, NO_NEIGHBOUR_DISTANCE, distances)
        if distances.shape[1] < k:
            pad = k - distances.shape[1]
            distances = np.pad(distances, ((0, 0), (0, pad)), constant_values=NO_NEIGHBOUR_DISTANCE)
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        return distances[:, :k], ids[:, :k]

    def neighbour_features(
        self,
        queries: np.ndarray,
        cheap_answers: np.ndarray,
        k: int = NEIGHBOURS_K,
        *,
        exclude_ids: np.ndarray | None = None,
        probabilities: np.ndarray | None = None,
    ) -> np.ndarray:
        """(n, 6) in ``NEIGHBOUR_NAMES`` order: the k neighbours' agreement with each cheap answer
        and their distances (see the module docstring). ``exclude_ids``: leave-one-out rows.
        With ``probabilities`` ((n, C), the cheap tier's), (n, 9): ``VOTE_NAMES`` follow."""
        distances, ids = self.search(queries, k, exclude_ids=exclude_ids)
        if len(ids) == 1:  # one request: plain Python over k numbers beats numpy's per-call cost
            answer = int(np.ravel(cheap_answers)[0])
            row = _neighbour_row(distances[0].tolist(), ids[0].tolist(), self.labels, answer)
            if probabilities is None:
                return row
            if np.shape(probabilities)[-1] > PYTHON_ROW_MAX_CLASSES:
                return np.column_stack([row, self._vote_block(distances, ids, cheap_answers, probabilities)])
            votes = _vote_row(
                distances[0].tolist(),
                ids[0].tolist(),
                self.labels,
                np.asarray(probabilities, np.float64).reshape(-1).tolist(),
                answer,
            )
            return np.concatenate([row, np.array([votes])], axis=1)
        block = self._neighbour_block(distances, ids, cheap_answers)
        if probabilities is None:
            return block
        return np.column_stack([block, self._vote_block(distances, ids, cheap_answers, probabilities)])

    def _vote_block(self, distances, ids, cheap_answers, probabilities) -> np.ndarray:
        """(n, 3) in ``VOTE_NAMES`` order (the module docstring)."""
        p = np.asarray(probabilities, np.float64)
        n, c = p.shape
        if c != self.n_classes:
            raise InputError(
                f"probabilities have {c} classes, the reference index {self.n_classes}", field="probabilities"
            )
        answers = np.asarray(cheap_answers, np.int64).reshape(-1)
        valid = ids >= 0
        one_hot = np.zeros((n, ids.shape[1], c))
        rows, cols = np.nonzero(valid)
        one_hot[rows, cols, self.labels[ids[rows, cols]]] = 1.0
        weights = valid / (distances + 1e-3)
        weighted = (weights[:, :, None] * one_hot).sum(1)
        total = weighted.sum(1, keepdims=True)
        vote = np.where(total > 0, weighted / np.maximum(total, 1e-12), 1.0 / c)
        at = np.arange(n)
        others = vote.copy()
        others[at, answers] = -np.inf
        counts = one_hot.sum(1)
        posterior = p * (counts + 1.0) / (valid.sum(1, keepdims=True) + c)
        q = posterior[at, answers] / np.maximum(posterior.sum(1), 1e-300)
        return np.column_stack([vote.max(1), vote[at, answers] - others.max(1), _log_odds(q, 1.0 - q)])

    def _neighbour_block(self, distances, ids, cheap_answers) -> np.ndarray:
        valid = ids >= 0  # padding sits at the end of a row with NO_NEIGHBOUR_DISTANCE
        agree = valid & (self.labels[ids] == np.asarray(cheap_answers, np.int64).reshape(-1, 1))
        weights = valid / (distances + 1e-3)
        n_valid = np.maximum(valid.sum(1), 1)
        return np.column_stack(
            [
                agree.sum(1) / n_valid,
                (weights * agree).sum(1) / np.maximum(weights.sum(1), 1e-12),
                distances[:, 0],
                (distances * valid).sum(1) / n_valid,
                np.where(agree, distances, NO_NEIGHBOUR_DISTANCE).min(1),
                np.where(valid > agree, distances, NO_NEIGHBOUR_DISTANCE).min(1),
            ]
        )

    # -- the stored form: JSON, no pickle ------------------------------------------------------

    def to_document(self) -> dict[str, Any]:
        return {
            "format": INDEX_FORMAT,
            "metric": "l2_unit",
            "dim": self.dim,
            "n_classes": self.n_classes,
            "n_items": len(self),
            "labels": self.labels.tolist(),
            "embeddings_f32le_b64": base64.b64encode(self.embeddings.astype("<f4").tobytes()).decode(),
            "sha256": self.sha256,
        }

    @classmethod
    def from_document(cls, document: Any, *, field: str = "reference_index") -> ReferenceIndex:
        """Rebuild and verify; a missing or mismatched part is a ConfigError naming its field."""
        if not isinstance(document, dict):
            raise ConfigError(f"{field}: expected an object, got {type(document).__name__}", field=field)
        for key in ("format", "dim", "n_classes", "labels", "embeddings_f32le_b64", "sha256"):
            if key not in document:
                raise ConfigError(f"{field}.{key} is missing", field=f"{field}.{key}")
        if document["format"] != INDEX_FORMAT:
            raise ConfigError(
                f"{field}.format is {document['format']!r}; expected {INDEX_FORMAT!r}",
                field=f"{field}.format",
            )
        try:
            raw = base64.b64decode(document["embeddings_f32le_b64"], validate=True)
        except ValueError as exc:
            raise ConfigError(
                f"{field}.embeddings_f32le_b64 is not base64: {exc}", field=f"{field}.embeddings_f32le_b64"
            ) from exc
        dim, labels = int(document["dim"]), np.asarray(document["labels"], np.int64)
        if dim < 1 or len(raw) != 4 * dim * len(labels):
            raise ConfigError(
                f"{field}.embeddings_f32le_b64 holds {len(raw)} bytes; expected {4 * dim * len(labels)} "
                f"({len(labels)} labels x dim {dim} x 4)",
                field=f"{field}.embeddings_f32le_b64",
            )
        embeddings = np.frombuffer(raw, "<f4").reshape(len(labels), dim).astype(np.float32)
        try:
            index = cls(np.ascontiguousarray(embeddings), labels, int(document["n_classes"]))
        except InputError as exc:
            raise ConfigError(f"{field}: {exc}", field=f"{field}.labels") from exc
        if index.sha256 != document["sha256"]:
            raise ConfigError(
                f"{field}.sha256 is {document['sha256']!r} but the stored items hash to {index.sha256!r}",
                field=f"{field}.sha256",
            )
        return index


def _neighbour_row(distances: list[float], ids: list[int], labels: np.ndarray, answer: int) -> np.ndarray:
    """``ReferenceIndex.neighbour_features`` for one row (the same numbers; a test holds them equal)."""
    n_valid = agree = 0
    weight_sum = weight_agree = distance_sum = 0.0
    nearest_agree = nearest_disagree = NO_NEIGHBOUR_DISTANCE
    for distance, i in zip(distances, ids):
        if i < 0:
            continue
        n_valid += 1
        distance_sum += distance
        weight = 1.0 / (distance + 1e-3)
        weight_sum += weight
        if labels[i] == answer:
            agree += 1
            weight_agree += weight
            nearest_agree = min(nearest_agree, distance)
        else:
            nearest_disagree = min(nearest_disagree, distance)
    n = max(n_valid, 1)
    return np.array(
        [
            [
                agree / n,
                weight_agree / max(weight_sum, 1e-12),
                distances[0],
                distance_sum / n,
                nearest_agree,
                nearest_disagree,
            ]
        ]
    )


def _vote_row(
    distances: list[float], ids: list[int], labels: np.ndarray, p: list[float], answer: int
) -> list[float]:
    """``ReferenceIndex._vote_block`` for one row (the same numbers; a test holds them equal)."""
    c = len(p)
    weighted, counts = [0.0] * c, [0.0] * c
    n_valid = 0
    for distance, i in zip(distances, ids):
        if i < 0:
            continue
        label = int(labels[i])
        weighted[label] += 1.0 / (distance + 1e-3)
        counts[label] += 1.0
        n_valid += 1
    total = sum(weighted)
    vote = [w / total for w in weighted] if total > 0 else [1.0 / c] * c
    best_other = max(v for j, v in enumerate(vote) if j != answer)
    posterior = [p[j] * (counts[j] + 1.0) / (n_valid + c) for j in range(c)]
    q = posterior[answer] / max(sum(posterior), 1e-300)
    return [max(vote), vote[answer] - best_other, _log_odds1(q, 1.0 - q)]


# --------------------------------------------------------------------------- all features


@dataclass(frozen=True)
class FeatureSpec:
    """Which feature blocks a router uses, in this order: output, input, neighbours."""

    output: str = "classifier"  # "classifier" or "detector"
    top_k: int = OUTPUT_TOP_K
    use_input: bool = True
    neighbours_k: int = NEIGHBOURS_K  # 0: no reference index
    neighbour_votes: bool = False  # the neighbours' class vote (VOTE_NAMES); classifiers only
    output_log_odds: bool = False  # LOG_ODDS_NAMES after the output block; classifiers only
    input_version: int = INPUT_VERSION  # the input block's definition (``input_statistics``)
    embedding_version: int = EMBEDDING_VERSION  # the pixel embedding's (router_stage.pixel_embedder)

    def __post_init__(self) -> None:
        # types and sizes first: a stored document is read back from disk or an upload, and a
        # top_k of 2**70 would otherwise ask for that many feature names
        for name, low, high in (("top_k", 1, MAX_TOP_K), ("neighbours_k", 0, MAX_NEIGHBOURS_K)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(
                    f"features.{name} must be an integer in [{low}, {high}], got {str(value)[:40]!r}",
                    field=f"features.{name}",
                )
        for name in ("use_input", "neighbour_votes", "output_log_odds"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"features.{name} must be true or false", field=f"features.{name}")
        check_input_version(self.input_version)
        check_embedding_version(self.embedding_version)
        if not isinstance(self.output, str) or self.output not in ("classifier", "detector"):
            raise ConfigError(
                f"unknown output kind {self.output!r}; expected one of ['classifier', 'detector']",
                field="features.output",
            )
        for flag in ("neighbour_votes", "output_log_odds"):
            if getattr(self, flag) and self.output != "classifier":
                raise ConfigError(
                    f"features.{flag} needs class probabilities; output is {self.output!r}",
                    field=f"features.{flag}",
                )
        if self.neighbour_votes and self.neighbours_k < 1:
            raise ConfigError(
                "features.neighbour_votes needs neighbours (neighbours_k >= 1)",
                field="features.neighbour_votes",
            )

    @property
    def names(self) -> tuple[str, ...]:
        out = classifier_feature_names(self.top_k) if self.output == "classifier" else DETECTOR_NAMES
        return (
            *out,
            *(LOG_ODDS_NAMES if self.output_log_odds else ()),
            *(INPUT_NAMES if self.use_input else ()),
            *(NEIGHBOUR_NAMES if self.neighbours_k > 0 else ()),
            *(VOTE_NAMES if self.neighbour_votes else ()),
        )

    def to_document(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "output": self.output,
            "top_k": self.top_k,
            "use_input": self.use_input,
            "neighbours_k": self.neighbours_k,
        }
        # written only when on, so a router stored before these existed keeps its sha256
        for flag in ("neighbour_votes", "output_log_odds"):
            if getattr(self, flag):
                document[flag] = True
        if self.use_input and self.input_version != 1:  # absent: version 1, as stored before it
            document["input_version"] = self.input_version
        if self.neighbours_k > 0 and self.embedding_version != 1:  # the same rule
            document["embedding_version"] = self.embedding_version
        return document

    @classmethod
    def from_document(cls, document: Any, *, field: str = "features") -> FeatureSpec:
        if not isinstance(document, dict):
            raise ConfigError(f"{field}: expected an object", field=field)
        known = {
            "output",
            "top_k",
            "use_input",
            "neighbours_k",
            "neighbour_votes",
            "output_log_odds",
            "input_version",
            "embedding_version",
        }
        unknown = set(document) - known
        if unknown:
            raise ConfigError(
                f"{field}: unknown keys {sorted(unknown)}", field=f"{field}.{sorted(unknown)[0]}"
            )
        # a router stored without the key was fitted on version 1 (it is served with version 1);
        # one without the input block has no input statistics to define
        version = document.get("input_version", 1 if document.get("use_input", True) else INPUT_VERSION)
        # likewise a router with neighbours stored without an embedding version embeds with version 1
        neighbours = document.get("neighbours_k", NEIGHBOURS_K)
        stored_before = not isinstance(neighbours, int) or neighbours > 0
        embedding = document.get("embedding_version", 1 if stored_before else EMBEDDING_VERSION)
        try:
            return cls(
                **{
                    **document,
                    "input_version": check_input_version(version, f"{field}.input_version"),
                    "embedding_version": check_embedding_version(embedding, f"{field}.embedding_version"),
                }
            )
        except ConfigError as exc:  # the spec's own checks name "features.<key>": name it where it was read
            if exc.field and exc.field.startswith("features") and field != "features":
                raise ConfigError(exc.reason, field=field + exc.field.removeprefix("features")) from None
            raise

    def input_statistics(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(n, 5) input block of ``images`` under this spec's definition (``input_features``)."""
        return input_features(images, self.input_version)

    def extract(
        self,
        *,
        output: np.ndarray | Sequence[np.ndarray],
        cheap_answers: np.ndarray,
        input_statistics: np.ndarray | None = None,
        embeddings: np.ndarray | None = None,
        index: ReferenceIndex | None = None,
        exclude_ids: np.ndarray | None = None,
    ) -> np.ndarray:
        """The (n, len(names)) feature matrix. ``output``: (n, C) probabilities for a classifier,
        per-image box scores for a detector. ``input_statistics``: (n, 5) from ``self.input_statistics``
        (this spec's definition of the input block)."""
        blocks = [
            classifier_features(output, self.top_k)
            if self.output == "classifier"
            else detector_features(output)
        ]
        n = len(blocks[0])
        if self.output_log_odds:
            blocks.append(output_log_odds(output))
        if self.use_input:
            if input_statistics is None:
                raise InputError(
                    "this router uses the input statistics; none were given", field="input_statistics"
                )
            stats = np.asarray(input_statistics, np.float64)
            if stats.shape != (n, len(INPUT_NAMES)):
                raise InputError(
                    f"input_statistics must have shape ({n}, {len(INPUT_NAMES)}), got {stats.shape}",
                    field="input_statistics",
                )
            blocks.append(stats)
        if self.neighbours_k > 0:
            if index is None or embeddings is None:
                raise InputError(
                    "this router uses the reference index; no index or embeddings given", field="index"
                )
            blocks.append(
                index.neighbour_features(
                    embeddings,
                    cheap_answers,
                    self.neighbours_k,
                    exclude_ids=exclude_ids,
                    probabilities=output if self.neighbour_votes else None,
                )
            )
        return np.column_stack(blocks)
