"""Decoded images to a CUDA device through one pinned host buffer of fixed size per device.

`tensor.pin_memory()` per image allocates from torch's pinned-memory cache: blocks rounded up
to a power of two and kept for the life of the process, so the pinned memory held grows to the
largest images ever seen, times the images in flight. Here each device has one buffer (two
halves used in turn, so that filling one overlaps the copy out of the other); an image larger
than a half crosses in pieces.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch

# 16 MiB pinned per device: a 640x480 image (0.9 MB) crosses in one piece, a 40-megapixel one
# (120 MB) in 15.
STAGING_BYTES = 16 << 20


class EventLike(Protocol):
    def record(self) -> None: ...
    def synchronize(self) -> None: ...


class _NoEvent:
    """The CPU (tests): copies are synchronous, nothing to wait for."""

    def record(self) -> None:
        pass

    def synchronize(self) -> None:
        pass


class HostStaging:
    def __init__(
        self,
        device: torch.device,
        capacity_bytes: int = STAGING_BYTES,
        *,
        pin: bool | None = None,
        event: Callable[[], EventLike] | None = None,
    ) -> None:
        self.device = device
        self.capacity_bytes = capacity_bytes
        on_cuda = device.type == "cuda"
        pin = on_cuda if pin is None else pin
        half = capacity_bytes // 2
        self._halves = [torch.empty(half, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        self._event: Callable[[], EventLike] = event or (torch.cuda.Event if on_cuda else _NoEvent)
        # The copy last issued out of each half: it must end before the half is written again.
        self._copies: list[EventLike | None] = [None, None]
        self._next = 0
        self._lock = threading.Lock()

    def to_device(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 HWC array -> [3, H, W] on the device (the permute is a view, made there).
        The copies are queued on the current stream; `pixels` may be freed on return."""
        height, width = int(pixels.shape[0]), int(pixels.shape[1])
        src = torch.from_numpy(np.ascontiguousarray(pixels)).view(-1)
        out = torch.empty(src.numel(), dtype=torch.uint8, device=self.device)
        half = self._halves[0].numel()
        with self._lock:
            for start in range(0, src.numel(), half):
                n = min(half, src.numel() - start)
                i, self._next = self._next, self._next ^ 1
                previous = self._copies[i]
                if previous is not None:
                    previous.synchronize()
                buffer = self._halves[i]
                buffer[:n].copy_(src[start : start + n])
                out[start : start + n].copy_(buffer[:n], non_blocking=True)
                copied = self._event()
                copied.record()
                self._copies[i] = copied
        return out.view(height, width, 3).permute(2, 0, 1)


_stagings: dict[torch.device, HostStaging] = {}
_stagings_lock = threading.Lock()


def staging_for(device: torch.device) -> HostStaging:
    """The device's one staging buffer (made on first use)."""
    with _stagings_lock:
        staging = _stagings.get(device)
        if staging is None:
            staging = _stagings[device] = HostStaging(device)
        return staging
