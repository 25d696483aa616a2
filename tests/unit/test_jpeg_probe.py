"""probe_image reads plain JPEG headers from the marker walk, without Pillow: the facts it gives
must be the ones Pillow's header parse gives, and everything else must still go to Pillow."""

from __future__ import annotations

import io
import struct

import pytest
from PIL import Image

import app.images.decode as images
from app.errors import ImageTooLargeError, InvalidImageError
from app.images.decode import probe_image
from app.images.structure import jpeg_header
from tests.conftest import shapes_image


def jpeg(mode: str = "RGB", size: tuple[int, int] = (96, 64), **options: object) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, "red" if mode == "RGB" else 120).save(buf, "JPEG", **options)
    return buf.getvalue()


def with_exif_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg(size=(96, 64), exif=exif.tobytes())


def with_segment(data: bytes, marker: int, payload: bytes) -> bytes:
    """`data` with one more segment right after SOI."""
    segment = bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload
    return data[:2] + segment + data[2:]


def with_size(data: bytes, width: int, height: int) -> bytes:
    """`data` with its frame header claiming another size (the pixels are not decoded)."""
    header = jpeg_header(data)
    assert header is not None
    sof = data.index(b"\xff\xc0")
    return data[: sof + 5] + struct.pack(">HH", height, width) + data[sof + 9 :]


def by_pillow(data: bytes, monkeypatch: pytest.MonkeyPatch, **kw: object) -> images.ImageInfo:
    with monkeypatch.context() as m:
        m.setattr(images, "_plain_jpeg_facts", lambda *a, **k: None)
        return probe_image(data, **kw)  # type: ignore[arg-type]


PLAIN = {
    "baseline RGB": lambda: jpeg(),
    "shapes 640x480": lambda: shapes_image(640, 480),
    "progressive": lambda: jpeg(progressive=True),
    "optimized, 4:4:4": lambda: jpeg(optimize=True, subsampling=0),
    "greyscale": lambda: jpeg("L"),
    "CMYK": lambda: jpeg("CMYK"),
    "ICC profile": lambda: jpeg(icc_profile=b"\0" * 300),
    "comment": lambda: jpeg(comment=b"hello"),
    "restart interval": lambda: with_segment(jpeg(), 0xDD, struct.pack(">H", 4)),
}


@pytest.mark.parametrize("name", list(PLAIN))
def test_plain_jpeg_facts_are_pillows_without_pillow(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = PLAIN[name]()
    assert images._plain_jpeg_facts(data, max_pixels=10**8, index=0) is not None
    fit = images.Fit(lambda h, w: (640, 640), reduce_above_pixels=0)
    for kw in ({"max_pixels": 10**8, "index": 0}, {"max_pixels": 10**8, "index": 0, "fit": fit}):
        assert probe_image(data, **kw) == by_pillow(data, monkeypatch, **kw)  # type: ignore[arg-type]


OTHERS = {
    "EXIF rotated": lambda: with_exif_orientation(6),
    "EXIF upright": lambda: with_exif_orientation(1),
    "XMP orientation": lambda: with_segment(
        jpeg(), 0xE1, b'http://ns.adobe.com/xap/1.0/\0<x tiff:Orientation="8"/>'
    ),
    "MPO header": lambda: with_segment(jpeg(), 0xE2, b"MPF\0" + b"\0" * 8),
    "12-bit precision": lambda: (
        jpeg()[:2] + jpeg()[2:].replace(b"\xff\xc0\x00\x11\x08", b"\xff\xc0\x00\x11\x0c", 1)
    ),
    "PNG": lambda: shapes_image(64, 48, "PNG"),
    "junk between segments": lambda: jpeg()[:2] + b"\x00" + jpeg()[2:],
}


@pytest.mark.parametrize("name", list(OTHERS))
def test_other_images_are_read_by_pillow(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    data = OTHERS[name]()
    assert images._plain_jpeg_facts(data, max_pixels=10**8, index=0) is None
    try:
        expected: object = by_pillow(data, monkeypatch, max_pixels=10**8, index=0)
    except InvalidImageError as exc:
        expected = exc.message
    try:
        got: object = probe_image(data, max_pixels=10**8, index=0)
    except InvalidImageError as exc:
        got = exc.message
    assert got == expected


def test_rotated_jpeg_reports_upright_size() -> None:
    info = probe_image(with_exif_orientation(6), max_pixels=10**8, index=0)
    assert (info.width, info.height, info.plain_jpeg) == (64, 96, False)


@pytest.mark.parametrize(
    ("size", "limit"),
    [((5000, 4000), 10**6), ((60000, 60000), 10**8)],  # over the limit; over Pillow's bomb check
)
def test_oversized_header_is_refused_as_pillow_refuses_it(
    size: tuple[int, int], limit: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = with_size(jpeg(), *size)
    with pytest.raises(ImageTooLargeError) as fast:
        probe_image(data, max_pixels=limit, index=3)
    with pytest.raises(ImageTooLargeError) as slow:
        by_pillow(data, monkeypatch, max_pixels=limit, index=3)
    assert (fast.value.message, fast.value.image_index) == (slow.value.message, 3)
