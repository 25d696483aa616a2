"""What makes transformers' RT-DETR family capturable in a CUDA graph, and what says why a model
is not.

Two things in transformers' forward passes break stream capture (read in modeling_rt_detr.py,
modeling_rt_detr_v2.py and modeling_d_fine.py of transformers 5.x):

- ``spatial_shapes[level, 0] = height`` writes a Python int into a device tensor. PyTorch turns
  the int into a 0-dim CPU tensor and calls ``aten.copy_``: a pageable host-to-device copy
  followed by a stream synchronisation, which capture forbids. The value is the feature map's
  height, fixed for a bucket's input shape, so `HostScalarWrites` turns that copy into a
  device ``fill_`` whose value the graph records.
- RT-DETRv2 and D-FINE call ``torch_compilable_check((...).sum() == sequence_length, ...)`` in
  every deformable-attention call; on a tensor that ends in ``.item()``, a device-to-host read.
  `checks_skipped` points the model's own forward functions (its instances only, as
  app/ops/patch.py does) at a no-op for the duration. transformers' switch for this,
  TRANSFORMERS_DISABLE_TORCH_CHECK, is process-wide and has meant other things in other
  releases, so it is not used.

`HostScalarWrites` also records every other host read (``item``, ``nonzero``...) with the model
line that asked for it, so that a model which cannot be captured is named with its cause
before capture is tried, instead of CUDA's "operation not permitted when stream is capturing".
"""

from __future__ import annotations

import contextlib
import traceback
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops that hand a device value to the host: each one synchronises the stream, and inside a
# capture it fails. (nonzero & co. also size their output by the data.)
_HOST_READS = {
    aten._local_scalar_dense.default,
    aten.item.default,
    aten.is_nonzero.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.unique_consecutive.default,
    aten._unique2.default,
}

_CHECK_NAME = "torch_compilable_check"


def _where() -> str:
    """The innermost frame outside torch, transformers' utilities and this file: the model line
    that issued the op."""
    for frame in reversed(traceback.extract_stack()):
        name = frame.filename.replace("\\", "/")
        if any(part in name for part in _NOT_THE_CALLER) or name.endswith("capture_guard.py"):
            continue
        return f"{name.rsplit('/', 1)[-1]}:{frame.lineno} ({(frame.line or '').strip()})"
    return "an unknown place"


_NOT_THE_CALLER = ("/torch/", "/transformers/utils/", "/transformers/integrations/")


def _on(tensor: torch.Tensor, device: torch.device) -> bool:
    return _same(tensor.device, device)


def _same(device: torch.device | str, watched: torch.device) -> bool:
    """Whether `device` is the watched one (a watched device without index matches them all)."""
    device = torch.device(device)
    if device.type != watched.type:
        return False
    return watched.index is None or device.index in (None, watched.index)


def _copy_target(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The device a copy or conversion writes to, None if `func` is neither or keeps the device."""
    if func is aten.copy_.default:
        return args[0].device
    if func is aten._to_copy.default or func is aten.to.dtype_layout:
        return kwargs.get("device")
    if func is aten.to.device:
        return args[1]
    if func is aten.to.other:
        return args[1].device
    return None


class HostScalarWrites(TorchDispatchMode):
    """While active: ``copy_`` into a tensor on `device` from a 0-dim CPU tensor becomes a
    ``fill_`` with that value (no host memory, no synchronisation); host reads of values on
    `device`, and copies of other host tensors to it, are recorded in `host_reads` (op and model
    line): a capture cannot hold them.

    `device` is the device whose tensors count as "on the device": a CUDA device in service; the
    CPU in tests, which run the same conversion on the CPU build of torch.
    """

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.converted = 0  # copies turned into fills
        self.host_reads: list[str] = []

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is aten.copy_.default:
            dst, src = args[0], args[1]
            if src.dim() == 0 and src.device.type == "cpu" and _on(dst, self.device):
                self.converted += 1
                # fill_ broadcasts and casts the value as copy_ would; the value is read from
                # host memory here, once, and recorded in the kernel's arguments.
                return aten.fill_.Scalar(dst, src.item())
        target = _copy_target(func, args, kwargs)
        if target is not None:
            src = args[0] if func is not aten.copy_.default else args[1]
            # On the CPU (tests) every tensor is a host tensor: only a real device is watched.
            if self.device.type != "cpu" and src.device.type == "cpu":
                if _same(target, self.device):
                    shape = "x".join(map(str, src.shape)) or "0-dim"
                    self.host_reads.append(f"a host-to-device copy ({shape}) at {_where()}")
        elif func in _HOST_READS:
            tensor = args[0]
            if isinstance(tensor, torch.Tensor) and _on(tensor, self.device):
                self.host_reads.append(f"{func} at {_where()}")
        return func(*args, **kwargs)


def _skip_check(*args: Any, **kwargs: Any) -> None:
    """Stands in for transformers' torch_compilable_check while a graph is recorded."""


@contextlib.contextmanager
def checks_skipped(model: torch.nn.Module) -> Iterator[int]:
    """Within the block, the forward of every submodule of `model` whose code calls
    transformers' ``torch_compilable_check`` sees a no-op under that name (the instances only;
    the classes and other models are untouched). Yields how many forwards were redirected."""
    from app.ops.patch import rebind_global

    patched: list[tuple[torch.nn.Module, Any]] = []
    for module in model.modules():
        forward = module.forward
        func = getattr(forward, "__func__", None)
        if not isinstance(func, types.FunctionType) or _CHECK_NAME not in func.__globals__:
            continue
        if _CHECK_NAME not in func.__code__.co_names:
            continue
        previous = module.__dict__.get("forward")  # an instance patch (app/ops) to restore
        replacement = rebind_global(func, _CHECK_NAME, _skip_check)
        module.forward = types.MethodType(replacement, module)
        patched.append((module, previous))
    try:
        yield len(patched)
    finally:
        for module, previous in patched:
            if previous is None:
                del module.forward
            else:
                module.forward = previous
