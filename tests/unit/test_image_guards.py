"""Hostile images: decompression bombs, truncated files and polyglots are refused fast,
before any pixel buffer is allocated."""

from __future__ import annotations

import io
import resource
import struct
import zlib

import pytest

from app.errors import ImageTooLargeError, InvalidImageError
from app.images.decode import decode_image
from tests.conftest import shapes_image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header announcing width x height RGB pixels, with a tiny zlib stream whose
    expansion would be the whole image (the classic decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = b"\x00" + b"\x00" * (3 * min(width, 4096))
    idat = zlib.compress(row * 64, 9)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize(
    ("width", "height"),
    [(100_000, 100_000), (20_000, 20_000), (8_000, 8_000), (1, 50_000_000)],
    ids=["10-gigapixel", "400-megapixel", "64-megapixel", "one-pixel-wide"],
)
def test_decompression_bomb_is_refused_from_the_header(width: int, height: int) -> None:
    data = png_bomb(width, height)
    assert len(data) < 100_000
    before = peak_rss_mb()
    with pytest.raises(ImageTooLargeError, match="image 0: the image"):
        decode_image(data, max_pixels=40_000_000, index=0)
    # Decoding even the smallest of these would need 192 MB of pixels.
    assert peak_rss_mb() - before < 50


def test_jpeg_bomb_is_refused_from_the_header() -> None:
    data = bytearray(shapes_image(64, 64))
    sof = data.index(b"\xff\xc0")  # baseline start-of-frame: height and width follow
    struct.pack_into(">HH", data, sof + 5, 60_000, 60_000)
    # Pillow's own bomb guard fires first here; ours names the size when it is the one.
    with pytest.raises(ImageTooLargeError, match="image 0: the image (has 60000x60000|is larger)"):
        decode_image(bytes(data), max_pixels=40_000_000, index=0)


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.9, 0.99])
def test_truncated_file_is_refused(cut: float) -> None:
    data = shapes_image(640, 480, "PNG")
    with pytest.raises(InvalidImageError, match="corrupt or truncated"):
        decode_image(data[: int(len(data) * cut)], max_pixels=40_000_000, index=0)


def test_gif_javascript_polyglot_is_refused() -> None:
    # A GIF header whose "dimensions" open a JavaScript comment: valid JS, broken GIF.
    polyglot = b"GIF89a/*\x00\x00\x00\x00\x00\x00*/=1;alert(document.domain);//" + b"\x00" * 32
    with pytest.raises((InvalidImageError, ImageTooLargeError)):
        decode_image(polyglot, max_pixels=40_000_000, index=0)


def test_html_with_image_magic_is_refused() -> None:
    html = b"<html><script>fetch('http://169.254.169.254/')</script>\x89PNG\r\n\x1a\n</html>"
    with pytest.raises(InvalidImageError, match="not an image"):
        decode_image(html, max_pixels=40_000_000, index=0)


def test_svg_is_not_an_accepted_format() -> None:
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>'
    with pytest.raises(InvalidImageError, match="not an image in a supported format"):
        decode_image(svg, max_pixels=40_000_000, index=0)


def test_valid_image_with_trailing_archive_decodes_as_the_image_only() -> None:
    # A JPEG+ZIP polyglot is a valid JPEG: only its pixels are used, the rest is ignored.
    buf = io.BytesIO()
    import zipfile

    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("payload.txt", "not for us")
    out = decode_image(shapes_image(64, 48) + buf.getvalue(), max_pixels=10**6, index=0)
    assert (out.width, out.height) == (64, 48)
