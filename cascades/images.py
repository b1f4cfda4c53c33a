"""Decode untrusted image bytes into RGB arrays, with limits checked before pixels are read."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from visionroute.errors import InputError, PayloadTooLarge, UnsupportedMediaType

DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")

# decode_image enforces its own, configurable pixel limit right after reading the header;
# PIL's global ceiling would otherwise pre-empt it with a less useful message.
Image.MAX_IMAGE_PIXELS = None


@dataclass(frozen=True)
class DecodedImage:
    rgb: np.ndarray  # (h, w, 3) uint8
    sha256: str
    format: str


def decode_image(
    data: bytes,
    *,
    field: str = "image",
    max_bytes: int = 20 << 20,
    max_pixels: int = 40_000_000,
    allowed_formats: tuple[str, ...] = DEFAULT_FORMATS,
) -> DecodedImage:
    """Validate and decode; every failure names ``field`` and the reason."""
    if not data:
        raise InputError("image is empty (0 bytes)", field=field)
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"image is {len(data)} bytes; the limit is {max_bytes}", field=field)
    try:
        # Reads the header only: size and format are known before any pixel is decoded.
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise UnsupportedMediaType(
            f"not an image in a known format; allowed formats: {list(allowed_formats)}", field=field
        ) from None
    except Image.DecompressionBombError as exc:  # PIL's own ceiling, above any sane limit
        raise PayloadTooLarge(f"image is a decompression bomb: {exc}", field=field) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"image header is corrupt: {exc}", field=field) from None
    if image.format not in allowed_formats:
        raise UnsupportedMediaType(
            f"image format {image.format} is not allowed; allowed: {list(allowed_formats)}", field=field
        )
    width, height = image.size
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}", field=field
        )
    if width < 1 or height < 1:
        raise InputError(f"image has no pixels ({width}x{height})", field=field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
            rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"image is truncated or corrupt: {exc}", field=field) from None
    return DecodedImage(rgb=rgb, sha256=hashlib.sha256(data).hexdigest(), format=image.format)
