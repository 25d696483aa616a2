"""Synthetic "shapes" detection data: deterministic images of coloured shapes with COCO annotations.

Used to train the default model (scripts/training/train_default_model.py), to evaluate it
(scripts/training/evaluate.py) and by tests. Every image is a pure function of (seed, index).

    python -m scripts.training.synthetic_shapes --out data/shapes-val --seed 2000003 --count 500
    python -m scripts.training.synthetic_shapes --highres --out data/shapes-4k --count 20

The high-resolution mode (issue 14: tiled inference) draws 3840x2160 and 4000x3000 scenes
(alternating) with 30-80 objects of 16-64 px: squashed to a 256 px input whole, such an object
is 1-4 px; at native resolution, in tiles, it is what the default model was trained on.
"""

from __future__ import annotations

import argparse
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")

# Seeds with fixed roles. Training draws (TRAIN_SEED, index); the other two streams are
# never seen in training: VALIDATION_SEED for the quick checks at each checkpoint,
# HELDOUT_SEED for the reported evaluation.
TRAIN_SEED = 0
VALIDATION_SEED = 1_000_001
HELDOUT_SEED = 2_000_003

MIN_SIDE, MAX_SIDE = 256, 800
MAX_ASPECT = 2.0
MIN_OBJECTS, MAX_OBJECTS = 1, 12
MIN_OBJECT_PX = 12
# The model sees every image squashed to a fixed square (256 px for the default model), so
# an object 12 px wide in an 800 px image would shrink to ~4 px. The smallest object is
# therefore also bounded by a fraction of the long side: 5% keeps it >= ~13 px at 256.
MIN_OBJECT_FRACTION = 0.05
MAX_OBJECT_FRACTION = 0.5  # of the short side
# A new shape may cover part of an earlier one, but every shape keeps at least this share of
# its own pixels visible, so each annotation still names a recognisable object.
MIN_VISIBLE_FRACTION = 0.6
SUPERSAMPLE = 2

# High-resolution scenes (see the module doc); a stream of their own, never trained on.
HIGHRES_SEED = 3_000_017
HIGHRES_SIZES: tuple[tuple[int, int], ...] = ((3840, 2160), (4000, 3000))
HIGHRES_OBJECT_PX = (16.0, 64.0)
HIGHRES_OBJECTS = (30, 80)


@dataclass(frozen=True)
class Sample:
    """One generated image: decoded pixels, the JPEG bytes they came from, and annotations."""

    image: Image.Image  # RGB, decoded from `jpeg`
    jpeg: bytes
    boxes: np.ndarray  # (N, 4) float32 [x1, y1, x2, y2] in pixels, tight around visible pixels
    labels: np.ndarray  # (N,) int64 index into CLASSES
    areas: np.ndarray  # (N,) float32 visible pixel count

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height


def _unit_polygon(kind: str, rng: np.random.Generator) -> np.ndarray:
    """Vertices of a shape inscribed in the unit circle, before rotation."""
    if kind == "square":
        angles = np.deg2rad([45, 135, 225, 315])
    elif kind == "triangle":
        angles = np.deg2rad([90, 210, 330]) + rng.uniform(-0.12, 0.12, 3)
    elif kind == "star":
        inner = rng.uniform(0.38, 0.5)
        angles = np.deg2rad(90 + 36 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, 1.0, inner)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    elif kind == "cross":
        half = rng.uniform(0.13, 0.2) * math.sqrt(2)  # arm half-width
        a = 1.0 / math.sqrt(1.0 + half * half)  # arm end so the corners touch the unit circle
        h = half * a
        return np.array(
            [
                (h, a),
                (h, h),
                (a, h),
                (a, -h),
                (h, -h),
                (h, -a),
                (-h, -a),
                (-h, -h),
                (-a, -h),
                (-a, h),
                (-h, h),
                (-h, a),
            ]
        )
    else:
        raise ValueError(f"no polygon for {kind!r}")
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _shape_alpha(kind: str, radius: float, angle: float, rng: np.random.Generator) -> np.ndarray:
    """Anti-aliased coverage (0..1) of a shape centred in a square crop of side 2*radius+2."""
    side = int(math.ceil(2 * radius)) + 2
    big = side * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    centre = big / 2
    r = radius * SUPERSAMPLE
    if kind == "circle":
        draw.ellipse((centre - r, centre - r, centre + r, centre + r), fill=255)
    else:
        pts = _unit_polygon(kind, rng)
        c, s = math.cos(angle), math.sin(angle)
        rotated = pts @ np.array([[c, s], [-s, c]])
        draw.polygon([(centre + r * x, centre - r * y) for x, y in rotated], fill=255)
    small = canvas.resize((side, side), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _smooth_noise(rng: np.random.Generator, width: int, height: int, cells: int) -> np.ndarray:
    """Low-frequency colour noise in [0, 1], shape (H, W, 3): a tiny random image upsampled."""
    small = rng.uniform(0, 255, (cells, cells, 3)).astype(np.uint8)
    up = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(up, dtype=np.float32) / 255.0


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Float RGB background in 0..255: flat, gradient, cloudy, striped or checkered."""
    kind = rng.choice(["flat", "gradient", "clouds", "stripes", "checker"])
    base = rng.uniform(0, 255, 3).astype(np.float32)
    if kind == "flat":
        bg = np.broadcast_to(base, (height, width, 3)).copy()
    elif kind == "gradient":
        other = rng.uniform(0, 255, 3).astype(np.float32)
        theta = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        t = xs * math.cos(theta) + ys * math.sin(theta)
        t = (t - t.min()) / max(float(np.ptp(t)), 1.0)
        bg = base + (other - base) * t[..., None]
    elif kind == "clouds":
        bg = _smooth_noise(rng, width, height, int(rng.integers(3, 10))) * 255.0
    else:
        other = rng.uniform(0, 255, 3).astype(np.float32)
        period = rng.uniform(8, 60)
        theta = rng.uniform(0, math.pi)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        u = xs * math.cos(theta) + ys * math.sin(theta)
        if kind == "stripes":
            t = 0.5 + 0.5 * np.sin(2 * math.pi * u / period)
        else:
            v = -xs * math.sin(theta) + ys * math.cos(theta)
            t = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
        # Keep textures from shouting louder than the shapes.
        strength = rng.uniform(0.2, 0.7)
        bg = base + (other - base) * (strength * t)[..., None]
    if rng.random() < 0.4:  # blend in some cloudiness
        clouds = _smooth_noise(rng, width, height, int(rng.integers(2, 8))) * 255.0
        w = rng.uniform(0.1, 0.4)
        bg = bg * (1 - w) + clouds * w
    return bg.astype(np.float32)


def _draw_clutter(rng: np.random.Generator, canvas: Image.Image) -> None:
    """Things that are not objects: lines, scribbles, dots, rings, arcs and soft blobs."""
    draw = ImageDraw.Draw(canvas)
    w, h = canvas.size
    for _ in range(int(rng.integers(0, 9))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.choice(["line", "scribble", "dots", "ring", "arc", "blob"])
        x, y = float(rng.uniform(0, w)), float(rng.uniform(0, h))
        size = float(rng.uniform(10, 0.4 * min(w, h)))
        if kind == "line":
            theta = rng.uniform(0, 2 * math.pi)
            draw.line(
                (x, y, x + size * math.cos(theta), y + size * math.sin(theta)),
                fill=colour,
                width=int(rng.integers(1, 4)),
            )
        elif kind == "scribble":
            pts = [(x, y)]
            for _ in range(int(rng.integers(3, 10))):
                x += float(rng.normal(0, size / 4))
                y += float(rng.normal(0, size / 4))
                pts.append((x, y))
            draw.line(pts, fill=colour, width=int(rng.integers(1, 3)))
        elif kind == "dots":
            for _ in range(int(rng.integers(3, 20))):
                dx, dy = rng.normal(0, size / 3, 2)
                r = float(rng.uniform(1, 3))
                draw.ellipse((x + dx - r, y + dy - r, x + dx + r, y + dy + r), fill=colour)
        elif kind in ("ring", "arc"):
            r = size / 2
            box = (x - r, y - r, x + r, y + r)
            width = int(rng.integers(1, 3))
            if kind == "ring":
                draw.ellipse(box, outline=colour, width=width)
            else:
                start = float(rng.uniform(0, 360))
                draw.arc(box, start, start + float(rng.uniform(60, 270)), fill=colour, width=width)
        else:  # a lumpy blob, deliberately unlike any class
            n = int(rng.integers(9, 18))
            angles = np.sort(rng.uniform(0, 2 * math.pi, n))
            radii = size / 4 * rng.uniform(0.45, 1.0, n)
            pts = [
                (x + r * math.cos(a), y + r * math.sin(a))
                for a, r in zip(angles, radii, strict=True)
            ]
            draw.polygon(pts, fill=colour)
    if rng.random() < 0.3:  # clutter that is soft rather than crisp
        blurred = canvas.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
        canvas.paste(blurred)


def _sample_size(rng: np.random.Generator) -> tuple[int, int]:
    long_side = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    aspect = float(rng.uniform(1.0, MAX_ASPECT)) if rng.random() < 0.7 else 1.0
    short_side = max(MIN_SIDE, int(round(long_side / aspect)))
    return (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)


def generate_sample(
    seed: int,
    index: int,
    size: tuple[int, int] | None = None,
    *,
    object_px: tuple[float, float] | None = None,
    objects: tuple[int, int] | None = None,
) -> Sample:
    """Image number `index` of the stream `seed`; identical on every call and machine.

    `size` (width, height) fixes the canvas, e.g. 640x480 for benchmarks and examples;
    `object_px` the range of shape diameters in pixels and `objects` the range of their count
    (default: the training distribution)."""
    rng = np.random.default_rng([seed, index])
    width, height = size if size is not None else _sample_size(rng)
    canvas = Image.fromarray(np.clip(_background(rng, width, height), 0, 255).astype(np.uint8))
    _draw_clutter(rng, canvas)
    pixels = np.asarray(canvas, dtype=np.float32).copy()

    owner = np.full((height, width), -1, dtype=np.int16)  # which shape owns each pixel
    full_area: list[int] = []
    visible: list[int] = []
    labels: list[int] = []
    regions: list[tuple[int, int, int, int]] = []

    min_d = max(MIN_OBJECT_PX, MIN_OBJECT_FRACTION * max(width, height))
    max_d = MAX_OBJECT_FRACTION * min(width, height)
    if object_px is not None:
        min_d, max_d = object_px
    low, high = objects if objects is not None else (MIN_OBJECTS, MAX_OBJECTS)
    wanted = int(rng.integers(low, high + 1))
    attempts = 0
    while len(labels) < wanted and attempts < wanted * 8:
        attempts += 1
        label = int(rng.integers(len(CLASSES)))
        # Log-uniform diameter, so small objects are as common as large ones.
        diameter = float(math.exp(rng.uniform(math.log(min_d), math.log(max_d))))
        alpha = _shape_alpha(CLASSES[label], diameter / 2, float(rng.uniform(0, 2 * math.pi)), rng)
        side = alpha.shape[0]
        if side >= width or side >= height:
            continue
        x0 = int(rng.integers(0, width - side + 1))
        y0 = int(rng.integers(0, height - side + 1))
        region = (y0, y0 + side, x0, x0 + side)
        mask = alpha >= 0.5
        if mask.sum() < 16:
            continue
        below = owner[region[0] : region[1], region[2] : region[3]]
        covered = np.bincount(below[mask & (below >= 0)], minlength=len(labels))
        if any(
            visible[i] - covered[i] < MIN_VISIBLE_FRACTION * full_area[i]
            for i in np.flatnonzero(covered)
        ):
            continue

        patch = pixels[region[0] : region[1], region[2] : region[3]]
        local = patch[mask].mean(axis=0)
        for _ in range(12):  # a colour that stands out from what lies underneath
            colour = rng.uniform(0, 255, 3).astype(np.float32)
            if np.linalg.norm(colour - local) > 90:
                break
        fill = np.broadcast_to(colour, patch.shape).astype(np.float32)
        if rng.random() < 0.4:  # shading across the shape
            theta = rng.uniform(0, 2 * math.pi)
            ys, xs = np.mgrid[0:side, 0:side].astype(np.float32) / side - 0.5
            fill = (
                fill
                + (rng.uniform(20, 60) * (xs * math.cos(theta) + ys * math.sin(theta)))[..., None]
            )
        a = alpha[..., None]
        patch[:] = patch * (1 - a) + fill * a
        below[mask] = len(labels)
        for i in np.flatnonzero(covered):
            visible[i] -= int(covered[i])
        full_area.append(int(mask.sum()))
        visible.append(full_area[-1])
        labels.append(label)
        regions.append(region)

    boxes, areas = [], []
    for i, (y0, y1, x0, x1) in enumerate(regions):
        ys, xs = np.nonzero(owner[y0:y1, x0:x1] == i)
        boxes.append([x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1])
        areas.append(len(xs))

    sigma = float(rng.choice([0.0, rng.uniform(1, 6), rng.uniform(6, 14)]))
    if sigma > 0:
        pixels += sigma * rng.standard_normal(pixels.shape, dtype=np.float32)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if rng.random() < 0.25:
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.0))))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(rng.integers(30, 96)))
    jpeg = buffer.getvalue()
    decoded = Image.open(io.BytesIO(jpeg))
    decoded.load()
    return Sample(
        image=decoded.convert("RGB"),
        jpeg=jpeg,
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.asarray(labels, dtype=np.int64),
        areas=np.asarray(areas, dtype=np.float32),
    )


def generate_highres(seed: int, index: int) -> Sample:
    """High-resolution scene `index` of stream `seed` (see the module doc)."""
    return generate_sample(
        seed,
        index,
        HIGHRES_SIZES[index % len(HIGHRES_SIZES)],
        object_px=HIGHRES_OBJECT_PX,
        objects=HIGHRES_OBJECTS,
    )


def coco_categories() -> list[dict]:
    """COCO categories; ids are 1-based (COCO habit), the model's class ids are 0-based."""
    return [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)]


def coco_dataset(
    seed: int, count: int, start: int = 0, *, highres: bool = False
) -> tuple[dict, list[Sample]]:
    """COCO ground truth for images start..start+count-1 of stream `seed`, and the samples
    (`highres`: the high-resolution scenes)."""
    images, annotations, samples = [], [], []
    for image_id, index in enumerate(range(start, start + count), start=1):
        sample = generate_highres(seed, index) if highres else generate_sample(seed, index)
        samples.append(sample)
        images.append(
            {
                "id": image_id,
                "file_name": f"{seed}_{index:06d}.jpg",
                "width": sample.width,
                "height": sample.height,
            }
        )
        for box, label, area in zip(sample.boxes, sample.labels, sample.areas, strict=True):
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label) + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": float(area),
                    "iscrowd": 0,
                }
            )
    coco = {
        "info": {
            "description": f"synthetic shapes, seed {seed}, images {start}..{start + count - 1}"
        },
        "images": images,
        "annotations": annotations,
        "categories": coco_categories(),
    }
    return coco, samples


def write_dataset(
    out_dir: Path, seed: int, count: int, start: int = 0, *, highres: bool = False
) -> Path:
    """Write the JPEGs and `annotations.json` (COCO) under out_dir; return the annotation path."""
    coco, samples = coco_dataset(seed, count, start, highres=highres)
    out_dir.mkdir(parents=True, exist_ok=True)
    for info, sample in zip(coco["images"], samples, strict=True):
        (out_dir / info["file_name"]).write_bytes(sample.jpeg)
    path = out_dir / "annotations.json"
    path.write_text(json.dumps(coco))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help=f"default {HELDOUT_SEED} ({HIGHRES_SEED} with --highres)",
    )
    parser.add_argument(
        "--highres",
        action="store_true",
        help="3840x2160 and 4000x3000 scenes with 16-64 px objects (tiled inference)",
    )
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--start", type=int, default=0, help="first image index")
    parser.add_argument("--size", default=None, help="WxH: one fixed size, e.g. 640x480")
    args = parser.parse_args()
    if args.seed is None:
        args.seed = HIGHRES_SEED if args.highres else HELDOUT_SEED
    if args.size:
        width, height = (int(v) for v in args.size.lower().split("x"))
        args.out.mkdir(parents=True, exist_ok=True)
        for i in range(args.start, args.start + args.count):
            sample = generate_sample(args.seed, i, (width, height))
            (args.out / f"shapes-{width}x{height}-{i}.jpg").write_bytes(sample.jpeg)
        print(f"wrote {args.count} images of {width}x{height}")
        return
    path = write_dataset(args.out, args.seed, args.count, args.start, highres=args.highres)
    print(f"wrote {args.count} images and {path}")


if __name__ == "__main__":
    main()
