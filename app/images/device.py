"""Batched JPEG decoding on the GPU (nvjpeg, through torchvision.io.decode_jpeg), with Pillow
as the fallback for every image nvjpeg refuses.

Pillow decodes a 640x480 JPEG at ~320 images/s per CPU core; nvjpeg decodes batches at ~15,000
images/s on an H100 (docs/DESIGN anchors), so at GPU throughput the CPU would be the bottleneck.

Two hazards of torchvision's decoder shape this module:
- nvjpeg's hardware decoder writes its outputs without waiting for the work already queued on
  the stream they were allocated on (pytorch/vision#9606, meta-pytorch/torchcodec#1634). The
  caching allocator hands the previous batch's freed buffers to the next decode while that
  batch's resize kernels are still queued, and the decode overwrites them: detections would go
  to the wrong request. So the current stream is drained (a host wait) before every decode; an
  event wait on the GPU would not do, as the hardware engine ignores stream order.
- torchvision keeps one global decoder and rebuilds it, leaking the old one, whenever the device
  changes; engines of several GPUs alternate, so every batch would rebuild it. With more than one
  device JPEGs are decoded by Pillow instead (`choose_jpeg_decoder`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Literal, Protocol

import numpy as np
import torch

from app.engine.host_staging import staging_for
from app.errors import ApiError, InvalidImageError
from app.images.decode import EncodedJpeg, decode_image

logger = logging.getLogger(__name__)

_JPEG_EOI = b"\xff\xd9"

# (encoded uint8 CPU tensors, device) -> decoded uint8 RGB [3, H, W] tensors on the device
DecodeBatch = Callable[[list[torch.Tensor], torch.device], list[torch.Tensor]]
DecoderSetting = Literal["auto", "pillow", "nvjpeg"]


def nvjpeg_unavailable_reason(device: torch.device) -> str | None:
    """Why JPEGs cannot be decoded on `device` (None when they can)."""
    if device.type != "cuda":
        return f"the device is {device.type}, not CUDA"
    try:
        import torchvision
        from torchvision.io import decode_jpeg
    except ImportError:
        return "torchvision is not installed (pip install -e '.[gpu]')"
    if "device" not in inspect.signature(decode_jpeg).parameters:
        return f"torchvision {torchvision.__version__} cannot decode on the GPU (0.19 or later can)"
    return None


def choose_jpeg_decoder(
    setting: DecoderSetting, device: torch.device, devices_in_use: int = 1
) -> DeviceJpegDecoder | None:
    """The device decoder when the setting and the installation allow it, else None (Pillow on
    the request path). `nvjpeg` that cannot be honoured is an error, `auto` a log line.
    `devices_in_use`: the devices this process serves on; nvjpeg only serves one (see above)."""
    if setting == "pillow":
        return None
    reason = nvjpeg_unavailable_reason(device)
    if reason is None and devices_in_use > 1:
        reason = (
            f"{devices_in_use} devices are in use, and torchvision's one global nvjpeg decoder "
            "is rebuilt (and the old one leaked) each time the device changes"
        )
    if reason is None:
        logger.info("JPEGs are decoded on %s with nvjpeg, in batches", device)
        return DeviceJpegDecoder(device)
    if setting == "nvjpeg":
        raise RuntimeError(f"--image-decoder nvjpeg cannot be honoured: {reason}")
    logger.info("JPEGs are decoded with Pillow on the CPU: %s", reason)
    return None


def _torchvision_decode(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    out = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    return list(out) if isinstance(out, list | tuple) else [out]


class StreamLike(Protocol):
    def synchronize(self) -> None: ...


class _NoStream:
    """The CPU (tests' stand-in decoders): no stream, nothing to wait for."""

    def synchronize(self) -> None:
        pass


def _current_cuda_stream(device: torch.device) -> StreamLike:
    return torch.cuda.current_stream(device) if device.type == "cuda" else _NoStream()


class DeviceJpegDecoder:
    def __init__(
        self,
        device: torch.device,
        decode_batch: DecodeBatch | None = None,
        current_stream: Callable[[torch.device], StreamLike] | None = None,
    ) -> None:
        self.device = device
        self._decode_batch = decode_batch or _torchvision_decode
        # The stream the decoded tensors are allocated on (the prepare stage's); tests pass fakes.
        self._current_stream = current_stream or _current_cuda_stream

    def decode(self, jpegs: Sequence[EncodedJpeg]) -> list[torch.Tensor | ApiError]:
        """One uint8 RGB [3, H, W] tensor on the device per JPEG, in order, or the error of a
        JPEG that neither nvjpeg nor Pillow could decode. A JPEG that does not end with its
        end-of-image marker never reaches nvjpeg (which decodes truncated files): Pillow
        judges it, as on the CPU path. The front end's marker walk (probe_plain_jpeg) already
        keeps such files off this path and cuts each JPEG at its marker; this is the check
        where nvjpeg is called."""
        if not jpegs:
            return []
        device_rows = [i for i, j in enumerate(jpegs) if j.data.endswith(_JPEG_EOI)]
        decoded: list[torch.Tensor | None] = [None] * len(jpegs)
        if device_rows:
            # bytearray: torch.frombuffer wants a writable buffer; the copy is a few tens of KB.
            encoded = [
                torch.frombuffer(bytearray(jpegs[i].data), dtype=torch.uint8) for i in device_rows
            ]
            # Drain the stream the outputs are allocated on: the previous batch's kernels must
            # have read the memory the decoder may be handed (see the module docstring).
            self._current_stream(self.device).synchronize()
            on_device: list[torch.Tensor | None]
            try:
                on_device = list(self._decode_batch(encoded, self.device))
            except Exception as exc:  # one bad file fails nvjpeg's whole batch: one by one
                logger.debug("batched JPEG decode failed (%s); decoding one by one", exc)
                on_device = [self._decode_one(e) for e in encoded]
            for i, image in zip(device_rows, on_device, strict=True):
                decoded[i] = image
        results: list[torch.Tensor | ApiError] = []
        for jpeg, image in zip(jpegs, decoded, strict=True):
            if image is not None and tuple(image.shape) == (3, jpeg.height, jpeg.width):
                results.append(image)
            else:
                results.append(self._pillow(jpeg))
        return results

    def _decode_one(self, encoded: torch.Tensor) -> torch.Tensor | None:
        try:
            (image,) = self._decode_batch([encoded], self.device)
            return image
        except Exception:
            return None

    def _pillow(self, jpeg: EncodedJpeg) -> torch.Tensor | ApiError:
        try:
            pixels = decode_image(jpeg.data, max_pixels=jpeg.pixel_count, index=jpeg.index).pixels
        except ApiError as exc:
            return exc
        except Exception as exc:  # decode_image maps Pillow's errors; anything else is ours
            return InvalidImageError(
                f"the JPEG could not be decoded ({type(exc).__name__})", image_index=jpeg.index
            )
        return to_device_chw(pixels, self.device)


def to_device_chw(pixels: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 HWC array -> [3, H, W] on `device`. On CUDA the rows go through the device's one
    pinned staging buffer of fixed size (app/engine/host_staging.py; not pin_memory() per image,
    which grows torch's pinned cache), and the permute happens on the device (a strided CPU view
    would be made contiguous in pageable memory first)."""
    if device.type == "cuda":
        return staging_for(device).to_device(pixels)
    return torch.from_numpy(pixels).permute(2, 0, 1)
