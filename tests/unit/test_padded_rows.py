"""Padded batches on the real tiny RT-DETR, on the CPU: every row of a batch of 3, 5 or 7
distinct images (pixels and JPEGs mixed), padded to the bucket of 4 or 8 and run through
(recorded) CUDA graphs, gets the answer its image gets alone, and no eager forward runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from app.backends.cuda_graphs import CudaGraphBackend
from app.engine.buckets import BatchBuckets
from app.engine.pipeline import DetectionTask, Engine, ImageDetections
from app.images.decode import decode_image, probe_plain_jpeg
from tests.conftest import shapes_image
from tests.unit.test_cuda_graphs import RecordingRuntime


def distinct_tasks(n: int, first_seed: int) -> list[DetectionTask]:
    """n different images of different sizes; every other one left encoded as a JPEG."""
    tasks = []
    for k in range(n):
        seed = first_seed + k
        data = shapes_image(96 + 16 * (seed % 5), 80 + 8 * (seed % 7), seed=seed)
        if k % 2:
            jpeg = probe_plain_jpeg(data, max_pixels=10**6, index=k)
            assert jpeg is not None
            tasks.append(DetectionTask(None, 0.0, 15, jpeg=jpeg))
        else:
            pixels = decode_image(data, max_pixels=10**6, index=k).pixels
            tasks.append(DetectionTask(pixels, 0.0, 15))
    return tasks


def assert_same(got: object, want: object) -> None:
    assert isinstance(got, ImageDetections) and isinstance(want, ImageDetections)
    np.testing.assert_allclose(got.scores, want.scores, atol=1e-4)
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_allclose(got.boxes, want.boxes, atol=1e-2)


@pytest.fixture(scope="module")
def engines(tiny_model_dir: Path) -> tuple[Engine, Engine, CudaGraphBackend]:
    alone = Engine.load(tiny_model_dir, name="tiny", device="cpu", dtype="float32")
    padded = Engine.load(tiny_model_dir, name="tiny", device="cpu", dtype="float32")
    graphs = CudaGraphBackend(padded.backend, warmup_runs=1, runtime=RecordingRuntime())
    assert graphs.capture([1, 2, 4, 8], 128, 128, with_mask=False), graphs.bucket_states()
    padded.backend, padded.buckets = graphs, BatchBuckets((1, 2, 4, 8), pad=True)
    return alone, padded, graphs


@pytest.mark.parametrize(("n", "bucket"), [(3, 4), (5, 8), (7, 8)])
def test_each_row_of_a_padded_batch_gets_its_own_images_answer(
    engines: tuple[Engine, Engine, CudaGraphBackend], n: int, bucket: int
) -> None:
    alone, padded, graphs = engines
    tasks = distinct_tasks(n, first_seed=10 * n)
    eager_before, replays_before = graphs.eager_batches, graphs.graph_batches
    got = padded.run_batch(tasks)
    assert graphs.eager_batches == eager_before  # no eager forward once graphs serve
    assert graphs.graph_batches == replays_before + 1
    singles = [alone.run_batch([task])[0] for task in tasks]
    for row, (g, want) in enumerate(zip(got, singles, strict=True)):
        assert isinstance(g, ImageDetections) and g.batch_size == n
        assert_same(g, want)
        # The rows are told apart: another image's answer does not pass for this one.
        other = singles[(row + 1) % n]
        assert isinstance(other, ImageDetections)
        assert not np.allclose(g.scores, other.scores, atol=1e-4), row


def test_padding_rows_never_reach_the_answers(
    engines: tuple[Engine, Engine, CudaGraphBackend],
) -> None:
    _, padded, _ = engines
    assert padded.buckets is not None
    seen: list[tuple[int, ...]] = []
    inner = padded.backend.infer

    def spy(pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None):
        seen.append(tuple(pixel_values.shape))
        return inner(pixel_values, pixel_mask)

    padded.backend.infer = spy  # type: ignore[method-assign]
    try:
        results = padded.run_batch(distinct_tasks(5, first_seed=99))
    finally:
        del padded.backend.infer
    assert seen == [(8, 3, 128, 128)] and len(results) == 5
