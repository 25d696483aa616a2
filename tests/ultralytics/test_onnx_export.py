"""scripts/export_onnx.py on an Ultralytics checkpoint: one custom deformable-attention node per
MSDeformAttn, run by stock onnxruntime, with torch's outputs, and the onnx backend's detections
matching Ultralytics' predictor."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.engine.tasks import DetectionTask, ImageDetections
from tests.ultralytics.conftest import UltralyticsCase, rgb
from tests.ultralytics.test_engine_parity import assert_parity

DECODER_LAYERS = 6  # rtdetr-l.yaml: six decoder layers, one MSDeformAttn each


@pytest.fixture(scope="module")
def exported(ultralytics_case: UltralyticsCase, tmp_path_factory: pytest.TempPathFactory):
    from scripts.export_onnx import export_onnx

    output = tmp_path_factory.mktemp("ultralytics-onnx") / "rtdetr-l-random.onnx"
    summary = export_onnx(ultralytics_case.checkpoint, output, verify=True, log=lambda _: None)
    return output, summary


def test_export_has_the_custom_node_and_matches_torch(exported) -> None:
    output, summary = exported
    assert output.is_file()
    assert summary.custom_nodes == DECODER_LAYERS
    assert summary.input_size == (640, 640)
    assert summary.inputs == ["pixel_values"]
    assert summary.checks["onnxruntime batch 1, 3"] == "ok", summary.max_abs_diff
    assert max(summary.max_abs_diff.values()) <= 1e-3


def test_onnx_backend_matches_ultralytics_predict(
    exported, ultralytics_case: UltralyticsCase
) -> None:
    from app.engine.pipeline import Engine

    output: Path = exported[0]
    engine = Engine.load(
        ultralytics_case.checkpoint,
        name="rtdetr-l-random",
        device="cpu",
        backend="onnx",
        onnx_path=output,
    )
    assert engine.info.backend == "onnx"
    tasks = [DetectionTask(rgb(data), 0.25, 300) for data in ultralytics_case.images]
    results = engine.run_batch(tasks)
    for got, want in zip(results, ultralytics_case.references, strict=True):
        assert isinstance(got, ImageDetections), got
        assert_parity(got, want)


def test_default_export_lands_beside_the_checkpoint(ultralytics_case: UltralyticsCase) -> None:
    from app.export.cache import local_export, model_files

    checkpoint = ultralytics_case.checkpoint
    assert local_export(checkpoint) == checkpoint.with_name("rtdetr-l-random.onnx")
    assert local_export(checkpoint, "int8") == checkpoint.with_name("rtdetr-l-random.int8.onnx")
    assert model_files(checkpoint) == [checkpoint]
