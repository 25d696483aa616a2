"""scripts/export_onnx.py on an Ultralytics checkpoint: one custom deformable-attention node per
MSDeformAttn, run by stock onnxruntime, with torch's outputs, and the onnx backend's detections
matching Ultralytics' predictor."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.ultralytics.conftest import UltralyticsCase
from tests.ultralytics.test_engine_parity import assert_engine_parity

DECODER_LAYERS = 6  # rtdetr-l.yaml: six decoder layers, one MSDeformAttn each


@pytest.fixture(scope="module")
def exported(ultralytics_case: UltralyticsCase, tmp_path_factory: pytest.TempPathFactory):
    from scripts.export_onnx import export_onnx

    output = tmp_path_factory.mktemp("ultralytics-onnx") / "rtdetr-l-random.onnx"
    summary = export_onnx(ultralytics_case.checkpoint, output, verify=False, log=lambda _: None)
    return output, summary


def test_export_has_the_custom_node(exported) -> None:
    output, summary = exported
    assert output.is_file()
    assert summary.custom_nodes == DECODER_LAYERS
    assert summary.functions == ["detr_serve::MultiscaleDeformableAttnPlugin_TRT"]
    assert summary.input_size == (640, 640)
    assert summary.inputs == ["pixel_values"]


def test_onnxruntime_matches_torch_on_the_images(
    exported, ultralytics_case: UltralyticsCase
) -> None:
    """The raw outputs of onnxruntime and eager torch on the pre-processed test images, query
    by query. This random model's encoder scores of many anchors nearly tie, so the 300 queries
    it selects may come in another order (a query's outputs are matched wherever it lands) and,
    at the edge of the selection, a query may trade places with the next one (at most 1 %)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from app.backends.ultralytics import load_checkpoint
    from app.engine.preprocess import Preprocessor
    from app.models.ultralytics import probe
    from tests.ultralytics.conftest import rgb

    checkpoint = probe(ultralytics_case.checkpoint)
    assert checkpoint is not None
    backend, _ = load_checkpoint(checkpoint, device="cpu", dtype="float32", msda_kernel=True)
    preprocess = Preprocessor(checkpoint.preprocess_spec(), torch.device("cpu"), torch.float32)
    images = [torch.from_numpy(rgb(d)).permute(2, 0, 1) for d in ultralytics_case.images]
    pixels, _ = preprocess(images)
    want = backend.infer(pixels, None)
    session = ort.InferenceSession(str(exported[0]), providers=["CPUExecutionProvider"])
    logits, boxes = session.run(["logits", "pred_boxes"], {"pixel_values": pixels.numpy()})
    want_logits, want_boxes = want.logits.numpy(), want.pred_boxes.numpy()
    assert logits.shape == want_logits.shape and boxes.shape == want_boxes.shape
    for image in range(len(images)):
        unmatched = 0
        for query in range(boxes.shape[1]):
            box_gap = np.abs(want_boxes[image] - boxes[image, query]).max(axis=1)
            nearest = int(box_gap.argmin())
            logit_gap = np.abs(want_logits[image, nearest] - logits[image, query]).max()
            if box_gap[nearest] > 1e-3 or logit_gap > 1e-2:
                unmatched += 1
        assert unmatched <= boxes.shape[1] // 100, (image, unmatched)


def test_onnx_backend_matches_ultralytics_predict(
    exported, ultralytics_case: UltralyticsCase
) -> None:
    output: Path = exported[0]
    assert_engine_parity(ultralytics_case, backend="onnx", onnx_path=output)


def test_default_export_lands_beside_the_checkpoint(ultralytics_case: UltralyticsCase) -> None:
    from app.export.cache import local_export, model_files

    checkpoint = ultralytics_case.checkpoint
    assert local_export(checkpoint) == checkpoint.with_name("rtdetr-l-random.onnx")
    assert local_export(checkpoint, "int8") == checkpoint.with_name("rtdetr-l-random.int8.onnx")
    assert model_files(checkpoint) == [checkpoint]
