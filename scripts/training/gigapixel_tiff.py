"""A tiled pyramidal TIFF of any size with planted shapes (issue 15: gigapixel jobs), written
tile by tile (memory: a few tiles, whatever the size), and the planted boxes as JSON.

    python -m scripts.training.gigapixel_tiff --out /tmp/slide.tif --size 20000 --levels 3

Shapes are drawn with the training set's own shape masks (scripts/training/synthetic_shapes.py), one
in at most each cell of a grid (36-64 px at level 0, never touching a cell's border), on a soft
background; lower levels are the same scene drawn at 1/2, 1/4... size.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scripts.training.synthetic_shapes import CLASSES, _shape_alpha

CELL = 160  # one shape at most per cell
TIFF_TILE = 256


@dataclass(frozen=True)
class Planted:
    boxes: np.ndarray  # (N, 4) x1, y1, x2, y2 at level 0
    labels: np.ndarray  # (N,)
    centres: np.ndarray  # (N, 2)
    radii: np.ndarray  # (N,)
    angles: np.ndarray  # (N,)
    colours: np.ndarray  # (N, 3)


def plant(width: int, height: int, seed: int, fill: float = 0.5) -> Planted:
    rng = np.random.default_rng(seed)
    cols, rows = width // CELL, height // CELL
    cells = np.argwhere(rng.random((rows, cols)) < fill)
    n = len(cells)
    radii = rng.uniform(18, 32, n)
    margin = radii + 4
    cx = cells[:, 1] * CELL + margin + rng.random(n) * (CELL - 2 * margin)
    cy = cells[:, 0] * CELL + margin + rng.random(n) * (CELL - 2 * margin)
    centres = np.stack([cx, cy], 1)
    labels = rng.integers(len(CLASSES), size=n)
    angles = rng.uniform(0, 2 * math.pi, n)
    colours = rng.choice([[220, 40, 40], [40, 200, 60], [40, 80, 230], [240, 200, 30]], n)
    boxes = np.concatenate([centres - radii[:, None], centres + radii[:, None]], 1)
    return Planted(boxes.astype(np.float32), labels, centres, radii, angles, colours)


def _masks(p: Planted, scale: float) -> list[np.ndarray]:
    out = []
    for i in range(len(p.labels)):
        rng = np.random.default_rng([7, i])  # the same polygon jitter at every level
        out.append(_shape_alpha(CLASSES[p.labels[i]], p.radii[i] * scale, p.angles[i], rng))
    return out


def tiles(width: int, height: int, p: Planted, scale: float) -> Iterator[np.ndarray]:
    """The level's tiles, row by row (TIFF_TILE square; edge tiles padded)."""
    w, h = math.ceil(width * scale), math.ceil(height * scale)
    masks = _masks(p, scale)
    sides = np.array([m.shape[0] for m in masks])
    x0s = np.round(p.centres[:, 0] * scale - sides / 2).astype(int)
    y0s = np.round(p.centres[:, 1] * scale - sides / 2).astype(int)
    # Shapes by the tile row they touch first: a row looks only at its own few.
    yy, xx = np.mgrid[0:TIFF_TILE, 0:TIFF_TILE]
    for ty in range(0, h, TIFF_TILE):
        near = np.flatnonzero((y0s < ty + TIFF_TILE) & (y0s + sides > ty))
        for tx in range(0, w, TIFF_TILE):
            # A soft background: two slow gradients and a little grain.
            base = (
                150
                + 40 * np.sin((xx + tx) / (900 * scale))
                + 30 * np.cos((yy + ty) / (700 * scale))
            )
            tile = np.repeat(base[..., None], 3, axis=2).astype(np.float32)
            tile[..., 1] *= 0.9
            for i in near:
                x0, y0, m = x0s[i], y0s[i], masks[i]
                if x0 >= tx + TIFF_TILE or x0 + m.shape[1] <= tx:
                    continue
                ys, ye = max(y0, ty), min(y0 + m.shape[0], ty + TIFF_TILE)
                xs, xe = max(x0, tx), min(x0 + m.shape[1], tx + TIFF_TILE)
                a = m[ys - y0 : ye - y0, xs - x0 : xe - x0, None]
                patch = tile[ys - ty : ye - ty, xs - tx : xe - tx]
                patch[:] = patch * (1 - a) + p.colours[i] * a
            yield np.clip(tile, 0, 255).astype(np.uint8)


def tight(p: Planted) -> Planted:
    """The planted boxes tight around each shape's visible pixels (coverage >= 0.5)."""
    boxes = []
    for i, m in enumerate(_masks(p, 1.0)):
        ys, xs = np.nonzero(m >= 0.5)
        x0 = round(p.centres[i, 0] - m.shape[1] / 2)
        y0 = round(p.centres[i, 1] - m.shape[0] / 2)
        boxes.append([x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1])
    return Planted(
        np.asarray(boxes, np.float32).reshape(-1, 4),
        p.labels,
        p.centres,
        p.radii,
        p.angles,
        p.colours,
    )


def write(path: Path, width: int, height: int, *, seed: int = 0, levels: int = 3) -> Planted:
    import tifffile

    p = tight(plant(width, height, seed))
    with tifffile.TiffWriter(path, bigtiff=width * height * 3 > 2**31) as tif:
        for level in range(levels):
            scale = 0.5**level
            shape = (math.ceil(height * scale), math.ceil(width * scale), 3)
            tif.write(
                tiles(width, height, p, scale),
                shape=shape,
                dtype=np.uint8,
                tile=(TIFF_TILE, TIFF_TILE),
                photometric="rgb",
                compression="zlib",
                subifds=levels - 1 if level == 0 else None,
                subfiletype=1 if level else 0,
            )
    return p


def recall(truth: np.ndarray, labels: np.ndarray, found: list[dict], iou: float = 0.5) -> float:
    """Share of planted boxes with a found box of the same class at IoU >= `iou`."""
    if len(truth) == 0:
        return 1.0
    if not found:
        return 0.0
    boxes = np.array([d["box"] for d in found], dtype=np.float64)
    classes = np.array([d["label"] for d in found])
    hit = 0
    order = np.argsort(boxes[:, 0])
    sorted_x1 = boxes[order, 0]
    for t, label in zip(truth, labels, strict=True):
        lo = np.searchsorted(sorted_x1, t[0] - 200)
        hi = np.searchsorted(sorted_x1, t[2])
        cand = order[lo:hi]
        if cand.size == 0:
            continue
        b = boxes[cand]
        w = np.clip(np.minimum(b[:, 2], t[2]) - np.maximum(b[:, 0], t[0]), 0, None)
        h = np.clip(np.minimum(b[:, 3], t[3]) - np.maximum(b[:, 1], t[1]), 0, None)
        inter = w * h
        union = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) + (t[2] - t[0]) * (t[3] - t[1]) - inter
        ok = (inter / union >= iou) & (classes[cand] == CLASSES[label])
        hit += bool(ok.any())
    return hit / len(truth)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", type=int, default=20_000, help="width and height")
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    p = write(args.out, args.size, args.size, seed=args.seed, levels=args.levels)
    truth = {"boxes": p.boxes.tolist(), "labels": [CLASSES[c] for c in p.labels]}
    args.out.with_suffix(".json").write_text(json.dumps(truth))
    print(f"{args.out}: {args.size} x {args.size}, {len(p.labels)} shapes, {args.levels} levels")


if __name__ == "__main__":
    main()
