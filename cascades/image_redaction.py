"""Redact an image before it is stored: detect faces and text, blur / pixelate / box them.

``Redactor.prepare`` turns a request's file into what the review queue stores under a tenant's
``PrivacyRule`` (policies/privacy.py), plus the trace step that says what was done: per kind,
the mode, the detector and its version, the count and the boxes (``xyxy`` in the file's pixels),
never any pixel content. The rule of storage:

- regions found (or metadata to drop): the stored image is the redacted pixels re-encoded
  (JPEG stays JPEG at quality 90, everything else becomes PNG) without the file's metadata
  (EXIF, XMP, comments: a GPS position or a camera owner's name is personal data too);
- nothing found and no metadata beyond the benign kind (resolution, colour profile): the
  redacted image *is* the file, so the file's own bytes are stored, byte for byte;
- a detector that fails (or cannot be loaded) stores nothing: ``StoredImage.data`` is None,
  ``withheld`` says why, and the step carries the error. Never the unredacted file instead.

``keep_original: true`` adds the unredacted file beside the redacted one (``original``).
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from policies.privacy import PrivacyPolicy
from visionroute.records import Step
from visionroute.redaction import failure_summary

STAGE = "privacy:redact"
# Face boxes from MTCNN hug the face: widen them so hair line, ears and chin go too.
FACE_MARGIN = 0.25
TEXT_MARGIN = 0.05
BLUR_WORKING_PX = 32
# PIL ``info`` keys that say nothing about a person (resolution, colour, animation, encoding).
BENIGN_METADATA = frozenset(
    {
        "jfif",
        "jfif_version",
        "jfif_unit",
        "jfif_density",
        "dpi",
        "progressive",
        "progression",
        "adobe",
        "adobe_transform",
        "icc_profile",
        "gamma",
        "srgb",
        "chromaticity",
        "transparency",
        "aspect",
        "interlace",
        "compression",
        "loop",
        "background",
        "duration",
    }
)


@dataclass(frozen=True)
class StoredImage:
    """What the review queue stores for one item, and the trace step saying why."""

    data: bytes | None  # the image to store (None: withheld, a detector failed)
    original: bytes | None  # the unredacted file, kept too (keep_original), else None
    withheld: str | None  # why nothing was stored
    step: Step


def region_box(xyxy: np.ndarray, margin: float, width: int, height: int) -> tuple[int, int, int, int]:
    """A detected box widened by ``margin`` of its size on each side, in whole pixels inside
    the image (outward rounding: a redaction never leaves a sliver of the region)."""
    x1, y1, x2, y2 = (float(v) for v in xyxy)
    dx, dy = (x2 - x1) * margin, (y2 - y1) * margin
    return (
        max(0, int(np.floor(x1 - dx))),
        max(0, int(np.floor(y1 - dy))),
        min(width, int(np.ceil(x2 + dx))),
        min(height, int(np.ceil(y2 + dy))),
    )


def redact_region(rgb: np.ndarray, box: tuple[int, int, int, int], mode: str) -> None:
    """Redact ``box`` of ``rgb`` in place: ``blur`` (a Gaussian with sigma a quarter of the
    region's longer side: features are gone, the shape of a head stays), ``pixelate`` (about 8
    blocks across the longer side), ``box`` (filled black)."""
    import cv2

    x1, y1, x2, y2 = box
    if x2 <= x1 or y2 <= y1:
        return
    region = rgb[y1:y2, x1:x2]
    height, width = region.shape[:2]
    longer = max(height, width)
    if mode == "blur":
        # The same blur relative to the region, computed ~32 px across: at full size a Gaussian
        # this wide cost 0.3 s on one text line (its kernel grows with the region).
        scale = min(1.0, BLUR_WORKING_PX / longer)
        small = cv2.resize(
            region,
            (max(1, round(width * scale)), max(1, round(height * scale))),
            interpolation=cv2.INTER_AREA,
        )
        small = cv2.GaussianBlur(
            small, (0, 0), sigmaX=max(1.0, max(small.shape[:2]) / 4), borderType=cv2.BORDER_REPLICATE
        )
        region[:] = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
    elif mode == "pixelate":
        block = max(2, longer // 8)
        small = cv2.resize(
            region, (max(1, width // block), max(1, height // block)), interpolation=cv2.INTER_AREA
        )
        region[:] = cv2.resize(small, (width, height), interpolation=cv2.INTER_NEAREST)
    elif mode == "box":
        region[:] = 0
    else:
        raise ValueError(f"unknown redaction mode {mode!r}")


def encode_like(rgb: np.ndarray, source_format: str | None, icc_profile: bytes | None) -> bytes:
    """The pixels in the source's format when it is JPEG (quality 90), else PNG; no metadata
    but the colour profile."""
    from PIL import Image

    buffer = io.BytesIO()
    options: dict[str, Any] = {"icc_profile": icc_profile} if icc_profile else {}
    if source_format == "JPEG":
        Image.fromarray(rgb).save(buffer, format="JPEG", quality=90, **options)
    else:
        # zlib level 1: a third of the default's time (60 vs 160 ms for 600x400), 7% larger
        Image.fromarray(rgb).save(buffer, format="PNG", compress_level=1, **options)
    return buffer.getvalue()


class Redactor:
    """Applies a privacy policy to images about to be stored; detectors load on first use."""

    def __init__(self, models_dir: Path | None = None) -> None:
        self.models_dir = models_dir

    def _detector(self, kind: str, policy: PrivacyPolicy):
        from cascades.detectors_privacy import face_detector, text_detector

        if kind == "faces":
            return face_detector(policy.face_detector, min_confidence=policy.face_min_confidence)
        return text_detector(policy.text_detector, self.models_dir)

    def prepare(
        self,
        image_bytes: bytes,
        rgb: np.ndarray | None,
        policy: PrivacyPolicy,
        tenant: str,
        *,
        policy_version: str | None = None,
    ) -> StoredImage:
        """What to store for ``image_bytes`` under ``tenant``'s rule. ``rgb`` is the file's own
        pixels when the caller has them (None: decoded here). Never raises for a failing
        detector or decoder: that withholds the image (fail closed)."""
        started = time.perf_counter()
        rule = policy.for_tenant(tenant)
        details: dict[str, Any] = {"rule": rule.model_dump()}
        if not rule.redacts:
            details.update(stored="original_file", original_kept=False)
            reason = "privacy policy redacts nothing (faces: keep, text: keep)"
            return StoredImage(
                image_bytes,
                None,
                None,
                Step(STAGE, reason=reason, policy_version=policy_version, details=details),
            )
        found: dict[str, list[tuple[int, int, int, int]]] = {}
        versions, names = [], []
        stage = "decode"
        try:
            header = _header(image_bytes)
            if rgb is None:
                rgb = _decoded(image_bytes, header.format)
            height, width = rgb.shape[:2]
            for kind, mode, margin in (("faces", rule.faces, FACE_MARGIN), ("text", rule.text, TEXT_MARGIN)):
                if mode == "keep":
                    continue
                stage = name = policy.face_detector if kind == "faces" else policy.text_detector
                detected = time.perf_counter()
                detector = self._detector(kind, policy)
                boxes = [region_box(xyxy, margin, width, height) for xyxy in detector.detect(rgb).xyxy]
                found[kind] = boxes
                names.append(name)
                versions.append(f"{name}={detector.version}")
                details[kind] = {
                    "mode": mode,
                    "detector": name,
                    "detector_version": detector.version,
                    "count": len(boxes),
                    "boxes_xyxy": [list(box) for box in boxes],
                    "latency_ms": round((time.perf_counter() - detected) * 1000.0, 3),
                }
            stage = "encode"
            extra_metadata = sorted(set(header.info) - BENIGN_METADATA)
            if any(found.values()) or extra_metadata:
                redacted = np.array(rgb, dtype=np.uint8, copy=True)
                for kind, boxes in found.items():
                    for box in boxes:
                        redact_region(redacted, box, rule.faces if kind == "faces" else rule.text)
                data, stored = (
                    encode_like(redacted, header.format, header.info.get("icc_profile")),
                    "redacted",
                )
            else:
                data, stored = image_bytes, "original_file"  # nothing to redact: the file is its redaction
        except Exception as exc:  # fail closed: nothing of this image is stored
            error = failure_summary(exc)
            withheld = f"privacy redaction failed at {stage}: {error}"
            details.update(failed_at=stage, stored=None, original_kept=False)
            return StoredImage(
                None,
                None,
                withheld,
                Step(
                    STAGE,
                    model=stage,
                    error=error,
                    reason=f"{withheld}; nothing was stored (fail closed)",
                    policy_version=policy_version,
                    latency_ms=(time.perf_counter() - started) * 1000.0,
                    details=details,
                ),
            )
        original = image_bytes if rule.keep_original else None
        details.update(stored=stored, metadata_removed=extra_metadata, original_kept=original is not None)
        counts = ", ".join(
            f"{len(boxes)} {kind} region(s) {details[kind]['mode']}" for kind, boxes in found.items()
        )
        return StoredImage(
            data,
            original,
            None,
            Step(
                STAGE,
                model="+".join(names),
                model_version=" | ".join(versions),
                reason=f"redacted before storage: {counts}",
                policy_version=policy_version,
                latency_ms=(time.perf_counter() - started) * 1000.0,
                details=details,
            ),
        )


def _header(image_bytes: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(image_bytes))


def _decoded(image_bytes: bytes, image_format: str) -> np.ndarray:
    """The file's own pixels (its limits were checked when the request was decoded)."""
    from cascades.images import decode_image

    return decode_image(
        image_bytes, max_bytes=len(image_bytes), max_pixels=2**62, allowed_formats=(image_format,)
    ).rgb
