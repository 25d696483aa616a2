"""Install detr-serve's deformable attention op into a loaded transformers or Ultralytics detector.

Three shapes of MSDA exist in transformers (5.x) and one in Ultralytics; each is swapped on the
model's module instances only, never on their classes or module globals, so an unpatched model in
the same process keeps its own code:

- ``MultiScaleDeformableAttention`` (RT-DETR, Deformable DETR and their kin): the submodule is
  replaced by :class:`DeformableAttention`, which has the same forward signature.
- ``DFineMultiscaleDeformableAttention`` calls ``self.ms_deformable_attn_core``: the instance
  attribute is pointed at :func:`ms_deform_attn_v2`.
- ``RTDetrV2MultiscaleDeformableAttention.forward`` calls the module-level function
  ``multi_scale_deformable_attention_v2``: the instance gets a copy of its class's forward whose
  globals map that name to :func:`ms_deform_attn_v2` (same code object, so the same semantics).

- Ultralytics' ``MSDeformAttn`` (``ultralytics.nn.modules.transformer``) calls the function
  ``multi_scale_deformable_attn_pytorch`` it imported from ``ultralytics.nn.modules.utils``: the
  instance gets a copy of its class's forward whose globals map that name to
  :func:`ms_deform_attn_ultralytics` (sampling locations [N, Lq, M, L, P, 2] up to 8.4.0, folded
  to [N, Lq, M, L * P, 2] later).

Per-level point counts (``num_points_list``, e.g. D-FINE's [3, 6, 3]) are padded to the largest
count with zero attention weights: the op keeps the standard [N, Lq, M, L, P, 2] layout of
Deformable DETR and of TensorRT's plugin, at the cost of sampling the padded points.
"""

from __future__ import annotations

import functools
import inspect
import logging
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from app.ops.msda import ms_deform_attn

logger = logging.getLogger(__name__)

_V2_FUNCTION = "multi_scale_deformable_attention_v2"
_ULTRALYTICS_FUNCTION = "multi_scale_deformable_attn_pytorch"
_V1_FORWARD_PARAMS = [
    "value",
    "value_spatial_shapes",
    "value_spatial_shapes_list",
    "level_start_index",
    "sampling_locations",
    "attention_weights",
    "im2col_step",
]
_MARK = "_detr_serve_msda"


class DeformableAttention(nn.Module):
    """Drop-in for transformers' ``MultiScaleDeformableAttention``: the same forward, our op."""

    def forward(
        self,
        value: Tensor,
        value_spatial_shapes: Tensor,
        value_spatial_shapes_list: Sequence[tuple[int, int]],
        level_start_index: Tensor,
        sampling_locations: Tensor,
        attention_weights: Tensor,
        im2col_step: int = 64,
    ) -> Tensor:
        return ms_deform_attn(
            value, value_spatial_shapes, level_start_index, sampling_locations, attention_weights
        )


def pad_points(
    sampling_locations: Tensor, attention_weights: Tensor, num_points_list: Sequence[int]
) -> tuple[Tensor, Tensor]:
    """Flat per-level points [N, Lq, M, sum(P_l), 2] and [N, Lq, M, sum(P_l)] -> the standard
    [N, Lq, M, L, P_max, 2] and [N, Lq, M, L, P_max]; padded points get weight 0."""
    batch, queries, heads, total, _ = sampling_locations.shape
    levels = len(num_points_list)
    most = max(num_points_list)
    if sum(num_points_list) != total:
        raise ValueError(f"num_points_list {list(num_points_list)} does not add up to {total}")
    if all(p == most for p in num_points_list):
        return (
            sampling_locations.reshape(batch, queries, heads, levels, most, 2),
            attention_weights.reshape(batch, queries, heads, levels, most),
        )
    locs = sampling_locations.split(list(num_points_list), dim=3)
    weights = attention_weights.split(list(num_points_list), dim=3)
    # Padded locations sit at the centre of the map (finite, in range): with weight 0 they add
    # exactly 0 to the sum.
    loc = torch.stack([F.pad(t, (0, 0, 0, most - t.shape[3]), value=0.5) for t in locs], dim=3)
    attn = torch.stack([F.pad(t, (0, most - t.shape[3])) for t in weights], dim=3)
    return loc, attn


def ms_deform_attn_v2(
    value: Tensor,
    value_spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
    num_points_list: list[int],
    method: str = "default",
    *,
    fallback: Callable[..., Tensor] | None = None,
) -> Tensor:
    """transformers' ``multi_scale_deformable_attention_v2`` contract (RT-DETRv2, D-FINE)."""
    if method != "default":
        # "discrete" is a different (nearest-pixel) sampler: leave it to transformers.
        if fallback is None:
            raise ValueError(f"method={method!r} needs transformers' own implementation")
        return fallback(
            value,
            value_spatial_shapes,
            sampling_locations,
            attention_weights,
            num_points_list,
            method,
        )
    levels = tuple((int(h), int(w)) for h, w in value_spatial_shapes)
    if torch.compiler.is_compiling():
        # Traced (compile, export): a cached tensor would leak out of, or into, the trace.
        shapes, start = _level_tensors(levels, value.device)
    else:
        shapes, start = _cached_level_tensors(levels, value.device)
    loc, attn = pad_points(sampling_locations, attention_weights, num_points_list)
    return ms_deform_attn(value, shapes, start, loc, attn)


def ms_deform_attn_ultralytics(
    value: Tensor,
    value_spatial_shapes: Sequence[Sequence[int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Ultralytics' ``multi_scale_deformable_attn_pytorch`` contract: value [N, S, M, D], level
    sizes as a list, locations and weights with the levels and points apart (up to 8.4.0) or
    folded into one axis of L * P (later)."""
    levels = tuple((int(h), int(w)) for h, w in value_spatial_shapes)
    if torch.compiler.is_compiling():
        shapes, start = _level_tensors(levels, value.device)
    else:
        shapes, start = _cached_level_tensors(levels, value.device)
    if sampling_locations.dim() == 5:
        batch, queries, heads, total, _ = sampling_locations.shape
        points = total // len(levels)
        sampling_locations = sampling_locations.reshape(
            batch, queries, heads, len(levels), points, 2
        )
        attention_weights = attention_weights.reshape(batch, queries, heads, len(levels), points)
    return ms_deform_attn(value, shapes, start, sampling_locations, attention_weights)


def _level_tensors(
    levels: tuple[tuple[int, int], ...], device: torch.device
) -> tuple[Tensor, Tensor]:
    shapes = torch.tensor(levels, dtype=torch.int64, device=device)
    return shapes, torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])


# v2 models hand over the level sizes as a Python list: the tensors are made once per size and
# device, not at every call (a host-to-device copy per layer, not allowed in CUDA graph capture).
_cached_level_tensors = functools.lru_cache(maxsize=64)(_level_tensors)


def install_msda(model: nn.Module) -> int:
    """Swap every deformable attention of ``model`` for detr-serve's op; returns how many."""
    replaced = 0
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if _is_v1_msda(child):
                setattr(parent, child_name, DeformableAttention())
                replaced += 1
                logger.debug("MSDA op installed at %s.%s", parent_name, child_name)
        if getattr(parent, _MARK, False):
            continue
        core = getattr(parent, "ms_deformable_attn_core", None)
        if callable(core) and getattr(core, "__name__", "") == _V2_FUNCTION:
            parent.ms_deformable_attn_core = functools.partial(ms_deform_attn_v2, fallback=core)
            setattr(parent, _MARK, True)
            replaced += 1
        elif _calls_function(parent, _ULTRALYTICS_FUNCTION):
            patched = rebind_global(
                type(parent).forward, _ULTRALYTICS_FUNCTION, ms_deform_attn_ultralytics
            )
            parent.forward = types.MethodType(patched, parent)
            setattr(parent, _MARK, True)
            replaced += 1
        elif _calls_function(parent, _V2_FUNCTION):
            forward = type(parent).forward
            fallback = forward.__globals__[_V2_FUNCTION]
            patched = rebind_global(
                forward, _V2_FUNCTION, functools.partial(ms_deform_attn_v2, fallback=fallback)
            )
            parent.forward = types.MethodType(patched, parent)
            setattr(parent, _MARK, True)
            replaced += 1
    if replaced:
        logger.info("deformable attention: detr-serve op installed in %d modules", replaced)
    elif any("deformable" in type(m).__name__.lower() for m in model.modules()):
        logger.warning(
            "deformable attention: no module of %s matched a known shape; the op is not used",
            type(model).__name__,
        )
    return replaced


def _is_v1_msda(module: nn.Module) -> bool:
    if type(module).__name__ != "MultiScaleDeformableAttention":
        return False
    params = list(inspect.signature(module.forward).parameters)
    return params == _V1_FORWARD_PARAMS


def _calls_function(module: nn.Module, name: str) -> bool:
    """Whether the forward of `module`'s class calls the module-level function `name`."""
    forward = getattr(type(module), "forward", None)
    code = getattr(forward, "__code__", None)
    return (
        code is not None
        and name in code.co_names
        and callable(getattr(forward, "__globals__", {}).get(name))
    )


def rebind_global(func: Any, name: str, replacement: Any) -> types.FunctionType:
    """A copy of ``func`` (same code) that sees ``replacement`` under the global ``name``."""
    scope = dict(func.__globals__)
    scope[name] = replacement
    copy = types.FunctionType(
        func.__code__, scope, func.__name__, func.__defaults__, func.__closure__
    )
    copy.__kwdefaults__ = func.__kwdefaults__
    copy.__qualname__ = func.__qualname__
    return copy
