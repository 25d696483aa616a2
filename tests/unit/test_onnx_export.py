"""ONNX export: one custom MSDA node with a standard-op body, dynamic batch, parity with torch."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from app.engine.preprocess_spec import PreprocessSpec, ShortestEdge
from app.ops.msda import ONNX_DOMAIN, ONNX_OP_TYPE, ms_deform_attn_reference
from tests.conftest import build_tiny_checkpoint
from tests.unit.test_msda_op import spread_weights

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@functools.cache
def exported_tiny_checkpoint(root: Path) -> Path:
    """conftest's tiny RT-DETR with spread weights, exported once per test session."""
    from transformers import AutoModelForObjectDetection

    from scripts.export_onnx import export_onnx

    folder = root / "tiny-onnx"
    if folder.exists():
        shutil.rmtree(folder)
    build_tiny_checkpoint(folder)
    model = AutoModelForObjectDetection.from_pretrained(folder)
    spread_weights(model)
    model.save_pretrained(folder)
    export_onnx(folder, verify=False, log=lambda *_: None)
    return folder


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def onnx_tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return exported_tiny_checkpoint(tmp_path_factory.getbasetemp())
    finally:
        torch.set_num_threads(threads)


def _single_node_model(
    value_dtype: int = 1, opset: int = 20, levels: int | str = 2
) -> onnx.ModelProto:
    """One MSDA node over two levels (7x5 and 3x4), 3 heads of 5 channels, 3 points; ``levels``
    a string makes the level count symbolic."""
    from onnx import TensorProto, helper

    from app.ops.onnx_function import INPUTS, add_msda_function

    float_type = value_dtype
    inputs = [
        helper.make_tensor_value_info("value", float_type, ["N", "S", 3, 5]),
        helper.make_tensor_value_info("spatial_shapes", TensorProto.INT32, [levels, 2]),
        helper.make_tensor_value_info("level_start_index", TensorProto.INT32, [levels]),
        helper.make_tensor_value_info(
            "sampling_locations", float_type, ["N", "Q", 3, levels, 3, 2]
        ),
        helper.make_tensor_value_info("attention_weights", float_type, ["N", "Q", 3, levels, 3]),
    ]
    node = helper.make_node(ONNX_OP_TYPE, INPUTS, ["out"], domain=ONNX_DOMAIN)
    output = helper.make_tensor_value_info("out", float_type, ["N", "Q", 3, 5])
    graph = helper.make_graph([node], "msda", inputs, [output])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    assert add_msda_function(model) == 1
    return model


@pytest.mark.parametrize(("batch", "opset"), [(1, 20), (3, 20), (2, 17)])
def test_function_body_matches_grid_sample_in_onnxruntime(batch, opset):
    # GridSample-20 names bilinear "linear"; opsets 16 to 19 name it "bilinear".
    model = _single_node_model(opset=opset)
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(batch)
    shapes, start = torch.tensor([[7, 5], [3, 4]]), torch.tensor([0, 35])
    value = torch.randn(batch, 47, 3, 5, generator=gen)
    loc = torch.rand(batch, 6, 3, 2, 3, 2, generator=gen) * 1.4 - 0.2  # some points outside
    loc[0, 0, 0, 0] = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.1, 0.5]])  # edges, centres
    weights = torch.rand(batch, 6, 3, 2, 3, generator=gen)
    (got,) = session.run(
        None,
        {
            "value": value.numpy(),
            "spatial_shapes": shapes.int().numpy(),
            "level_start_index": start.int().numpy(),
            "sampling_locations": loc.numpy(),
            "attention_weights": weights.numpy(),
        },
    )
    want = ms_deform_attn_reference(value, shapes, start, loc, weights).view(batch, 6, 3, 5)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=1e-5)


def test_function_body_unrolls_one_grid_sample_per_level():
    model = _single_node_model()
    (function,) = model.functions
    assert [n.op_type for n in function.node].count("GridSample") == 2


def test_function_needs_a_static_level_count():
    from app.ops.onnx_function import level_count

    with pytest.raises(ValueError, match="number of feature levels is not static"):
        _single_node_model(levels="L")
    assert level_count(_single_node_model()) == 2


def test_function_needs_opset_16():
    from app.ops.onnx_function import msda_function

    with pytest.raises(ValueError, match="opset >= 16"):
        msda_function(15, 2)


def test_function_body_runs_float16_values():
    from onnx import TensorProto

    model = _single_node_model(TensorProto.FLOAT16)
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(0)
    value = torch.randn(2, 47, 3, 5, generator=gen).half()
    loc = torch.rand(2, 6, 3, 2, 3, 2, generator=gen).half()
    weights = torch.rand(2, 6, 3, 2, 3, generator=gen).half()
    shapes, start = torch.tensor([[7, 5], [3, 4]]), torch.tensor([0, 35])
    (got,) = session.run(
        None,
        {
            "value": value.numpy(),
            "spatial_shapes": shapes.int().numpy(),
            "level_start_index": start.int().numpy(),
            "sampling_locations": loc.numpy(),
            "attention_weights": weights.numpy(),
        },
    )
    assert got.dtype == np.float16
    want = ms_deform_attn_reference(value.double(), shapes, start, loc.double(), weights.double())
    np.testing.assert_allclose(got.astype(np.float64), want.view(2, 6, 3, 5), atol=3e-3, rtol=3e-3)


def test_export_writes_one_custom_node_per_deformable_attention(onnx_tiny_dir):
    model = onnx.load(onnx_tiny_dir / "model.onnx")
    onnx.checker.check_model(model, full_check=True)
    custom = [n for n in model.graph.node if n.domain == ONNX_DOMAIN]
    assert [n.op_type for n in custom] == [ONNX_OP_TYPE]  # the tiny model has one decoder layer
    assert {(f.domain, f.name) for f in model.functions} == {(ONNX_DOMAIN, ONNX_OP_TYPE)}
    assert any(o.domain == ONNX_DOMAIN for o in model.opset_import)
    # TensorRT's plugin input order and types: shapes and start index as int32.
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    types = {
        v.name: v.type.tensor_type for v in [*inferred.graph.value_info, *inferred.graph.input]
    }
    node_inputs = [types[name] for name in custom[0].input]
    assert [t.elem_type for t in node_inputs] == [1, 6, 6, 1, 1]
    assert [len(t.shape.dim) for t in node_inputs] == [4, 2, 1, 6, 5]
    # The batch stays symbolic through the graph.
    for output in inferred.graph.output:
        assert output.type.tensor_type.shape.dim[0].dim_param == "batch"
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["detr_serve.input_size"] == "128x128"
    assert len(meta["detr_serve.weights_sha256"]) == 64


@pytest.mark.parametrize("batch", [1, 3])
def test_exported_model_matches_torch_in_onnxruntime(onnx_tiny_dir, one_thread, batch):
    from transformers import AutoModelForObjectDetection

    session = ort.InferenceSession(
        str(onnx_tiny_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    model = AutoModelForObjectDetection.from_pretrained(onnx_tiny_dir).eval()
    pixels = torch.rand(batch, 3, 128, 128, generator=torch.Generator().manual_seed(batch))
    logits, boxes = session.run(["logits", "pred_boxes"], {"pixel_values": pixels.numpy()})
    with torch.inference_mode():
        want = model(pixel_values=pixels)  # transformers' own code, not our op
    np.testing.assert_allclose(logits, want.logits.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(boxes, want.pred_boxes.numpy(), atol=1e-4, rtol=1e-4)


def test_export_refuses_a_model_without_a_fixed_input_size():
    from scripts.export_onnx import input_size

    spec = PreprocessSpec(resize=ShortestEdge(800, 1333), do_pad=True)
    with pytest.raises(ValueError, match="fixed input size"):
        input_size(spec)
    assert input_size(
        PreprocessSpec(resize=ShortestEdge(800, 1333), do_pad=True, pad_size=(64, 96))
    ) == (64, 96)


def test_symbolic_len_is_removed_after_export():
    import transformers.models.rt_detr.modeling_rt_detr as rt_detr

    from scripts.export_onnx import symbolic_len

    holder = torch.nn.Sequential(rt_detr.RTDetrFrozenBatchNorm2d(4))
    with symbolic_len(holder):
        assert rt_detr.len(torch.zeros(4, 2)) == 4
        assert rt_detr.len([1, 2]) == 2
    assert "len" not in vars(rt_detr)
