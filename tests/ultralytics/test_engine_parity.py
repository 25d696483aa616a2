"""The engine on an Ultralytics checkpoint against Ultralytics' own predictor, in one process:
the same boxes, scores and classes (conftest.assert_parity), in one batch of several images, with
detr-serve's deformable attention op and with Ultralytics' own sampling."""

from __future__ import annotations

import pytest

from app.engine.tasks import DetectionTask, ImageDetections
from tests.ultralytics.conftest import (
    CONF,
    MAX_DET,
    UltralyticsCase,
    assert_parity,
    predictor_module,
    rgb,
)


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


def test_module_has_the_predictors_memory_format(ultralytics_case: UltralyticsCase) -> None:
    """The engine's model is in the memory format Ultralytics' predictor puts it in on this
    machine (channels-last on x86 CPUs with oneDNN since AutoBackend's `channels_last`): each
    format rounds the convolutions its own way, and on a chaotic model that shows."""
    import torch
    from ultralytics import RTDETR

    from app.backends.ultralytics import load_module
    from app.models.ultralytics import probe

    checkpoint = probe(ultralytics_case.checkpoint)
    assert checkpoint is not None
    ours = load_module(checkpoint, torch.device("cpu"))
    theirs = RTDETR(str(ultralytics_case.checkpoint))
    theirs.predict(rgb(ultralytics_case.images[2])[..., ::-1].copy(), verbose=False, save=False)
    net = predictor_module(theirs)
    for a, b in zip(ours.parameters(), net.parameters(), strict=True):
        assert a.shape == b.shape and a.stride() == b.stride()
