"""Batched pre-processing in torch, on the model's device: uint8 RGB images of any sizes -> the
model's ``pixel_values`` (and ``pixel_mask``).

Reproduces transformers' PIL image processors for the DETR family from a checkpoint's
preprocessor_config.json (read in app/engine/preprocess_spec.py), without importing them.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from app.engine.preprocess_spec import _INTERPOLATE_MODES, NEAREST, PreprocessSpec

# Input pixels stacked on the device at once (uint8, 3 bytes each: 24 MB), whatever the batch
# holds; the float32 copies are made at the output size only.
_FLOAT_CHUNK_PIXELS = 8_000_000
# Pixels of one strip of a resize pass in float32 (input and output rows together, 12 bytes
# each: 12 MB): a large image is resized strip by strip from uint8 and never held in float32
# at full resolution (a 40-megapixel image would take 480 MB).
_STRIP_PIXELS = 1_000_000


class Preprocessor:
    """uint8 RGB images of any sizes -> the model's ``pixel_values`` (and ``pixel_mask``)."""

    def __init__(self, spec: PreprocessSpec, device: torch.device, dtype: torch.dtype) -> None:
        self.spec = spec
        self.device = torch.device(device)
        self.dtype = dtype
        self._scale = spec.rescale_factor if spec.do_rescale else 1.0
        self._mean: torch.Tensor | None = None
        self._std: torch.Tensor | None = None
        if spec.do_normalize:
            self._mean = torch.tensor(spec.mean, device=self.device).view(1, 3, 1, 1)
            self._std = torch.tensor(spec.std, device=self.device).view(1, 3, 1, 1)

    def __call__(
        self,
        images: Sequence[torch.Tensor],
        source_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return pixel_values [B, 3, h, w] in ``dtype`` and pixel_mask [B, h, w] int64 or None.

        images: uint8 RGB tensors [3, H, W], CPU or device, of any sizes (strided views such as
        ``hwc.permute(2, 0, 1)`` are fine: they cross to the device as they are).
        source_sizes: (height, width) of each original image when some were already reduced
        at decode time: the output size is the original's (an image already at it is not
        resized again). Default: each tensor's own size.
        """
        if not images:
            raise ValueError("no images to preprocess")
        for i, image in enumerate(images):
            if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(
                    f"image {i}: expected a uint8 RGB tensor [3, H, W], "
                    f"got {image.dtype} {tuple(image.shape)}"
                )
        in_sizes = [(int(im.shape[1]), int(im.shape[2])) for im in images]
        if source_sizes is None:
            source_sizes = in_sizes
        elif len(source_sizes) != len(images):
            raise ValueError(f"{len(source_sizes)} source sizes for {len(images)} images")
        out_sizes = [self.spec.output_size(h, w) for h, w in source_sizes]
        if self.spec.resize_with == "opencv":
            images = [
                _resize_opencv(im, size) if size != in_size else im
                for im, size, in_size in zip(images, out_sizes, in_sizes, strict=True)
            ]
            in_sizes = out_sizes
        batch_height, batch_width = self._padded_size(out_sizes)

        # Images of the same size are resized together (one set of kernels per distinct size),
        # in chunks of at most _FLOAT_CHUNK_PIXELS input pixels: float32 copies are 12 bytes a
        # pixel, and a batch of large images must not be converted all at once.
        groups: dict[tuple[tuple[int, int], tuple[int, int]], list[int]] = {}
        for i, size in enumerate(in_sizes):
            groups.setdefault((size, out_sizes[i]), []).append(i)
        shape = (len(images), 3, batch_height, batch_width)
        if len(groups) == 1 and out_sizes[0] == (batch_height, batch_width):
            pixel_values = None  # one size and nothing to pad: filled below, or taken as is
        else:
            # Padding is zero AFTER normalisation, as transformers pads normalised arrays.
            pixel_values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for ((height, width), (out_height, out_width)), index in groups.items():
            per_chunk = max(1, _FLOAT_CHUNK_PIXELS // (height * width))
            for start in range(0, len(index), per_chunk):
                chunk = index[start : start + per_chunk]
                x = torch.stack([images[i].to(self.device, non_blocking=True) for i in chunk])
                if (out_height, out_width) != (height, width):
                    x = _resize(x, out_height, out_width, self.spec.resample)
                else:
                    x = x.float()
                x = self._normalize(x).to(self.dtype)
                if pixel_values is None and len(chunk) == len(images):
                    pixel_values = x
                    break
                if pixel_values is None:
                    pixel_values = torch.empty(shape, dtype=self.dtype, device=self.device)
                pixel_values[chunk, :, :out_height, :out_width] = x
        assert pixel_values is not None
        if not self.spec.do_pad:
            return pixel_values, None
        return pixel_values, self._pixel_mask(out_sizes, batch_height, batch_width)

    def _padded_size(self, out_sizes: list[tuple[int, int]]) -> tuple[int, int]:
        height = max(h for h, _ in out_sizes)
        width = max(w for _, w in out_sizes)
        if not self.spec.do_pad:
            if any(size != (height, width) for size in out_sizes):
                raise ValueError(f"images resize to different shapes {out_sizes} and do_pad=false")
            return height, width
        if self.spec.pad_size is None:
            return height, width
        if height > self.spec.pad_size[0] or width > self.spec.pad_size[1]:
            raise ValueError(
                f"an image resizes to {(height, width)}, larger than pad_size {self.spec.pad_size}"
            )
        return self.spec.pad_size

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        # Same order as transformers: rescale, then (x - mean) / std.
        if self._scale != 1.0:
            x = x.mul_(self._scale)
        if self._mean is not None and self._std is not None:
            x = x.sub_(self._mean).div_(self._std)
        return x

    def _pixel_mask(self, sizes: list[tuple[int, int]], height: int, width: int) -> torch.Tensor:
        sizes_t = torch.tensor(sizes, device=self.device)
        rows = torch.arange(height, device=self.device) < sizes_t[:, :1]
        cols = torch.arange(width, device=self.device) < sizes_t[:, 1:]
        return (rows[:, :, None] & cols[:, None, :]).long()


def _resize_opencv(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [3, h, w] with cv2.resize(INTER_LINEAR) on the host, Ultralytics'
    LetterBox resize (not antialiased, OpenCV's fixed-point rounding). OpenCV comes with the
    ultralytics extra, the only models whose spec asks for it; the result goes back to the
    image's device."""
    import cv2

    hwc = np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy())
    out = cv2.resize(hwc, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    return torch.from_numpy(out).permute(2, 0, 1).to(image.device)


def _resize(x: torch.Tensor, height: int, width: int, resample: int) -> torch.Tensor:
    """Resize uint8 [N, C, H, W] the way PIL's Image.resize does, to float32 holding uint8
    values. Neither the input nor the intermediate is ever converted to float32 whole: each
    pass runs in strips along the axis it leaves alone (so the result is the same), and the
    intermediate is kept in uint8 (PIL rounds it to uint8 anyway)."""
    in_height, in_width = x.shape[-2:]
    if resample == NEAREST:
        rows = torch.from_numpy(_nearest_indices(in_height, height)).to(x.device)
        cols = torch.from_numpy(_nearest_indices(in_width, width)).to(x.device)
        return x.index_select(2, rows).index_select(3, cols).float()
    mode = _INTERPOLATE_MODES[resample]
    # PIL resamples in two passes, rounding to uint8 in between; torch alone would skip that
    # rounding and be off by a level on some 2 % of pixels. Pillow >= 13 runs the vertical pass
    # first when the height shrinks by more than twice as many pixels as the width.
    shrink_h, shrink_w = in_height - height, in_width - width
    if shrink_h > 0 and shrink_h > 2 * shrink_w:
        middle = _strip_pass(x, height, in_width, mode, torch.uint8)
    else:
        middle = _strip_pass(x, in_height, width, mode, torch.uint8)
    return _strip_pass(middle, height, width, mode, torch.float32)


def _strip_pass(
    x: torch.Tensor, height: int, width: int, mode: str, dtype: torch.dtype
) -> torch.Tensor:
    """One resize pass of uint8 `x` to (height, width), of which one matches `x`'s, in strips
    along that axis (rows when the width changes, columns when the height does), each strip
    converted to float32 alone."""
    n, c, in_height, in_width = x.shape
    out = torch.empty((n, c, height, width), dtype=dtype, device=x.device)
    if (in_height, in_width) == (height, width):
        out.copy_(x)
        return out
    if in_height == height:  # a horizontal pass: rows are independent
        step = max(1, _STRIP_PIXELS // (n * (in_width + width)))
        for top in range(0, height, step):
            rows = x[:, :, top : top + step].float()
            out[:, :, top : top + step] = _resize_pass(rows, rows.shape[2], width, mode)
    else:  # a vertical pass: columns are independent
        step = max(1, _STRIP_PIXELS // (n * (in_height + height)))
        for left in range(0, width, step):
            cols = x[:, :, :, left : left + step].float()
            out[:, :, :, left : left + step] = _resize_pass(cols, height, cols.shape[3], mode)
    return out


def _resize_pass(x: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    if x.shape[-2:] == (height, width):
        return x
    y = F.interpolate(x, size=(height, width), mode=mode, align_corners=False, antialias=True)
    # PIL rounds half up and clips each pass to uint8 (torch.round would round half to even).
    return y.clamp_(0, 255).add_(0.5).floor_()


@lru_cache(maxsize=512)
def _nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    # Pillow's nearest resize (ImagingScaleAffine) walks the source by repeated addition of the
    # step in double precision and truncates; a cumulative sum makes the same choices at the
    # exact-integer boundaries where (i + 0.5) * step would round differently.
    step = in_size / out_size
    coords = np.cumsum(np.concatenate(([step * 0.5], np.full(out_size - 1, step))))
    return np.minimum(coords.astype(np.int64), in_size - 1)
