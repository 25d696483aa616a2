"""The engine's three stages with fakes: two batches overlap (one prepares while the other
computes), each stage takes one batch at a time, batches are padded to their bucket, and an
image that cannot be decoded fails alone."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from app.backends.base import RawOutputs
from app.engine.buckets import BatchBuckets
from app.engine.pipeline import Engine
from app.engine.postprocess import Postprocessor, PostprocessSpec
from app.engine.tasks import DetectionTask, ImageDetections, ModelInfo
from app.errors import InvalidImageError
from app.images.decode import EncodedJpeg
from tests.conftest import shapes_image

QUERIES, CLASSES = 6, 3


class Recorder:
    """Intervals of every stage call, and the peak number of concurrent calls per stage."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.calls: list[str] = []

    def enter(self, stage: str) -> None:
        with self.lock:
            self.running[stage] = self.running.get(stage, 0) + 1
            self.peak[stage] = max(self.peak.get(stage, 0), self.running[stage])
            self.calls.append(stage)

    def leave(self, stage: str) -> None:
        with self.lock:
            self.running[stage] -= 1


class FakePreprocessor:
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.second_batch_started = threading.Event()
        self.batches = 0

    def __call__(
        self, images: Sequence[torch.Tensor], source_sizes: object = None
    ) -> tuple[torch.Tensor, None]:
        self.recorder.enter("prepare")
        self.batches += 1
        if self.batches == 2:
            self.second_batch_started.set()
        time.sleep(0.02)
        self.recorder.leave("prepare")
        return torch.zeros((len(images), 3, 8, 8)), None


class FakeBackend:
    name = "fake"
    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, recorder: Recorder, wait_for: threading.Event | None = None) -> None:
        self.recorder = recorder
        self.wait_for = wait_for
        self.batch_sizes: list[int] = []
        self.overlapped: bool | None = None

    def infer(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None) -> RawOutputs:
        self.recorder.enter("compute")
        self.batch_sizes.append(pixel_values.shape[0])
        if self.wait_for is not None and len(self.batch_sizes) == 1:
            # The first forward pass holds on until the second batch is being prepared: with
            # one lock for the whole batch that never happens and this times out (False).
            self.overlapped = self.wait_for.wait(30)
        time.sleep(0.02)
        n = pixel_values.shape[0]
        self.recorder.leave("compute")
        return RawOutputs(torch.zeros((n, QUERIES, CLASSES)), torch.full((n, QUERIES, 4), 0.5))


def fake_engine(wait_for_second_batch: bool = False) -> tuple[Engine, FakeBackend, Recorder]:
    recorder = Recorder()
    pre = FakePreprocessor(recorder)
    backend = FakeBackend(recorder, pre.second_batch_started if wait_for_second_batch else None)
    info = ModelInfo("fake", "fake", "cpu", "float32", {0: "a", 1: "b", 2: "c"}, "Fake")
    engine = Engine(backend, pre, Postprocessor(PostprocessSpec("sigmoid", QUERIES)), info)  # type: ignore[arg-type]
    return engine, backend, recorder


def pixels_task(height: int = 48, width: int = 64) -> DetectionTask:
    return DetectionTask(np.zeros((height, width, 3), np.uint8), 0.0, 5)


def test_next_batch_is_prepared_while_the_current_one_computes() -> None:
    engine, backend, recorder = fake_engine(wait_for_second_batch=True)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(engine.run_batch, [pixels_task()] * 2)
        while "compute" not in recorder.calls:
            time.sleep(0.001)
        second = pool.submit(engine.run_batch, [pixels_task()] * 3)
        results = first.result(60) + second.result(60)
    assert backend.overlapped, "the first forward pass waited for the second prepare"
    assert len(results) == 5 and all(isinstance(r, ImageDetections) for r in results)
    assert backend.batch_sizes == [2, 3]


def test_each_stage_takes_one_batch_at_a_time() -> None:
    engine, _, recorder = fake_engine()
    with ThreadPoolExecutor(4) as pool:
        outputs = list(pool.map(engine.run_batch, [[pixels_task()] * n for n in (1, 2, 3, 4)]))
    assert [len(o) for o in outputs] == [1, 2, 3, 4]
    assert recorder.peak == {"prepare": 1, "compute": 1}


def test_batches_are_padded_to_their_bucket_and_the_padding_rows_dropped() -> None:
    engine, backend, _ = fake_engine()
    engine.buckets = BatchBuckets((1, 2, 4, 8), pad=True)
    results = engine.run_batch([pixels_task()] * 3)
    assert backend.batch_sizes == [4]
    assert len(results) == 3 and all(r.batch_size == 3 for r in results)  # type: ignore[union-attr]
    engine.buckets = engine.buckets.with_padding(False)
    engine.run_batch([pixels_task()] * 3)
    assert backend.batch_sizes == [4, 3]


def test_an_undecodable_jpeg_fails_alone_and_keeps_its_place() -> None:
    engine, backend, _ = fake_engine()
    good = shapes_image(64, 48)
    broken = EncodedJpeg(good[: len(good) // 3], 48, 64, index=1)
    tasks = [
        pixels_task(),
        DetectionTask(None, 0.0, 5, jpeg=broken),
        DetectionTask(None, 0.0, 5, jpeg=EncodedJpeg(good, 48, 64, index=2)),
    ]
    results = engine.run_batch(tasks)
    assert isinstance(results[0], ImageDetections) and isinstance(results[2], ImageDetections)
    assert isinstance(results[1], InvalidImageError) and results[1].image_index == 1
    assert backend.batch_sizes == [2]


def test_a_batch_of_only_undecodable_images_never_reaches_the_model() -> None:
    engine, backend, _ = fake_engine()
    (result,) = engine.run_batch(
        [DetectionTask(None, 0.0, 5, jpeg=EncodedJpeg(b"\xff\xd8\xff", 4, 4, 0))]
    )
    assert isinstance(result, InvalidImageError)
    assert backend.batch_sizes == []


def test_a_task_holds_pixels_or_a_jpeg() -> None:
    with pytest.raises(ValueError, match="either pixels or a JPEG"):
        DetectionTask(None, 0.5, 5)


def test_a_batch_of_tiles_only_goes_to_the_backends_infer_tiles() -> None:
    engine, backend, _ = fake_engine()
    calls: list[int] = []

    def infer_tiles(pixel_values, pixel_mask):  # type: ignore[no-untyped-def]
        calls.append(pixel_values.shape[0])
        return backend.infer(pixel_values, pixel_mask)

    backend.infer_tiles = infer_tiles  # type: ignore[attr-defined]
    tile = dataclasses.replace(pixels_task(), tile=True)
    engine.run_batch([tile, tile, tile])
    engine.run_batch([tile, pixels_task()])  # mixed: the plain path
    engine.run_batch([pixels_task()])
    assert calls == [3]
    assert backend.batch_sizes == [3, 2, 1]
