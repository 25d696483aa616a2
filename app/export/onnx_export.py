"""Export a checkpoint to ONNX: MODEL_DIR -> model.onnx (an Ultralytics x.pt -> x.onnx), for the
onnx backend.

Used by the server at start-up (app/export/cache.py: exported once into the cache, reused) and by
``scripts/export_onnx.py`` (by hand, and in the Docker build). The graph has a dynamic batch
dimension and a fixed image size (the image processor's size, or its pad_size). Each multi-scale
deformable attention is ONE node ``detr_serve::MultiscaleDeformableAttnPlugin_TRT`` carrying an
ONNX function body of standard ops, so stock onnxruntime runs the file and a runtime with a fused
kernel can claim the node (README, "Deformable attention op and ONNX"). The file is written to a
temporary name beside its destination, checked (onnx.checker with strict shape inference) and,
with ``verify``, run in onnxruntime at batch 1 and 3 against eager PyTorch, then renamed into
place: a reader never sees half a file, and two processes exporting at once both leave a whole one.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from app.engine.preprocess_spec import FixedSize, PreprocessSpec
from app.export.cache import local_export, sha256_file
from app.ops.msda import ONNX_DOMAIN, ONNX_OP_TYPE
from app.ops.onnx_function import add_msda_function
from app.ops.patch import install_msda

DEFAULT_OPSET = 20
WEIGHTS_FILE = "model.safetensors"
# Metadata keys the ONNX backend reads back.
META_WEIGHTS_SHA256 = "detr_serve.weights_sha256"
META_INPUT_SIZE = "detr_serve.input_size"
_CHECK_SWITCH = "TRANSFORMERS_DISABLE_TORCH_CHECK"


@dataclass
class ExportSummary:
    path: Path
    opset: int
    nodes: int
    custom_nodes: int
    functions: list[str]
    size_bytes: int
    input_size: tuple[int, int]
    inputs: list[str]
    seconds: float
    checks: dict[str, str] = field(default_factory=dict)
    max_abs_diff: dict[str, float] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = [
            f"wrote {self.path} ({self.size_bytes / 1e6:.1f} MB) in {self.seconds:.1f} s",
            f"  opset {self.opset}, {self.nodes} nodes, {self.custom_nodes} x "
            f"{ONNX_DOMAIN}::{ONNX_OP_TYPE} (functions: {', '.join(self.functions) or 'none'})",
            f"  inputs {', '.join(self.inputs)}: [batch, 3, {self.input_size[0]}, "
            f"{self.input_size[1]}], batch dynamic",
        ]
        out += [f"  check {name}: {result}" for name, result in self.checks.items()]
        out += [f"  max |onnxruntime - torch| {k}: {v:.2e}" for k, v in self.max_abs_diff.items()]
        return out


class _Detector(torch.nn.Module):
    """The transformers model with plain tensor inputs and outputs, as the exporter wants."""

    def __init__(self, model: torch.nn.Module, with_mask: bool) -> None:
        super().__init__()
        self.model = model
        self.with_mask = with_mask

    def forward(
        self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        kwargs: dict[str, Any] = {"pixel_values": pixel_values}
        if self.with_mask:
            kwargs["pixel_mask"] = pixel_mask
        out = self.model(**kwargs)
        return out.logits, out.pred_boxes


def _tensor_len(obj: Any) -> Any:
    # len(tensor) returns a Python int and so pins a dynamic batch to the example's size.
    return obj.shape[0] if isinstance(obj, torch.Tensor) else builtins.len(obj)


@contextlib.contextmanager
def symbolic_len(model: torch.nn.Module) -> Iterator[None]:
    """While exporting, let ``len(tensor)`` in transformers' modeling code stay symbolic.

    RT-DETR's forward takes ``batch_size = len(source_flatten)``; a module-level ``len`` in the
    modeling modules of ``model`` (removed afterwards) returns ``tensor.shape[0]`` instead, the
    same value in eager mode and a SymInt under torch.export.
    """
    modules = {
        sys.modules[type(m).__module__]
        for m in model.modules()
        if type(m).__module__.startswith("transformers.models.")
    }
    patched = [mod for mod in modules if "len" not in vars(mod)]
    for mod in patched:
        mod.len = _tensor_len  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for mod in patched:
            del mod.len


@contextlib.contextmanager
def no_runtime_checks() -> Iterator[None]:
    """transformers' torch_compilable_check becomes aten._is_all_true when traced, which the
    ONNX exporter cannot translate (RT-DETRv2, D-FINE); transformers' own switch turns it off."""
    previous = os.environ.get(_CHECK_SWITCH)
    os.environ[_CHECK_SWITCH] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[_CHECK_SWITCH]
        else:
            os.environ[_CHECK_SWITCH] = previous


def input_size(spec: PreprocessSpec) -> tuple[int, int]:
    if spec.do_pad and spec.pad_size is not None:
        return spec.pad_size
    if isinstance(spec.resize, FixedSize):
        return spec.resize.height, spec.resize.width
    raise ValueError(
        "ONNX export needs a fixed input size: the image processor resizes to a fixed "
        '{"height", "width"} or pads to pad_size; set pad_size in preprocessor_config.json'
    )


def export_onnx(
    model_dir: Path,
    output: Path | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    verify: bool = True,
    optimize: bool = True,
    log: Any = print,
    metadata: dict[str, str] | None = None,
) -> ExportSummary:
    """Write ``output`` (default MODEL_DIR/model.onnx) atomically; ``metadata`` is added to the
    file's metadata (the cache's key, app/export/cache.py)."""
    import onnx

    started = time.perf_counter()
    model_dir = Path(model_dir)
    output = Path(output) if output is not None else local_export(model_dir)
    spec = PreprocessSpec.for_model(model_dir)
    height, width = input_size(spec)
    log(f"[1/4] loading {model_dir} (float32, CPU), input [batch, 3, {height}, {width}]")
    model = _load_float32(model_dir, height, width)
    replaced = install_msda(model)
    if not replaced:
        log("  warning: no deformable attention found; the graph has no MSDA node")
    detector = _Detector(model, with_mask=spec.do_pad).eval()
    example: tuple[torch.Tensor, ...] = (torch.rand(2, 3, height, width),)
    batch = torch.export.Dim("batch", min=1, max=4096)
    dynamic: tuple[dict[int, Any], ...] = ({0: batch},)
    names = ["pixel_values"]
    if spec.do_pad:
        example += (torch.ones(2, height, width, dtype=torch.int64),)
        dynamic += ({0: batch},)
        names.append("pixel_mask")

    log(f"[2/4] exporting with torch.onnx (dynamo), opset {opset}, {replaced} MSDA modules")
    with torch.inference_mode(False), torch.no_grad(), symbolic_len(model), no_runtime_checks():
        program = torch.onnx.export(
            detector,
            example,
            dynamo=True,
            dynamic_shapes=dynamic,
            input_names=names,
            output_names=["logits", "pred_boxes"],
            opset_version=opset,
            optimize=optimize,
            verbose=False,
        )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no ONNX program")
    proto = program.model_proto
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    if batch_dim.HasField("dim_value"):
        raise RuntimeError(
            f"the exported batch dimension is fixed to {batch_dim.dim_value}: some model code "
            "turned the batch size into a Python int"
        )
    custom = add_msda_function(proto)
    meta = {META_INPUT_SIZE: f"{height}x{width}"}
    weights = model_dir / WEIGHTS_FILE
    if weights.is_file():
        meta[META_WEIGHTS_SHA256] = sha256_file(weights)
    meta.update(metadata or {})
    onnx.helper.set_model_props(proto, meta)
    output.parent.mkdir(parents=True, exist_ok=True)
    with written_atomically(output) as temporary:
        onnx.save_model(proto, temporary)
        summary = _check(temporary, proto, custom, (height, width), names, opset, log)
        if verify:
            log("[4/4] running onnxruntime at batch 1 and 3 against eager PyTorch")
            summary.max_abs_diff = _verify(temporary, model, spec.do_pad, (height, width))
            worst = max(summary.max_abs_diff.values())
            summary.checks["onnxruntime batch 1, 3"] = (
                "ok"
                if worst <= 1e-3
                else (
                    f"DIFFERS by {worst:.2g}: a trained model agrees to ~1e-5; a randomly "
                    "initialised one can tie in its query selection, and top-k among ties is "
                    "implementation-defined"
                )
            )
        else:
            log("[4/4] onnxruntime check skipped (--no-verify)")
    summary.path = output
    summary.seconds = time.perf_counter() - started
    return summary


def _load_float32(model_dir: Path, height: int, width: int) -> torch.nn.Module:
    """The model in float32 on the CPU: a transformers folder, or an Ultralytics checkpoint
    wrapped to give logits and pred_boxes like one (app/backends/ultralytics.py)."""
    from transformers import AutoModelForObjectDetection

    from app.models.ultralytics import probe

    checkpoint = probe(model_dir)
    if checkpoint is None:
        return AutoModelForObjectDetection.from_pretrained(model_dir, dtype=torch.float32).eval()
    from app.backends.ultralytics import UltralyticsDetector, load_module, warm_anchors

    detector = UltralyticsDetector(load_module(checkpoint, torch.device("cpu"))).eval()
    warm_anchors(detector, height, width)
    return detector


@contextlib.contextmanager
def written_atomically(output: Path) -> Iterator[Path]:
    """A temporary path beside ``output`` (same file system) to write; renamed to ``output`` when
    the block succeeds, removed when it fails."""
    temporary = output.with_name(f".{output.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        yield temporary
        os.replace(temporary, output)
    finally:
        temporary.unlink(missing_ok=True)


def _check(
    path: Path,
    proto: Any,
    custom: int,
    size: tuple[int, int],
    names: list[str],
    opset: int,
    log: Any,
) -> ExportSummary:
    import onnx

    log("[3/4] checking the file (onnx.checker, strict shape inference)")
    checks: dict[str, str] = {}
    onnx.checker.check_model(str(path), full_check=True)
    checks["onnx.checker (full)"] = "ok"
    inferred = onnx.shape_inference.infer_shapes(onnx.load(path), strict_mode=True)
    shapes = {
        o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
        for o in inferred.graph.output
    }
    checks["shape inference"] = ", ".join(f"{k} {v}" for k, v in shapes.items())
    return ExportSummary(
        path=path,
        opset=opset,
        nodes=len(proto.graph.node),
        custom_nodes=custom,
        functions=[f"{f.domain}::{f.name}" for f in proto.functions],
        size_bytes=path.stat().st_size,
        input_size=size,
        inputs=names,
        seconds=0.0,
        checks=checks,
    )


def _verify(
    path: Path, model: torch.nn.Module, with_mask: bool, size: tuple[int, int]
) -> dict[str, float]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = {"logits": 0.0, "pred_boxes": 0.0}
    generator = torch.Generator().manual_seed(0)
    for batch in (1, 3):
        pixels = torch.rand(batch, 3, *size, generator=generator)
        feeds = {"pixel_values": pixels.numpy()}
        kwargs: dict[str, Any] = {"pixel_values": pixels}
        if with_mask:
            mask = torch.ones(batch, *size, dtype=torch.int64)
            feeds["pixel_mask"] = mask.numpy()
            kwargs["pixel_mask"] = mask
        logits, boxes = session.run(["logits", "pred_boxes"], feeds)
        with torch.inference_mode():
            ref = model(**kwargs)
        for name, got, want in (
            ("logits", logits, ref.logits),
            ("pred_boxes", boxes, ref.pred_boxes),
        ):
            if got.shape != tuple(want.shape):
                raise RuntimeError(f"{name}: onnxruntime gave {got.shape}, torch {want.shape}")
            worst[name] = max(worst[name], float((torch.from_numpy(got) - want).abs().max()))
    return worst
