import io

import pytest
from PIL import Image

from cascades.images import decode_image
from visionroute.errors import InputError, PayloadTooLarge, UnsupportedMediaType


def png(width: int, height: int, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_decodes_rgb_and_hashes_bytes():
    decoded = decode_image(png(32, 16, "L"))
    assert decoded.rgb.shape == (16, 32, 3) and decoded.format == "PNG"
    assert len(decoded.sha256) == 64


@pytest.mark.parametrize(
    "data, error, message",
    [
        (b"", InputError, "empty"),
        (b"hello, not an image", UnsupportedMediaType, "not an image"),
        (png(64, 64)[:60], InputError, "truncated or corrupt|corrupt"),
    ],
)
def test_bad_bytes_get_a_named_error(data, error, message):
    with pytest.raises(error, match=message) as caught:
        decode_image(data, field="image")
    assert caught.value.field == "image"


def test_pixel_limit_is_checked_before_decoding():
    with pytest.raises(PayloadTooLarge, match="20000x20000"):
        decode_image(png(20000, 20000, "1"), max_pixels=40_000_000)


def test_byte_limit_and_format_allow_list():
    with pytest.raises(PayloadTooLarge, match="limit is 10"):
        decode_image(png(8, 8), max_bytes=10)
    with pytest.raises(UnsupportedMediaType, match="PNG is not allowed"):
        decode_image(png(8, 8), allowed_formats=("JPEG",))
