"""Large images are resized to the model's input while they decode: the pixels that leave the
decoder are the model's size, the reported size and the boxes stay the original's."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from app.engine.pipeline import DetectionTask, Engine
from app.engine.processing import FixedSize, ShortestEdge
from app.images.decode import DECODE_WEIGHT, REDUCE_ABOVE_PIXELS, Fit, decode_image, probe_image
from tests.conftest import shapes_image

FIT = Fit(FixedSize(256, 256).output_size, Image.Resampling.BILINEAR)


def encode(img: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def big_picture(width: int = 3000, height: int = 2000) -> Image.Image:
    return Image.open(io.BytesIO(shapes_image(width, height, "PNG"))).convert("RGB")


def test_a_large_png_is_resized_to_the_model_input_exactly_as_pillow_does() -> None:
    img = big_picture()
    out = decode_image(encode(img, "PNG"), max_pixels=10**8, index=0, fit=FIT)
    assert out.pixels.shape == (256, 256, 3)
    assert (out.width, out.height) == (3000, 2000)
    expected = np.asarray(img.resize((256, 256), Image.Resampling.BILINEAR))
    assert np.array_equal(out.pixels, expected)


def test_images_at_or_under_the_threshold_keep_their_pixels() -> None:
    side = int(math.isqrt(REDUCE_ABOVE_PIXELS))
    data = encode(Image.new("RGB", (side, side), (9, 9, 9)), "PNG")
    out = decode_image(data, max_pixels=10**8, index=0, fit=FIT)
    assert out.pixels.shape == (side, side, 3) and out.source_size is None


def test_a_large_jpeg_decodes_at_a_scale_and_probes_its_cost() -> None:
    data = encode(big_picture(4000, 3000), "JPEG", quality=90)
    info = probe_image(data, max_pixels=10**8, index=0, fit=FIT)
    # Twice the 256 input is 512: 4000 // 512 = 7, 3000 // 512 = 5 -> scale 1/4.
    assert info.decode_pixels == 1000 * 750
    assert info.held_pixels == 256 * 256
    assert (info.width, info.height) == (4000, 3000)
    out = decode_image(data, max_pixels=10**8, index=0, fit=FIT)
    assert out.pixels.shape == (256, 256, 3)
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((256, 256), 2), np.int16)
    # Decoding at 1/4 scale changes a few levels, not the picture.
    assert np.abs(out.pixels.astype(np.int16) - full).mean() < 2.0


def test_exif_rotation_is_applied_after_the_resize() -> None:
    img = big_picture(3000, 2000)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait (rotate 270)
    data = encode(img, "JPEG", quality=95, exif=exif)
    fit = Fit(ShortestEdge(200, 1000).output_size, Image.Resampling.BILINEAR)
    info = probe_image(data, max_pixels=10**8, index=0, fit=fit)
    assert (info.width, info.height) == (2000, 3000)
    out = decode_image(data, max_pixels=10**8, index=0, fit=fit)
    assert (out.width, out.height) == (2000, 3000)
    assert out.pixels.shape[:2] == ShortestEdge(200, 1000).output_size(3000, 2000)
    reference = decode_image(data, max_pixels=10**8, index=0)  # full size, upright
    small = np.asarray(Image.fromarray(reference.pixels).resize((200, 300), 2), np.int16)
    assert np.abs(out.pixels.astype(np.int16) - small).mean() < 3.0


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGBA", "I;16", "LA"])
def test_every_mode_reduces_to_rgb(mode: str) -> None:
    img = Image.new(mode, (3000, 2000))
    out = decode_image(encode(img, "PNG"), max_pixels=10**8, index=0, fit=FIT)
    assert out.pixels.shape == (256, 256, 3) and out.pixels.dtype == np.uint8


def test_sixteen_bit_reduction_keeps_the_scale() -> None:
    img = Image.new("I;16", (3000, 2000), 40_000)
    out = decode_image(encode(img, "PNG"), max_pixels=10**8, index=0, fit=FIT)
    assert int(out.pixels[0, 0, 0]) == 40_000 >> 8


def test_webp_counts_for_its_decoders_copies() -> None:
    data = encode(Image.new("RGB", (3000, 2000), 5), "WEBP", lossless=True)
    info = probe_image(data, max_pixels=10**8, index=0, fit=FIT)
    assert info.decode_pixels == 3000 * 2000 * DECODE_WEIGHT["WEBP"]


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Engine:
    return Engine.load(tiny_model_dir, name="tiny", device="cpu")


def test_boxes_of_a_reduced_image_are_in_the_original_pixels(engine: Engine) -> None:
    data = shapes_image(3000, 2000, "PNG")
    spec = engine.preprocessor.spec
    fit = Fit(spec.output_size, spec.resample)
    full = decode_image(data, max_pixels=10**8, index=0)
    reduced = decode_image(data, max_pixels=10**8, index=0, fit=fit)
    assert reduced.pixels.shape[:2] == spec.output_size(2000, 3000)
    tasks = [
        DetectionTask(full.pixels, 0.0, 20),
        DetectionTask(reduced.pixels, 0.0, 20, source_size=(reduced.height, reduced.width)),
    ]
    old, new = engine.run_batch(tasks)
    assert len(old.boxes) == 20
    # Pillow's resize at decode time is the one the device reproduces: the same boxes, in the
    # 3000 x 2000 original's pixels.
    np.testing.assert_allclose(new.boxes, old.boxes, atol=0.05)
    np.testing.assert_allclose(new.scores, old.scores, atol=1e-4)
    assert new.boxes[:, 2].max() > 256 or new.boxes[:, 3].max() > 256
