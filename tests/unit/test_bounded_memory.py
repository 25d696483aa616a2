"""Memory that does not grow with image size: pre-processing never holds a full-resolution
float32 copy of a large image (it resizes from uint8 in strips), with the same numbers as the
full-resolution float resize it replaced; images reach a CUDA device through one pinned
staging buffer of fixed size, never through pin_memory() per image."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from app.engine import processing
from app.engine.host_staging import HostStaging
from app.engine.processing import (
    BICUBIC,
    BILINEAR,
    NEAREST,
    FixedSize,
    MaxSize,
    Preprocessor,
    PreprocessSpec,
    ShortestEdge,
)
from app.images import device as device_jpeg


class FloatTensors(TorchDispatchMode):
    """Records the element count of every floating-point tensor an operation makes."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.sizes.append(t.numel())
        return out


def old_resize(x: torch.Tensor, height: int, width: int, resample: int) -> torch.Tensor:
    """The resize this replaced: the whole image in float32, two passes."""
    x = x.float()
    in_height, in_width = x.shape[-2:]
    if resample == NEAREST:
        rows = torch.from_numpy(processing._nearest_indices(in_height, height))
        cols = torch.from_numpy(processing._nearest_indices(in_width, width))
        return x.index_select(2, rows).index_select(3, cols)
    mode = processing._INTERPOLATE_MODES[resample]
    shrink_h, shrink_w = in_height - height, in_width - width
    step = processing._resize_pass
    if shrink_h > 0 and shrink_h > 2 * shrink_w:
        return step(step(x, height, in_width, mode), height, width, mode)
    return step(step(x, in_height, width, mode), height, width, mode)


def image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    # Smooth content plus noise: resizes round differently on real edges and flat areas.
    yy, xx = np.mgrid[0:height, 0:width]
    base = (127 + 100 * np.sin(xx / 37.0) * np.cos(yy / 23.0))[..., None]
    noise = rng.integers(-20, 20, size=(height, width, 3))
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    return torch.from_numpy(pixels).permute(2, 0, 1)


@pytest.mark.parametrize("resample", [BILINEAR, BICUBIC, NEAREST])
@pytest.mark.parametrize(
    ("size", "out"),
    [((750, 1000), (320, 320)), ((1500, 200), (320, 320)), ((150, 250), (320, 320))],
)
def test_the_strip_resize_gives_the_full_float_resize_numbers(
    monkeypatch, resample: int, size: tuple[int, int], out: tuple[int, int]
) -> None:
    monkeypatch.setattr(processing, "_STRIP_PIXELS", 20_000)  # many strips, odd last one
    x = torch.stack([image(*size, seed=1), image(*size, seed=2)])
    new = processing._resize(x, *out, resample)
    assert new.dtype == torch.float32
    assert torch.equal(new, old_resize(x, *out, resample))


@pytest.mark.parametrize(
    "spec",
    [
        PreprocessSpec(FixedSize(640, 640)),
        PreprocessSpec(ShortestEdge(800, 1333), do_pad=True),
        PreprocessSpec(MaxSize(640, 640), do_pad=True, pad_size=(640, 640)),
    ],
)
def test_a_large_image_is_never_held_in_float32_at_full_resolution(spec) -> None:
    height, width = 1500, 2000  # 3 megapixels: 36 MB in float32
    pre = Preprocessor(spec, torch.device("cpu"), torch.float32)
    big = image(height, width)
    with FloatTensors() as floats:
        pixel_values, _ = pre([big, image(480, 640, seed=3)])
    full = 3 * height * width
    assert floats.sizes, "the tracker saw nothing"
    # No float32 tensor larger than the model's input batch itself, which is far below one
    # full-resolution copy.
    assert max(floats.sizes) <= pixel_values.numel() < full, (max(floats.sizes), full)
    # And the answer is the one the full-resolution float path gave.
    out_h, out_w = spec.output_size(height, width)
    expected = old_resize(big[None], out_h, out_w, spec.resample)
    expected = pre._normalize(expected)[0]
    assert torch.equal(pixel_values[0, :, :out_h, :out_w], expected)


def test_the_float_tracker_sees_a_full_resolution_conversion() -> None:
    """The tracker itself: the old path's float32 copy is what it must catch."""
    big = image(1500, 2000)
    with FloatTensors() as floats:
        old_resize(big[None], 640, 640, BILINEAR)
    assert max(floats.sizes) >= 3 * 1500 * 2000


# -- host to device through one staging buffer --------------------------------------------------


class FakeEvent:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def record(self) -> None:
        self.log.append("record")

    def synchronize(self) -> None:
        self.log.append("wait")


def test_a_large_image_crosses_in_pieces_through_a_buffer_of_fixed_size() -> None:
    log: list[str] = []
    staging = HostStaging(
        torch.device("cpu"), capacity_bytes=64 * 1024, pin=False, event=lambda: FakeEvent(log)
    )
    pixels = image(300, 500, seed=4).permute(1, 2, 0).contiguous().numpy()
    out = staging.to_device(pixels)
    assert out.shape == (3, 300, 500) and out.dtype == torch.uint8
    assert torch.equal(out, torch.from_numpy(pixels).permute(2, 0, 1))
    pieces = -(-pixels.nbytes // (32 * 1024))  # two halves of 32 KiB, used in turn
    assert log.count("record") == pieces
    # A half is refilled only after the copy out of it has finished.
    assert log.count("wait") == pieces - 2
    buffers = {id(b) for b in staging._halves}
    staging.to_device(image(10, 20).permute(1, 2, 0).contiguous().numpy())
    assert {id(b) for b in staging._halves} == buffers and staging.capacity_bytes == 64 * 1024


def test_images_reach_a_cuda_device_through_the_staging_buffer_not_pin_memory(
    monkeypatch,
) -> None:
    seen: list[tuple[int, ...]] = []

    class Recorder:
        def to_device(self, pixels: np.ndarray) -> torch.Tensor:
            seen.append(pixels.shape)
            return torch.from_numpy(pixels).permute(2, 0, 1)

    def no_pinning(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise AssertionError("pin_memory() per image feeds torch's pinned-memory cache")

    monkeypatch.setattr(torch.Tensor, "pin_memory", no_pinning)
    monkeypatch.setattr(device_jpeg, "staging_for", lambda device: Recorder())
    pixels = np.zeros((48, 64, 3), dtype=np.uint8)
    chw = device_jpeg.to_device_chw(pixels, torch.device("cuda"))
    assert seen == [(48, 64, 3)] and chw.shape == (3, 48, 64)


def test_one_staging_buffer_per_device() -> None:
    from app.engine.host_staging import staging_for

    a = staging_for(torch.device("cpu"))
    assert staging_for(torch.device("cpu")) is a
