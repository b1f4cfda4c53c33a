"""The detectors privacy redaction runs before an image is stored: faces and text regions.

- ``mtcnn``: facenet-pytorch's MTCNN (Zhang et al., "Joint Face Detection and Alignment using
  Multi-task Cascaded Convolutional Networks", IEEE SPL 2016), whose P/R/O-Net weights ship
  inside the package (installed ``--no-deps``: its metadata pins an older torch and numpy).
- ``ppocr_det``: the PP-OCRv4 DBNet text detector (Liao et al., "Real-time Scene Text Detection
  with Differentiable Binarization", AAAI 2020) that ``visionroute models prepare`` copies from
  rapidocr-onnxruntime: detection only, nothing is recognised (no text content is ever read).

Both return ``Detections`` (boxes in the image's own pixels) and carry a ``version`` string
that the trace records. ``FACE_DETECTORS`` / ``TEXT_DETECTORS`` (policies/privacy.py) name them
without importing torch, so a policy can be validated cheaply; ``face_detector`` / ``text_detector`` build each
once per process (loading MTCNN costs seconds) and share it between threads.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import threading
from pathlib import Path

import numpy as np

from policies.privacy import FACE_DETECTORS, TEXT_DETECTORS  # the names a privacy policy may give
from visionroute.records import Detections


class MtcnnFaceDetector:
    """Faces with MTCNN's probability >= ``min_confidence``.

    Images larger than ``max_side`` are scanned downscaled (MTCNN's image pyramid grows with
    the image; a face smaller than ``min_face_px`` at that scale is not found) and the boxes
    are mapped back to the image's pixels.

    ``torch_threads``: torch's intra-op threads while MTCNN runs (None: torch's own number); the
    previous number is restored after each call, so other torch users in the process keep
    theirs. On a busy machine one thread is several times faster than threads spinning for
    cores the serving tiers hold (astronaut, 2 loaded cores: 0.3-0.5 s on one, 3.6-5.8 s on two).
    """

    name = "mtcnn"

    def __init__(
        self,
        *,
        min_confidence: float = 0.9,
        min_face_px: int = 20,
        max_side: int = 1280,
        torch_threads: int | None = 1,
    ) -> None:
        import torch
        from facenet_pytorch import MTCNN

        self.torch_threads = torch_threads
        self.min_confidence = min_confidence
        self.max_side = max_side
        self._torch = torch
        self._mtcnn = MTCNN(keep_all=True, min_face_size=min_face_px, device="cpu")
        self._lock = threading.Lock()  # one pass at a time: its thread setting is process-wide
        self.version = _mtcnn_version()

    def detect(self, rgb: np.ndarray) -> Detections:
        import cv2

        height, width = rgb.shape[:2]
        scale = min(1.0, self.max_side / max(height, width))
        scanned = rgb
        if scale < 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            scanned = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        with self._lock, self._torch.inference_mode():
            previous = self._torch.get_num_threads()
            if self.torch_threads is not None:
                self._torch.set_num_threads(self.torch_threads)
            try:
                boxes, probs = self._mtcnn.detect(np.ascontiguousarray(scanned))
            finally:
                self._torch.set_num_threads(previous)
        if boxes is None:
            return Detections.empty(("face",))
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4) / scale
        probs = np.asarray(probs, np.float32).reshape(-1)
        keep = probs >= self.min_confidence
        boxes = boxes[keep]
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
        return Detections(boxes, probs[keep], np.zeros(int(keep.sum()), np.int64), ("face",))


def _mtcnn_version() -> str:
    """The package's version and a digest of the three weight files it ships."""
    import facenet_pytorch

    data = Path(facenet_pytorch.__file__).parent / "data"
    digest = hashlib.sha256()
    for name in ("pnet.pt", "rnet.pt", "onet.pt"):
        digest.update((data / name).read_bytes())
    return (
        f"facenet-pytorch=={importlib.metadata.version('facenet-pytorch')};sha256:{digest.hexdigest()[:16]}"
    )


class DbnetTextDetector:
    """Text boxes from the prepared ``ppocr_det`` model (its own preprocessing and decoder)."""

    name = "ppocr_det"

    def __init__(self, models_dir: Path | None) -> None:
        from cascades.onnx_stage import OnnxStage, OnnxStageConfig

        # One thread: redaction runs beside the serving tiers and must not take every core.
        self._stage = OnnxStage(OnnxStageConfig(model="ppocr_det", intra_op_threads=1), models_dir=models_dir)
        self.version = self._stage.version

    def detect(self, rgb: np.ndarray) -> Detections:
        (detections,), _ = self._stage.predict([rgb])
        return detections


_built: dict[tuple, object] = {}
_build_lock = threading.Lock()


def _once(key: tuple, build):
    with _build_lock:
        if key not in _built:
            _built[key] = build()
        return _built[key]


def face_detector(name: str, *, min_confidence: float = 0.9) -> MtcnnFaceDetector:
    """The named face detector, built once per process (``KeyError`` for an unknown name:
    policies are validated against ``FACE_DETECTORS`` before they get here)."""
    if name not in FACE_DETECTORS:
        raise KeyError(f"unknown face detector {name!r}; expected one of {sorted(FACE_DETECTORS)}")
    return _once((name, min_confidence), lambda: MtcnnFaceDetector(min_confidence=min_confidence))


def text_detector(name: str, models_dir: Path | None) -> DbnetTextDetector:
    if name not in TEXT_DETECTORS:
        raise KeyError(f"unknown text detector {name!r}; expected one of {sorted(TEXT_DETECTORS)}")
    return _once((name, str(models_dir)), lambda: DbnetTextDetector(models_dir))
