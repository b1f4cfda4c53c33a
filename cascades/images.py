"""Decode untrusted image bytes into RGB arrays, with limits checked before pixels are read."""

from __future__ import annotations

import dataclasses
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
    rgb: np.ndarray  # (h, w, 3) uint8; smaller than the file when decoded with ``min_size``
    sha256: str
    format: str
    original_size: tuple[int, int] | None = None  # the file's (width, height); None: rgb's own

    @property
    def width(self) -> int:
        return self.original_size[0] if self.original_size else int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return self.original_size[1] if self.original_size else int(self.rgb.shape[0])

    @property
    def is_reduced(self) -> bool:
        return (self.width, self.height) != (int(self.rgb.shape[1]), int(self.rgb.shape[0]))


@dataclass(frozen=True)
class ImageHeader:
    width: int
    height: int
    format: str
    opened: Image.Image | None = dataclasses.field(
        default=None, compare=False, repr=False
    )  # decode_image reuses it

    @property
    def pixels(self) -> int:
        return self.width * self.height


def probe_image(
    data: bytes,
    *,
    field: str = "image",
    max_bytes: int = 20 << 20,
    max_pixels: int = 40_000_000,
    allowed_formats: tuple[str, ...] = DEFAULT_FORMATS,
) -> ImageHeader:
    """Size and format from the header alone, with every limit checked; no pixel is decoded."""
    image = _opened(data, field, max_bytes, max_pixels, allowed_formats)
    return ImageHeader(image.size[0], image.size[1], image.format, image)


def reduction_factor(size: tuple[int, int], min_size: tuple[int, int] | None) -> int:
    """The largest integer factor that keeps (width, height) at least ``min_size``; 1 = none."""
    if not min_size:
        return 1
    return max(1, min(size[0] // max(1, min_size[0]), size[1] // max(1, min_size[1])))


def decode_image(
    data: bytes,
    *,
    field: str = "image",
    max_bytes: int = 20 << 20,
    max_pixels: int = 40_000_000,
    allowed_formats: tuple[str, ...] = DEFAULT_FORMATS,
    min_size: tuple[int, int] | None = None,
    opened: Image.Image | None = None,
) -> DecodedImage:
    """Validate and decode; every failure names ``field`` and the reason.

    ``opened``: what ``probe_image(data, ...).opened`` read from the same bytes under the same
    limits (its header is parsed once, not twice).

    ``min_size`` (width, height): the smallest image the caller needs. A JPEG is then decoded
    at 1/2, 1/4 or 1/8 scale by the decoder itself (DCT scaling, PIL's ``draft``), so the full
    image never exists in memory; other formats are decoded whole and reduced by an integer
    factor (box filter) right away. Either way the result stays at least ``min_size``, and
    ``original_size`` keeps the file's own size.
    """
    image = opened if opened is not None else _opened(data, field, max_bytes, max_pixels, allowed_formats)
    original_size, file_format = image.size, image.format
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if min_size and image.format == "JPEG" and reduction_factor(image.size, min_size) >= 2:
                image.draft("RGB", min_size)  # DCT scaling: at least min_size, never below
            image.load()
            factor = reduction_factor(image.size, min_size)
            if factor >= 2:
                image = image.reduce(factor)
            if image.mode != "RGB":
                image = image.convert("RGB")
            rgb = np.asarray(image, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"image is truncated or corrupt: {exc}", field=field) from None
    return DecodedImage(
        rgb=rgb,
        sha256=hashlib.sha256(data).hexdigest(),
        format=file_format,
        original_size=original_size if rgb.shape[1::-1] != original_size else None,
    )


def _opened(
    data: bytes, field: str, max_bytes: int, max_pixels: int, allowed_formats: tuple[str, ...]
) -> Image.Image:
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
    return image
