"""app/jobs/reader.py: a job's plain (untiled) image is decoded by app/images/decode.py, as
/v1/detect decodes one: upright after its EXIF orientation, refused past the pixel limit, and
a file that does not decode fails the job with the reason."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.jobs.reader import UnreadableImageError, open_image


def _write(path: Path, image: Image.Image, fmt: str, **kw: object) -> Path:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    path.write_bytes(buf.getvalue())
    return path


def test_a_png_job_image_reads_back_its_pixels(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    path = _write(tmp_path / "a.png", Image.fromarray(pixels), "PNG")
    source = open_image(path, level=0, max_whole_pixels=10_000)
    assert (source.width, source.height) == (60, 40)
    np.testing.assert_array_equal(source.read(10, 5, 30, 25), pixels[5:25, 10:30])


def test_a_jpeg_job_image_is_turned_upright_by_its_exif_orientation(tmp_path: Path) -> None:
    # Stored 60 wide and 40 high, orientation 6 (turn 90 degrees clockwise to view): the
    # upright image is 40 wide and 60 high, as /v1/detect reports it.
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _write(tmp_path / "a.jpg", Image.new("RGB", (60, 40), (200, 30, 30)), "JPEG",
                  exif=exif.tobytes())  # fmt: skip
    source = open_image(path, level=0, max_whole_pixels=10_000)
    assert (source.width, source.height) == (40, 60)


def test_a_job_image_over_the_pixel_limit_fails_with_the_limit(tmp_path: Path) -> None:
    path = _write(tmp_path / "big.png", Image.new("RGB", (200, 100)), "PNG")
    with pytest.raises(UnreadableImageError) as exc:
        open_image(path, level=0, max_whole_pixels=10_000)
    assert "200x100" in str(exc.value) and "max_job_image_pixels" in str(exc.value)
    assert "tiled TIFF" in str(exc.value)


def test_a_truncated_job_image_fails_with_the_reason(tmp_path: Path) -> None:
    full = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(full, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(full.getvalue()[:60])
    with pytest.raises(UnreadableImageError) as exc:
        open_image(path, level=0, max_whole_pixels=10_000)
    assert str(exc.value).startswith("the PNG image does not decode:")
