"""The engine on an Ultralytics checkpoint against Ultralytics' own predictor, in one process:
the same boxes (1 px), scores (1e-3) and classes, in one batch of several images, with
detr-serve's deformable attention op and with Ultralytics' own sampling."""

from __future__ import annotations

import numpy as np
import pytest

from app.engine.tasks import DetectionTask, ImageDetections
from tests.ultralytics.conftest import Reference, UltralyticsCase, rgb

CONF = 0.25  # Ultralytics' default conf: predict keeps score > conf
MAX_DET = 300  # Ultralytics' default max_det


def assert_parity(got: ImageDetections | dict, want: Reference) -> None:
    """The same detections: as many, the top five in the same order, and each of Ultralytics'
    matched one to one by one of ours with the same class, its score within 1e-3 and its box
    within 1 px (below the top, scores closer than 1e-6 may trade places)."""
    if isinstance(got, dict):  # a /v1 answer's result
        dets = got["detections"]
        scores = np.array([d["score"] for d in dets], np.float32)
        labels = np.array([d["class_id"] for d in dets], np.int64)
        boxes = np.array([d["box"] for d in dets], np.float32).reshape(-1, 4)
    else:
        scores, labels, boxes = got.scores, got.labels, got.boxes
    assert len(scores) == len(want.scores) > 0, (len(scores), len(want.scores))
    np.testing.assert_array_equal(labels[:5], want.classes[:5])
    np.testing.assert_allclose(scores[:5], want.scores[:5], atol=1e-3, rtol=0)
    free = set(range(len(scores)))
    for score, label, box in zip(want.scores, want.classes, want.boxes, strict=True):
        match = next(
            (
                j
                for j in sorted(free)
                if labels[j] == label
                and abs(scores[j] - score) <= 1e-3
                and np.abs(boxes[j] - box).max() <= 1.0
            ),
            None,
        )
        assert match is not None, f"no match for class {label} score {score} box {box}"
        free.remove(match)


def assert_engine_parity(case: UltralyticsCase, **load: object) -> None:
    """The engine loaded with `load`, on all the images in one batch, against the references."""
    from app.engine.pipeline import Engine

    engine = Engine.load(case.checkpoint, name="rtdetr-l-random", device="cpu", **load)
    assert engine.info.labels[0] == "0" and len(engine.info.labels) == 80
    assert engine.info.architecture.startswith("RTDETRDetectionModel (Ultralytics")
    assert engine.info.backend == load["backend"]
    tasks = [DetectionTask(rgb(data), CONF, MAX_DET) for data in case.images]
    results = engine.run_batch(tasks)  # one batch of all the images
    assert len(results) == len(tasks)
    for got, want in zip(results, case.references, strict=True):
        assert isinstance(got, ImageDetections), got
        assert got.batch_size == len(tasks)
        assert_parity(got, want)


@pytest.mark.parametrize("msda_kernel", [True, False], ids=["detr-serve-op", "ultralytics-op"])
def test_engine_batch_matches_ultralytics_predict(
    ultralytics_case: UltralyticsCase, msda_kernel: bool
) -> None:
    assert_engine_parity(ultralytics_case, backend="torch", msda_kernel=msda_kernel)


def test_msda_patch_replaces_ultralytics_sampling(ultralytics_case: UltralyticsCase) -> None:
    """Every MSDeformAttn of the decoder runs detr-serve's op after install_msda, and gives
    Ultralytics' multi_scale_deformable_attn_pytorch's output."""
    import torch
    from ultralytics.nn.modules.transformer import MSDeformAttn
    from ultralytics.nn.modules.utils import multi_scale_deformable_attn_pytorch

    from app.backends.ultralytics import UltralyticsDetector, load_module
    from app.models.ultralytics import probe
    from app.ops.patch import install_msda, ms_deform_attn_ultralytics

    checkpoint = probe(ultralytics_case.checkpoint)
    assert checkpoint is not None
    detector = UltralyticsDetector(load_module(checkpoint, torch.device("cpu")))
    attns = [m for m in detector.modules() if isinstance(m, MSDeformAttn)]
    assert attns
    assert install_msda(detector) == len(attns)
    calls: list[int] = []
    original = torch.ops.detr_serve.ms_deform_attn

    # The op is called through app.ops.msda.ms_deform_attn: count the calls that reach it.
    import app.ops.patch as patch

    def counting(*args: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return original(*args)

    saved = patch.ms_deform_attn
    patch.ms_deform_attn = counting
    try:
        with torch.inference_mode():
            detector(torch.rand(1, 3, 320, 320))
    finally:
        patch.ms_deform_attn = saved
    assert len(calls) == len(attns)

    # The op against Ultralytics' function, in the layout the installed version takes (levels
    # and points folded into one axis since 8.4.x, apart before), ours in both.
    import inspect

    folded = "num_total_points" in inspect.getsource(multi_scale_deformable_attn_pytorch)
    generator = torch.Generator().manual_seed(0)
    shapes = [(8, 8), (4, 4), (2, 2)]
    value = torch.randn(2, sum(h * w for h, w in shapes), 8, 16, generator=generator)
    loc = torch.rand(2, 5, 8, 3, 4, 2, generator=generator) * 1.2 - 0.1
    weights = torch.rand(2, 5, 8, 3, 4, generator=generator)
    if folded:
        theirs = multi_scale_deformable_attn_pytorch(
            value, shapes, loc.reshape(2, 5, 8, 12, 2), weights.reshape(2, 5, 8, 12)
        )
    else:
        theirs = multi_scale_deformable_attn_pytorch(value, shapes, loc, weights)
    for layout in [(loc, weights), (loc.reshape(2, 5, 8, 12, 2), weights.reshape(2, 5, 8, 12))]:
        ours = ms_deform_attn_ultralytics(value, shapes, *layout)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
