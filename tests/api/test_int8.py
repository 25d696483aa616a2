"""The INT8 gate: `scripts/export_onnx.py --int8` on the default model gives a file that keeps
its mAP@0.5 within 0.01 of float32 (scripts/training/evaluate.py INT8_MAP50_TOLERANCE) on held-out
images, with its deformable attention left in float32; `--precision int8` then serves it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from app.config import DEFAULT_MODEL_NAME, REPO_MODELS_DIR, Settings
from app.engine.build import build_engines
from app.engine.pipeline import DetectionTask, Engine, ImageDetections
from scripts.training import evaluate
from scripts.training import synthetic_shapes as shapes

pytest.importorskip("onnxruntime")
DEFAULT_MODEL = REPO_MODELS_DIR / DEFAULT_MODEL_NAME
# Held-out images the gate is judged on (a few hundred objects; the full report uses 500 images).
GATE_IMAGES = 120

pytestmark = pytest.mark.skipif(
    not (DEFAULT_MODEL / "model.safetensors").is_file(), reason="no default model"
)


@pytest.fixture(scope="module")
def int8_cache(onnx_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model folder, cache) with the float32 and INT8 exports of the default model in the
    session's cache, made by the script users run."""
    from scripts.export_onnx import main as export_main

    model = tmp_path_factory.mktemp("int8") / DEFAULT_MODEL_NAME
    shutil.copytree(DEFAULT_MODEL, model, ignore=shutil.ignore_patterns("*.onnx"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert export_main([str(model), "--cache-dir", str(onnx_cache_dir), "--int8"]) == 0
    finally:
        torch.set_num_threads(threads)
    return model, onnx_cache_dir


def _detections(engine: Engine, samples: list[shapes.Sample]) -> list[list[dict]]:
    labels = engine.info.labels
    out: list[list[dict]] = []
    for start in range(0, len(samples), 8):
        chunk = samples[start : start + 8]
        tasks = [DetectionTask(np.asarray(s.image), 0.01, 100) for s in chunk]
        for result in engine.run_batch(tasks):
            assert isinstance(result, ImageDetections)
            out.append(
                [
                    {"label": labels[int(label)], "score": float(score), "box": box.tolist()}
                    for score, label, box in zip(
                        result.scores, result.labels, result.boxes, strict=True
                    )
                ]
            )
    return out


def test_int8_keeps_map50_within_the_gate_and_attention_in_float(int8_cache):
    import onnx

    from app.export.cache import FILE_NAMES, find_export
    from app.export.quantize import module_of

    model, cache = int8_cache
    float_file = find_export(model, cache, "float32")
    int8_file = find_export(model, cache, "int8")
    assert float_file is not None and int8_file is not None
    assert int8_file.path.name == FILE_NAMES["int8"]

    quantized = onnx.load(str(int8_file.path))
    ops = {n.op_type for n in quantized.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    msda = [n for n in quantized.graph.node if n.domain == "detr_serve"]
    assert msda, "the deformable-attention nodes are gone"
    # Their function body is the float32 one: no quantization inside it.
    (body,) = [f for f in quantized.functions if f.domain == "detr_serve"]
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in body.node}
    produced_by = {o: n for n in quantized.graph.node for o in n.output}
    for node in msda:
        for name in node.input:
            producer = produced_by.get(name)
            assert producer is None or producer.op_type != "QuantizeLinear", node.name
    # The backbone and encoder are quantized; the decoder's products stay float32.
    decoder = [n for n in quantized.graph.node if module_of(n) == "decoder"]
    products = [n for n in decoder if n.op_type in ("MatMul", "Gemm", "Conv")]
    assert products, "no decoder node recorded"
    for node in products:
        fed = {produced_by[i].op_type for i in node.input if i in produced_by}
        assert "DequantizeLinear" not in fed, node.name
    backbone_convs = [
        n for n in quantized.graph.node if module_of(n) == "backbone" and n.op_type == "Conv"
    ]
    assert backbone_convs and all(
        produced_by[n.input[1]].op_type == "DequantizeLinear" for n in backbone_convs
    )

    coco_gt, samples = shapes.coco_dataset(shapes.HELDOUT_SEED, GATE_IMAGES)
    columns = {}
    for name, found in (("float32", float_file), ("int8", int8_file)):
        engine = Engine.load(model, name="m", device="cpu", backend="onnx", onnx_path=found.path)
        columns[name] = evaluate.coco_map(coco_gt, _detections(engine, samples))
    passes, drop = evaluate.int8_gate(columns["float32"], columns["int8"])
    assert columns["float32"]["mAP50"] > 0.8, columns  # the comparison means something
    assert passes, f"INT8 loses {drop:.4f} mAP@0.5 (> {evaluate.INT8_MAP50_TOLERANCE}): {columns}"


def test_precision_int8_serves_the_quantized_file(int8_cache):
    model, cache = int8_cache
    settings = Settings(
        model=model, device="cpu", precision="int8", onnx_cache_dir=cache, torch_threads=1
    )
    (engine,) = build_engines(settings)
    assert engine.info.backend == "onnx" and engine.info.dtype == "int8"
    assert "INT8 model" in engine.info.backend_reason
    assert "model.int8.onnx" in engine.info.backend_reason


def test_profile_attributes_the_int8_models_time_to_the_detectors_parts(int8_cache):
    """scripts/bench/profile_onnx.py (README, "Where INT8's time goes") names the part of the
    detector each kernel ran for: the backbone's convolutions in INT8, the deformable attention's
    inlined function body, the decoder in float32, and next to nothing left unattributed."""
    from app.export.cache import find_export
    from scripts.bench import profile_onnx

    model, cache = int8_cache
    found = {p: find_export(model, cache, p) for p in ("float32", "int8")}
    assert None not in found.values()
    prof = {p: profile_onnx.profile(f.path, 1, 1, 1) for p, f in found.items()}  # type: ignore[union-attr]
    for precision, figures in prof.items():
        parts, total = figures["by_part"], sum(figures["by_part"].values())
        assert {"backbone", "encoder", "decoder", profile_onnx.MSDA_BODY} <= set(parts), parts
        assert parts.get("other", 0.0) < 0.1 * total, (precision, parts)
    assert "QLinearConv" in prof["int8"]["by_op"] and "QLinearConv" not in prof["float32"]["by_op"]
    assert "Conv" in prof["float32"]["by_op"]
    rows = profile_onnx.throughput([f.path for f in found.values()], [1], 1, 1)  # type: ignore[union-attr]
    assert [r["batch"] for r in rows] == [1, 1] and all(r["cpu_ms_per_image"] > 0 for r in rows)
