"""The ONNX form of the MSDA op: one node in our domain plus a function body of standard ops.

During ``torch.onnx.export`` the op becomes one ``detr_serve::MultiscaleDeformableAttnPlugin_TRT``
node (app/ops/msda.py). :func:`add_msda_function` then attaches the body below to the model as a
model-local function, so stock onnxruntime runs the file (it inlines functions no kernel claims)
while a runtime with a fused kernel, such as TensorRT's plugin, can claim the node instead.

The body is a gather-based bilinear sampler (four corner rows per point, zero weight outside the
map, a weighted sum), not GridSample: no per-level loop, any number of levels, float32
arithmetic whatever the value dtype. Inputs and output follow the TensorRT plugin: value
[N, S, M, D], spatial_shapes [L, 2] int32, level_start_index [L] int32, sampling_locations
[N, Lq, M, L, P, 2], attention_weights [N, Lq, M, L, P] -> [N, Lq, M, D].

Imports onnx: only the exporter (scripts/export_onnx.py) and tests use this module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from app.ops.msda import ONNX_DOMAIN, ONNX_OP_TYPE, ONNX_OP_VERSION

if TYPE_CHECKING:
    import onnx

INPUTS = ["value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights"]
OUTPUT = "output"


def msda_function(opset: int) -> onnx.FunctionProto:
    """The function body, written against the default domain at ``opset`` (>= 15)."""
    from onnx import TensorProto, helper, numpy_helper

    if opset < 15:
        raise ValueError(f"the MSDA function needs opset >= 15 (CastLike); got {opset}")
    nodes: list[onnx.NodeProto] = []

    def const(name: str, value: object, dtype: type = np.int64) -> str:
        tensor = numpy_helper.from_array(np.asarray(value, dtype=dtype), name)
        nodes.append(helper.make_node("Constant", [], [name], value=tensor))
        return name

    def op(kind: str, inputs: list[str], output: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(kind, inputs, [output], **attrs))
        return output

    f32 = TensorProto.FLOAT
    i64 = TensorProto.INT64
    zero, one, two = const("c0", 0), const("c1", 1), const("c2", 2)
    const("ax1", [1])
    const("ax3", [3])
    const("ax_last", [-1])
    const("shape_nm", [-1, 1, 1, 1, 1, 1])
    const("shape_m", [1, 1, -1, 1, 1, 1])
    const("shape_rows_head", [0, 0, 0, -1])
    const("shape_w", [0, 0, 0, 1, -1])
    fzero, fone = const("f0", 0.0, np.float32), const("f1", 1.0, np.float32)
    fminus2 = const("fm2", -2.0, np.float32)
    ftwo = const("f2", 2.0, np.float32)

    # Per-level sizes as [L, 1]: they broadcast against [N, Lq, M, L, P].
    op("Cast", ["spatial_shapes"], "shapes", to=i64)
    op("Cast", ["level_start_index"], "start64", to=i64)
    op("Unsqueeze", [op("Gather", ["shapes", zero], "h_l", axis=1), "ax1"], "h")
    op("Unsqueeze", [op("Gather", ["shapes", one], "w_l", axis=1), "ax1"], "w")
    op("Unsqueeze", ["start64", "ax1"], "start")
    op("Cast", ["h"], "hf", to=f32)
    op("Cast", ["w"], "wf", to=f32)

    # grid_sample arithmetic (align_corners=False): g = 2*loc - 1, pixel = ((g + 1)*size - 1)/2,
    # clamped to [-2, size + 1] so that far points keep all corners outside the map.
    op("Cast", ["sampling_locations"], "loc", to=f32)
    op("Cast", ["attention_weights"], "attn", to=f32)
    for axis, (coord, size) in enumerate((("x", "wf"), ("y", "hf"))):
        op("Gather", ["loc", const(f"i{coord}", axis)], f"{coord}_loc", axis=-1)
        op("Sub", [op("Mul", [f"{coord}_loc", ftwo], f"{coord}_2"), fone], f"{coord}_g")
        op("Mul", [op("Add", [f"{coord}_g", fone], f"{coord}_g1"), size], f"{coord}_s")
        op("Div", [op("Sub", [f"{coord}_s", fone], f"{coord}_s1"), ftwo], f"{coord}_raw")
        op("Max", [f"{coord}_raw", fminus2], f"{coord}_lo")
        op("Min", [f"{coord}_lo", op("Add", [size, fone], f"{coord}_hi")], f"i{coord}f")
        op("Floor", [f"i{coord}f"], f"{coord}0f")
        op("Sub", [f"i{coord}f", f"{coord}0f"], f"f{coord}")  # weight of the far corner
        op("Sub", [fone, f"f{coord}"], f"g{coord}")  # weight of the near corner
        op("Cast", [f"{coord}0f"], f"{coord}0", to=i64)
        op("Add", [f"{coord}0", one], f"{coord}1")

    positions, weights = [], []
    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
        c = f"{dx}{dy}"
        xs, ys = f"x{dx}", f"y{dy}"
        op("GreaterOrEqual", [xs, zero], f"xok0_{c}")
        op("Less", [xs, "w"], f"xok1_{c}")
        op("GreaterOrEqual", [ys, zero], f"yok0_{c}")
        op("Less", [ys, "h"], f"yok1_{c}")
        op("And", [f"xok0_{c}", f"xok1_{c}"], f"xok_{c}")
        op("And", [f"yok0_{c}", f"yok1_{c}"], f"yok_{c}")
        op("And", [f"xok_{c}", f"yok_{c}"], f"ok_{c}")
        op("Mul", [ys, "w"], f"yw_{c}")
        op("Add", [op("Add", ["start", f"yw_{c}"], f"sy_{c}"), xs], f"pos_raw_{c}")
        op("Where", [f"ok_{c}", f"pos_raw_{c}", zero], f"pos_{c}")
        wx = "fx" if dx else "gx"
        wy = "fy" if dy else "gy"
        op("Mul", [op("Mul", [wx, wy], f"wxy_{c}"), "attn"], f"w_raw_{c}")
        op("Where", [f"ok_{c}", f"w_raw_{c}", fzero], f"w_{c}")
        positions.append(op("Unsqueeze", [f"pos_{c}", "ax_last"], f"pos_u_{c}"))
        weights.append(op("Unsqueeze", [f"w_{c}", "ax_last"], f"w_u_{c}"))
    op("Concat", positions, "pos", axis=-1)  # [N, Lq, M, L, P, 4]
    op("Concat", weights, "wts", axis=-1)

    # Row of value viewed as [N*S*M, D]: (n*S + s)*M + m.
    op("Shape", ["value"], "vshape")
    n_dim = op("Gather", ["vshape", zero], "n_dim")
    s_dim = op("Gather", ["vshape", one], "s_dim")
    m_dim = op("Gather", ["vshape", two], "m_dim")
    op("Slice", ["vshape", const("s3", [3]), const("s4", [4])], "d_dim")
    op("Reshape", [op("Range", [zero, n_dim, one], "n_range"), "shape_nm"], "n_idx")
    op("Reshape", [op("Range", [zero, m_dim, one], "m_range"), "shape_m"], "m_idx")
    op("Mul", ["n_idx", s_dim], "n_s")
    op("Mul", [op("Add", ["n_s", "pos"], "ns_pos"), m_dim], "ns_pos_m")
    op("Add", ["ns_pos_m", "m_idx"], "rows")  # [N, Lq, M, L, P, 4]
    op("Concat", [const("minus1", [-1]), "d_dim"], "table_shape", axis=0)
    op("Reshape", ["value", "table_shape"], "table")
    op("Reshape", ["rows", "shape_rows_head"], "rows_k")  # [N, Lq, M, K]
    op("Cast", [op("Gather", ["table", "rows_k"], "picked", axis=0)], "picked_f", to=f32)
    op("Reshape", ["wts", "shape_w"], "wts_k")  # [N, Lq, M, 1, K]
    op("MatMul", ["wts_k", "picked_f"], "summed")  # [N, Lq, M, 1, D], float32 accumulation
    op("Squeeze", ["summed", "ax3"], "out_f")
    op("CastLike", ["out_f", "value"], OUTPUT)

    return helper.make_function(
        ONNX_DOMAIN,
        ONNX_OP_TYPE,
        INPUTS,
        [OUTPUT],
        nodes,
        opset_imports=[helper.make_opsetid("", opset)],
    )


def add_msda_function(model: onnx.ModelProto) -> int:
    """Attach the MSDA function to ``model`` (idempotent); returns how many nodes use it."""
    from onnx import helper

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise ValueError("the model imports no default-domain opset")
    uses = sum(
        1
        for node in _all_nodes(model)
        if (node.domain, node.op_type) == (ONNX_DOMAIN, ONNX_OP_TYPE)
    )
    known = {(f.domain, f.name) for f in model.functions}
    if uses and (ONNX_DOMAIN, ONNX_OP_TYPE) not in known:
        model.functions.append(msda_function(opset))
    if uses and all(o.domain != ONNX_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(ONNX_DOMAIN, ONNX_OP_VERSION))
    return uses


def _all_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    nodes = list(model.graph.node)
    for function in model.functions:
        nodes.extend(function.node)
    return nodes
