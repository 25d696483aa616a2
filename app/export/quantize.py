"""Static INT8 quantization of an exported model with onnxruntime's quantization tooling.

What is quantized: the CNN backbone, the hybrid encoder and the projections between them (every
op onnxruntime can quantize there: convolutions, matrix products, adds, pooling...; QDQ format,
unsigned 8-bit activations with calibrated min/max ranges, signed 8-bit weights per output
channel), which is where most of an RT-DETR's CPU time goes. What stays float32: the decoder and
the detection heads, and so each multi-scale deformable attention node
(``detr_serve::MultiscaleDeformableAttnPlugin_TRT``) with its function body: the quantizer only
rewrites the main-graph nodes it is given, so the node receives float inputs and its GridSample
sampling runs exactly as in the float model. On the default model, quantizing every
node instead was as fast but lost 0.07 mAP@[.5:.95] (box edges), and Conv/MatMul alone gained
only ~1.1x (README, "INT8"); adding the encoder-output heads, the decoder's matrix products,
QOperator format or onnxruntime's pre-processing measured no faster (README, "Where INT8's time
goes": the float32 parts left are the deformable-attention sampling and the decoder's small ops,
which do not gain from INT8 here). Nodes are told apart by the module scope torch.onnx records in
their metadata. The calibration images are the caller's (scripts/export_onnx.py --int8 generates
them with scripts/training/synthetic_shapes.py).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from app.export.onnx_export import written_atomically

logger = logging.getLogger(__name__)

# The modules (transformers' names under the detector's `model`) whose nodes are quantized when
# `scopes` is given: the CNN backbone, the hybrid encoder and the projections between them.
BACKBONE_AND_ENCODER = ("backbone", "encoder", "encoder_input_proj", "decoder_input_proj")
_SCOPE = re.compile(r"'model\.model\.([A-Za-z_]+)")


def module_of(node: Any) -> str | None:
    """The top module under the detector a node was exported from (torch.onnx's name scopes in
    the node's metadata), e.g. "backbone", "decoder"; None when the export did not record it."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            match = _SCOPE.search(prop.value)
            return match.group(1) if match else None
    return None


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over model inputs computed on demand."""

    def __init__(self, feeds: Iterable[dict[str, np.ndarray]]) -> None:
        self._feeds: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:  # onnxruntime >= 1.17 may iterate
        return self._feeds


def quantize_int8(
    source: Path,
    output: Path,
    calibration: Iterable[dict[str, np.ndarray]],
    *,
    metadata: dict[str, str] | None = None,
    op_types: tuple[str, ...] | None = None,
    scopes: tuple[str, ...] | None = BACKBONE_AND_ENCODER,
    log: Callable[[str], None] = print,
) -> Path:
    """Write ``output``: ``source`` (a float32 export) statically quantized, its activation
    ranges calibrated (min/max) on the ``calibration`` feeds (``{"pixel_values": ...}`` batches
    as the served model receives them). ``scopes``: the modules whose nodes are quantized (None:
    the whole graph); ``op_types``: the op types quantized (None: all onnxruntime can).
    ``metadata`` is added to the file's metadata."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = onnx.load(str(source))
    msda_nodes = [n.name for n in model.graph.node if n.domain.startswith("detr_serve")]
    chosen: list[str] | None = None
    if scopes is not None:
        chosen = [n.name for n in model.graph.node if module_of(n) in scopes]
        if not chosen:
            raise ValueError(f"{source} records no module of {scopes} in its nodes' metadata")
        log(f"quantizing the {len(chosen)} nodes of {', '.join(scopes)}; the rest stays float")
    which = ", ".join(op_types or ["every quantizable op"])
    log(
        f"quantizing {source.name}: {which} to INT8 (QDQ, per-channel weights); "
        f"{len(msda_nodes)} deformable-attention nodes and their function body stay float32"
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    with written_atomically(output) as temporary:
        quantize_static(
            str(source),
            str(temporary),
            _Reader(calibration),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=list(op_types) if op_types else None,
            nodes_to_quantize=chosen,
            nodes_to_exclude=msda_nodes,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
        quantized = onnx.load(str(temporary))
        keep = {p.key: p.value for p in model.metadata_props}
        keep.update(metadata or {})
        onnx.helper.set_model_props(quantized, keep)
        onnx.save_model(quantized, str(temporary))
    log(f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB)")
    return output
