"""Multi-scale deformable attention (MSDA) as one torch op: ``torch.ops.detr_serve.ms_deform_attn``.

Signature (the one of Deformable DETR's CUDA op and of TensorRT's plugin):

    value               [N, S, M, D]            S = sum of h*w over the L levels
    spatial_shapes      [L, 2] integer          (h, w) of each level
    level_start_index   [L] integer             offset of each level in S
    sampling_locations  [N, Lq, M, L, P, 2]     (x, y), normalised to [0, 1]
    attention_weights   [N, Lq, M, L, P]
    -> output           [N, Lq, M * D]

Each point is read with ``grid_sample`` semantics (bilinear, zero padding, align_corners=False)
and the output is the attention-weighted sum of the L * P samples of each (query, head).

Implementations: a gather-based one for any device (CPU and the CUDA fallback), a Triton kernel
on CUDA when triton is installed (app/ops/msda_triton.py), a fake one so that torch.compile and
torch.export trace through it, and a single custom ONNX node during torch.onnx.export
(app/ops/onnx_function.py gives it a body of standard ops).
"""

from __future__ import annotations

import logging
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

OP_NAME = "detr_serve::ms_deform_attn"
# The ONNX node: TensorRT's plugin name and input order, in our own domain (see README).
ONNX_DOMAIN = "detr_serve"
ONNX_OP_TYPE = "MultiscaleDeformableAttnPlugin_TRT"
ONNX_OP_VERSION = 1

_HALF_TYPES = (torch.float16, torch.bfloat16)


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """The op as models call it: the custom op, or one custom ONNX node while exporting."""
    if torch.onnx.is_in_onnx_export():
        return _onnx_symbolic(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    return torch.ops.detr_serve.ms_deform_attn(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


@torch.library.custom_op(OP_NAME, mutates_args=())
def _ms_deform_attn_op(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    return ms_deform_attn_gather(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


@_ms_deform_attn_op.register_fake
def _ms_deform_attn_fake(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    batch, _, heads, dim = value.shape
    return value.new_empty((batch, sampling_locations.shape[1], heads * dim))


@_ms_deform_attn_op.register_kernel("cuda")
def _ms_deform_attn_cuda(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    if triton_available():
        from app.ops.msda_triton import ms_deform_attn_triton

        return ms_deform_attn_triton(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    return ms_deform_attn_gather(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


@cache
def triton_available() -> bool:
    """Whether the Triton kernel can run: CUDA present and triton importable (checked once)."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        logger.info("triton is not installed: deformable attention uses the gather fallback")
        return False
    return True


def _check_shapes(value: Tensor, spatial_shapes: Tensor, loc: Tensor, weights: Tensor) -> None:
    if value.dim() != 4 or loc.dim() != 6 or loc.shape[-1] != 2 or weights.dim() != 5:
        raise ValueError(
            "ms_deform_attn expects value [N, S, M, D], sampling_locations [N, Lq, M, L, P, 2] "
            f"and attention_weights [N, Lq, M, L, P]; got {tuple(value.shape)}, "
            f"{tuple(loc.shape)}, {tuple(weights.shape)}"
        )
    if weights.shape != loc.shape[:-1] or spatial_shapes.shape != (loc.shape[3], 2):
        raise ValueError(
            f"attention_weights {tuple(weights.shape)} and spatial_shapes "
            f"{tuple(spatial_shapes.shape)} do not match sampling_locations {tuple(loc.shape)}"
        )


def ms_deform_attn_gather(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Bilinear sampling as four gathers, fused with the weighted sum by ``embedding_bag``.

    Each (n, q, m) output row is a bag of L*P*4 rows of ``value`` viewed as [N*S*M, D] (no copy
    of value), weighted by bilinear weight * attention weight; corners outside their level get
    weight 0, which is grid_sample's zero padding. Written by hand because torch has no MSDA op.
    Half-precision inputs are computed (and accumulated) in float32.
    """
    _check_shapes(value, spatial_shapes, sampling_locations, attention_weights)
    batch, seq, heads, dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    compute = torch.float32 if value.dtype in _HALF_TYPES else value.dtype
    device = value.device
    bags = batch * queries * heads
    # Work on [level, bag * point] planes: per-level constants broadcast along one long,
    # contiguous inner axis (a trailing axis of P points or 4 corners would leave TensorIterator
    # with tiny inner loops on CPU).
    loc = sampling_locations.to(compute).permute(5, 3, 0, 1, 2, 4).reshape(2, levels, bags * points)
    attn = attention_weights.to(compute).permute(3, 0, 1, 2, 4).reshape(levels, bags * points)
    shapes = spatial_shapes.to(device=device, dtype=torch.int64)
    height, width = shapes[:, :1], shapes[:, 1:]  # [L, 1]
    start = level_start_index.to(device=device, dtype=torch.int64).view(levels, 1)

    # grid_sample's unnormalisation (align_corners=False): pixel = loc * size - 0.5. Clamping
    # keeps far-away points (and their int casts) harmless: a point clamped to -2 or size + 1
    # still has all four corners outside the map.
    ix = (loc[0] * width).sub_(0.5).clamp_(min=-2).minimum(width + 1)
    iy = (loc[1] * height).sub_(0.5).clamp_(min=-2).minimum(height + 1)
    x0f, y0f = ix.floor(), iy.floor()
    fx, fy = ix.sub_(x0f), iy.sub_(y0f)  # weights of the far corners (x0 + 1, y0 + 1)
    x0, y0 = x0f.long(), y0f.long()
    # A corner outside its level gets weight 0 (grid_sample's zero padding) and a clamped,
    # harmless index. The attention weight is folded into the y weights.
    wx0 = (1 - fx).mul_((x0 >= 0) & (x0 < width))
    wx1 = fx.mul_((x0 >= -1) & (x0 < width - 1))
    wy0 = (1 - fy).mul_((y0 >= 0) & (y0 < height)).mul_(attn)
    wy1 = fy.mul_((y0 >= -1) & (y0 < height - 1)).mul_(attn)
    # Row of value.view(N*S*M, D) for bag (n, q, m) and position s = start + y*w + x:
    # (n*S + s)*M + m = (start + y*w)*M + x*M + (n*S*M + m).
    bag = torch.arange(bags, device=device)
    bag_base = (bag // (queries * heads) * (seq * heads) + bag % heads).repeat_interleave(points)
    cx0 = x0.clamp(min=0).minimum(width - 1).mul_(heads)
    cx1 = (x0 + 1).clamp_(min=0).minimum(width - 1).mul_(heads)
    ry0 = y0.clamp(min=0).minimum(height - 1).mul_(width).add_(start).mul_(heads).add_(bag_base)
    ry1 = (y0 + 1).clamp_(min=0).minimum(height - 1).mul_(width).add_(start)
    ry1 = ry1.mul_(heads).add_(bag_base)
    # One bag per output row, laid out [bags, 4 corners, L, P] (order in a bag is free); each
    # corner's plane is written straight into its strided slot.
    rows = torch.empty((bags, 4, levels, points), dtype=torch.int64, device=device)
    weights = torch.empty((bags, 4, levels, points), dtype=compute, device=device)
    row_planes = rows.permute(1, 2, 0, 3)  # [4, L, bags, P]
    weight_planes = weights.permute(1, 2, 0, 3)
    corners = (
        (ry0, cx0, wy0, wx0),
        (ry0, cx1, wy0, wx1),
        (ry1, cx0, wy1, wx0),
        (ry1, cx1, wy1, wx1),
    )
    plane = (levels, bags, points)
    for c, (ry, cx, wy, wx) in enumerate(corners):
        torch.add(ry.view(plane), cx.view(plane), out=row_planes[c])
        torch.mul(wy.view(plane), wx.view(plane), out=weight_planes[c])
    table = value.reshape(batch * seq * heads, dim).to(compute)
    out = F.embedding_bag(
        rows.view(bags, -1), table, per_sample_weights=weights.view(bags, -1), mode="sum"
    )
    return out.view(batch, queries, heads * dim).to(value.dtype)


def ms_deform_attn_reference(
    value: Tensor,
    spatial_shapes: Tensor | list[tuple[int, int]],
    level_start_index: Tensor | None,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """The grid_sample formulation (Deformable DETR's PyTorch fallback), the ground truth."""
    batch, _, heads, dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes]
    value_list = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1
    samples = []
    for level, (h, w) in enumerate(shapes):
        value_l = value_list[level].flatten(2).transpose(1, 2).reshape(batch * heads, dim, h, w)
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        samples.append(
            F.grid_sample(
                value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False
            )
        )
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    out = (torch.stack(samples, dim=-2).flatten(-2) * weights).sum(-1)
    return out.view(batch, heads * dim, queries).transpose(1, 2).contiguous()


def _onnx_symbolic(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    # TensorRT's plugin takes int32 shapes and offsets and returns [N, Lq, M, D]; the output
    # type is declared here because no shape inference knows the custom op.
    batch, _, heads, dim = value.shape
    queries = sampling_locations.shape[1]
    out = torch.onnx.ops.symbolic(
        f"{ONNX_DOMAIN}::{ONNX_OP_TYPE}",
        (
            value,
            spatial_shapes.to(torch.int32),
            level_start_index.to(torch.int32),
            sampling_locations.to(value.dtype),
            attention_weights.to(value.dtype),
        ),
        dtype=value.dtype,
        shape=(batch, queries, heads, dim),
        version=ONNX_OP_VERSION,
    )
    return out.flatten(2)
