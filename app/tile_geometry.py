"""Tiled (sliced) inference: the geometry of the tiles and the resolved options of a request.

No torch here: the front ends compute tile counts (for the limits) before anything is decoded;
the engine cuts and merges (app/engine/tile_tasks.py). The semantics are SAHI's
(`get_slice_bboxes`): tiles of `tile_size` pixels step by `tile_size - int(tile_size * overlap)`,
the last tile of a row or column is shifted back inside the image so that every tile is full
size, and an image smaller than a tile along an axis is one tile of the image's size there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# A tile smaller than this holds too little context for a detector; larger ones are not tiles.
MIN_TILE_SIZE = 64
MAX_TILE_SIZE = 4096
MAX_OVERLAP = 0.9

Merge = Literal["nms", "greedy_nmm"]
MatchMetric = Literal["iou", "ios"]


@dataclass(frozen=True)
class TileSpec:
    """How one image is tiled and its tiles' detections merged (crosses to the engine)."""

    tile_size: int
    overlap: float = 0.2
    full_image: bool = False
    merge: Merge = "greedy_nmm"
    match_metric: MatchMetric = "ios"
    match_threshold: float = 0.5
    class_agnostic: bool = False

    def __post_init__(self) -> None:
        if not MIN_TILE_SIZE <= self.tile_size <= MAX_TILE_SIZE:
            raise ValueError(
                f"tile_size must be within {MIN_TILE_SIZE}..{MAX_TILE_SIZE}, got {self.tile_size}"
            )
        if not 0.0 <= self.overlap <= MAX_OVERLAP:
            raise ValueError(f"overlap must be within 0..{MAX_OVERLAP}, got {self.overlap}")

    @property
    def step(self) -> int:
        return self.tile_size - int(self.overlap * self.tile_size)

    def tiles(self, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """(x1, y1, x2, y2) of every tile, row by row."""
        xs = axis_starts(width, self.tile_size, self.step)
        ys = axis_starts(height, self.tile_size, self.step)
        tw, th = min(self.tile_size, width), min(self.tile_size, height)
        return [(x, y, x + tw, y + th) for y in ys for x in xs]

    def runs_full_image(self, height: int, width: int) -> bool:
        """The full-image pass runs when asked for and the image is more than one tile (a
        single tile already is the full image)."""
        return self.full_image and (height > self.tile_size or width > self.tile_size)

    def count(self, height: int, width: int) -> int:
        """Forward-pass items the image makes: its tiles, plus the full-image pass."""
        xs = axis_starts(width, self.tile_size, self.step)
        ys = axis_starts(height, self.tile_size, self.step)
        return len(xs) * len(ys) + int(self.runs_full_image(height, width))


def axis_starts(length: int, size: int, step: int) -> list[int]:
    """Start offsets of the tiles along one axis of `length` pixels (SAHI's loop, one axis)."""
    if step < 1:
        raise ValueError(f"step must be positive, got {step}")
    if length <= size:
        return [0]
    starts = []
    x = 0
    while x + size < length:
        starts.append(x)
        x += step
    starts.append(length - size)  # the last tile, shifted back inside the image
    return starts


def wants_tiles(height: int, width: int, model_side: int, auto_factor: float) -> bool:
    """ "auto": tile an image whose longer side is over `auto_factor` times the model's input."""
    return max(height, width) > auto_factor * model_side
