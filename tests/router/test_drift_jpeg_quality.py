"""The drift monitor reads a JPEG's quality from the file's bytes (``jpeg_file_quality``, no
image opened): the same table, so the same quality, as Pillow's ``quantization[0]`` gives."""

import io
import math

import numpy as np
import pytest
from PIL import Image

from router.drift.monitors import estimate_jpeg_quality, jpeg_file_quality


def encoded(format: str, **options) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=format, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("quality", [1, 5, 23, 50, 75, 90, 97, 100])
@pytest.mark.parametrize("options", [{}, {"subsampling": 0}, {"progressive": True}, {"optimize": True}])
def test_the_file_quality_is_what_pillow_reads(quality, options):
    data = encoded("JPEG", quality=quality, **options)
    with Image.open(io.BytesIO(data)) as header:
        assert jpeg_file_quality(data) == estimate_jpeg_quality(header) == quality


def test_a_table_of_16_bit_values_is_read_too():
    table = [300] * 64  # beyond 255: libjpeg writes it with 2-byte precision
    data = encoded("JPEG", qtables=[table, table])
    with Image.open(io.BytesIO(data)) as header:
        assert header.quantization[0][0] == 300
        assert jpeg_file_quality(data) == estimate_jpeg_quality(header)


@pytest.mark.parametrize(
    "data",
    [encoded("PNG"), b"", b"\xff\xd8", b"\xff\xd8\xff\xdb\x00", encoded("JPEG")[:40], b"\xff\xd8junk" * 9],
)
def test_no_table_is_nan_never_an_error(data):
    assert math.isnan(jpeg_file_quality(data))
