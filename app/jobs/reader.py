"""A job's image, read region by region: tiled (and pyramidal) TIFF/BigTIFF through tifffile's
zarr store, other images (JPEG, PNG, WebP, untiled TIFF) decoded once up to a pixel limit.

Why tifffile + zarr: tifffile is the maintained pure-Python reader of TIFF/BigTIFF (and the OME,
SVS, NDPI flavours of whole-slide images), and `aszarr` exposes a page's tiles as a zarr array's
chunks, so a slice decodes only the tiles it touches (a region of 2 x 8 model tiles touches a few
dozen 256-pixel TIFF tiles), in parallel, holding nothing else. OpenSlide would add a C library
for the same reads; writing the tile walk by hand would redo what zarr does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


class UnreadableImageError(ValueError):
    """The file is not an image a job can read; the message says why (the job's reason)."""


def sniff(head: bytes) -> str | None:
    """The container of a file from its first bytes: tiff, jpeg, png, webp, or None."""
    if head[:4] in TIFF_MAGIC:
        return "tiff"
    if head[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


NOT_AN_IMAGE = "not a TIFF, JPEG, PNG or WebP file"


class ImageSource(Protocol):
    @property
    def width(self) -> int: ...

    @property
    def height(self) -> int: ...

    def read(self, x1: int, y1: int, x2: int, y2: int) -> np.ndarray:
        """uint8 [y2 - y1, x2 - x1, 3] pixels of the region."""
        ...

    def close(self) -> None: ...


@dataclass
class _Decoded:
    """A plain image, decoded once."""

    pixels: np.ndarray
    kind: str

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    def read(self, x1: int, y1: int, x2: int, y2: int) -> np.ndarray:
        return self.pixels[y1:y2, x1:x2]

    def close(self) -> None:
        self.pixels = np.zeros((0, 0, 3), np.uint8)


class _TiffRegions:
    """One level of a tiled TIFF as a zarr array; regions decode only the tiles they touch."""

    kind = "tiff"

    def __init__(self, path: Path, level: int, max_whole_pixels: int) -> None:
        import tifffile
        import zarr

        try:
            self._tif = tifffile.TiffFile(path)
            series = self._tif.series[0]
        except Exception as exc:  # tifffile raises TiffFileError, ValueError, struct.error...
            raise UnreadableImageError(f"the TIFF cannot be read: {_short(exc)}") from None
        levels = series.levels
        if not 0 <= level < len(levels):
            self._tif.close()
            raise UnreadableImageError(
                f"the TIFF has {len(levels)} level(s); level {level} was asked for"
            )
        chosen = levels[level]
        axes, shape = chosen.axes, chosen.shape
        if axes not in ("YXS", "YX") or (axes == "YXS" and shape[2] not in (3, 4)):
            self._tif.close()
            raise UnreadableImageError(
                f"the TIFF's image has axes {axes} and shape {shape}; jobs read RGB(A) or "
                "grey images (axes YXS or YX)"
            )
        if chosen.dtype != np.uint8:
            self._tif.close()
            raise UnreadableImageError(
                f"the TIFF's samples are {chosen.dtype}; jobs read 8-bit images"
            )
        self.height, self.width = int(shape[0]), int(shape[1])
        page = chosen.keyframe
        if not page.is_tiled and self.height * self.width > max_whole_pixels:
            self._tif.close()
            raise UnreadableImageError(
                f"the TIFF is not tiled and has {self.height * self.width} pixels, over "
                f"max_job_image_pixels ({max_whole_pixels}); write it tiled (e.g. 256 x 256 "
                "tiles) to be read region by region"
            )
        self._axes = axes
        self._array: Any = zarr.open(self._tif.aszarr(series=0, level=level), mode="r")

    def read(self, x1: int, y1: int, x2: int, y2: int) -> np.ndarray:
        try:
            region = np.asarray(self._array[y1:y2, x1:x2])
        except Exception as exc:
            raise UnreadableImageError(
                f"the TIFF's tiles in the region x {x1}..{x2}, y {y1}..{y2} do not decode: "
                f"{_short(exc)}"
            ) from None
        if self._axes == "YX":
            return np.repeat(region[:, :, None], 3, axis=2)
        return np.ascontiguousarray(region[:, :, :3])

    def close(self) -> None:
        self._tif.close()


def open_image(path: Path, *, level: int, max_whole_pixels: int) -> ImageSource:
    """The job's image; raises UnreadableImageError with the reason the job fails with."""
    with path.open("rb") as fh:
        kind = sniff(fh.read(16))
    if kind is None:
        raise UnreadableImageError(NOT_AN_IMAGE)
    if kind == "tiff":
        return _TiffRegions(path, level, max_whole_pixels)
    if level != 0:
        raise UnreadableImageError(f"a {kind.upper()} image has one level; level {level} was asked")
    return _Decoded(_decode_whole(path, kind, max_whole_pixels), kind)


def _decode_whole(path: Path, kind: str, max_pixels: int) -> np.ndarray:
    """Decoded as /v1/detect decodes (app/images/decode.py: the structure walk, the pixel limit
    from the header, EXIF orientation), so a job's boxes are in the same upright pixels."""
    from app.errors import ImageTooLargeError, InvalidImageError
    from app.images.decode import decode_image

    try:
        return decode_image(path.read_bytes(), max_pixels=max_pixels, index=None).pixels
    except ImageTooLargeError as exc:
        raise UnreadableImageError(
            f"the {kind.upper()} image is too large: {exc.message} (max_job_image_pixels); "
            "send a tiled TIFF instead"
        ) from None
    except InvalidImageError as exc:
        raise UnreadableImageError(
            f"the {kind.upper()} image does not decode: {exc.message}"
        ) from None


def _short(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[:limit] + "..."
