"""The structure walk before decoding: real files pass, files whose structure no real image has
(thousands of JPEG scans or segments, floods of PNG chunks, GIF sub-blocks, WebP frames) are
refused with a message naming the count, before Pillow parses them."""

from __future__ import annotations

import io
import struct

import pytest
from PIL import Image

from app.errors import InvalidImageError
from app.images.decode import decode_image, probe_image, probe_plain_jpeg
from app.images.structure import (
    MAX_GIF_BLOCKS_BEFORE_FRAME,
    MAX_JPEG_SCANS,
    MAX_JPEG_SEGMENTS,
    MAX_PNG_CHUNKS,
    MAX_WEBP_FRAMES,
    structure_problem,
)
from scripts.checks.hostile_payloads import progressive_jpeg as _progressive_jpeg
from scripts.checks.hostile_payloads import scan_bomb
from scripts.checks.hostile_payloads import sos_headers as _sos_headers
from tests.conftest import shapes_image
from tests.security.test_decode_hostile import gif_block_flood, png_chunk_flood, segment_flood


def encode(img: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def frames(count: int, size: tuple[int, int] = (32, 32)) -> list[Image.Image]:
    return [Image.new("RGB", size, (i * 40 % 256, 20, 200)) for i in range(count)]


@pytest.mark.parametrize(
    "data",
    [
        shapes_image(320, 240),
        _progressive_jpeg(320, 240),
        shapes_image(320, 240, "PNG"),
        shapes_image(320, 240, "GIF"),
        shapes_image(320, 240, "WEBP"),
        encode(frames(1)[0], "JPEG", exif=Image.Exif(), icc_profile=b"\0" * 70_000),
        encode(frames(1)[0], "PNG", save_all=True, append_images=frames(30)),
        encode(frames(1)[0], "GIF", save_all=True, append_images=frames(30), comment=b"x" * 9000),
        encode(frames(1)[0], "WEBP", save_all=True, append_images=frames(30)),
    ],
    ids=[
        "jpeg",
        "progressive-jpeg",
        "png",
        "gif",
        "webp",
        "jpeg-icc",
        "apng",
        "gif-anim",
        "webp-anim",
    ],
)
def test_real_files_pass_the_structure_walk(data: bytes) -> None:
    assert structure_problem(data) is None
    decode_image(data, max_pixels=10**6, index=0)


def test_a_progressive_jpeg_holds_about_ten_scans() -> None:
    assert 5 <= len(_sos_headers(_progressive_jpeg(320, 240))) <= 12


@pytest.mark.parametrize("which", [0, 1], ids=["all-components", "one-component"])
def test_jpeg_over_the_scan_limit_is_refused(which: int) -> None:
    base = len(_sos_headers(_progressive_jpeg(64, 64)))
    at_limit = scan_bomb(64, 64, MAX_JPEG_SCANS - base, which)
    assert structure_problem(at_limit) is None
    over = scan_bomb(64, 64, MAX_JPEG_SCANS - base + 1, which)
    assert f"more than {MAX_JPEG_SCANS} scans" in (structure_problem(over) or "")
    with pytest.raises(
        InvalidImageError, match=f"image 4: the JPEG holds more than {MAX_JPEG_SCANS} scans"
    ):
        decode_image(over, max_pixels=10**6, index=4)
    with pytest.raises(InvalidImageError, match="scans"):
        probe_image(over, max_pixels=10**6, index=4)
    with pytest.raises(InvalidImageError, match="scans"):
        probe_plain_jpeg(over, max_pixels=10**6, index=4)


def test_jpeg_segment_flood_is_refused() -> None:
    assert structure_problem(segment_flood(MAX_JPEG_SEGMENTS - 20)) is None
    problem = structure_problem(segment_flood(MAX_JPEG_SEGMENTS + 1))
    assert problem is not None and f"more than {MAX_JPEG_SEGMENTS} marker segments" in problem


def test_png_chunk_flood_is_refused() -> None:
    assert structure_problem(png_chunk_flood(MAX_PNG_CHUNKS - 10)) is None
    problem = structure_problem(png_chunk_flood(MAX_PNG_CHUNKS))
    assert problem == f"the PNG holds more than {MAX_PNG_CHUNKS} chunks"


def test_gif_sub_block_flood_is_refused() -> None:
    assert structure_problem(gif_block_flood(MAX_GIF_BLOCKS_BEFORE_FRAME - 10)) is None
    problem = structure_problem(gif_block_flood(MAX_GIF_BLOCKS_BEFORE_FRAME + 1))
    assert problem is not None and "extension blocks before its first frame" in problem


def test_webp_frame_flood_is_refused() -> None:
    anmf = b"ANMF" + struct.pack("<I", 16) + b"\0" * 16
    body = b"WEBP" + b"VP8X" + struct.pack("<I", 10) + b"\x02" + b"\0" * 9
    for count, refused in ((MAX_WEBP_FRAMES, False), (MAX_WEBP_FRAMES + 1, True)):
        chunks = body + anmf * count
        data = b"RIFF" + struct.pack("<I", len(chunks)) + chunks
        problem = structure_problem(data)
        assert (problem is not None) == refused, problem
    assert problem is not None and f"more than {MAX_WEBP_FRAMES} frames" in problem


@pytest.mark.parametrize(
    "data",
    [b"", b"\xff\xd8", b"\xff\xd8\xff\xe0\xff\xff", b"\x89PNG\r\n\x1a\n\xff", b"GIF89a", b"RIFF"],
)
def test_truncated_structures_are_left_to_the_decoder(data: bytes) -> None:
    assert structure_problem(data) is None


def test_jpeg_compressed_tiff_is_refused() -> None:
    data = encode(Image.new("RGB", (64, 64), 7), "TIFF", compression="jpeg")
    with pytest.raises(InvalidImageError, match="image 2: TIFF compression 'jpeg' is not accepted"):
        decode_image(data, max_pixels=10**6, index=2)
    lzw = encode(Image.new("RGB", (64, 64), 7), "TIFF", compression="tiff_lzw")
    assert decode_image(lzw, max_pixels=10**6, index=2).width == 64
