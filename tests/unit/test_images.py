"""Image decoding: formats, guards, orientation and colour modes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from app.errors import ImageTooLargeError, InvalidImageError
from app.images.decode import decode_image
from tests.conftest import shapes_image


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"])
def test_supported_formats_decode_to_rgb(fmt: str) -> None:
    out = decode_image(shapes_image(64, 48, fmt), max_pixels=10**6, index=0)
    assert out.pixels.shape == (48, 64, 3) and out.pixels.dtype == np.uint8
    assert out.format == fmt


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (60, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = decode_image(encode(img, "JPEG", exif=exif), max_pixels=10**6, index=0)
    assert (out.width, out.height) == (20, 60)


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "LA", "P", "1"])
def test_colour_modes_convert_to_rgb(mode: str) -> None:
    img = Image.new("RGB", (8, 8), (10, 200, 30)).convert(mode)
    fmt = "JPEG" if mode in ("L", "CMYK") else "PNG" if mode != "1" else "BMP"
    out = decode_image(encode(img, fmt), max_pixels=10**6, index=0)
    assert out.pixels.shape == (8, 8, 3)


def test_transparent_pixels_become_white() -> None:
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    out = decode_image(encode(img, "PNG"), max_pixels=10**6, index=0)
    assert out.pixels.min() == 255


def test_sixteen_bit_greyscale_is_scaled_not_clipped() -> None:
    arr = np.full((4, 4), 32768, dtype=np.uint16)
    out = decode_image(encode(Image.fromarray(arr), "PNG"), max_pixels=10**6, index=0)
    assert 120 <= int(out.pixels[0, 0, 0]) <= 135


def test_animated_gif_uses_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out = decode_image(buf.getvalue(), max_pixels=10**6, index=0)
    assert out.pixels[0, 0, 0] > 200 and out.pixels[0, 0, 2] < 50


def test_pixel_limit_is_checked_from_the_header() -> None:
    data = shapes_image(400, 300)
    with pytest.raises(ImageTooLargeError, match="image 3: the image has 400x300"):
        decode_image(data, max_pixels=100_000, index=3)


def test_truncated_and_garbage_inputs_name_the_index() -> None:
    with pytest.raises(InvalidImageError, match="image 2: the .* is corrupt or truncated"):
        decode_image(shapes_image(200, 200)[:500], max_pixels=10**6, index=2)
    with pytest.raises(InvalidImageError, match="image 0: not an image"):
        decode_image(b"GIF89a but not really", max_pixels=10**6, index=0)
    with pytest.raises(InvalidImageError, match="empty"):
        decode_image(b"", max_pixels=10**6, index=0)
