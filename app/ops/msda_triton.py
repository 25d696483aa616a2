"""Triton kernel of multi-scale deformable attention (CUDA; fp32, fp16, bf16; fp32 accumulation).

Imported only where triton is importable (app/ops/msda.py checks CUDA and triton first). Under
``TRITON_INTERPRET=1`` the same kernel runs on CPU tensors, which is how it is tested without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _msda_kernel(
    value_ptr,  # [N, S, M, D], contiguous
    shapes_ptr,  # [L, 2] int32 (h, w)
    start_ptr,  # [L] int32
    loc_ptr,  # [N, Lq, M, L, P, 2], contiguous
    attn_ptr,  # [N, Lq, M, L, P], contiguous
    out_ptr,  # [N, Lq, M, D], contiguous
    num_rows,  # N * Lq * M
    seq,  # S
    queries,  # Lq
    heads,  # M
    dim,  # D
    LEVELS: tl.constexpr,
    POINTS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program: BLOCK_R output rows (n, q, m) x all D channels. Each sample point is four
    # masked row gathers of D contiguous values; accumulation is in float32.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_rows
    rows64 = rows.to(tl.int64)
    head = rows64 % heads
    batch = rows64 // (queries * heads)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for level in tl.static_range(LEVELS):
        height = tl.load(shapes_ptr + 2 * level)
        width = tl.load(shapes_ptr + 2 * level + 1)
        start = tl.load(start_ptr + level)
        height_f = height.to(tl.float32)
        width_f = width.to(tl.float32)
        for point in tl.static_range(POINTS):
            k = rows64 * (LEVELS * POINTS) + level * POINTS + point
            x = tl.load(loc_ptr + 2 * k, mask=row_ok, other=0.0).to(tl.float32)
            y = tl.load(loc_ptr + 2 * k + 1, mask=row_ok, other=0.0).to(tl.float32)
            a = tl.load(attn_ptr + k, mask=row_ok, other=0.0).to(tl.float32)
            # grid_sample, align_corners=False: pixel = loc * size - 0.5; clamped so that far
            # points stay far (all corners outside) without overflowing the int cast.
            ix = tl.minimum(tl.maximum(x * width_f - 0.5, -2.0), width_f + 1.0)
            iy = tl.minimum(tl.maximum(y * height_f - 0.5, -2.0), height_f + 1.0)
            x0f = tl.floor(ix)
            y0f = tl.floor(iy)
            fx = ix - x0f
            fy = iy - y0f
            x0 = x0f.to(tl.int32)
            y0 = y0f.to(tl.int32)
            for corner in tl.static_range(4):
                dx = corner % 2
                dy = corner // 2
                xi = x0 + dx
                yi = y0 + dy
                ok = row_ok & (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
                wx = dx * fx + (1 - dx) * (1.0 - fx)
                wy = dy * fy + (1 - dy) * (1.0 - fy)
                pos = (start + yi * width + xi).to(tl.int64)
                src = ((batch * seq + pos) * heads + head) * dim
                v = tl.load(
                    value_ptr + src[:, None] + cols[None, :],
                    mask=ok[:, None] & col_ok[None, :],
                    other=0.0,
                ).to(tl.float32)
                acc += v * (a * wx * wy)[:, None]
    dst = rows64[:, None] * dim + cols[None, :]
    tl.store(
        out_ptr + dst, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :]
    )


def ms_deform_attn_triton(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    block_rows: int = 64,
) -> Tensor:
    """Same contract as app.ops.msda.ms_deform_attn; output in value's dtype."""
    batch, seq, heads, dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    value = value.contiguous()
    # Locations keep their own dtype: fp16 locations would cost ~0.04 px on an 80-px level.
    loc = sampling_locations.contiguous()
    attn = attention_weights.contiguous()
    shapes = spatial_shapes.to(device=value.device, dtype=torch.int32).contiguous()
    start = level_start_index.to(device=value.device, dtype=torch.int32).contiguous()
    out = torch.empty((batch, queries, heads, dim), dtype=value.dtype, device=value.device)
    num_rows = batch * queries * heads
    if num_rows == 0:
        return out.view(batch, queries, heads * dim)
    block_d = triton.next_power_of_2(dim)
    grid = (triton.cdiv(num_rows, block_rows),)
    _msda_kernel[grid](
        value,
        shapes,
        start,
        loc,
        attn,
        out,
        num_rows,
        seq,
        queries,
        heads,
        dim,
        LEVELS=levels,
        POINTS=points,
        BLOCK_R=block_rows,
        BLOCK_D=block_d,
    )
    return out.view(batch, queries, heads * dim)
