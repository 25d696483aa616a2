"""What crosses between the service and the engine: a task per image, its detections, the
model's description. No torch here: the HTTP front-end processes import this, not the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from app.errors import ApiError
from app.images.decode import EncodedJpeg
from app.tile_geometry import TileSpec


class DeviceOutOfMemoryError(RuntimeError):
    """One image did not fit on the device even in a batch of its own."""


@dataclass(frozen=True)
class DetectionTask:
    """One image waiting for the model, with the options of its request: decoded pixels, or a
    JPEG left encoded for the device decoder (then `pixels` is None)."""

    pixels: np.ndarray | None  # uint8 [H, W, 3]
    threshold: float
    max_detections: int
    class_ids: frozenset[int] | None = None
    jpeg: EncodedJpeg | None = None
    # (height, width) of the original image when `pixels` were reduced at decode time (to the
    # model's input size): boxes are scaled to it, not to the pixels' shape.
    source_size: tuple[int, int] | None = None
    # Run as tiles (app/engine/tile_tasks.py) rather than as one image; `pixels` are the full image.
    tiling: TileSpec | None = None
    # One of the tasks a tiled image became (a tile, or its full-image pass): made in the
    # engine's process from pixels decoded once, so it brings no decoding work of its own.
    tile: bool = False
    # Front end only: the arena block `pixels` were decoded into (app/ipc/client.py's
    # Reservation), sent to the engine by offset without a copy.
    arena_block: object | None = None

    def __post_init__(self) -> None:
        if (self.pixels is None) == (self.jpeg is None):
            raise ValueError("a DetectionTask holds either pixels or a JPEG, not both or neither")

    @property
    def image(self) -> np.ndarray | EncodedJpeg:
        """The decoded pixels, or the JPEG left encoded."""
        if self.jpeg is not None:
            return self.jpeg
        assert self.pixels is not None
        return self.pixels

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the original image."""
        if self.jpeg is not None:
            return self.jpeg.height, self.jpeg.width
        if self.source_size is not None:
            return self.source_size
        assert self.pixels is not None
        return int(self.pixels.shape[0]), int(self.pixels.shape[1])


@dataclass(frozen=True)
class ImageDetections:
    scores: np.ndarray  # float32 [K]
    labels: np.ndarray  # int64 [K]
    boxes: np.ndarray  # float32 [K, 4], xyxy in the original image's pixels
    batch_size: int
    inference_s: float
    postprocess_s: float
    tiles: int = 0  # forward-pass items the image ran as (0: not tiled)


# What the engine answers for one image: its detections, or the error of that image alone.
ImageResult = ImageDetections | DeviceOutOfMemoryError | ApiError


@dataclass(frozen=True)
class BucketMode:
    """How batches of one bucket run on one device: a replayed CUDA graph, or eagerly and why."""

    device: str
    batch_size: int
    cuda_graph: bool
    reason: str = ""  # why eager; empty for a graph


@dataclass(frozen=True)
class ModelInfo:
    name: str
    backend: str
    device: str
    dtype: str
    labels: dict[int, str]
    architecture: str
    buckets: tuple[BucketMode, ...] = ()  # filled in at start-up (app/engine/build.py)
    backend_reason: str = ""  # why this backend (app/engine/backend_choice.py)
