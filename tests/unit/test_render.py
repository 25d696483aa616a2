"""The renderer (app/images/render.py): colours per class, labels inside the image, EXIF
orientation, sizes scaled to the image."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from app.errors import InvalidImageError
from app.images.render import (
    PALETTE,
    Boxes,
    Style,
    class_colour,
    draw_detections,
    label_rect,
    render,
)

NAMES = {0: "circle", 1: "square", 2: "triangle"}


def _boxes(rows: list[tuple[int, float, list[float]]]) -> Boxes:
    return Boxes(
        boxes=np.array([r[2] for r in rows], dtype=np.float32).reshape(-1, 4),
        class_ids=np.array([r[0] for r in rows], dtype=np.int64),
        scores=np.array([r[1] for r in rows], dtype=np.float32),
        names=NAMES,
    )


def _encoded(img: Image.Image, fmt: str = "PNG", exif: Image.Exif | None = None) -> bytes:
    buf = io.BytesIO()
    if exif is not None:
        img.save(buf, format=fmt, exif=exif)
    else:
        img.save(buf, format=fmt)
    return buf.getvalue()


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _grey(width: int, height: int) -> Image.Image:
    return Image.new("RGB", (width, height), (128, 128, 128))


def test_colour_of_a_class_is_the_same_in_every_call_and_differs_between_neighbours() -> None:
    assert class_colour(3) == class_colour(3) == PALETTE[3]
    assert class_colour(3 + len(PALETTE)) == class_colour(3)
    assert len({class_colour(i) for i in range(len(PALETTE))}) == len(PALETTE)


def test_boxes_are_drawn_in_their_class_colour_in_every_render() -> None:
    found = _boxes([(0, 0.9, [20, 20, 100, 100]), (2, 0.8, [150, 40, 250, 160])])
    first = _decode(
        render(_encoded(_grey(300, 200)), found, max_pixels=10**8, index=0, fmt="png", labels=False)
    )
    second = _decode(
        render(_encoded(_grey(300, 200)), found, max_pixels=10**8, index=0, fmt="png", labels=False)
    )
    np.testing.assert_array_equal(first, second)
    # The left edge of each box, half way down it, in the class's colour.
    assert tuple(first[60, 20]) == class_colour(0)
    assert tuple(first[100, 150]) == class_colour(2)
    assert tuple(first[60, 60]) == (128, 128, 128)  # inside the box: untouched


@pytest.mark.parametrize(
    "box",
    [
        [0, 0, 50, 40],  # top-left corner: no room above
        [260, 0, 300, 30],  # top-right corner: the label would run off the right
        [280, 185, 300, 200],  # bottom-right, tiny
        [-20, -10, 400, 300],  # past every edge
        [5, 190, 290, 200],  # along the bottom
    ],
)
def test_label_rect_stays_inside_the_image(box: list[float]) -> None:
    size = (300, 200)
    for text in [(60, 12), (250, 30), (400, 250)]:  # wider and taller than the image too
        x0, y0, x1, y1 = label_rect(box, text, size, pad=2)
        assert 0 <= x0 < x1 <= size[0]
        assert 0 <= y0 < y1 <= size[1]


def test_label_goes_above_the_box_when_there_is_room_else_inside_its_top() -> None:
    assert label_rect([50, 100, 150, 180], (40, 10), (300, 200), pad=2) == (50, 86, 94, 100)
    assert label_rect([50, 5, 150, 180], (40, 10), (300, 200), pad=2) == (50, 5, 94, 19)


def test_label_of_a_box_at_the_top_right_corner_is_drawn_inside_the_image() -> None:
    found = _boxes([(1, 0.97, [250, 0, 300, 40])])
    drawn = np.asarray(draw_detections(_grey(300, 200), found))
    colour = np.array(class_colour(1))
    label_pixels = np.argwhere((drawn == colour).all(axis=2))
    # The label is a filled rectangle wider than the 50 px box: it was shifted left to fit.
    assert label_pixels[:, 1].min() < 250
    # Its text (another colour) is inside the label, so inside the image.
    inside = drawn[0:30, 150:300]
    assert ((inside != colour).any(axis=2) & (inside != 128).any(axis=2)).any()


def test_labels_false_draws_boxes_only() -> None:
    found = _boxes([(1, 0.97, [100, 100, 200, 180])])
    with_labels = np.asarray(draw_detections(_grey(300, 200), found, labels=True))
    without = np.asarray(draw_detections(_grey(300, 200), found, labels=False))
    # Just above the box: the label's fill (and text) with labels, untouched without.
    above = np.s_[85:100, 100:160]
    assert (with_labels[above] == class_colour(1)).all(axis=2).sum() > 100
    assert (without[above] == 128).all()
    assert (without[140, 100] == class_colour(1)).all()


def test_line_width_and_font_grow_with_the_image() -> None:
    small, large = Style.for_size(320, 240), Style.for_size(7300, 5480)
    assert small.line_width >= 1 and small.font_size >= 10
    assert large.line_width > 5 * small.line_width
    assert large.font_size > 5 * small.font_size


def test_exif_rotated_jpeg_is_drawn_upright_at_its_own_resolution() -> None:
    # Stored 200 wide x 100 high, with the left half red; EXIF orientation 6 says "turn 90
    # degrees clockwise to view": upright it is 100 wide x 200 high, red on top.
    stored = Image.new("RGB", (200, 100), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 100, 100))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encoded(stored, "JPEG", exif)
    # A box in the upright image's pixels, in its lower (blue) half.
    found = _boxes([(2, 0.9, [10, 120, 90, 190])])
    out = Image.open(
        io.BytesIO(render(data, found, max_pixels=10**8, index=0, fmt="png", labels=False))
    )
    assert out.size == (100, 200)
    pixels = np.asarray(out.convert("RGB")).astype(int)
    assert pixels[40, 50, 0] > 200 and pixels[40, 50, 2] < 60  # top: red
    assert pixels[160, 50, 2] > 200 and pixels[160, 50, 0] < 60  # bottom, inside the box: blue
    # The box's left edge, where the upright image says it is.
    assert tuple(pixels[155, 10]) == class_colour(2)
    assert tuple(pixels[155, 30]) != class_colour(2)


def test_png_is_answered_as_png_at_full_resolution() -> None:
    data = _encoded(_grey(1200, 900), "JPEG")
    out = render(data, _boxes([]), max_pixels=10**8, index=0, fmt="png", labels=True)
    img = Image.open(io.BytesIO(out))
    assert (img.format, img.size) == ("PNG", (1200, 900))


def test_render_refuses_what_the_decoder_refuses() -> None:
    with pytest.raises(InvalidImageError, match="image 2: not an image"):
        render(
            b"plain text, not an image",
            _boxes([]),
            max_pixels=10**8,
            index=2,
            fmt="jpeg",
            labels=True,
        )
