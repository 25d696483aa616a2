"""detr-serve's deformable attention op against transformers' grid_sample formulation."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.ops.msda import (
    ms_deform_attn,
    ms_deform_attn_gather,
    ms_deform_attn_reference,
    triton_available,
)
from app.ops.patch import DeformableAttention, install_msda, ms_deform_attn_v2, pad_points

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def one_torch_thread():
    # Small ops on a 2-core machine that is busy elsewhere: a second intra-op thread only waits.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_inputs(
    levels: list[tuple[int, int]],
    batch: int = 2,
    queries: int = 5,
    heads: int = 2,
    dim: int = 4,
    points: int = 3,
    spread: tuple[float, float] = (-0.25, 1.25),
    seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(levels, dtype=torch.int64)
    start = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    seq = int(shapes.prod(1).sum())
    value = torch.randn(batch, seq, heads, dim, generator=gen)
    low, high = spread
    loc = torch.rand(batch, queries, heads, len(levels), points, 2, generator=gen)
    loc = loc * (high - low) + low
    weights = torch.rand(batch, queries, heads, len(levels), points, generator=gen)
    return value, shapes, start, loc, weights


level_sizes = st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9)), min_size=1, max_size=3)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    levels=level_sizes,
    batch=st.integers(1, 2),
    queries=st.integers(1, 6),
    heads=st.integers(1, 3),
    dim=st.integers(1, 5),
    points=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_op_matches_grid_sample_on_random_shapes(levels, batch, queries, heads, dim, points, seed):
    # Non-square levels, 1-pixel levels and points outside the map (locations in [-0.25, 1.25]).
    args = make_inputs(levels, batch, queries, heads, dim, points, seed=seed)
    got = ms_deform_attn(*args)
    want = ms_deform_attn_reference(*args)
    assert got.shape == (batch, queries, heads * dim)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_op_matches_grid_sample_on_edges_and_pixel_centres():
    levels = [(3, 5), (4, 2)]
    value, shapes, start, _, _ = make_inputs(levels, batch=1, heads=1, dim=3)
    # Every combination of map edges (0, 1), pixel edges (k / size) and pixel centres
    # ((k + 0.5) / size) of the first level, plus just outside the map.
    xs = torch.tensor([0.0, 1.0, 0.2, 0.4, 0.1, 0.5, 0.9, -1e-7, 1 + 1e-7, -0.1, 1.1])
    ys = torch.tensor([0.0, 1.0, 1 / 3, 2 / 3, 1 / 6, 0.5, 5 / 6, -1e-7, 1 + 1e-7])
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="ij"), -1).reshape(-1, 2)
    queries = grid.shape[0]
    loc = grid.view(1, queries, 1, 1, 1, 2).expand(1, queries, 1, 2, 1, 2).contiguous()
    weights = torch.ones(1, queries, 1, 2, 1)
    got = ms_deform_attn(value, shapes, start, loc, weights)
    want = ms_deform_attn_reference(value, shapes, start, loc, weights)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    # On the map's outer edge only half a pixel is inside: the sample is half the edge pixel.
    at_origin = ms_deform_attn(
        value, shapes, start, torch.zeros(1, 1, 1, 2, 1, 2), torch.tensor([[[[[1.0], [0.0]]]]])
    )
    torch.testing.assert_close(at_origin[0, 0], 0.25 * value[0, 0, 0], atol=1e-6, rtol=0)


def test_far_away_points_contribute_nothing():
    value, shapes, start, loc, weights = make_inputs([(4, 6), (2, 3)], batch=1, queries=4)
    loc[0, 0] = 1e9
    loc[0, 1] = -1e9
    loc[0, 2] = 3.0
    loc[0, 3] = -2.0
    out = ms_deform_attn(value, shapes, start, loc, weights)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_op_takes_half_precision_and_accumulates_in_float32(dtype):
    args = make_inputs([(6, 4), (3, 2)], batch=2, queries=7, heads=2, dim=8, points=4)
    value, shapes, start, loc, weights = args
    half = (value.to(dtype), shapes, start, loc.to(dtype), weights.to(dtype))
    got = ms_deform_attn(*half)
    assert got.dtype == dtype
    # The reference in float64 on the same (rounded) inputs: only the output rounding remains.
    exact = ms_deform_attn_reference(*(t.double() if t.is_floating_point() else t for t in half))
    tolerance = 1e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(got.double(), exact, atol=tolerance, rtol=tolerance)


def test_op_is_registered_with_a_fake_implementation():
    args = make_inputs([(5, 3), (2, 2)], batch=2)
    torch.library.opcheck(
        torch.ops.detr_serve.ms_deform_attn.default,
        args,
        test_utils=("test_schema", "test_faketensor"),
    )


def test_torch_export_keeps_the_op_as_one_node_with_a_dynamic_batch():
    class Block(torch.nn.Module):
        def forward(self, value, shapes, start, loc, weights):
            return ms_deform_attn(value, shapes, start, loc, weights) * 2

    args = make_inputs([(5, 3), (2, 2)], batch=2)
    batch = torch.export.Dim("batch")
    program = torch.export.export(
        Block(), args, dynamic_shapes=({0: batch}, None, None, {0: batch}, {0: batch})
    )
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.detr_serve.ms_deform_attn.default) == 1
    bigger = make_inputs([(5, 3), (2, 2)], batch=3, seed=1)
    torch.testing.assert_close(
        program.module()(*bigger), ms_deform_attn_reference(*bigger) * 2, atol=1e-5, rtol=1e-5
    )


def test_torch_compile_traces_the_op_without_graph_breaks():
    class Block(torch.nn.Module):
        def forward(self, value, shapes, start, loc, weights):
            return ms_deform_attn(value, shapes, start, loc, weights) + 1

    # aot_eager: dynamo captures the whole graph (fullgraph) and AOT traces it with the fake
    # implementation; no C++ compiler needed.
    compiled = torch.compile(Block(), backend="aot_eager", fullgraph=True, dynamic=True)
    args = make_inputs([(5, 3), (2, 2)], batch=2)
    torch.testing.assert_close(
        compiled(*args), ms_deform_attn_reference(*args) + 1, atol=1e-5, rtol=1e-5
    )


def test_pad_points_matches_transformers_v2_with_points_per_level():
    from transformers.models.d_fine.modeling_d_fine import multi_scale_deformable_attention_v2

    levels, points = [(6, 5), (3, 4), (2, 2)], [1, 3, 2]
    value, shapes, _, _, _ = make_inputs(levels, heads=2, dim=4)
    gen = torch.Generator().manual_seed(3)
    loc = torch.rand(2, 5, 2, sum(points), 2, generator=gen) * 1.4 - 0.2
    weights = torch.rand(2, 5, 2, sum(points), generator=gen)
    got = ms_deform_attn_v2(value, levels, loc, weights, points)
    want = multi_scale_deformable_attention_v2(value, levels, loc, weights, points)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    padded_loc, padded_weights = pad_points(loc, weights, points)
    assert padded_loc.shape == (2, 5, 2, 3, 3, 2)
    assert padded_weights[:, :, :, 0, 1:].abs().sum() == 0  # level 0 has 1 real point of 3


# --- the op installed in transformers models -------------------------------------------------


def _tiny_backbone():
    from transformers import RTDetrResNetConfig

    return RTDetrResNetConfig(
        embedding_size=8,
        hidden_sizes=[8, 16, 16, 16],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        out_features=["stage2", "stage3", "stage4"],
    )


_RT_COMMON = {
    "d_model": 16,
    "encoder_hidden_dim": 16,
    "encoder_in_channels": [16, 16, 16],
    "decoder_in_channels": [16, 16, 16],
    "encoder_ffn_dim": 32,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "decoder_ffn_dim": 32,
    "decoder_layers": 2,
    "num_queries": 10,
    "num_denoising": 0,
    "num_labels": 3,
}


def _build(kind: str, **extra) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    if kind == "rt_detr":
        config = tf.RTDetrConfig(backbone_config=_tiny_backbone(), decoder_n_points=2, **_RT_COMMON)
        model = tf.RTDetrForObjectDetection(config)
    elif kind == "rt_detr_v2":
        config = tf.RTDetrV2Config(
            backbone_config=_tiny_backbone(), decoder_n_points=2, **_RT_COMMON, **extra
        )
        model = tf.RTDetrV2ForObjectDetection(config)
    elif kind == "d_fine":
        config = tf.DFineConfig(
            backbone_config=_tiny_backbone(),
            decoder_n_points=[1, 3, 2],
            hidden_expansion=0.5,
            **_RT_COMMON,
            **extra,
        )
        model = tf.DFineForObjectDetection(config)
    else:
        backbone = tf.ResNetConfig(
            embedding_size=8,
            hidden_sizes=[8, 16, 16, 16],
            depths=[1, 1, 1, 1],
            layer_type="basic",
            out_features=["stage2", "stage3", "stage4"],
        )
        config = tf.DeformableDetrConfig(
            use_timm_backbone=False,
            backbone_config=backbone,
            use_pretrained_backbone=False,
            d_model=32,
            encoder_layers=1,
            decoder_layers=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            num_queries=10,
            encoder_n_points=2,
            decoder_n_points=2,
            num_labels=3,
        )
        model = tf.DeformableDetrForObjectDetection(config)
    spread_weights(model)
    return model.eval()


def spread_weights(model: torch.nn.Module, seed: int = 1) -> None:
    """Give a randomly initialised detector O(1) activations everywhere.

    transformers' init (std 0.01, small norm weights) shrinks the tiny RT-DETR's features to
    ~1e-12, so every query scores the same and top-k among ties is implementation-defined:
    torch and onnxruntime then pick different queries. Fan-in scaled weights avoid that.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if param.dim() >= 2:
                param.copy_(noise / math.sqrt(param[0].numel()))
            elif name.endswith("weight"):
                param.copy_(1 + 0.1 * noise)
            else:
                param.copy_(0.1 * noise)


class _CountingOp:
    """Counts calls of the op's CPU kernel while installed."""

    def __init__(self) -> None:
        self.calls = 0

    def __enter__(self) -> _CountingOp:
        def counting(*args):
            self.calls += 1
            return ms_deform_attn_gather(*args)

        torch.library.register_kernel("detr_serve::ms_deform_attn", "cpu", counting)
        return self

    def __exit__(self, *exc: object) -> None:
        torch.library.register_kernel("detr_serve::ms_deform_attn", "cpu", ms_deform_attn_gather)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [("rt_detr", 2), ("rt_detr_v2", 2), ("d_fine", 2), ("deformable_detr", 3)],
)
def test_installed_op_keeps_model_outputs(kind, expected):
    model = _build(kind)
    patched = copy.deepcopy(model)
    assert install_msda(patched) == expected
    pixels = torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = model(pixel_values=pixels)
        with _CountingOp() as op:
            got = patched(pixel_values=pixels)
    assert op.calls == expected  # the op really ran, once per deformable attention
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.pred_boxes, want.pred_boxes, atol=1e-5, rtol=1e-5)
    assert install_msda(patched) == 0  # installing twice is harmless


def test_install_replaces_multiscale_deformable_attention_modules():
    model = _build("rt_detr")
    install_msda(model)
    attn = model.model.decoder.layers[0].encoder_attn.attn
    assert isinstance(attn, DeformableAttention)
    # The class itself is untouched: a model built later still runs transformers' code.
    fresh = _build("rt_detr")
    assert not isinstance(fresh.model.decoder.layers[0].encoder_attn.attn, DeformableAttention)


def test_discrete_sampling_is_left_to_transformers():
    model = _build("d_fine", decoder_method="discrete")
    patched = copy.deepcopy(model)
    install_msda(patched)
    pixels = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), _CountingOp() as op:
        got, want = patched(pixel_values=pixels), model(pixel_values=pixels)
    assert op.calls == 0
    torch.testing.assert_close(got.logits, want.logits, atol=0, rtol=0)


# --- the Triton kernel -----------------------------------------------------------------------
# Runs on a CUDA machine with triton installed; skipped here (no GPU in CI). The interpreter
# test runs wherever triton is importable (TRITON_INTERPRET=1 executes the kernel on the CPU).


@pytest.mark.skipif(not triton_available(), reason="needs CUDA and triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_kernel_matches_reference_on_cuda(dtype):
    from app.ops.msda_triton import ms_deform_attn_triton

    args = make_inputs(
        [(80, 80), (40, 40), (20, 20), (7, 13)], batch=2, queries=300, heads=8, dim=32
    )
    value, shapes, start, loc, weights = args
    exact = ms_deform_attn_reference(value.double(), shapes, start, loc.double(), weights.double())
    cuda = [t.cuda() for t in args]
    cuda[0], cuda[3], cuda[4] = cuda[0].to(dtype), cuda[3].to(dtype), cuda[4].to(dtype)
    got = ms_deform_attn_triton(*cuda)
    assert got.dtype == dtype
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    torch.testing.assert_close(got.double().cpu(), exact, atol=tolerance, rtol=tolerance)
    # The dispatcher picks the kernel on CUDA.
    torch.testing.assert_close(ms_deform_attn(*cuda), got)


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _triton_importable(), reason="triton is not installed")
def test_triton_kernel_in_interpreter_mode_matches_reference():
    script = (
        "import torch\n"
        "from tests.unit.test_msda_op import make_inputs\n"
        "from app.ops.msda import ms_deform_attn_reference as ref\n"
        "from app.ops.msda_triton import ms_deform_attn_triton as tri\n"
        "args = make_inputs([(7, 5), (3, 4)], batch=2, queries=6, heads=3, dim=5)\n"
        "torch.testing.assert_close(tri(*args), ref(*args), atol=1e-5, rtol=1e-5)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]
