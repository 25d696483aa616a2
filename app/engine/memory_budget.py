"""The device-memory check made before a model loads on a CUDA device: with several models on
one GPU (one engine process each), a model that cannot fit fails with the numbers instead of
failing another model's batch with out-of-memory later.

A coarse floor, not a promise that the model fits: the weights twice (the float32 weights as
loaded, plus a half-precision copy or the CUDA graphs' pools) and `_IMAGE_BYTES` per image of
the largest batch (activations, pre-processing buffers).
"""

from __future__ import annotations

import logging
from pathlib import Path

from app.config import Settings

logger = logging.getLogger(__name__)

_IMAGE_BYTES = 64 << 20
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx")


class DeviceMemoryBudgetError(RuntimeError):
    """The device has less free memory than the model needs at the least."""


def weights_bytes(path: Path) -> int:
    """Bytes of the weight files of a model folder (or of a checkpoint file)."""
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return 0
    return sum(
        f.stat().st_size for f in path.iterdir() if f.is_file() and f.suffix in _WEIGHT_SUFFIXES
    )


def needed_bytes(weights: int, max_batch_size: int) -> int:
    return 2 * weights + max_batch_size * _IMAGE_BYTES


def budget_problem(device: str, free: int, weights: int, max_batch_size: int) -> str | None:
    """Why a model of `weights` bytes batching `max_batch_size` cannot load on `device` with
    `free` bytes free, or None."""
    need = needed_bytes(weights, max_batch_size)
    if need <= free:
        return None
    mib = 1 << 20
    return (
        f"{device} has {free // mib} MiB free, under the {need // mib} MiB this model needs at "
        f"the least (weights {weights // mib} MiB twice, plus {_IMAGE_BYTES // mib} MiB per "
        f"image of a batch of {max_batch_size}): unload a model, lower max_batch_size "
        "(serve.json) or serve it on another device"
    )


def check_device_memory(settings: Settings) -> None:
    """Raise DeviceMemoryBudgetError when a CUDA device of the settings lacks the memory."""
    cuda = [d for d in settings.device_list if d.startswith("cuda")]
    if not cuda and settings.device == "auto":
        import torch

        cuda = ["cuda:0"] if torch.cuda.is_available() else []
    if not cuda:
        return
    import torch

    weights = weights_bytes(settings.model)
    for device in cuda:
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        problem = budget_problem(device, free, weights, settings.max_batch_size)
        if problem is not None:
            raise DeviceMemoryBudgetError(problem)
        logger.info(
            "%s: %d MiB free, this model needs %d MiB at the least",
            device,
            free >> 20,
            needed_bytes(weights, settings.max_batch_size) >> 20,
        )
