"""The engine on the tiny real model: shapes, clipping, class masks, out-of-memory splitting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.backends.base import RawOutputs
from app.engine.pipeline import Engine
from app.engine.tasks import DetectionTask, DeviceOutOfMemoryError


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Engine:
    return Engine.load(tiny_model_dir, name="tiny", device="cpu")


def task(height: int = 240, width: int = 320, **kw) -> DetectionTask:
    pixels = np.random.default_rng(height * width).integers(0, 255, (height, width, 3), np.uint8)
    return DetectionTask(pixels, kw.pop("threshold", 0.0), kw.pop("max_detections", 50), **kw)


def test_one_result_per_image_with_boxes_inside_each_image(engine: Engine) -> None:
    results = engine.run_batch([task(240, 320), task(500, 200), task(64, 900)])
    assert len(results) == 3
    for res, (h, w) in zip(results, [(240, 320), (500, 200), (64, 900)], strict=True):
        assert not isinstance(res, Exception)
        assert len(res.scores) == len(res.labels) == len(res.boxes) <= 50
        assert (res.boxes[:, 0::2] >= 0).all() and (res.boxes[:, 0::2] <= w).all()
        assert (res.boxes[:, 1::2] >= 0).all() and (res.boxes[:, 1::2] <= h).all()
        assert res.batch_size == 3


def test_class_filter_keeps_only_the_asked_classes(engine: Engine) -> None:
    (res,) = engine.run_batch([task(class_ids=frozenset({2}))])
    assert not isinstance(res, Exception)
    assert len(res.labels) > 0 and set(res.labels.tolist()) == {2}


class OomAbove:
    """Wraps a backend; raises torch.OutOfMemoryError for batches larger than `limit`."""

    def __init__(self, inner, limit: int) -> None:
        self.inner, self.limit = inner, limit
        self.name, self.device, self.dtype = inner.name, inner.device, inner.dtype
        self.sizes: list[int] = []

    def infer(self, pixel_values: torch.Tensor, pixel_mask) -> RawOutputs:
        self.sizes.append(pixel_values.shape[0])
        if pixel_values.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.inner.infer(pixel_values, pixel_mask)


def test_out_of_memory_splits_the_batch_and_retries(engine: Engine) -> None:
    fake = OomAbove(engine.backend, limit=2)
    oom_engine = Engine(fake, engine.preprocessor, engine.postprocessor, engine.info)
    results = oom_engine.run_batch([task() for _ in range(5)])
    assert len(results) == 5 and not any(isinstance(r, Exception) for r in results)
    assert fake.sizes == [5, 2, 3, 1, 2]


def test_image_that_does_not_fit_alone_fails_only_itself(engine: Engine) -> None:
    fake = OomAbove(engine.backend, limit=0)
    oom_engine = Engine(fake, engine.preprocessor, engine.postprocessor, engine.info)
    results = oom_engine.run_batch([task(), task()])
    assert all(isinstance(r, DeviceOutOfMemoryError) for r in results)


def test_torch_backend_runs_convolutions_in_the_fastest_memory_format(tiny_model_dir) -> None:
    """On an x86 CPU with oneDNN the model's convolution weights are channels-last
    (conv_memory_format), and its outputs are the NCHW model's up to float rounding."""
    import platform

    from app.backends.torch_backend import TorchBackend, conv_memory_format

    backend = TorchBackend.load(tiny_model_dir, device="cpu", msda_kernel=True)
    convs = [m for m in backend.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs
    fmt = conv_memory_format(torch.device("cpu"))
    if platform.machine() in {"AMD64", "x86_64"} and torch.backends.mkldnn.is_available():
        assert fmt == torch.channels_last  # this project's CI machines
    for conv in convs:
        assert conv.weight.is_contiguous(memory_format=fmt)
    pixels = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    got = backend.infer(pixels, None)
    backend.model.to(memory_format=torch.contiguous_format)
    want = backend.infer(pixels, None)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.pred_boxes, want.pred_boxes, atol=1e-5, rtol=1e-4)
