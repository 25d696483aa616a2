"""Detections drawn on the image they came from: a box per detection in its class's colour and a
label (class name and score) kept inside the image, sized to the image.

Pillow's ImageDraw does all of it, and Pillow is already how the service decodes. supervision's
annotators would add OpenCV (tens of MB) to every front end for the same boxes and labels.
Runs in the decode worker processes (app/images/pool.py), never on the event loop.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from app.images.decode import decode_upright

# Tableau 20's strong half then its light half: neighbouring class ids get distinct hues, and
# the colour of a class id is the same in every call, process and run (no hashing).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (174, 199, 232),
    (255, 187, 120),
    (152, 223, 138),
    (255, 152, 150),
    (197, 176, 213),
    (196, 156, 148),
    (247, 182, 210),
    (199, 199, 199),
    (219, 219, 141),
    (158, 218, 229),
)

FORMATS = {"jpeg": "JPEG", "png": "PNG"}
MEDIA_TYPES = {"jpeg": "image/jpeg", "png": "image/png"}


def class_colour(class_id: int) -> tuple[int, int, int]:
    return PALETTE[class_id % len(PALETTE)]


def text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever reads better on `background` (relative luminance)."""
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


@dataclass(frozen=True)
class Style:
    """Line width and font size for an image: proportional to its shorter side, so that a
    40-megapixel photo's boxes are as visible as a thumbnail's."""

    line_width: int
    font_size: int

    @classmethod
    def for_size(cls, width: int, height: int) -> Style:
        short = min(width, height)
        return cls(line_width=max(1, round(short / 250)), font_size=max(10, round(short / 36)))


@dataclass(frozen=True)
class Boxes:
    """What to draw, as the engine answered it (boxes in the upright image's pixels)."""

    boxes: np.ndarray  # float [N, 4] x1, y1, x2, y2
    class_ids: np.ndarray  # int [N]
    scores: np.ndarray  # float [N]
    names: dict[int, str]


def label_rect(
    box: Sequence[float], text_size: tuple[int, int], image_size: tuple[int, int], pad: int
) -> tuple[int, int, int, int]:
    """Where a label of `text_size` (w, h) goes for `box`: above the box's top-left corner when
    there is room, else just inside the box's top; shifted left and clamped so that it stays
    within the image of `image_size` (w, h). Returns (x0, y0, x1, y1)."""
    width, height = image_size
    w = min(text_size[0] + 2 * pad, width)
    h = min(text_size[1] + 2 * pad, height)
    x1, y1 = int(round(box[0])), int(round(box[1]))
    top = y1 - h if y1 - h >= 0 else max(0, y1)
    top = min(top, height - h)
    left = min(max(0, x1), width - w)
    return left, top, left + w, top + h


@cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow's embedded font (scalable with FreeType, which Pillow's wheels include).
    return ImageFont.load_default(size=size)


def draw_detections(img: Image.Image, found: Boxes, *, labels: bool = True) -> Image.Image:
    """Draw on `img` (RGB, changed in place) and return it."""
    style = Style.for_size(*img.size)
    draw = ImageDraw.Draw(img)
    font = _font(style.font_size)
    pad = max(1, style.line_width)
    order = np.argsort(found.scores, kind="stable")  # best last: drawn on top
    for i in order:
        box = [float(v) for v in found.boxes[i]]
        colour = class_colour(int(found.class_ids[i]))
        draw.rectangle(box, outline=colour, width=style.line_width)
        if not labels:
            continue
        name = found.names.get(int(found.class_ids[i]), str(int(found.class_ids[i])))
        text = f"{name} {float(found.scores[i]):.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        size = (math.ceil(right - left), math.ceil(bottom - top))
        rect = label_rect(box, size, img.size, pad)
        draw.rectangle(rect, fill=colour)
        draw.text(
            (rect[0] + pad - left, rect[1] + pad - top), text, fill=text_colour(colour), font=font
        )
    return img


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=1)  # speed over size: drawn once, sent once
    else:
        img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def render(
    data: bytes, found: Boxes, *, max_pixels: int, index: int, fmt: str, labels: bool
) -> bytes:
    """The encoded image (`fmt`: "jpeg" or "png") at its own resolution, EXIF orientation
    applied, with `found` drawn on it."""
    img = decode_upright(data, max_pixels=max_pixels, index=index)
    return encode(draw_detections(img, found, labels=labels), fmt)
